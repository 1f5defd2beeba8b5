"""The training process's host memory: what a step frees is kept for the next step, not given back to the OS.

Why: a CPU training step allocates and frees the same large buffers every step (activations and their
gradients; lraspp's logits for 4 images at 480 px alone are 4 x 21 x 480 x 480 floats, 77 MB). With glibc's
defaults every block above the mmap threshold (at most 32 MB) is mapped on its own and unmapped when freed, and
free memory at the heap's top is given back past the trim threshold, so each step faults the same pages in
again, every one zeroed by the kernel: system time the reference scripts pay too. Kept, the pages are reused.
Measured on bench/vs_reference.py's runs (BENCHMARKS.md, "Host memory kept between steps"): segmentation's
page faults 7.9 M -> 1.6 M and system time 16.7 s -> 4.2 s of a 75-90 s run; peak memory +10-13%.

These are glibc's own tunables (mallopt), the knob PyTorch's CPU performance notes turn by preloading jemalloc
or tcmalloc, with nothing to install. Another C library (musl, macOS's): nothing changes. DataLoader workers
forked after the call inherit the setting; spawned ones keep the defaults.
"""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

# mallopt's parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_KEEP = {
    _M_MMAP_MAX: 0,  # no block mapped on its own: each comes from the heap, where a freed one is reused
    _M_TRIM_THRESHOLD: 2 ** 31 - 1,  # the heap's free top given back only past 2 GiB (mallopt takes an int)
    _M_TOP_PAD: 64 << 20,  # the heap grown 64 MiB at a time while the first steps find their peak
}
# glibc's defaults (malloc/malloc.c: DEFAULT_MMAP_MAX, DEFAULT_TRIM_THRESHOLD, DEFAULT_TOP_PAD). Setting them
# again leaves the dynamic mmap threshold off (fixed where it stood), as any explicit setting does.
_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024}


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> bool:
    """From now on, memory this process frees stays with it for reuse (glibc); False where nothing changed."""
    libc = _glibc()
    if libc is None:
        return False
    return any([libc.mallopt(param, value) == 1 for param, value in _KEEP.items()])  # each one tried


def give_back_kept_memory() -> None:
    """glibc's defaults again, and the free memory kept so far given back to the OS: a notebook or a sweep that
    called train() in its own process does not hold the run's peak afterwards."""
    libc = _glibc()
    if libc is None:
        return
    for param, value in _DEFAULTS.items():
        libc.mallopt(param, value)
    libc.malloc_trim(0)


@contextmanager
def kept(on: bool = True) -> Iterator[bool]:
    """Freed memory kept for the block's duration (if `on`), glibc's defaults again after it; yields whether
    the setting took. For a command that runs one block (`trainer eval`, `trainer predict`): an evaluation's
    forward passes free and allocate the same large activations per batch as training's steps do."""
    held = on and keep_freed_memory()
    try:
        yield held
    finally:
        if held:
            give_back_kept_memory()
