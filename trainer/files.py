"""Writing files so that a crash, a full disk or a stop request never leaves half of one behind.

Every file the trainer writes goes through here: written under a temporary sibling name (`.NAME.tmp-PID`),
optionally fsynced, then renamed over the target in one step. On any failure (an exception, a full disk,
a stop signal raised mid-write) the temporary is removed and the target is untouched. `fsync=True` is for
what a resume depends on (checkpoints and their pointer); the rest is only renamed (a crash loses at most
the newest version, never the old one).
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

import xxhash

from trainer.errors import TrainerError

# errors that mean "this location cannot take our files", as opposed to a bug: one line for the user
DISK_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted", errno.ENOTDIR: "a path component is a file, not a folder",
               errno.EISDIR: "it is a folder", errno.ENAMETOOLONG: "file name too long"}


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def atomic_write(path: Union[str, Path], data: Union[str, bytes], fsync: bool = False) -> None:
    """Replace `path` with `data` in one rename; nothing is left behind on failure."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException as err:  # also a stop request raised mid-write: never leave the temporary
        _remove(tmp)
        if isinstance(err, OSError):
            raise disk_error(err, path) from None
        raise


def atomic_write_json(path: Union[str, Path], obj, fsync: bool = False) -> None:
    atomic_write(path, json.dumps(obj, indent=1, default=str) + "\n", fsync=fsync)


@contextmanager
def atomic_dir(target: Union[str, Path], fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces `target` in one rename (the old
    version moved aside first, removed last); on failure it is removed and `target` is as it was.

    Whatever the old folder holds that the new one does not (a user's notes, an earlier report) is then
    carried into the new one, so replacing a folder never deletes a file the caller did not write anew: the
    temporary folder only ever holds our own files, and until every such file is carried over the old folder
    (`.NAME.old-PID`) stays, where rundir.clean_leftovers finishes the job after a kill. A `target` that is a
    symbolic link is replaced as a link: the folder it points to is never touched."""
    target = Path(target)
    tmp = temp_name(target)
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        yield tmp
        if fsync:
            for f in tmp.iterdir():
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            fsync_dir(tmp)
        if os.path.lexists(target):
            os.rename(target, old)
        os.rename(tmp, target)
        if fsync:
            fsync_dir(target.parent)
    except BaseException as err:
        _remove(tmp)
        if os.path.lexists(old) and not os.path.lexists(target):  # the swap was cut between its two renames
            os.rename(old, target)
        if isinstance(err, OSError):
            raise disk_error(err, target) from None
        raise
    stuck = carry_over(old, target)
    if stuck:
        raise TrainerError(f"{target} was replaced, but {len(stuck)} file(s) of its old version could not be moved "
                           f"into it ({stuck[0][0]}: {stuck[0][1]}); they are kept in {old}")
    _remove(old)


def carry_over(old: Path, target: Path) -> list:
    """Move what the folder `old` holds that the folder `target` does not into `target` (nothing when `old` is
    a link or no folder); returns (name, why) of what could not be moved."""
    stuck = []
    if old.is_dir() and not old.is_symlink():
        for entry in sorted(old.iterdir()):
            if not os.path.lexists(target / entry.name):
                try:
                    os.rename(entry, target / entry.name)
                except OSError as err:
                    stuck.append((entry.name, err.strerror or str(err)))
    return stuck


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


def writes_to(path: Union[str, Path], fn: Callable[[], object]):
    """Run `fn`, turning a file-system error on `path` into one line (see `disk_error`)."""
    try:
        return fn()
    except OSError as err:
        raise disk_error(err, path) from None


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
