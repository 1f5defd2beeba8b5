"""Object-detection data: COCO JSON files (any of three folder layouts), Pascal VOC XML, box-aware transforms
and collation. (The generated shapes are written as a COCO folder by trainer/data/generated.py.)

Everything is read into a `CocoSplit`: per image its path, real size and id, and its boxes as numpy arrays
(one concatenated array per field plus offsets; no dict per annotation survives the parse, since COCO's
train2017 holds 860k of them). Every annotation and image header is checked once at start-up; the first
problem raises one DataError naming the file and the annotation. Boxes are XYXY in pixels of the image as
decoded (after its EXIF orientation), pixel edges as coordinates: a box [0, 0, 2, 1] covers pixels (0,0) and
(1,0). Category ids may be any integers: training labels are 1..K in id order, 0 being the detectors'
background.

Items are (image float32 [3,H,W] in [0,1], target): not normalised and not resized, as torchvision's
detectors do both themselves (and map their boxes back to the original pixels). Augmentation is, like
classification's and segmentation's, a pure function of (seed, epoch, sample index).
"""
from __future__ import annotations

import glob
import json
import os
import re
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.data.datasets import SeededDataset, read_image, sample_seed
from trainer.data.folders import image_error
from trainer.data.masks import VOC_CLASSES, checked_stored_size, image_orientation, open_voc
from trainer.data.scale import scale_crop_steps
from trainer.errors import DataError

COCO_KEYS = ("images", "annotations", "categories")
# a box may overhang its image by this much (pixels) before it counts as a wrong box rather than rounding or
# an annotation tool's slack: max(5% of that side, 2 px); a smaller overhang is clipped to the image
OVERHANG_FRACTION, OVERHANG_MIN_PX = 0.05, 2.0
LAYOUTS = ("ROOT/<split>/annotations.json or ROOT/<split>/_annotations.coco.json (Roboflow; its 'valid' folder "
           "for val) with the images beside it; ROOT/annotations/instances_<split>20XX.json with the images in "
           "ROOT/<split>20XX/ (COCO 2017); or data.coco_files {split: {annotations: FILE, images: DIR}}")


# ---- the split ----

class ImageAnnotations(NamedTuple):
    """One image's annotations (views into the split's arrays: do not write to them)."""
    boxes: np.ndarray  # float32 [N, 4] XYXY pixels, clipped to the image
    labels: np.ndarray  # int64 [N], 1..K
    iscrowd: np.ndarray  # bool [N]: COCO crowd regions and VOC "difficult" objects; neither trained nor scored
    area: np.ndarray  # float32 [N]: the file's area (COCO: the segment's pixels), else the box's w*h
    ann_ids: np.ndarray  # int64 [N]: the file's annotation ids


