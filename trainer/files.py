"""File primitives: one-line wording of file-system errors, checksums, reading the user's text files and
safetensors (never a pickle), fsync of a folder.

Writing is the write gate's (trainer/outputs.py): every file any command writes, replaces or deletes goes
through it, under one policy; it uses these primitives.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import xxhash

from trainer.errors import TrainerError

# errors that mean "this location cannot take our files", as opposed to a bug: one line for the user
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a folder",
               errno.EISDIR: "it is a folder", errno.ENAMETOOLONG: "file name too long"}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What detects bit rot and truncation in checkpoints: xxHash's XXH3, 128 bits (`xxhsum -H2 FILE` checks one by
# hand). Not for tampering (loading runs no code anyway), for speed: 10.4 GB/s here against sha256's 1.0 GB/s,
# so verifying a 293 MB ResNet-50 + AdamW checkpoint costs ~0.03 s instead of ~0.3 s (bench/checkpoint_io.py).
CHECKSUM = "xxh3_128"


def checksum_bytes(data: bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def checksum_file(path: Union[str, Path]) -> str:
    """Of the whole file, read through a memory map (no copy into Python: 3x faster than reads here)."""
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return checksum_bytes(b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_128_hexdigest(view)


def disk_error(err: OSError, path: Union[str, Path, None] = None) -> Exception:
    """A file-system error as one line naming the place (a TrainerError), or the error itself if it is not
    one of the "this location cannot take it" kind."""
    reason = DISK_ERRORS.get(err.errno)
    if reason is None:
        return err
    where = path or err.filename
    return TrainerError(f"cannot write {where}: {reason}" + (
        "; free some space (the previous files are intact) and run the same command again"
        if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""))


@contextmanager
def safetensors_os_errors(path: Union[str, Path]) -> Iterator[None]:
    """Around safetensors' `save_file`: its writer (Rust) reports a failed write (a full disk) as a
    SafetensorError whose text holds "(os error 28)", not as an OSError, so the callers that turn OSErrors into
    one line (atomic_dir, disk_error) would let it through as a traceback. Re-raised here as the OSError it
    stands for; a SafetensorError without an OS error (a bug) goes through unchanged."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def read_json(path: Union[str, Path], default=None):
    """A JSON file of ours, or `default` ({} if not given) when it is absent or unreadable (cut by a crash)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {} if default is None else default


def read_lines(path: Union[str, Path], what: str) -> list:
    """A text file the user wrote (a class list, a list of inputs): its non-blank lines, stripped; a file that
    is not UTF-8 (UTF-16 is what PowerShell's `>` writes) or not readable is one line naming it."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # -sig: a BOM (Notepad's UTF-8) is not a name
    except UnicodeDecodeError as err:
        raise TrainerError(f"{what} {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                           f"{err.start}); save it as UTF-8") from None
    except OSError as err:
        raise TrainerError(f"cannot read {what} {path}: {err.strerror or err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def is_pickle(path: Union[str, Path]) -> bool:
    """A pickle (protocol 2-5: 0x80 and the protocol number) or torch.save's zip container, and not a
    safetensors file: one of those starts with its header length (8 bytes, little-endian) and then "{", and
    that length's low byte can be 0x80 too, so the magic alone would refuse 1 in 256 good files."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= path.stat().st_size:
        return False
    return (len(head) >= 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)) or head.startswith(b"PK\x03\x04")


def load_safetensors(path: Union[str, Path], what: str) -> dict:
    """Tensors from a .safetensors file, or one line saying why not. Nothing else is ever parsed as weights,
    so a pickle (of any protocol, whatever its file name) is refused rather than run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if is_pickle(path):
        raise TrainerError(f"{what} {path} is a pickle (torch.save) file; loading it could run code, so it is "
                           f"refused. Save weights with safetensors")
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise TrainerError(f"{what} {path} is not a readable safetensors file (truncated, damaged, or another "
                           f"format such as a pickle, which is refused): {err}") from None
    except OSError as err:
        raise TrainerError(f"cannot read {what} {path}: {err.strerror or err}") from None
