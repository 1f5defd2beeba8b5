"""Packed shards of an image folder, a segmentation (masks) folder, a COCO folder or a multi-label CSV folder:
`trainer pack SRC DEST` writes them, data.format=shards trains from them.

Why: a million small files cost a million opens per epoch and per rank, which shared cluster file systems
serve slowly and their administrators ration (../shared/docs/tuning-and-data-at-scale.md, part B). A few
hundred large files cost a few hundred.

Format: Arrow IPC files (pyarrow), each holding about `shard_mb` of images in rows of three columns: `image`
(the file's bytes exactly as they were: nothing re-encoded, unless --max-side below), `label` (int64) and
`path` (relative to SRC): any Arrow tool reads them. A segmentation folder's rows also hold `mask` (the
mask PNG's bytes) and `mask_path`, and its label is 0; the index keeps its class names (classes.txt) and
says `"kind": "masks"`.
A multi-label CSV folder's rows (kind "multilabel", label 0) also hold `labels`: the indices of the row's
classes (list<int32>, in the index's class order; empty for an image with no label), so that reading the pack
needs no CSV.
Where each image's (and mask's) bytes lie in its shard (offset, length) is recorded when packing, in
`rows.arrow` with every row's shard, label and path, so reading an image is one positioned read (pread) of
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

`--max-side N` stores every image whose longer side exceeds N pixels shrunk to N, re-encoded as a JPEG
(`_shrunk`): the decoder, which bounds the samples per core at photo sizes (BENCHMARKS.md, issue 34), then has
fewer pixels to decode at every epoch. FFCV's `max_resolution` does the same. Images within N keep their bytes
(and their masks and annotations theirs). What is in a shrunk image's pixels follows it: its mask (masks
folders) is turned by the image's EXIF orientation and resized NEAREST to the same size (`_shrunk_mask`); its
COCO annotations (boxes, polygons, RLE masks, keypoints, areas, the image's width and height) are scaled in a
copy of the annotation file (`_shrunk_annotations`). The plan and the index record the flags (`shrink`), so a
cut-short pack resumes only with the same flags.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from trainer.data.datasets import PathTable, SeededDataset, read_image
from trainer.data.folders import decode_checked, image_error, lost_class_message, scan_imagefolder
from trainer.data.coco import CocoSplit, DetectionDataset, check_same_categories, find_coco_splits, read_coco
from trainer.data.masks import (LAYOUT, ORIENT_MASK, QUARTER_TURNS, MaskDataset, image_orientation,
                                mask_size_error, read_class_names, read_mask_file, scan_pairs)
from trainer.data.multilabel import SPLIT_FILES, check_classes, read_multilabel_splits
from trainer.config import CsvCfg
from trainer.errors import DataError, TrainerError
from trainer.files import read_json
from trainer.outputs import Folder, Inputs, open_folder

VERSION = 1
INDEX, PLAN, ROWS = "index.json", ".plan.json", "rows.arrow"
MAX_SHARD_MB = 1024
# --quality of the JPEGs --max-side re-encodes: the quality of FFCV's ImageNet packs (libffcv/ffcv-imagenet's
# README: `write_dataset.sh 400 0.10 90`, "quality=90 JPEGs" at a 400 px maximum side), and of the bench's photos
DEFAULT_QUALITY = 90
MAX_OPEN_SHARDS = 256  # per process (each DataLoader worker): ImageNet packs into ~550 shards of 256 MiB
READ_THREADS = 8  # reads overlap (latency-bound on a network file system); PIL's decode releases the GIL


# (the files of one row: the image, and its mask for a masks folder; label: a class index, or a multi-label
# row's tuple of class indices)
Item = Tuple[Tuple[str, ...], object]
KINDS = ("classes", "masks", "coco", "multilabel")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 (the submodule)
    except ImportError:
        raise TrainerError("packed shards need pyarrow: pip install -e '.[shards]' (or pip install pyarrow)") from None
    return pyarrow


# ---- packing ----

def _scan(src: Path, kind: str, csv_cfg=None, log=None) -> Tuple[List[str], Dict[str, List[Item]], dict, dict]:
    """The class names and each split's rows of `src`: (image,) and its label for class folders (sorted by
    class, then path); (image, mask) and 0 for a masks folder (sorted by image path, as its training reads);
    (image,) and 0 for a COCO folder, in the order of its annotation file's images, whose annotation files
    (read and checked here as a training start reads them) go into the pack beside the shards: the third
    value says which, per split: {"file": name in DEST, "source": path, "images": image folder relative to
    src}; the fourth, a COCO folder's image sizes per split ([I, 2] width, height as training reads them, in the
    annotation file's image order: what --max-side scales its annotations from). `log`: where read_coco's notes
    go (none by default: training from the pack reads the annotations again and says them then)."""
    if kind == "classes":
        classes, splits = scan_imagefolder(src)
        return classes, {split: [((path,), label) for path, label in samples]
                         for split, samples in splits.items()}, {}, {}
    if kind == "multilabel":  # read and checked as a training start reads the folder (its data.csv: csv_cfg)
        splits = [split for split, name in SPLIT_FILES.items() if (src / name).is_file()]
        classes, found = read_multilabel_splits(src, csv_cfg, splits)
        check_classes(classes, found["train"][1], src / SPLIT_FILES["train"])
        return classes, {split: [((path,), tuple(np.flatnonzero(targets[r]).tolist())) for r, path in enumerate(paths)]
                         for split, (paths, targets, _) in found.items()}, {}, {}
    if kind == "masks":
        return read_class_names(src, None), {split: [(pair, 0) for pair in scan_pairs(src / split)]
                                             for split in ("train", "val", "test") if (src / split).is_dir()}, {}, {}
    found = find_coco_splits(src, ["train"], optional=["val", "test"])
    coco = {split: read_coco(ann, images, log=log or (lambda *_: None)) for split, (ann, images) in found.items()}
    check_same_categories(coco)
    annotations = {split: {"file": f"{split}-annotations.json", "source": str(ann),
                           "images": os.path.relpath(images, src)} for split, (ann, images) in found.items()}
    return (coco["train"].class_names, {split: [((path,), 0) for path in c.paths] for split, c in coco.items()},
            annotations, {split: np.stack([c.widths, c.heights], axis=1) for split, c in coco.items()})


def _plan(src: Path, shard_mb: float, kind: str, csv_cfg=None, shrink: Optional[dict] = None, log=None
          ) -> Tuple[dict, Dict[str, List[Item]], dict]:
    """Which files go into which shard: consecutive rows of a split until the shard holds `shard_mb`. A pure
    function of the listing, so a resumed pack makes the same shards. Returns the plan, the scanned rows of
    each split and a COCO folder's image sizes (_scan's). `shrink` (--max-side's) is part of each shard's
    digest: a shard of other flags is never kept."""
    classes, splits, annotations, image_sizes = _scan(src, kind, csv_cfg, log)
    limit = shard_mb * 2**20
    plan = {"version": VERSION, "kind": kind, "source": str(src.resolve()), "classes": classes,
            "shard_mb": shard_mb, "splits": {}}
    listing = hashlib.sha256()  # names, labels and sizes of every file: another source, another listing
    if annotations:  # a COCO folder's: its annotation files, whole
        plan["annotations"] = annotations
        for split, entry in annotations.items():
            listing.update(f"{split}\0{entry['images']}\0".encode("utf-8", "surrogateescape"))
            listing.update(hashlib.sha256(Path(entry["source"]).read_bytes()).digest())

    def new_part():  # a shard's digest, begun with the flags it is shrunk by (none: as before the option)
        return hashlib.sha256(json.dumps(shrink, sort_keys=True).encode() if shrink else b"")

    for split, items in splits.items():
        shards, start, size, part = [], 0, 0, new_part()
        for i, (files, label) in enumerate(items):
            sizes = [os.stat(path).st_size for path in files]
            nbytes = sum(sizes)
            if size and size + nbytes > limit:
                shards.append((start, i, part.hexdigest()))
                start, size, part = i, 0, new_part()
            # an image folder's as before; a multi-label row's label is its classes, e.g. "(0, 2)"
            line = f"{split}\0{os.path.relpath(files[0], src)}\0{label}\0{sizes[0]}"
            line += "".join(f"\0{os.path.relpath(path, src)}\0{n}" for path, n in zip(files[1:], sizes[1:])) + "\n"
            line = line.encode("utf-8", "surrogateescape")
            listing.update(line)
            part.update(line)
            size += nbytes
        shards.append((start, len(items), part.hexdigest()))
        plan["splits"][split] = [{"file": f"{split}-{k:05d}.arrow", "first": a, "end": b, "listing": digest}
                                 for k, (a, b, digest) in enumerate(shards)]
    plan["listing"] = listing.hexdigest()
    return plan, splits, image_sizes


class PackedFile:
    """A file held in packed shards, read when opened: its `name` (where it was in the packed folder, and which
    shards hold it now: what an error names) and a function that reads its bytes. trainer.data.masks reads
    an image or mask from it as from a path."""

    def __init__(self, name: str, read):
        self.name, self.read = name, read

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read())

    def __str__(self) -> str:
        return self.name


def _shrunk_size(width: int, height: int, max_side: int) -> Optional[Tuple[int, int]]:
    """The (width, height) in pixels that --max-side stores an upright image of `width` x `height` at: its longer
    side `max_side`, its aspect kept; None when its longer side is within `max_side` (it keeps its bytes). Also
    what a COCO pack's annotations are scaled to (_shrunk_annotations), from the image headers' sizes."""
    if max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return ((max_side, max(1, round(height * scale))) if width >= height
            else (max(1, round(width * scale)), max_side))


def _shrunk(img: Image.Image, size: Tuple[int, int], quality: int) -> bytes:
    """An image as --max-side stores it: `img` (RGB, turned upright by its EXIF orientation, as decode_checked
    gives it; the tag is not kept: the pixels are upright) resized to `size` (_shrunk_size) with Pillow's Lanczos
    filter, which averages over the whole footprint of each output pixel when shrinking (antialiased, unlike a
    plain bilinear sample), as a JPEG of `quality`."""
    buf = io.BytesIO()
    img.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _shrunk_mask(mask: np.ndarray, how: dict, orientation: int, size: Tuple[int, int]) -> bytes:
    """The mask of an image _shrunk stores: `mask` (read_mask_file's class indices, in the stored frame, and
    `how`, its mode and palette) turned by its image's EXIF `orientation` as training turns it (the shrunk image
    is stored upright, without the tag), then resized to the shrunk image's `size` NEAREST (a class index or the
    ignore index is never blended with its neighbours), as a PNG of the mask's own mode (a palette mask keeps its
    palette and transparency)."""
    if orientation in ORIENT_MASK:
        mask = ORIENT_MASK[orientation](mask)
    if how["mode"] == "1":
        mask = mask.astype(bool)  # PIL's mode 1 again
    elif how["mode"] == "I" and mask.size and 0 <= mask.min() <= mask.max() <= 65535:
        mask = mask.astype(np.uint16)  # the same values: a PNG holds 16 bits at most (Pillow writes no mode I PNG)
    img = Image.fromarray(np.ascontiguousarray(mask))
    img = img.resize(size, Image.Resampling.NEAREST)
    if how["palette"] is not None:
        img.putpalette(how["palette"])  # an L image of the indices becomes a P image with the palette
    kept = {} if how["transparency"] is None else {"transparency": how["transparency"]}
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kept)
    return buf.getvalue()


def _shrunk_annotations(data: bytes, sizes: np.ndarray, max_side: int, source: str) -> bytes:
    """A COCO annotation file (its bytes, read and checked by read_coco) in the pixels of the images --max-side
    stores: for every image it shrinks, its `width` and `height` become the stored size, and its annotations
    are scaled, x by new_w / old_w and y by new_h / old_h, `old` being the size training reads (`sizes`, [I, 2]
    in the file's image order: after the EXIF orientation, the frame read_coco takes boxes in) and `new` its
    _shrunk_size: `bbox`, polygon `segmentation`s, RLE ones (_shrunk_rle), `keypoints` (the x and y of each
    triple) and `area` (by both scales). The annotations of images within max_side, and every other key, are
    left as they were. `source`: the file, for messages."""
    coco = json.loads(data)
    scale = {}  # image id -> (x scale, y scale, old (width, height), new (width, height))
    for im, (width, height) in zip(coco["images"], sizes.tolist()):
        size = _shrunk_size(width, height, max_side)
        if size:
            im["width"], im["height"] = size
            scale[int(im["id"])] = (size[0] / width, size[1] / height, (width, height), size)
    for ann in coco["annotations"]:
        if int(ann["image_id"]) not in scale:
            continue
        sx, sy, old, new = scale[int(ann["image_id"])]
        key = "bbox"
        try:
            x, y, w, h = ann["bbox"]
            # a box ending inside its image ends inside the shrunk one: (x + w) * sx may round one float step
            # past the new width, which the reader would then report as an overhang it clipped
            right = min((x + w) * sx, new[0]) if x + w <= old[0] else (x + w) * sx
            bottom = min((y + h) * sy, new[1]) if y + h <= old[1] else (y + h) * sy
            ann["bbox"] = [x * sx, y * sy, right - x * sx, bottom - y * sy]
            key = "area"
            if ann.get("area") is not None:
                ann["area"] = ann["area"] * sx * sy
            key = "segmentation"
            segmentation = ann.get("segmentation")
            if isinstance(segmentation, list):  # polygons: [x1, y1, x2, y2, ...] each
                ann[key] = [[v * (sy if k % 2 else sx) for k, v in enumerate(polygon)] for polygon in segmentation]
            elif isinstance(segmentation, dict):
                ann[key] = _shrunk_rle(segmentation, old, new)
            key = "keypoints"
            if isinstance(ann.get("keypoints"), list):  # [x, y, visibility] triples; (0, 0, 0): not labelled
                ann[key] = [v * sx if k % 3 == 0 else v * sy if k % 3 == 1 else v for k, v in enumerate(ann[key])]
        except (TypeError, ValueError, KeyError) as err:
            raise DataError(f"{source}: annotation {ann.get('id')}: its {key} cannot be scaled to its image's stored "
                            f"size for --max-side ({type(err).__name__}: {err})") from None
    return json.dumps(coco).encode()


def _shrunk_rle(segmentation: dict, old: Tuple[int, int], new: Tuple[int, int]) -> dict:
    """A COCO RLE segmentation ({"size": [h, w], "counts": compressed string, or uncompressed list}) of an image
    of `old` (width, height) as the mask of its shrunk image of `new`: decoded by pycocotools, resized NEAREST
    (a pixel is in or out, never half), encoded again (compressed). Its size must be its image's: else it is
    not in the frame the boxes are in, and scaling it to the image would be a guess."""
    from pycocotools import mask as coco_mask

    height, width = segmentation["size"]
    if (width, height) != tuple(old):
        raise ValueError(f"the RLE's size is {width}x{height} (WxH), its image's {old[0]}x{old[1]}")
    rle = (coco_mask.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list)
           else segmentation)
    pixels = Image.fromarray(coco_mask.decode(rle)).resize(new, Image.Resampling.NEAREST)
    encoded = coco_mask.encode(np.asfortranarray(np.asarray(pixels, dtype=np.uint8)))
    return {"size": [new[1], new[0]], "counts": encoded["counts"].decode("ascii")}


def _read(files: Tuple[str, ...], shrink: Optional[dict] = None) -> Tuple[List[bytes], str, str]:
    """The row's files' bytes, why they are bad ("" if they decode) and the error line naming the file at
    fault. A full decode: every image is checked once; a mask must be a single-channel image of indices (its
    values are checked by the training's start, which knows the classes). `shrink` ({"max_side", "quality"}):
    the image as _shrunk stores it, from the same decode that checks it, and its mask as _shrunk_mask stores
    it; with `shrink`, a mask must be its image's size (training's start checks it too, but a shrunk pair
    would hide it)."""
    data = []
    for k, path in enumerate(files):
        try:
            with open(path, "rb") as fh:
                data.append(fh.read())
        except OSError as err:
            why = f"{type(err).__name__}: {err.strerror or err}"
            return [], why, f"cannot read {'mask' if k else 'image'} {path}: {why}"
    original = data[0]
    # upright as training decodes it when shrinking (the stored pixels are then upright); orientation cannot
    # make a file bad, so the check is the same either way
    img, why = decode_checked(io.BytesIO(original), exif_orientation=bool(shrink))
    if why:
        return [], why, f"cannot read image {files[0]}: {why}"
    upright = img.size  # (width, height)
    size = _shrunk_size(*upright, shrink["max_side"]) if shrink else None
    if size:
        try:
            data[0] = _shrunk(img, size, shrink["quality"])
        except Exception as err:  # decoded above: a failure here is PIL's resize or encode, named with the file
            why = image_error(err)
            return [], why, f"cannot shrink image {files[0]}: {why}"
    del img  # a decoded photo: not held while its mask is read
    if len(files) > 1:
        try:
            mask, how = read_mask_file(PackedFile(files[1], lambda: data[1]))
        except DataError as err:
            return [], str(err), str(err)
        if shrink:
            try:
                orientation = image_orientation(original)  # what training turns the mask by
            except Exception as err:
                why = image_error(err)
                return [], why, f"cannot read image {files[0]}: {why}"
            stored = upright[::-1] if orientation in QUARTER_TURNS else upright
            why = mask_size_error(files[0], files[1], stored, (mask.shape[1], mask.shape[0]), lambda: orientation)
            if why:
                return [], why, why
            if size:
                try:
                    data[1] = _shrunk_mask(mask, how, orientation, size)
                except Exception as err:
                    why = image_error(err)
                    return [], why, f"cannot shrink mask {files[1]}: {why}"
    return data, "", ""


def _contents(data) -> dict:
    """A whole shard file's rows: label, path, and where each image's bytes lie in the file (offset, length),
    found from the addresses of the Arrow buffers within the file's own bytes (`data`)."""
    pa = _pyarrow()
    whole = pa.py_buffer(data)
    reader = pa.ipc.open_file(pa.BufferReader(whole))
    masks, multilabel = "mask" in reader.schema.names, "labels" in reader.schema.names
    out = {"label": [], "path": [], "offset": [], "length": []}
    if multilabel:
        out["labels"] = []
    if masks:
        out.update({"mask_path": [], "mask_offset": [], "mask_length": []})
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        for column, prefix in (("image", ""), ("mask", "mask_")) if masks else (("image", ""),):
            values = batch.column(column)
            _, offsets, data_buffer = values.buffers()
            bounds = np.frombuffer(offsets, dtype=np.int32)[values.offset:values.offset + len(values) + 1]
            bounds = bounds.astype(np.int64)
            start = (data_buffer.address - whole.address) if data_buffer is not None else 0
            out[prefix + "offset"] += (start + bounds[:-1]).tolist()
            out[prefix + "length"] += np.diff(bounds).tolist()
        out["label"] += batch.column("label").to_pylist()
        out["path"] += batch.column("path").to_pylist()
        if masks:
            out["mask_path"] += batch.column("mask_path").to_pylist()
        if multilabel:
            out["labels"] += batch.column("labels").to_pylist()
    meta = reader.schema.metadata or {}
    out["skipped"] = json.loads(meta.get(b"skipped", b"[]"))
    out["listing"] = meta.get(b"listing", b"").decode()
    return out


def _write_shard(out: Folder, target: Path, src: Path, items: Sequence[Item], skip_bad: bool, listing: str,
                 fix: str, shrink: Optional[dict] = None) -> dict:
    """One shard of `items`; a bad image stops it (`fix`: what the user can do) unless `skip_bad`. `shrink`:
    --max-side's images (_shrunk)."""
    pa = _pyarrow()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        read = list(pool.map(lambda files: _read(files, shrink), [files for files, _ in items]))
    lines = [line for _, why, line in read if why]
    bad = [[os.path.relpath(files[0], src), why] for (files, _), (_, why, _) in zip(items, read) if why]
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more in this shard)" if len(bad) > 1 else ""
        raise DataError(f"{lines[0]}{more}; {fix}")
    keep = [(files, label, data) for (files, label), (data, why, _) in zip(items, read) if not why]
    multilabel = bool(items) and isinstance(items[0][1], tuple)  # a multi-label row's label is its classes
    columns = {"image": pa.array([data[0] for _, _, data in keep], type=pa.binary()),
               "label": pa.array([0 if multilabel else label for _, label, _ in keep], type=pa.int64()),
               "path": pa.array([os.path.relpath(files[0], src) for files, _, _ in keep], type=pa.string())}
    if items and len(items[0][0]) > 1:  # a masks folder: each image's mask beside it
        columns["mask"] = pa.array([data[1] for _, _, data in keep], type=pa.binary())
        columns["mask_path"] = pa.array([os.path.relpath(files[1], src) for files, _, _ in keep], type=pa.string())
    if multilabel:
        columns["labels"] = pa.array([list(label) for _, label, _ in keep], type=pa.list_(pa.int32()))
    table = pa.table(columns)
    # what it holds, for a resumed pack to know it: the digest of its files' names, labels and sizes
    table = table.replace_schema_metadata({"skipped": json.dumps(bad), "listing": listing})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1024)  # record batches of 1,024 rows, for any Arrow reader
    data = sink.getvalue().to_pybytes()
    contents = _contents(data)
    placed = [data[o:o + n] for o, n in zip(contents["offset"], contents["length"])]
    if "mask_offset" in contents:
        placed = list(zip(placed, [data[o:o + n] for o, n in zip(contents["mask_offset"], contents["mask_length"])]))
    if any(got != (tuple(row) if len(row) > 1 else row[0]) for got, (_, _, row) in zip(placed, keep)):
        raise TrainerError(f"packing {target}: the recorded places of the images do not hold them (a bug)")
    out.write(target.name, data, fsync=True)
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


