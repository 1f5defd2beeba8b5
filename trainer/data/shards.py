"""Packed shards of an image folder: `trainer pack SRC DEST` writes them, data.format=shards trains from them.

Why: a million small files cost a million opens per epoch and per rank, which shared cluster file systems
serve slowly and their administrators ration (../shared/docs/tuning-and-data-at-scale.md, part B). A few
hundred large files cost a few hundred.

Format: Arrow IPC files (pyarrow), each holding about `shard_mb` of images in rows of three columns: `image`
(the file's bytes exactly as they were: nothing re-encoded), `label` (int64) and `path` (relative to SRC):
any Arrow tool reads them. Where each image's bytes lie in its shard (offset, length) is recorded when packing,
in `rows.arrow` with every row's shard, label and path, so reading an image is one positioned read (pread) of
its bytes: any row at any time (map-style), so the sampler, the per-sample augmentation seeds, exact resume,
evaluation and the metrics are those of the folder path, whatever the number of workers or ranks. Not through
Arrow's readers at training time: a memory-mapped Arrow read asks the kernel for a whole record batch's pages
(measured: opening a 131 MB shard that way made it all resident), which at ImageNet scale would read every
shard at a start.

Chosen over: Hugging Face `datasets` (the same Arrow files underneath, but pandas, dill, multiprocess and
huggingface_hub on top, and a cache of its own); WebDataset tars (read in sequence: the order and an exact
resume then depend on the worker count and shard order); MosaicML streaming and FFCV (formats and machinery
of their own, for the same result here).

DEST holds `<split>-NNNNN.arrow`, `rows.arrow` and `index.json` (written last, atomically): the classes, per
split the shards with their rows and bytes, the files left out as unreadable. Until it is written,
`.plan.json` says which files go into which shard, so a pack cut short (or stopped by an unreadable file,
fixed since) is resumed by the same command: a finished shard is kept when it holds the files planned for it
(each records the digest of their names, labels and sizes), and written again otherwise.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.data.datasets import PathTable, _SeededDataset
from trainer.data.folders import Sample, _check_one, decode_bytes, image_error, scan_imagefolder
from trainer.errors import DataError, TrainerError
from trainer.files import atomic_write, atomic_write_json, read_json

VERSION = 1
INDEX, PLAN, ROWS = "index.json", ".plan.json", "rows.arrow"
MAX_SHARD_MB = 1024
MAX_OPEN_SHARDS = 256  # per process (each DataLoader worker): ImageNet packs into ~550 shards of 256 MiB
READ_THREADS = 8  # reads overlap (latency-bound on a network file system); PIL's decode releases the GIL


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 (the submodule)
    except ImportError:
        raise TrainerError("packed shards need pyarrow: pip install -e '.[shards]' (or pip install pyarrow)") from None
    return pyarrow


# ---- packing ----

def _plan(src: Path, shard_mb: float) -> Tuple[dict, Dict[str, List[Sample]]]:
    """Which files go into which shard: consecutive files of a split (sorted by class, then path) until the
    shard holds `shard_mb`. A pure function of the listing, so a resumed pack makes the same shards. Returns
    the plan and the scanned samples of each split."""
    classes, splits = scan_imagefolder(src)
    limit = shard_mb * 2**20
    plan = {"version": VERSION, "source": str(src.resolve()), "classes": classes, "shard_mb": shard_mb,
            "splits": {}}
    listing = hashlib.sha256()  # names, labels and sizes of every file: another source, another listing
    for split, samples in splits.items():
        shards, start, size, part = [], 0, 0, hashlib.sha256()
        for i, (path, label) in enumerate(samples):
            nbytes = os.stat(path).st_size
            if size and size + nbytes > limit:
                shards.append((start, i, part.hexdigest()))
                start, size, part = i, 0, hashlib.sha256()
            line = f"{split}\0{os.path.relpath(path, src)}\0{label}\0{nbytes}\n".encode("utf-8", "surrogateescape")
            listing.update(line)
            part.update(line)
            size += nbytes
        shards.append((start, len(samples), part.hexdigest()))
        plan["splits"][split] = [{"file": f"{split}-{k:05d}.arrow", "first": a, "end": b, "listing": digest}
                                 for k, (a, b, digest) in enumerate(shards)]
    plan["listing"] = listing.hexdigest()
    return plan, splits


def _read(path: str) -> Tuple[bytes, str]:
    """A file's bytes and "" if they decode, else why not (a full decode: every image is checked once)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        return b"", f"{type(err).__name__}: {err.strerror or err}"
    return data, _check_one(io.BytesIO(data))


