"""The scan of an image folder (its classes and files per split, the paths its walk skipped) and what verifying
its files found, cached in one file, so that a restart, a requeue or the other ranks of a run read one file
instead of walking and checking a million files again.

Where: data.cache_dir, by default $TRAINER_CACHE_DIR, else the user's cache ($XDG_CACHE_HOME/cnn-trainer, else
~/.cache/cnn-trainer), in manifests/: one file per data folder, named by a hash of the folder's real path. Never in
the data folder: it may be read-only or shared, and nothing of ours is written into a user's data.

When it is used: only if nothing in the tree changed since. Every folder the scan listed (the root, each split
and class folder, every subfolder, the targets of symlinked folders) is recorded with its modification time
(st_mtime_ns); a file added, removed or renamed, or a folder added, removed or renamed, changes the time of
the folder that holds it, so at each start every recorded folder is stat-ed (about a thousand for ImageNet,
against 1.3 million files) and any difference means a fresh scan. What this cannot see: a file rewritten in
place under the same name. Such a file is met when it is read, as with data.verify_images=off.

Format: one numpy .npz (no pickle: loaded with allow_pickle=False), written atomically: a JSON header (as
uint8) with the classes, folders, skipped paths and verification results, and per split the paths as one
UTF-8 buffer with offsets and the labels as int64.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from trainer.data.datasets import PathTable
from trainer.data.folders import Sample, SkippedPath
from trainer.errors import TrainerError
from trainer.outputs import Inputs, open_folder

# of the scan and of this file's layout: another version is scanned again. 2: every path to a file is listed (a
# version 1 scan dropped a second path to a file: a hardlink, or a symlink to a file, lost its samples)
VERSION = 2


def cache_file(root, cache_dir: str, inputs: Optional[Inputs] = None) -> Optional[Path]:
    """The manifest's path for this data folder, or None with data.cache_dir=off. A cache inside the data (or
    another input) is refused: its files would become part of the data."""
    if cache_dir == "off":
        return None
    base = Path(cache_dir or os.environ.get("TRAINER_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cnn-trainer"))
    if inputs is not None:
        inputs.check(base / "manifests", "data.cache_dir")
    key = hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return base / "manifests" / f"{key}.npz"


UNCHECKED, HEADER_OK, DECODES, BAD = 0, 1, 2, 3  # what is known of each file (a full decode answers a header check)


class Manifest:
    """What a scan found (`splits`: the samples of each split folder, before any held-out part is split off)
    and, per file, what verification found (`status`, one uint8 per sample; `reasons` of the bad ones)."""

    def __init__(self, root: str, classes: List[str], splits: Dict[str, List[Sample]], folders: Dict[str, int],
                 skipped: List[SkippedPath], status: Optional[Dict[str, np.ndarray]] = None,
                 reasons: Optional[Dict[str, str]] = None):
        self.root, self.classes, self.splits, self.folders, self.skipped = root, classes, splits, folders, skipped
        self.status = status or {name: np.zeros(len(s), dtype=np.uint8) for name, s in splits.items()}
        self.reasons = reasons or {}
        self._where: Optional[Dict[str, Tuple[str, int]]] = None
        self.changed = True  # not yet written as it is

    def _positions(self, samples: List[Sample]) -> List[Tuple[str, int]]:
        if self._where is None:  # path -> (split, index): built once, when a check is asked
            self._where = {p: (name, i) for name, s in self.splits.items() for i, (p, _) in enumerate(s)}
        return [self._where[p] for p, _ in samples]

    def known_bad(self, samples: List[Sample], full: bool) -> Optional[Dict[str, str]]:
        """{path: why} of the bad ones among `samples` if every one of them was checked at least as thoroughly
        as asked; else None (they are checked again)."""
        need = DECODES if full else HEADER_OK
        for name, index in self._positions(samples):
            if self.status[name][index] < need:
                return None
        return {p: self.reasons[p] for p, _ in samples if p in self.reasons}

    def record(self, samples: List[Sample], full: bool, bad: Dict[str, str]) -> None:
        for (path, _), (name, index) in zip(samples, self._positions(samples)):
            if path in bad:
                self.status[name][index], self.reasons[path] = BAD, bad[path]
            else:
                self.status[name][index] = max(int(self.status[name][index]), DECODES if full else HEADER_OK)
        self.changed = True


def save(path: Path, manifest: Manifest) -> Optional[str]:
    """Write it (atomically); a cache that cannot be written (read-only home, full disk) is not an error for
    the run: returns why, else None."""
    header = {"version": VERSION, "root": manifest.root, "classes": manifest.classes, "folders": manifest.folders,
              "skipped": [list(s) for s in manifest.skipped], "reasons": manifest.reasons,
              "splits": list(manifest.splits)}
    arrays = {"header": np.frombuffer(json.dumps(header).encode("utf-8", "surrogateescape"), dtype=np.uint8)}
    for i, (name, samples) in enumerate(manifest.splits.items()):
        buffer, offsets = PathTable([p for p, _ in samples]).arrays()
        arrays[f"paths_{i}"], arrays[f"offsets_{i}"] = buffer, offsets
        arrays[f"labels_{i}"] = np.array([label for _, label in samples], dtype=np.int64)
        arrays[f"status_{i}"] = manifest.status[name]
    out = io.BytesIO()
    np.savez(out, **arrays)
    try:  # its own folder (new, empty, or the cache's): never a file of someone else's
        open_folder(path.parent, "cache", "train", "data.cache_dir", what="a cache folder of the trainer").write(
            path.name, out.getvalue())
    except (OSError, TrainerError) as err:  # (the gate words a full or read-only disk as a TrainerError)
        manifest.changed = False  # said once
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return f"cannot cache the scan of {manifest.root} in {path.parent}: {why} (see data.cache_dir)"
    manifest.changed = False
    return None


def load(path: Optional[Path], root) -> Optional[Manifest]:
    """The cached scan of `root` if there is one and nothing in the tree changed since; else None."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(npz["header"].tobytes().decode("utf-8", "surrogateescape"))
            if header.get("version") != VERSION or header.get("root") != str(root):
                return None
            for folder, mtime in header["folders"].items():
                if os.stat(folder).st_mtime_ns != mtime:
                    return None
            splits = {name: list(zip(PathTable.from_buffers(npz[f"paths_{i}"], npz[f"offsets_{i}"]).tolist(),
                                     npz[f"labels_{i}"].tolist()))
                      for i, name in enumerate(header["splits"])}
            status = {name: np.array(npz[f"status_{i}"]) for i, name in enumerate(header["splits"])}
    except (OSError, ValueError, KeyError, TypeError):  # gone, cut short, another layout: scan again
        return None
    manifest = Manifest(header["root"], header["classes"], splits, header["folders"],
                        [SkippedPath(*s) for s in header["skipped"]], status, header["reasons"])
    manifest.changed = False
    return manifest