def _check_every_class_kept(src: Path, classes: List[str], items: Sequence[Item], kept: set, skipped: list) -> None:
    """--skip-bad-images may not leave a class without a training image, as data.skip_bad_images may not on
    the folder path (a model would be trained to predict a class it never saw). Checked once the train split's
    shards are written: only decoding every image tells, and the shards are written as they are read (reading
    a large folder twice to refuse earlier would cost as much again). Nothing usable is left (no index.json),
    and the same command, once the files are fixed or removed, keeps the shards still holding their files."""
    lost = sorted(set(range(len(classes))) - kept)
    if lost:
        # the classes of each file: its label, or a multi-label row's tuple of them
        classes_of = {os.path.relpath(files[0], src): label if isinstance(label, tuple) else (label,)
                      for files, label in items}
        dropped = [path for path, _ in skipped if lost[0] in classes_of.get(path, ())]
        raise DataError(lost_class_message(classes[lost[0]], "--skip-bad-images", dropped, len(lost) - 1)
                        + "; fix or remove them, then run the same trainer pack again (the pack is not usable "
                        "until then)")


def _layout(src: Path) -> str:
    """"multilabel" for a multi-label CSV folder (train.csv), "masks" for a segmentation folder (split/images +
    split/masks), "coco" for a COCO folder (annotation files), else "classes" (class folders)."""
    if (src / "train.csv").is_file():  # as training reads it (trainer/targets.py): what it is, whatever else
        return "multilabel"
    splits = [src] + [src / name for name in ("train", "val", "test") if (src / name).is_dir()]
    masks = [d for d in splits if (d / "images").is_dir() and (d / "masks").is_dir()]
    coco = (src / "annotations").is_dir() or any((d / name).is_file() for d in splits
                                                  for name in ("annotations.json", "_annotations.coco.json"))
    if masks and masks[0] == src:
        raise DataError(f"{src} holds images/ and masks/ without split folders: a segmentation folder is packed "
                        f"as it trains, {LAYOUT}")
    return "masks" if masks else "coco" if coco else "classes"