def _contents(data) -> dict:
    """A whole shard file's rows: label, path, and where each image's bytes lie in the file (offset, length),
    found from the addresses of the Arrow buffers within the file's own bytes (`data`)."""
    pa = _pyarrow()
    whole = pa.py_buffer(data)
    reader = pa.ipc.open_file(pa.BufferReader(whole))
    out = {"label": [], "path": [], "offset": [], "length": []}
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        images = batch.column(0)
        _, offsets, values = images.buffers()
        bounds = np.frombuffer(offsets, dtype=np.int32)[images.offset:images.offset + len(images) + 1].astype(np.int64)
        start = (values.address - whole.address) if values is not None else 0
        out["offset"] += (start + bounds[:-1]).tolist()
        out["length"] += np.diff(bounds).tolist()
        out["label"] += batch.column(1).to_pylist()
        out["path"] += batch.column(2).to_pylist()
    meta = reader.schema.metadata or {}
    out["skipped"] = json.loads(meta.get(b"skipped", b"[]"))
    out["listing"] = meta.get(b"listing", b"").decode()
    return out


def _write_shard(target: Path, src: Path, samples: Sequence[Sample], skip_bad: bool, listing: str) -> dict:
    pa = _pyarrow()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = list(pool.map(_read, [p for p, _ in samples]))
    bad = [[os.path.relpath(p, src), why] for (p, _), (_, why) in zip(samples, read) if why]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more in this shard)" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {src / bad[0][0]}: {bad[0][1]}{more}; fix or remove it, or pack with "
                        f"--skip-bad-images")
    keep = [(os.path.relpath(p, src), label, data) for (p, label), (data, why) in zip(samples, read) if not why]
    table = pa.table({"image": pa.array([d for _, _, d in keep], type=pa.binary()),
                      "label": pa.array([label for _, label, _ in keep], type=pa.int64()),
                      "path": pa.array([r for r, _, _ in keep], type=pa.string())})
    # what it holds, for a resumed pack to know it: the digest of its files' names, labels and sizes
    table = table.replace_schema_metadata({"skipped": json.dumps(bad), "listing": listing})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1024)  # record batches of 1,024 rows, for any Arrow reader
    data = sink.getvalue().to_pybytes()
    contents = _contents(data)
    if any(data[o:o + n] != image for o, n, (_, _, image) in zip(contents["offset"], contents["length"], keep)):
        raise TrainerError(f"packing {target}: the recorded places of the images do not hold them (a bug)")
    atomic_write(target, data, fsync=True)
    return {"file": target.name, "rows": len(keep), "bytes": len(data), "contents": contents}


def _finished(target: Path, shard: dict) -> Optional[dict]:
    """A shard written by an earlier, interrupted pack: its entry if it is whole and holds the files planned
    for it now (the same names, labels and sizes), else None: it is written again."""
    pa = _pyarrow()
    try:
        data = target.read_bytes()
        contents = _contents(data)
    except (OSError, pa.ArrowInvalid, ValueError):
        return None
    if contents["listing"] != shard["listing"] or \
            len(contents["label"]) + len(contents["skipped"]) != shard["end"] - shard["first"]:
        return None
    return {"file": target.name, "rows": len(contents["label"]), "bytes": len(data), "contents": contents}


def _refuse_other_layouts(src: Path) -> None:
    """Packing takes image folders of classes. A masks folder (split/images + split/masks) or a COCO folder
    would otherwise be read as classes named "images" and "masks", or lose its annotations: refused."""
    splits = [src] + [src / name for name in ("train", "val", "test") if (src / name).is_dir()]
    masks = any((d / "images").is_dir() and (d / "masks").is_dir() for d in splits)
    coco = (src / "annotations").is_dir() or any((d / name).is_file() for d in splits
                                                  for name in ("annotations.json", "_annotations.coco.json"))
    if masks or coco:
        kind = "a segmentation folder (images/ and masks/)" if masks else "a COCO folder (annotations)"
        raise DataError(f"{src} looks like {kind}: trainer pack takes image folders of classes for now; train "
                        f"from the folder itself")