@dataclass
class CocoSplit:
    """The images and annotations of one split. Annotations of image i are rows starts[i]:starts[i+1] of the
    concatenated arrays; images without any are kept (starts[i] == starts[i+1])."""
    source: str  # the annotation file (or VOC folder) it was read from, for messages
    categories: List[Tuple[int, str]]  # (category id, name) sorted by id; label of the k-th is k + 1
    paths: List[str]
    widths: np.ndarray  # int64 [I], the real size after EXIF orientation (when exif_orientation)
    heights: np.ndarray
    image_ids: np.ndarray  # int64 [I], the file's image ids
    boxes: np.ndarray  # float32 [M, 4] XYXY
    labels: np.ndarray  # int64 [M]
    iscrowd: np.ndarray  # bool [M]
    area: np.ndarray  # float64 [M]
    file_xywh: np.ndarray  # float64 [M, 4]: the boxes exactly as the file gives them (unclipped), for scoring
    ann_ids: np.ndarray  # int64 [M]
    starts: np.ndarray  # int64 [I + 1]
    exif_orientation: bool = True  # whether sizes (and so boxes) are in the EXIF-turned frame decode_rgb gives
    _label_of: Dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._label_of = {cid: k + 1 for k, (cid, _) in enumerate(self.categories)}

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """K categories (the detectors' num_classes is K + 1, with background)."""
        return len(self.categories)

    @property
    def class_names(self) -> List[str]:
        """Names in label order: class_names[label - 1]."""
        return [name for _, name in self.categories]

    def label_of(self, category_id: int) -> int:
        """The contiguous training label (1..K) of a category id of the file."""
        try:
            return self._label_of[int(category_id)]
        except KeyError:
            raise DataError(f"category id {category_id} is not among the categories of {self.source} "
                            f"({[cid for cid, _ in self.categories]})") from None

    def category_id_of(self, label: int) -> int:
        """The file's category id of a training label (1..K); the inverse of label_of."""
        if not 1 <= int(label) <= len(self.categories):
            raise DataError(f"label {label} is not a category label of {self.source}: labels are "
                            f"1..{len(self.categories)} (0 is background)")
        return self.categories[int(label) - 1][0]

    def to_coco_gt(self) -> dict:
        """This split as a COCO ground-truth dict for pycocotools' COCOeval: image ids are the indices in the
        split (the targets' "image_id"), category ids the file's own, boxes as the file gives them (unclipped),
        crowd / difficult boxes kept as iscrowd 1 (ignored in scoring). Annotation ids are renumbered 1..M:
        COCOeval takes id 0 for "unmatched", and a file may well start at 0."""
        # the file's own numbers (unclipped, float64): an independent pycocotools run on the same file must
        # score the same detections to the same bit
        xywh = self.file_xywh.tolist()
        image_of = np.repeat(np.arange(len(self.paths)), np.diff(self.starts)).tolist()
        cats = [cid for cid, _ in self.categories]
        return {"images": [{"id": i, "file_name": p, "width": int(w), "height": int(h)}
                           for i, (p, w, h) in enumerate(zip(self.paths, self.widths, self.heights))],
                "annotations": [{"id": k + 1, "image_id": image_of[k], "category_id": cats[int(label) - 1],
                                 "bbox": xywh[k], "area": float(area), "iscrowd": int(crowd)}
                                for k, (label, area, crowd) in enumerate(zip(self.labels, self.area, self.iscrowd))],
                "categories": [{"id": cid, "name": name} for cid, name in self.categories]}

    def annotations(self, index: int) -> ImageAnnotations:
        rows = slice(int(self.starts[index]), int(self.starts[index + 1]))
        return ImageAnnotations(self.boxes[rows], self.labels[rows], self.iscrowd[rows], self.area[rows],
                                self.ann_ids[rows])


# ---- checks shared by COCO and VOC ----

def _shown_size(path, exif_orientation: bool) -> Tuple[int, int, bool]:
    """(width, height, turned) of an image file (a path, or a PackedFile) from its header (no decode): the size
    decode_rgb gives, i.e. swapped when exif_orientation and the file's EXIF orientation is a quarter turn (5-8)."""
    width, height = checked_stored_size(path)
    if exif_orientation and image_orientation(path) in (5, 6, 7, 8):
        return height, width, True
    return width, height, False