def _shrink_flags(shrink: Optional[dict]) -> str:
    """How a pack's `shrink` reads on the command line that made it."""
    return f"--max-side {shrink['max_side']} --quality {shrink['quality']}" if shrink else "no --max-side"


def pack(src, dest, shard_mb: float = 256, skip_bad: bool = False, say=print, csv_cfg=None,
         max_side: Optional[int] = None, quality: Optional[int] = None) -> dict:
    """Pack the image folder, masks folder, COCO folder or multi-label CSV folder `src` into shards in `dest`;
    returns the index. Resumable: run it again. `csv_cfg`: a multi-label folder's data.csv (the defaults if
    None). `max_side` (pixels): images whose longer side exceeds it are stored shrunk to it, as JPEGs of
    `quality` (_shrunk; DEFAULT_QUALITY if None), with their masks or COCO annotations in the shrunk pixels."""
    _pyarrow()
    src, dest = Path(src), Path(dest)
    if not 0 < shard_mb <= MAX_SHARD_MB:
        raise DataError(f"--shard-mb must be in (0, {MAX_SHARD_MB}], got {shard_mb} (an Arrow binary column holds "
                        f"at most 2 GiB)")
    if max_side is not None and max_side < 1:
        raise DataError(f"--max-side must be a positive number of pixels, got {max_side}")
    if quality is not None and max_side is None:
        raise DataError("--quality is the JPEG quality of the images --max-side shrinks: give --max-side too")
    quality = DEFAULT_QUALITY if quality is None else quality
    if not 1 <= quality <= 100:
        raise DataError(f"--quality must be in [1, 100] (a JPEG quality), got {quality}")
    shrink = {"max_side": max_side, "quality": quality} if max_side is not None else None
    # DEST: new, empty, or a pack's own (one cut short resumes); never inside the folder packed
    out = open_folder(dest, "pack", "pack", "DEST", Inputs([("the folder packed", src)]), what="a pack of the trainer")
    kind = _layout(src)
    if kind != "multilabel" and csv_cfg is not None and csv_cfg != CsvCfg():
        raise DataError(f"data.csv.* is for a multi-label CSV folder (train.csv, val.csv); {src} is not one")
    if kind == "coco" and skip_bad:
        raise DataError(f"--skip-bad-images cannot leave images of a COCO folder out ({src}): its annotation files "
                        f"name them; fix or remove the bad ones (and their annotations)")
    # with --max-side the pack's annotations state the stored sizes, so what read_coco notes of the folder's
    # (sizes that differ from the files', boxes in the turned frame) is said now: training cannot say it later
    plan, splits, image_sizes = _plan(src, shard_mb, kind, csv_cfg if csv_cfg is not None else CsvCfg(), shrink,
                                      log=say if shrink else None)
    if shrink:  # absent without --max-side: a plan or index of before the option reads the same
        plan["shrink"] = shrink
    fix = ("fix or replace it (its annotations name it)" if kind == "coco"
           else "fix or remove it, or pack with --skip-bad-images")
    if (dest / INDEX).is_file():
        index = read_json(dest / INDEX)
        if index.get("listing") == plan["listing"] and index.get("shrink") != shrink:
            raise DataError(f"{dest} already holds these files packed with {_shrink_flags(index.get('shrink'))}, not "
                            f"{_shrink_flags(shrink)}: choose another DEST, or delete it to pack again")
        if index.get("listing") == plan["listing"]:
            say(f"[pack] {dest} already holds these files, packed: nothing to do")
            return index
        raise DataError(f"{dest} already holds a packed dataset of other files (its index.json): choose another "
                        f"DEST, or delete it to pack again")
    if (dest / PLAN).is_file() and out.owns(PLAN):  # a resume keeps the shards made with the first flags
        before = read_json(dest / PLAN).get("shrink")
        if before != shrink:
            raise DataError(f"{dest} holds a pack cut short that was made with {_shrink_flags(before)}, not "
                            f"{_shrink_flags(shrink)}: run it again with the same flags to resume it, or delete "
                            f"{dest} to pack again")
    out.clean_leftovers()  # the temporaries of a pack killed while writing a shard
    if (dest / PLAN).is_file():  # a cut-short pack (or one stopped by a bad file, fixed since): shards that
        # still hold what is planned for them are kept, any other is written again
        say(f"[pack] resuming the unfinished pack in {dest}")
    out.write_json(PLAN, plan)
    total = sum(shard["end"] - shard["first"] for v in plan["splits"].values() for shard in v)
    index = {key: plan[key] for key in ("version", "kind", "source", "classes", "shard_mb", "listing", "shrink")
             if key in plan}
    for split, entry in plan.get("annotations", {}).items():  # as they were read: training reads them again
        data = Path(entry["source"]).read_bytes()
        if shrink:  # in the pixels of the images as stored
            data = _shrunk_annotations(data, image_sizes[split], shrink["max_side"], entry["source"])
        out.write(entry["file"], data, fsync=True)
        index.setdefault("annotations", {})[split] = {"file": entry["file"], "images": entry["images"]}
    index["splits"], skipped, done = {}, [], 0
    rows = {"shard": [], "offset": [], "length": [], "label": [], "path": []}  # every row, in index order
    if kind == "masks":
        rows.update({"mask_offset": [], "mask_length": [], "mask_path": []})
    if kind == "multilabel":
        rows["labels"] = []
    for split, shards in plan["splits"].items():
        entries, kept = [], set()
        for shard in shards:
            target = dest / shard["file"]
            planned = shard["end"] - shard["first"]
            entry = _finished(target, shard) if out.owns(target.name) else None
            if entry is None:
                entry = _write_shard(out, target, src, splits[split][shard["first"]:shard["end"]], skip_bad,
                                     shard["listing"], fix, shrink)
            contents = entry.pop("contents")
            skipped += contents["skipped"]
            if kind == "multilabel":  # a class is kept by any row holding it
                kept.update(i for row in contents["labels"] for i in row)
            else:
                kept.update(contents["label"])
            rows["shard"] += [sum(len(v) for v in index["splits"].values()) + len(entries)] * entry["rows"]
            for key in rows:
                if key != "shard":
                    rows[key] += contents[key]
            entries.append(entry)
            done += planned
            say(f"[pack] {target.name}: {entry['rows']} images, {entry['bytes'] / 2**20:.1f} MiB ({done}/{total})")
        index["splits"][split] = entries
        if kind in ("classes", "multilabel") and split == "train":
            _check_every_class_kept(src, plan["classes"], splits[split], kept, skipped)
    index["skipped"] = skipped
    pa = _pyarrow()
    types = {"shard": pa.int32(), "path": pa.string(), "mask_path": pa.string(), "labels": pa.list_(pa.int32())}
    table = pa.table({key: pa.array(values, type=types.get(key, pa.int64())) for key, values in rows.items()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    out.write(ROWS, sink.getvalue().to_pybytes(), fsync=True)
    out.write_json(INDEX, index, fsync=True)  # last: its presence says the pack is complete
    out.remove(PLAN)
    planned = {shard["file"] for v in plan["splits"].values() for shard in v}
    for stale in dest.iterdir():  # shards of an earlier plan of this pack (e.g. before a bad file was fixed)
        if re.fullmatch(r"(train|val|test)-\d{5}\.arrow", stale.name) and stale.name not in planned:
            out.remove(stale.name)  # only a shard the pack wrote: never a file of the user's
    what = {"masks": "images with masks", "coco": "images with COCO annotations",
            "multilabel": "images with label sets"}.get(kind, "images")
    say(f"[pack] {len(rows['label'])} {what} of {len(index['classes'])} classes"
        + (f" (longer sides above {max_side} px shrunk to it)" if shrink else "") + " in "
        f"{sum(len(v) for v in index['splits'].values())} shard(s) in {dest}"
        + (f"; {len(skipped)} unreadable file(s) left out, e.g. {skipped[0][0]}" if skipped else ""))
    return index


# ---- reading ----

class Shards:
    """The shards of a packed dataset and where each row's image bytes lie in them (numpy arrays: shared
    between forked workers without copies). Each process opens a shard the first time it reads from it:
    a forked DataLoader worker opens its own, once; each image is then one positioned read."""

    def __init__(self, root: Path, files: List[str], shard: np.ndarray, offset: np.ndarray, length: np.ndarray,
                 mask_offset: Optional[np.ndarray] = None, mask_length: Optional[np.ndarray] = None):
        self.root, self.files, self.shard, self.offset, self.length = root, files, shard, offset, length
        self.mask_offset, self.mask_length = mask_offset, mask_length  # a masks folder's: each image's mask
        self._fds: Dict[int, int] = {}
        self._pid = None

    def __getstate__(self):  # pickled into spawned workers: without open files
        return {**self.__dict__, "_fds": {}, "_pid": None}

    def image_bytes(self, row: int) -> bytes:
        return self._pread(row, self.offset, self.length)

    def mask_bytes(self, row: int) -> bytes:
        return self._pread(row, self.mask_offset, self.mask_length)

    def image_file(self, row: int, path: str) -> PackedFile:
        """Row `row`'s image, read when opened, named by its `path` in the packed folder and by these shards."""
        return PackedFile(f"{path} (in the shards at {self.root})", lambda: self.image_bytes(row))

    def mask_file(self, row: int, path: str) -> PackedFile:
        return PackedFile(f"{path} (in the shards at {self.root})", lambda: self.mask_bytes(row))

    def _pread(self, row: int, offsets: np.ndarray, lengths: np.ndarray) -> bytes:
        if self._pid != os.getpid():  # forked since: never share another process's file offsets or closes
            self._fds, self._pid = {}, os.getpid()
        k = int(self.shard[row])
        if k not in self._fds:
            if len(self._fds) >= MAX_OPEN_SHARDS:  # the oldest opened goes: far below the usual 1,024 open files
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[k] = os.open(self.root / self.files[k], os.O_RDONLY)
        length = int(lengths[row])
        data = os.pread(self._fds[k], length, int(offsets[row]))
        if len(data) != length:
            raise OSError(f"shard {self.files[k]} ends before this file's bytes (cut short since the start?)")
        return data


class ShardDataset(SeededDataset):
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
        # verified when packed: an error here means a shard changed since, and it names the file and the shards
        return read_image(self.shards.image_file(int(self.rows[index]), self.paths[index]), self.exif_orientation)

    def file_bytes(self, index: int) -> bytes:
        """The image's bytes as packed (what `load` decodes; data.decode_device=cuda decodes them on the GPU)."""
        return self.shards.image_bytes(int(self.rows[index]))


class ShardMaskDataset(MaskDataset):
    """A split of a packed masks folder: images and masks read from the shards by row, decoded and checked as
    the folder's files are (MaskDataset reads them through image_source and mask_source: a PackedFile)."""

    def __init__(self, shards: Shards, rows: np.ndarray, paths: PathTable, mask_paths: PathTable, transform=None,
                 seed: int = 0, exif_orientation: bool = True):
        SeededDataset.__init__(self, transform, seed)
        self.shards, self.rows, self.paths, self.mask_paths = shards, rows, paths, mask_paths
        self.exif_orientation = exif_orientation

    def __len__(self) -> int:
        return len(self.rows)

    def image_source(self, index: int) -> PackedFile:
        return self.shards.image_file(int(self.rows[index]), self.paths[index])

    def mask_source(self, index: int) -> PackedFile:
        return self.shards.mask_file(int(self.rows[index]), self.mask_paths[index])


class ShardDetectionDataset(DetectionDataset):
    """A split of a packed COCO folder: its annotations as read from the packed annotation file, each image
    read from the shards by row (`rows[i]` holds the split's i-th image)."""

    def __init__(self, split: CocoSplit, shards: Shards, rows: np.ndarray, transform=None, seed: int = 0):
        super().__init__(split, transform, seed)
        self.shards, self.rows = shards, rows

    def load(self, index: int) -> torch.Tensor:
        # verified when packed: an error here means a shard changed since, and it names the file and the shards
        return read_image(self.shards.image_file(int(self.rows[index]), self.paths[index]), self.exif_orientation)


class Packed(NamedTuple):
    """What read_packed finds: the kind ("classes", "masks" or "coco"), the class names, per split the rows as
    (row, label), the shards, every row's path (and mask path) as in the packed folder, and a COCO folder's
    annotation files ({split: {"file": in the pack, "images": the image folder the file names them from}})."""
    kind: str
    classes: List[str]
    found: Dict[str, List[Tuple[int, int]]]
    shards: Shards
    paths: PathTable
    mask_paths: Optional[PathTable]
    annotations: Dict[str, dict]
    skipped: List[list] = []  # [path as in the packed folder, why] of the files --skip-bad-images left out
    # a multi-label pack's classes of every row: row r's are label_values[label_offsets[r]:label_offsets[r + 1]]
    label_offsets: Optional[np.ndarray] = None
    label_values: Optional[np.ndarray] = None

    def multi_hot(self, rows: np.ndarray) -> np.ndarray:
        """The (len(rows), classes) float32 targets of a multi-label pack's `rows`: what its CSV folder gives."""
        starts, ends = self.label_offsets[rows], self.label_offsets[rows + 1]
        counts = ends - starts
        out = np.zeros((len(rows), len(self.classes)), dtype=np.float32)
        # the position of every class index of the selected rows in label_values, row after row
        at = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        out[np.repeat(np.arange(len(rows)), counts), self.label_values[at]] = 1.0
        return out


def read_packed_coco(pack: Packed, split: str, log=print, exif_orientation: bool = True
                     ) -> Tuple[CocoSplit, np.ndarray]:
    """A split of a packed COCO folder, read and checked as read_coco reads the folder's (the image headers
    from the shards), and the row of each of its images."""
    entry = pack.annotations.get(split)
    if entry is None:
        raise DataError(f"the shards at {pack.shards.root} hold no {split} split (found: "
                        f"{', '.join(sorted(pack.annotations))})")
    rows = {os.path.normpath(pack.paths[row]): row for row, _ in pack.found[split]}

    def row_of(path: str) -> int:
        key = os.path.normpath(path)
        if key not in rows:
            raise DataError(f"image {path} of {pack.shards.root / entry['file']} is not in the shards at "
                            f"{pack.shards.root}: the pack is not whole; pack again")
        return rows[key]

    def open_image(path: str) -> PackedFile:
        return pack.shards.image_file(row_of(path), path)

    coco = read_coco(pack.shards.root / entry["file"], entry["images"], log=log,
                     exif_orientation=exif_orientation, open_image=open_image)
    return coco, np.array([row_of(path) for path in coco.paths], dtype=np.int64)


def packed_kind(root) -> str:
    """The kind of the pack at `root` from its index ("classes" when it is not one: read_packed says why)."""
    try:
        return str(json.loads((Path(root) / INDEX).read_text()).get("kind", "classes"))
    except (OSError, ValueError, AttributeError):
        return "classes"


def _strings(table, name: str) -> PathTable:
    """A string column as a PathTable, without a Python string per row (UTF-8 bytes + int32 offsets)."""
    strings = table.column(name).combine_chunks()
    _, offsets, data = strings.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int32)[strings.offset:strings.offset + len(strings) + 1]
    return PathTable.from_buffers(np.frombuffer(data, dtype=np.uint8).copy() if data is not None
                                  else np.zeros(0, np.uint8), offsets)


def read_packed(root) -> Packed:
    """The pack at `root` from its index and rows table; a missing, cut-short or overwritten shard is one line
    naming it (each shard's size and Arrow footer are checked: a few hundred small reads, no image read)."""
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
        kind = str(index.get("kind", "classes"))  # packs made before masks folders could be packed: classes
        if kind not in KINDS:
            raise ValueError(f"kind {kind!r} is none of {', '.join(KINDS)}")
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
    for split, entry in (index.get("annotations") or {}).items():
        if not (root / entry["file"]).is_file():
            raise DataError(f"{root / entry['file']} is missing (the {split} split's annotations): copy it back, or "
                            f"pack again")
    try:
        with pa.OSFile(str(root / ROWS)) as source:
            table = pa.ipc.open_file(source).read_all()
        shard = table.column("shard").to_numpy().astype(np.int64)
        numbers = ("offset", "length", "label") + (("mask_offset", "mask_length") if kind == "masks" else ())
        columns = {k: table.column(k).to_numpy() for k in numbers}
        paths = _strings(table, "path")
        mask_paths = _strings(table, "mask_path") if kind == "masks" else None
        label_offsets = label_values = None
        if kind == "multilabel":
            labels = table.column("labels").combine_chunks()
            label_offsets = labels.offsets.to_numpy().astype(np.int64)
            label_offsets -= label_offsets[0]  # from the first row's (flatten starts there)
            label_values = labels.flatten().to_numpy().astype(np.int64)
            if len(label_values) and not 0 <= label_values.min() <= label_values.max() < len(classes):
                raise ValueError(f"a class index outside the index's {len(classes)} classes")
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as err:
        raise DataError(f"{root / ROWS} cannot be read ({err}): pack again") from None
    counts = np.bincount(shard, minlength=len(entries)) if len(shard) else np.zeros(len(entries), np.int64)
    for k, (split, name, rows, _) in enumerate(entries):
        if counts[k] != rows:
            raise DataError(f"{root / ROWS} lists {counts[k]} images in shard {name}, the index {rows}: pack again")
    found: Dict[str, List[Tuple[int, int]]] = {split: [] for split in index["splits"]}
    split_of = np.array([entries[k][0] for k in range(len(entries))], dtype=object)
    labels = columns["label"].tolist()
    for row, k in enumerate(shard.tolist()):
        found[split_of[k]].append((row, labels[row]))
    shards = Shards(root, [e[1] for e in entries], shard, columns["offset"], columns["length"],
                    columns.get("mask_offset"), columns.get("mask_length"))
    return Packed(kind, classes, found, shards, paths, mask_paths, dict(index.get("annotations") or {}),
                  [entry for entry in index.get("skipped") or [] if isinstance(entry, list) and entry],
                  label_offsets, label_values)