def pack(src, dest, shard_mb: float = 256, skip_bad: bool = False, say=print) -> dict:
    """Pack the image folder `src` into shards in `dest`; returns the index. Resumable: run it again."""
    _pyarrow()
    src, dest = Path(src), Path(dest)
    if not 0 < shard_mb <= MAX_SHARD_MB:
        raise DataError(f"--shard-mb must be in (0, {MAX_SHARD_MB}], got {shard_mb} (an Arrow binary column holds "
                        f"at most 2 GiB)")
    real_src, real_dest = src.resolve(), dest.resolve()
    if real_dest == real_src or real_src in real_dest.parents:
        raise DataError(f"the shards would go inside the folder they pack ({dest} is in {src}): choose a DEST "
                        f"outside it (nothing is written into a data folder)")
    _refuse_other_layouts(src)
    plan, splits = _plan(src, shard_mb)
    if (dest / INDEX).is_file():
        index = read_json(dest / INDEX)
        if index.get("listing") == plan["listing"]:
            say(f"[pack] {dest} already holds these files, packed: nothing to do")
            return index
        raise DataError(f"{dest} already holds a packed dataset of other files (its index.json): choose another "
                        f"DEST, or delete it to pack again")
    if dest.exists() and not (dest / PLAN).is_file() and any(dest.iterdir()):
        raise DataError(f"{dest} is not empty and holds no pack: choose an empty or new folder")
    dest.mkdir(parents=True, exist_ok=True)
    if (dest / PLAN).is_file():  # a cut-short pack (or one stopped by a bad file, fixed since): shards that
        # still hold what is planned for them are kept, any other is written again
        say(f"[pack] resuming the unfinished pack in {dest}")
    atomic_write_json(dest / PLAN, plan)
    total = sum(shard["end"] - shard["first"] for v in plan["splits"].values() for shard in v)
    index = {key: plan[key] for key in ("version", "source", "classes", "shard_mb", "listing")}
    index["splits"], skipped, done = {}, [], 0
    rows = {"shard": [], "offset": [], "length": [], "label": [], "path": []}  # every row, in index order
    for split, shards in plan["splits"].items():
        entries = []
        for shard in shards:
            target = dest / shard["file"]
            planned = shard["end"] - shard["first"]
            entry = _finished(target, shard) if target.is_file() else None
            if entry is None:
                entry = _write_shard(target, src, splits[split][shard["first"]:shard["end"]], skip_bad,
                                     shard["listing"])
            contents = entry.pop("contents")
            skipped += contents["skipped"]
            rows["shard"] += [sum(len(v) for v in index["splits"].values()) + len(entries)] * entry["rows"]
            for key in ("offset", "length", "label", "path"):
                rows[key] += contents[key]
            entries.append(entry)
            done += planned
            say(f"[pack] {target.name}: {entry['rows']} images, {entry['bytes'] / 2**20:.1f} MiB ({done}/{total})")
        index["splits"][split] = entries
    index["skipped"] = skipped
    pa = _pyarrow()
    table = pa.table({"shard": pa.array(rows["shard"], type=pa.int32()), "offset": pa.array(rows["offset"], pa.int64()),
                      "length": pa.array(rows["length"], pa.int64()), "label": pa.array(rows["label"], pa.int64()),
                      "path": pa.array(rows["path"], pa.string())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    atomic_write(dest / ROWS, sink.getvalue().to_pybytes(), fsync=True)
    atomic_write_json(dest / INDEX, index, fsync=True)  # last: its presence says the pack is complete
    (dest / PLAN).unlink()
    planned = {shard["file"] for v in plan["splits"].values() for shard in v}
    for stale in dest.iterdir():  # shards of an earlier plan of this pack (e.g. before a bad file was fixed)
        if re.fullmatch(r"(train|val|test)-\d{5}\.arrow", stale.name) and stale.name not in planned:
            stale.unlink()
    say(f"[pack] {len(rows['label'])} images of {len(index['classes'])} classes in "
        f"{sum(len(v) for v in index['splits'].values())} shard(s) in {dest}"
        + (f"; {len(skipped)} unreadable file(s) left out, e.g. {skipped[0][0]}" if skipped else ""))
    return index


# ---- reading ----

class Shards:
    """The shards of a packed dataset and where each row's image bytes lie in them (numpy arrays: shared
    between forked workers without copies). Each process opens a shard the first time it reads from it:
    a forked DataLoader worker opens its own, once; each image is then one positioned read."""

    def __init__(self, root: Path, files: List[str], shard: np.ndarray, offset: np.ndarray, length: np.ndarray):
        self.root, self.files, self.shard, self.offset, self.length = root, files, shard, offset, length
        self._fds: Dict[int, int] = {}
        self._pid = None

    def __getstate__(self):  # pickled into spawned workers: without open files
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def image_bytes(self, row: int) -> bytes:
        if self._pid != os.getpid():  # forked since: never share another process's file offsets or closes
            self._fds, self._pid = {}, os.getpid()
        k = int(self.shard[row])
        if k not in self._fds:
            if len(self._fds) >= MAX_OPEN_SHARDS:  # the oldest opened goes: far below the usual 1,024 open files
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[k] = os.open(self.root / self.files[k], os.O_RDONLY)
        length = int(self.length[row])
        data = os.pread(self._fds[k], length, int(self.offset[row]))
        if len(data) != length:
            raise OSError(f"shard {self.files[k]} ends before this image's bytes (cut short since the start?)")
        return data


class ShardDataset(_SeededDataset):
    """A split of a packed dataset: `rows` into `shards`, with labels and the original relative paths (the
    data fingerprint is then the folder's). Images decode as the folder path decodes the same files."""

    def __init__(self, shards: Shards, rows: np.ndarray, labels: np.ndarray, paths: PathTable, transform=None,
                 seed: int = 0, exif_orientation: bool = True):
        super().__init__(transform, seed)
        self.shards, self.rows, self.labels, self.paths = shards, rows, labels, paths
        self.exif_orientation = exif_orientation

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> torch.Tensor:
        row = int(self.rows[index])
        try:
            return decode_bytes(self.shards.image_bytes(row), self.exif_orientation)
        except Exception as err:  # verified when packed: a shard changed since, or a bug: name the row
            raise DataError(f"cannot read image {self.paths[index]} from the shards in {self.shards.root}: "
                            f"{image_error(err)}") from None


def read_packed(root) -> Tuple[List[str], Dict[str, List[Sample]], Shards, PathTable]:
    """The classes, per split the samples as (row, label), the shards and every row's path, from `root`'s
    index and rows table; a missing, cut-short or overwritten shard is one line naming it (each shard's size
    and Arrow footer are checked: a few hundred small reads, no image read)."""
    pa = _pyarrow()
    root = Path(root)
    if not (root / INDEX).is_file():
        why = "a pack was cut short: run the same trainer pack again" if (root / PLAN).is_file() else \
            "make one with: trainer pack SRC " + str(root)
        raise DataError(f"{root} is not a packed dataset (no {INDEX}; {why})")
    try:
        index = json.loads((root / INDEX).read_text())
        entries = [(split, e["file"], int(e["rows"]), int(e["bytes"])) for split, v in index["splits"].items()
                   for e in v]
        classes = list(index["classes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{root / INDEX} is not a pack's index ({type(err).__name__}: {err})") from None
    for split, name, rows, nbytes in entries:
        path = root / name
        if not path.is_file():
            raise DataError(f"shard {path} is missing (the index lists {rows} images in it): copy it back, or "
                            f"pack again")
        size = path.stat().st_size
        if size != nbytes:
            raise DataError(f"shard {path} is {size} bytes, its index says {nbytes}: cut short or replaced; copy "
                            f"it again, or pack again")
        try:
            with pa.OSFile(str(path)) as source:  # the magic bytes and the footer, not the images
                pa.ipc.open_file(source)
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"shard {path} cannot be read ({err}): copy it again, or pack again") from None
    try:
        with pa.OSFile(str(root / ROWS)) as source:
            table = pa.ipc.open_file(source).read_all()
        shard = table.column("shard").to_numpy().astype(np.int64)
        columns = {k: table.column(k).to_numpy() for k in ("offset", "length", "label")}
        strings = table.column("path").combine_chunks()  # UTF-8 bytes + int32 offsets: a PathTable's layout
        _, offsets, data = strings.buffers()
        offsets = np.frombuffer(offsets, dtype=np.int32)[strings.offset:strings.offset + len(strings) + 1]
        paths = PathTable.from_buffers(np.frombuffer(data, dtype=np.uint8).copy() if data is not None
                                       else np.zeros(0, np.uint8), offsets)
    except (OSError, pa.ArrowInvalid, KeyError) as err:
        raise DataError(f"{root / ROWS} cannot be read ({err}): pack again") from None
    counts = np.bincount(shard, minlength=len(entries)) if len(shard) else np.zeros(len(entries), np.int64)
    for k, (split, name, rows, _) in enumerate(entries):
        if counts[k] != rows:
            raise DataError(f"{root / ROWS} lists {counts[k]} images in shard {name}, the index {rows}: pack again")
    found: Dict[str, List[Sample]] = {split: [] for split in index["splits"]}
    split_of = np.array([entries[k][0] for k in range(len(entries))], dtype=object)
    labels = columns["label"].tolist()
    for row, k in enumerate(shard.tolist()):
        found[split_of[k]].append((row, labels[row]))
    return classes, found, Shards(root, [e[1] for e in entries], shard, columns["offset"], columns["length"]), paths