def _read_sizes(paths: Sequence, describe_image: Callable[[int], str], exif_orientation: bool,
                threads: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Widths, heights and 'turned by EXIF' of every image (paths, or PackedFiles); one DataError for missing or
    unreadable files."""
    missing = [i for i, p in enumerate(paths) if isinstance(p, str) and not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more missing image file(s))" if len(missing) > 1 else ""
        raise DataError(f"missing image file {paths[missing[0]]} ({describe_image(missing[0])}){more}")

    def one(i):
        try:
            return _shown_size(paths[i], exif_orientation), ""
        except DataError as err:  # checked_stored_size's: it names the file already
            return None, f"{err} ({describe_image(i)})"
        except Exception as err:  # PIL raises many types for a bad file: name it
            return None, f"cannot read image {paths[i]} ({describe_image(i)}): {image_error(err)}"

    sizes = np.zeros((len(paths), 2), dtype=np.int64)
    turned = np.zeros(len(paths), dtype=bool)
    first_bad, n_bad = "", 0
    with ThreadPoolExecutor(max_workers=threads) as pool:  # header reads wait on the disk, not the GIL
        for i, (result, why) in enumerate(pool.map(one, range(len(paths)))):
            if why:
                first_bad, n_bad = first_bad or why, n_bad + 1
            else:
                sizes[i] = result[:2]
                turned[i] = result[2]
    if first_bad:
        raise DataError(first_bad + (f" (and {n_bad - 1} more unreadable image(s))" if n_bad > 1 else ""))
    return sizes[:, 0], sizes[:, 1], turned


def _first(bad: np.ndarray, what: str, describe: Callable[[int], str], source: str, tail: str = "") -> None:
    """Raise one DataError for the first True of `bad` (annotation rows), with the count of the others."""
    rows = np.flatnonzero(bad)
    if len(rows):
        more = f" (and {len(rows) - 1} more such annotation(s))" if len(rows) > 1 else ""
        raise DataError(f"{source}: {describe(int(rows[0]))}: {what(int(rows[0]))}{more}{tail}")


def _build_split(source: str, categories: List[Tuple[int, str]], paths: List[str], image_ids: np.ndarray,
                 stated: np.ndarray, ann_ids: np.ndarray, image_rows: np.ndarray, labels: np.ndarray,
                 xywh: np.ndarray, iscrowd: np.ndarray, area: np.ndarray, describe: Callable[[int], str],
                 describe_image: Callable[[int], str], log, exif_orientation: bool, threads: int,
                 sources: Optional[Sequence] = None) -> CocoSplit:
    """Check the boxes (size, then against the real image sizes read from the headers), clip small overhangs,
    and pack the annotations per image. `stated` [I, 2] holds the file's (width, height), -1 where unknown;
    `image_rows` the image index of each annotation; `area` NaN where the file gives none; `sources` what
    the headers are read from when not the paths (packed shards)."""
    x, y, w, h = xywh.T
    _first(~np.isfinite(xywh).all(axis=1), lambda k: f"box {xywh[k].tolist()} (x, y, w, h) is not finite",
           describe, source)
    _first((w <= 0) | (h <= 0), lambda k: f"box {xywh[k].tolist()} (x, y, w, h) has a zero or negative width or "
                                          f"height", describe, source)

    widths, heights, turned = _read_sizes(paths if sources is None else sources, describe_image, exif_orientation,
                                          threads)
    differ = (stated >= 0).all(axis=1) & ((stated[:, 0] != widths) | (stated[:, 1] != heights))
    if differ.any():
        i = int(np.flatnonzero(differ)[0])
        n_turned = int((differ & turned).sum())
        by_exif = (f"; {n_turned} of them only because the file's EXIF orientation turns it a quarter: their boxes "
                   f"are taken to be in the turned (shown) frame" if n_turned else "")
        log(f"{source}: {int(differ.sum())} image(s) are not the size the annotations state, e.g. "
                f"{paths[i]} is {widths[i]}x{heights[i]} (WxH), stated {stated[i, 0]}x{stated[i, 1]}; using the real "
                f"size (boxes are in real pixels, nothing is rescaled){by_exif}")

    W, H = widths[image_rows].astype(np.float64), heights[image_rows].astype(np.float64)
    tol_x = np.maximum(OVERHANG_FRACTION * W, OVERHANG_MIN_PX)
    tol_y = np.maximum(OVERHANG_FRACTION * H, OVERHANG_MIN_PX)
    beyond = np.stack([-x, -y, x + w - W, y + h - H], axis=1)  # px past the left, top, right, bottom edge
    too_far = (beyond > np.stack([tol_x, tol_y, tol_x, tol_y], axis=1)).any(axis=1)

    def outside(k):
        edge = int(np.argmax(beyond[k] - np.array([tol_x[k], tol_y[k], tol_x[k], tol_y[k]])))
        return (f"box {xywh[k].tolist()} (x, y, w, h) reaches {beyond[k, edge]:g} px beyond the "
                f"{('left', 'top', 'right', 'bottom')[edge]} edge of its {int(W[k])}x{int(H[k])} (WxH) image "
                f"(tolerance {(tol_x, tol_y)[edge % 2][k]:g} px: more is a wrong box, not rounding)")

    _first(too_far, outside, describe, source)
    xyxy = np.stack([np.clip(x, 0, W), np.clip(y, 0, H), np.clip(x + w, 0, W), np.clip(y + h, 0, H)], axis=1)
    _first((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1]),
           lambda k: f"box {xywh[k].tolist()} (x, y, w, h) lies wholly outside its {int(W[k])}x{int(H[k])} image",
           describe, source)
    clipped = (beyond > 0).any(axis=1)
    if clipped.any():
        k = int(np.flatnonzero(clipped)[0])
        log(f"{source}: {int(clipped.sum())} box(es) overhang their image by up to max({OVERHANG_FRACTION:.0%} of "
                f"the side, {OVERHANG_MIN_PX:g} px) and were clipped to it, e.g. {describe(k)}")

    area = np.where(np.isnan(area), w * h, area)
    order = np.argsort(image_rows, kind="stable")  # grouped by image, in file order within an image
    starts = np.searchsorted(image_rows[order], np.arange(len(paths) + 1))
    return CocoSplit(source=source, categories=categories, paths=list(paths), widths=widths, heights=heights,
                     image_ids=np.asarray(image_ids, dtype=np.int64), boxes=xyxy[order].astype(np.float32),
                     labels=labels[order].astype(np.int64), iscrowd=iscrowd[order].astype(bool),
                     area=area[order].astype(np.float64), file_xywh=xywh[order].astype(np.float64), ann_ids=ann_ids[order].astype(np.int64),
                     starts=starts.astype(np.int64), exif_orientation=exif_orientation)


# ---- COCO JSON ----

def int64(value) -> int:
    """An id as the int64 arrays hold it; beyond their range an OverflowError (a message, not a wrap-around)."""
    number = int(value)
    if not -2 ** 63 <= number < 2 ** 63:
        raise OverflowError(f"{number} does not fit in 64 bits")
    return number


def _load_json(json_path: Path) -> dict:
    if not json_path.is_file():
        raise DataError(f"annotation file {json_path} does not exist")
    try:
        with open(json_path, "rb") as fh:
            data = json.load(fh)
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{json_path} is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise DataError(f"{json_path} is not a COCO detection file: its top level is a {type(data).__name__}, not "
                        f"an object with keys {', '.join(COCO_KEYS)}")
    missing = [k for k in COCO_KEYS if k not in data]
    if missing:
        raise DataError(f"{json_path} is not a COCO detection file: no {', '.join(repr(k) for k in missing)} key(s) "
                        f"(found {sorted(data)[:8]}; expected {', '.join(COCO_KEYS)})")
    for k in COCO_KEYS:
        if not isinstance(data[k], list):
            raise DataError(f"{json_path} is not a COCO detection file: {k!r} is a {type(data[k]).__name__}, "
                            f"not a list")
    return data


def _duplicate(ids: np.ndarray) -> Optional[int]:
    """The first id (in file order) that occurs again, or None."""
    _, first_at, counts = np.unique(ids, return_index=True, return_counts=True)
    dup = first_at[counts > 1]
    return int(ids[dup.min()]) if len(dup) else None


def read_coco(json_path, image_dir, log=print, exif_orientation: bool = True, threads: int = 4,
              open_image: Optional[Callable[[str], object]] = None) -> CocoSplit:
    """Read and check one COCO detection file; `file_name`s are relative to image_dir. See the module doc and
    _build_split for what is checked; images without annotations are kept, in file order. `open_image`: what
    an image's path is read from instead of the file (packed shards: a PackedFile)."""
    json_path, image_dir = Path(json_path), Path(image_dir)
    data = _load_json(json_path)
    src = str(json_path)

    cats = []
    for k, c in enumerate(data["categories"]):
        try:
            cats.append((int64(c["id"]), str(c["name"])))
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise DataError(f"{src}: category #{k} ({str(c)[:80]}) needs an integer 'id' and a 'name' "
                            f"({type(err).__name__}: {err})") from None
    if not cats:
        raise DataError(f"{src}: 'categories' is empty: nothing to detect")
    cat_ids = np.array([cid for cid, _ in cats], dtype=np.int64)
    dup = _duplicate(cat_ids)
    if dup is not None:
        names = [name for cid, name in cats if cid == dup]
        raise DataError(f"{src}: category id {dup} appears {len(names)} times ({', '.join(map(repr, names))})")
    categories = sorted(cats)
    sorted_cat_ids = np.array([cid for cid, _ in categories], dtype=np.int64)

    n_img = len(data["images"])
    image_ids = np.empty(n_img, dtype=np.int64)
    stated = np.full((n_img, 2), -1, dtype=np.int64)
    paths = []
    for i, im in enumerate(data["images"]):
        try:
            image_ids[i] = int(im["id"])
            paths.append(str(image_dir / str(im["file_name"])))
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise DataError(f"{src}: image #{i} ({str(im)[:80]}) needs an integer 'id' and a 'file_name' "
                            f"({type(err).__name__}: {err})") from None
        try:  # optional: the real size is read from the file anyway
            stated[i] = int(im["width"]), int(im["height"])
        except (KeyError, TypeError, ValueError, OverflowError):
            pass
    if not n_img:
        raise DataError(f"{src}: 'images' is empty")
    dup = _duplicate(image_ids)
    if dup is not None:
        files = [p for p, iid in zip(paths, image_ids) if iid == dup]
        raise DataError(f"{src}: image id {dup} appears {len(files)} times ({files[0]}, {files[1]})")

    anns = data["annotations"]
    m = len(anns)
    ann_ids, ann_image, ann_cat = (np.empty(m, dtype=np.int64) for _ in range(3))
    xywh = np.empty((m, 4), dtype=np.float64)
    iscrowd = np.zeros(m, dtype=bool)
    area = np.full(m, np.nan)
    for k, a in enumerate(anns):
        try:
            ann_ids[k], ann_image[k], ann_cat[k] = int(a["id"]), int(a["image_id"]), int(a["category_id"])
            bbox = a["bbox"]
            if len(bbox) != 4:
                raise ValueError(f"bbox has {len(bbox)} numbers")
            xywh[k] = [float(v) for v in bbox]
            crowd = a.get("iscrowd") or 0  # absent or null: not a crowd
            if crowd not in (0, 1):
                raise ValueError(f"iscrowd must be 0 or 1, got {crowd!r}")
            iscrowd[k] = bool(crowd)
            if a.get("area") is not None:
                area[k] = float(a["area"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            who = a.get("id", f"#{k}") if isinstance(a, dict) else f"#{k}"
            raise DataError(f"{src}: annotation {who} needs an integer 'id', 'image_id', 'category_id' and a 'bbox' "
                            f"[x, y, w, h] ({type(err).__name__}: {err})") from None
    del data, anns  # the parsed JSON (GBs for COCO train) goes; only the arrays stay
    dup = _duplicate(ann_ids)
    if dup is not None:
        raise DataError(f"{src}: annotation id {dup} appears more than once (each annotation needs its own id)")

    by_id = np.argsort(image_ids)
    pos = np.clip(np.searchsorted(image_ids[by_id], ann_image), 0, n_img - 1)
    known = image_ids[by_id][pos] == ann_image
    image_rows = by_id[pos]
    _first(~known, lambda k: f"image_id {ann_image[k]} is not among the {n_img} images of the file",
           lambda k: f"annotation {ann_ids[k]}", src)
    cpos = np.clip(np.searchsorted(sorted_cat_ids, ann_cat), 0, len(categories) - 1)
    _first(sorted_cat_ids[cpos] != ann_cat,
           lambda k: f"category_id {ann_cat[k]} is not among the categories {sorted_cat_ids.tolist()}",
           lambda k: f"annotation {ann_ids[k]} (image {ann_image[k]}, {paths[image_rows[k]]})", src)

    return _build_split(
        src, categories, paths, image_ids, stated, ann_ids, image_rows, cpos + 1, xywh, iscrowd, area,
        describe=lambda k: f"annotation {ann_ids[k]} (image {ann_image[k]}, {paths[image_rows[k]]})",
        describe_image=lambda i: f"image id {image_ids[i]} in {src}", log=log,
        exif_orientation=exif_orientation, threads=threads,
        sources=None if open_image is None else [open_image(p) for p in paths])


# ---- finding splits ----

def find_coco_splits(root, splits: Sequence[str], files: Optional[dict] = None, optional: Sequence[str] = ()
                     ) -> Dict[str, Tuple[Path, Path]]:
    """split -> (annotation file, image folder) for each of `splits` (and of `optional` when found), from
    `files` {split: {"annotations": FILE, "images": DIR}} when it names the split, else from the LAYOUTS
    under root. Only paths are looked at: check_same_categories compares the files once read."""
    root = Path(root) if root is not None else None
    files = dict(files or {})
    unknown = sorted(set(files) - set(splits) - set(optional))
    if unknown:
        raise DataError(f"data.coco_files names split(s) {unknown}, not among the splits read here "
                        f"({', '.join(list(splits) + list(optional))})")
    found: Dict[str, Tuple[Path, Path]] = {}
    for split in list(splits) + [s for s in optional if s not in splits]:
        if split in files:
            entry = files[split]
            if not isinstance(entry, dict) or set(entry) != {"annotations", "images"}:
                raise DataError(f"data.coco_files.{split} must be {{annotations: FILE, images: DIR}}, got {entry!r}")
            for key in ("annotations", "images"):
                if not isinstance(entry[key], (str, os.PathLike)) or not str(entry[key]):
                    raise DataError(f"data.coco_files.{split}.{key} must be one path, got {entry[key]!r}")
            ann, images = Path(entry["annotations"]), Path(entry["images"])
            if not ann.is_file():
                raise DataError(f"data.coco_files.{split}.annotations: {ann} "
                                + ("is a folder, not a COCO annotation file" if ann.is_dir() else "does not exist"))
            if not images.is_dir():
                raise DataError(f"data.coco_files.{split}.images: {images} is not a folder")
            found[split] = (ann, images)
            continue
        if root is None or not root.is_dir():
            raise DataError(f"data root {root} is not a folder; expected {LAYOUTS}")
        candidates = []
        for folder in [split] + (["valid"] if split == "val" else []):  # Roboflow exports name val 'valid'
            for name in ("annotations.json", "_annotations.coco.json"):
                if (root / folder / name).is_file():
                    candidates.append((root / folder / name, root / folder))
        for ann in sorted(glob.glob(str(root / "annotations" / f"instances_{glob.escape(split)}20*.json"))):
            year = re.fullmatch(rf"instances_{re.escape(split)}(20\d\d)\.json", os.path.basename(ann))
            if year:
                candidates.append((Path(ann), root / f"{split}{year.group(1)}"))
        if not candidates:
            if split in splits:
                raise DataError(f"no {split} split under {root}: looked for {LAYOUTS}")
            continue
        if len(candidates) > 1:
            raise DataError(f"{len(candidates)} annotation files for split {split} under {root} "
                            f"({', '.join(str(a) for a, _ in candidates)}); keep one or choose with data.coco_files")
        ann, images = candidates[0]
        if not images.is_dir():
            raise DataError(f"{ann} has no image folder {images} beside it (COCO layout: ROOT/<split>20XX/)")
        found[split] = (ann, images)
    return found


def check_same_categories(splits: Dict[str, CocoSplit]) -> None:
    """Every split must have the same (category id, name) list: a label means one thing in all of them."""
    items = list(splits.items())
    ref_name, ref = items[0]
    for name, split in items[1:]:
        if split.categories == ref.categories:
            continue
        a, b = dict(ref.categories), dict(split.categories)
        diffs = [f"id {cid} is {a[cid]!r} in {ref_name} but {b[cid]!r} in {name}" for cid in sorted(set(a) & set(b))
                 if a[cid] != b[cid]]
        if set(a) - set(b):
            diffs.append(f"ids only in {ref_name}: {sorted(set(a) - set(b))}")
        if set(b) - set(a):
            diffs.append(f"ids only in {name}: {sorted(set(b) - set(a))}")
        raise DataError(f"splits {ref_name} ({ref.source}) and {name} ({split.source}) have different categories: "
                        f"{'; '.join(diffs)}")


def read_coco_splits(root, splits: Sequence[str], files: Optional[dict] = None, optional: Sequence[str] = (),
                     log=print, exif_orientation: bool = True) -> Dict[str, CocoSplit]:
    """find_coco_splits, read_coco on each, check_same_categories: the one call a data builder needs."""
    found = find_coco_splits(root, splits, files, optional)
    out = {split: read_coco(ann, images, log=log, exif_orientation=exif_orientation)
           for split, (ann, images) in found.items()}
    check_same_categories(out)
    return out


# ---- Pascal VOC ----

def voc_detection_split(root, year: str = "2012", image_set: str = "train", log=print,
                        exif_orientation: bool = True) -> CocoSplit:
    """An existing Pascal VOC copy (root holds VOCdevkit/VOC<year>/) as a CocoSplit, read offline through
    torchvision's VOCDetection (its file lists and XML parsing): categories are the 20 classes with ids 1..20.

    VOC boxes are 1-based inclusive pixel indices: x1 = xmin - 1, x2 = xmax in pixel-edge coordinates (as
    detectron2's VOC reader). "difficult" objects become iscrowd: VOC's evaluation neither rewards nor
    penalises a detection of one, which is what an ignored (crowd) box is in COCO's evaluation (a detection
    matching it is dropped, not a false positive); training skips them as it skips crowd boxes.
    """
    from torchvision.datasets import VOCDetection

    year = str(year)
    voc, where = open_voc(VOCDetection, root, year, image_set)
    missing = [p for p in voc.annotations if not os.path.isfile(p)]
    if missing:
        raise DataError(f"Pascal VOC {year} {image_set}: {len(missing)} annotation file(s) missing, e.g. {missing[0]} "
                        f"(an incomplete extraction?)")

    classes = VOC_CLASSES[1:]  # without background: id k + 1 for classes[k]
    stated = np.full((len(voc.images), 2), -1, dtype=np.int64)
    rows, xyxy1, labels, difficult, xml_of = [], [], [], [], []
    for i, xml_path in enumerate(voc.annotations):
        try:
            ann = VOCDetection.parse_voc_xml(ET.parse(xml_path).getroot())["annotation"]
            size = ann.get("size", {})
            if "width" in size and "height" in size:
                stated[i] = int(float(size["width"])), int(float(size["height"]))
            objects = ann.get("object", [])
            for j, obj in enumerate(objects if isinstance(objects, list) else [objects]):
                if obj["name"] not in classes:
                    raise DataError(f"{xml_path}: object #{j} is a {obj['name']!r}, not one of the 20 VOC classes")
                b = obj["bndbox"]
                xyxy1.append([float(b[k]) for k in ("xmin", "ymin", "xmax", "ymax")])
                labels.append(classes.index(obj["name"]) + 1)
                difficult.append(str(obj.get("difficult", "0")).strip() == "1")
                rows.append(i)
                xml_of.append(j)
        except DataError:
            raise
        except Exception as err:  # ParseError, a missing tag (KeyError), a non-number (ValueError)
            raise DataError(f"cannot read VOC annotation {xml_path}: {type(err).__name__}: {err}") from None
    box = np.asarray(xyxy1, dtype=np.float64).reshape(-1, 4)
    xywh = np.stack([box[:, 0] - 1, box[:, 1] - 1, box[:, 2] - box[:, 0] + 1, box[:, 3] - box[:, 1] + 1], axis=1)
    rows_arr = np.asarray(rows, dtype=np.int64)
    # VOC ids are names like 2008_000123: as an integer 2008000123 (unique, and readable back)
    names = [Path(p).stem for p in voc.images]
    ids = [int(n.replace("_", "")) if n.replace("_", "").isdigit() else -1 for n in names]
    if -1 in ids or len(set(ids)) != len(ids):
        ids = list(range(len(names)))
    return _build_split(
        where, [(k + 1, name) for k, name in enumerate(classes)], list(voc.images), np.asarray(ids), stated,
        np.arange(1, len(rows) + 1), rows_arr, np.asarray(labels, dtype=np.int64), xywh,
        np.asarray(difficult, dtype=bool), np.full(len(rows), np.nan),
        describe=lambda k: f"object #{xml_of[k]} of {voc.annotations[rows[k]]}",
        describe_image=lambda i: f"listed in ImageSets/Main/{image_set}.txt", log=log,
        exif_orientation=exif_orientation, threads=4)


# ---- dataset ----

class DetectionDataset(SeededDataset):
    """The images of a CocoSplit; items are (image float32 [3,H,W] in [0,1], target {"boxes" float32 [N,4]
    XYXY, "labels" int64 [N] (1..K), "image_id": index in the split, "orig_size": (h, w) before the transform}).

    Crowd (and VOC difficult) boxes are never in the target: training must not learn them, and evaluation
    reads its ground truth, ignored boxes included, from `self.split`. The transform runs under a torch RNG
    seeded by (seed, epoch, index), so a resumed run sees the same augmentation."""

    def __init__(self, split: CocoSplit, transform=None, seed: int = 0):
        super().__init__(transform if transform is not None else detection_eval_transform(), seed)
        self.split = split
        self.paths = split.paths  # for the data fingerprint
        self.exif_orientation = split.exif_orientation

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int) -> torch.Tensor:
        """The image as a (3, H, W) uint8 RGB tensor, turned by its EXIF orientation when the split's sizes are."""
        return read_image(self.paths[index], self.exif_orientation)

    def __getitem__(self, index: int):
        image = self.load(index)
        h, w = (int(v) for v in image.shape[-2:])
        if (w, h) != (int(self.split.widths[index]), int(self.split.heights[index])):  # boxes would be misplaced
            raise DataError(f"image {self.paths[index]} decodes to {w}x{h} (WxH) but its header said "
                            f"{self.split.widths[index]}x{self.split.heights[index]} when {self.split.source} was read "
                            f"(changed since, or an EXIF orientation PIL reads differently)")
        ann = self.split.annotations(index)
        keep = ~ann.iscrowd
        target = {"boxes": torch.from_numpy(ann.boxes[keep]), "labels": torch.from_numpy(ann.labels[keep])}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            image, target = self.transform(image, target)
        target["image_id"] = index
        target["orig_size"] = (h, w)
        return image, target


def collate_detection(batch) -> "DetectionBatch":
    """(list of images, list of targets): the detectors batch images of different sizes themselves."""
    return DetectionBatch(([image for image, _ in batch], [target for _, target in batch]))


class DetectionBatch(tuple):
    """(list of images, list of targets), as collate_detection makes it; sent from a DataLoader worker to the
    main process as three tensors for the whole batch (pixels, boxes, labels) instead of three per image, and
    received as the same lists (of views into those three).

    torch moves each tensor a worker sends into a shared-memory file of its own (created, mapped, its file
    descriptor passed over a socket): with the image, boxes and labels of each image sent apart, that was 3
    files per image, and a 32-px COCO folder read at 650 images/s where a masks folder read at 5,800
    (bench/dense_shards.py)."""

    def __reduce__(self):
        images, targets = self
        if not images or len({x.dtype for x in images}) > 1:  # nothing to pack (a batch is one dtype)
            return DetectionBatch, ((list(images), list(targets)),)
        boxes = [t["boxes"].reshape(-1, 4) for t in targets]
        rest = [{k: v for k, v in t.items() if k not in ("boxes", "labels")} for t in targets]
        return _unpacked_detections, (torch.cat([x.reshape(-1) for x in images]), [tuple(x.shape) for x in images],
                                      torch.cat(boxes), torch.cat([t["labels"] for t in targets]),
                                      [len(b) for b in boxes], rest)


def _unpacked_detections(pixels: torch.Tensor, shapes: list, boxes: torch.Tensor, labels: torch.Tensor,
                         counts: list, rest: list) -> DetectionBatch:
    """What DetectionBatch.__reduce__ packed, as the lists it came from (views: nothing copied)."""
    images = [x.view(shape) for x, shape in zip(pixels.split([int(np.prod(s)) for s in shapes]), shapes)]
    targets = [{"boxes": b, "labels": lab, **r} for b, lab, r in zip(boxes.split(counts), labels.split(counts), rest)]
    return DetectionBatch((images, targets))


# ---- transforms ----

class RandomRelativeScale(v2.Transform):
    """Resize by one factor drawn uniformly from `scale_range`, relative to the image's own size (v2.ScaleJitter
    is relative to a fixed target size instead); boxes follow."""

    def __init__(self, scale_range: Tuple[float, float]):
        super().__init__()
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise DataError(f"scale jitter range {scale_range} must be (min, max) with 0 < min <= max")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + float(torch.rand(1)) * (hi - lo)
        return dict(size=[max(1, int(round(h * s))), max(1, int(round(w * s)))])

    def transform(self, inpt, params):
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class _IoUCrop(v2.RandomIoUCrop):
    """RandomIoUCrop that leaves an image without boxes whole: the stock one only stops on its 'no crop' draw
    then, after 40 wasted trials per other draw."""

    def make_params(self, flat_inputs):
        boxes = next(x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes))
        return {} if boxes.shape[0] == 0 else super().make_params(flat_inputs)


def _labels(sample):
    return sample[1]["labels"]  # (image, target): the labels go wherever their boxes go


class DetectionTransform:
    """A v2 chain on (image uint8 [3,H,W], {"boxes": float32 [N,4] XYXY, "labels": int64 [N]}), returned as
    plain tensors: (image float32 [3,H',W'] in [0,1], {"boxes", "labels"}), zero boxes being a [0, 4] tensor."""

    def __init__(self, steps: list):
        self.chain = v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])  # images only; boxes stay float

    def __call__(self, image: torch.Tensor, target: dict):
        h, w = image.shape[-2:]
        boxes = tv_tensors.BoundingBoxes(target["boxes"].reshape(-1, 4).float(), format="XYXY", canvas_size=(h, w))
        x, out = self.chain(tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"]})
        return x.as_subclass(torch.Tensor), {"boxes": out["boxes"].as_subclass(torch.Tensor).reshape(-1, 4),
                                             "labels": out["labels"]}


# the padding colour of a scale-jittered canvas (uint8): the detectors' normalisation mean (DETECTOR_MEAN in
# trainer/data/__init__.py), so padding is 0 once normalised, as the reference's FixedSizeCrop(fill=mean)
DETECTOR_MEAN_UINT8 = (124, 116, 104)


def detection_train_transform(hflip: bool, scale_jitter: Optional[Tuple[float, float]], iou_crop: bool,
                              color_jitter: float, scale_range: Optional[Sequence[float]] = None,
                              image_size: Optional[int] = None) -> DetectionTransform:
    """Training augmentation moving boxes with the pixels: colour jitter (image only), an SSD-style IoU crop
    (boxes whose centre leaves the crop dropped), a scale of the image's own size, a horizontal flip; then
    boxes clamped to the image and those under 1 px wide or high dropped with their labels. No resize to a
    fixed size: the detectors resize themselves (so a scale here changes the resolution seen, not the size).
    `scale_range` (trainer/data/scale.py): the image fitted into `image_size` squared, scaled by a factor from
    the range, padded and cropped to that square (the detection reference's "lsj" preset); the detector then
    skips its own resize in training (Detection.build_model)."""
    steps = []
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    if iou_crop:
        steps += [_IoUCrop(), v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_labels)]
    if scale_jitter is not None:
        steps.append(RandomRelativeScale(scale_jitter))
    if scale_range is not None:
        steps += scale_crop_steps(image_size, scale_range, fit=True, image_fill=DETECTOR_MEAN_UINT8)
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_labels)]
    return DetectionTransform(steps)


def detection_eval_transform() -> DetectionTransform:
    """To float in [0,1] only: the detectors resize internally and map their boxes back to these pixels."""
    return DetectionTransform([])
