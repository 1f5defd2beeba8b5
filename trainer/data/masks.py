"""Semantic segmentation data: image + mask folders, Pascal VOC, mask checks, joint transforms, collation.

A mask is a single-channel PNG of class indices the size of its image (mode L, P: the palette index is the
class, the Pascal VOC convention; or 16-bit I;16/I), with `ignore_index` (255 by default) for pixels that
count nowhere. A mask is in the frame of its image's STORED pixels: when the image file carries an EXIF
orientation (and data.exif_orientation is on), that same turn is applied to the mask, since masks carry no
tag of their own. Augmentation moves image and mask together (torchvision v2 with tv_tensors; masks are
only ever resized NEAREST, never interpolated) and is, like classification's, a pure function of
(seed, epoch, sample index).
"""
from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from trainer.data.datasets import SeededDataset, decode_named, open_source, read_bytes, read_image, sample_seed
from trainer.data.folders import EXIF_ORIENTATION, JPEG_MAGIC, ends_complete, image_error, jpeg_orientation
from trainer.data.scale import scale_crop_steps
from trainer.errors import DataError
from trainer.files import read_lines

Pair = Tuple[str, str]  # (image path, mask path); either may be a PackedFile (a row of packed shards) instead
MASK_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LAYOUT = ("ROOT/<split>/images/<name>.<jpg|jpeg|png|bmp|tif|tiff|webp> with ROOT/<split>/masks/<name>.png "
          "for split train (+ val, test) and ROOT/classes.txt")
# the 21 Pascal VOC classes in mask-index order (0 = background; 255 marks object borders and "difficult" pixels)
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]
# what PIL's ImageOps.exif_transpose does to the stored pixels for each EXIF orientation, on an (H, W) array of
# any integer type (2 flips left-right, 6 turns 90 degrees clockwise, ...; tested against PIL on images)
ORIENT_MASK = {2: lambda m: m[:, ::-1], 3: lambda m: m[::-1, ::-1], 4: lambda m: m[::-1],
               5: lambda m: m.T, 6: lambda m: np.rot90(m, -1), 7: lambda m: m[::-1, ::-1].T,
               8: lambda m: np.rot90(m, 1)}
QUARTER_TURNS = (5, 6, 7, 8)  # the EXIF orientations that swap an image's width and height


# ---- finding pairs ----

def read_class_names(root: Path, class_names: Optional[Sequence[str]]) -> List[str]:
    """data.class_names when given, else ROOT/classes.txt (one name a line, index 0 first; blank lines and the
    spaces around a name ignored). At least 2 distinct names."""
    if class_names is not None:
        names, where = [str(n).strip() for n in class_names], "data.class_names"
    else:
        path = Path(root) / "classes.txt"
        if not path.is_file():
            raise DataError(f"no class list: {path} is missing; write it (one class name per line, the name of mask "
                            f"value 0 first) or pass data.class_names")
        names, where = read_lines(path, "class list"), str(path)
    if len(names) < 2:
        raise DataError(f"need at least 2 classes, found {len(names)} ({names}) in {where}")
    seen = set()
    for name in names:
        if not name:
            raise DataError(f"empty class name in {where}")
        if name in seen:
            raise DataError(f"class name {name!r} appears twice in {where}")
        seen.add(name)
    return names


def _list_files(folder: Path, extensions: Sequence[str]) -> Dict[str, str]:
    """stem -> path of the files in `folder` (not recursive) ending in one of `extensions`; hidden files skipped."""
    found: Dict[str, str] = {}
    with os.scandir(folder) as it:
        for entry in sorted(it, key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file() or not entry.name.lower().endswith(extensions):
                continue
            stem = os.path.splitext(entry.name)[0]
            if stem in found:
                raise DataError(f"two files named {stem}.* in {folder} ({os.path.basename(found[stem])}, "
                                f"{entry.name}): each image needs its own name, as its mask is found by it")
            found[stem] = entry.path
    return found


def scan_pairs(split_dir: Path) -> List[Pair]:
    """(image, mask) pairs of one split folder, sorted by image path; every image needs its mask and vice versa."""
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise DataError(f"missing folder {folder}: expected {LAYOUT}")
    images = _list_files(images_dir, MASK_IMAGE_EXTENSIONS)
    masks = _list_files(masks_dir, (".png",))
    lossy = _list_files(masks_dir, tuple(e for e in MASK_IMAGE_EXTENSIONS if e != ".png"))
    if lossy:  # a JPEG mask has smeared class indices at every edge
        raise DataError(f"mask {next(iter(lossy.values()))} is not a PNG: masks must be lossless PNGs of class indices")
    orphans = sorted(set(images) - set(masks))
    unmatched = sorted(set(masks) - set(images))
    if orphans or unmatched:
        example = (f"e.g. {images[orphans[0]]} has no {masks_dir / (orphans[0] + '.png')}" if orphans
                   else f"e.g. {masks[unmatched[0]]} has no image {images_dir / unmatched[0]}.<ext>")
        raise DataError(f"{split_dir}: {len(orphans)} image(s) without a mask and {len(unmatched)} mask(s) without an "
                        f"image ({example}); every images/<name>.<ext> needs masks/<name>.png")
    if not images:
        raise DataError(f"no images in {images_dir} ({', '.join(MASK_IMAGE_EXTENSIONS)})")
    return sorted((images[stem], masks[stem]) for stem in images)


def seeded_split(pairs: List[Pair], fraction: float, seed: int) -> Tuple[List[Pair], List[Pair]]:
    """round(fraction x count) of `pairs` held out by a seeded permutation (at least one left to train on); both
    parts keep the sorted order."""
    held = np.zeros(len(pairs), dtype=bool)
    n_held = min(int(round(fraction * len(pairs))), len(pairs) - 1)
    held[np.random.default_rng(seed).permutation(len(pairs))[:n_held]] = True
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


def scan_mask_folder(root, val_fraction: float, split_seed: int, class_names: Optional[Sequence[str]] = None,
                     ignore_index: int = 255) -> Tuple[List[str], Dict[str, List[Pair]]]:
    """Class names and (image, mask) pairs per split of a masks folder (LAYOUT).

    Without a val/ folder, val is a seeded `val_fraction` of train (0: the test split validates, as for image
    folders). Only the file names are checked here; check_masks decodes the masks.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data path does not exist or is not a folder: {root} (expected {LAYOUT})")
    if not (root / "train").is_dir():
        raise DataError(f"no training split: {root / 'train'} is missing (expected {LAYOUT})")
    classes = read_class_names(root, class_names)
    check_ignore_index(classes, ignore_index, "data.class_names" if class_names is not None else root / "classes.txt")
    splits = {split: scan_pairs(root / split) for split in ("train", "val", "test") if (root / split).is_dir()}
    return classes, with_val_split(root, splits, val_fraction, split_seed)


def check_ignore_index(classes: Sequence[str], ignore_index: int, where) -> None:
    """ignore_index marks pixels that count nowhere: it may not be a class's index (`where`: the class list)."""
    if 0 <= ignore_index < len(classes):
        raise DataError(f"data.ignore_index={ignore_index} is the index of class '{classes[ignore_index]}' "
                        f"({len(classes)} classes in {where}); choose an ignore_index of {len(classes)} or more "
                        f"(255 is usual)")


def with_val_split(root, splits: dict, val_fraction: float, split_seed: int) -> dict:
    """`splits` (train, and val and test where their folders exist) with a val split: without a val folder, a
    seeded `val_fraction` of train, or (0) the test split. The items may be pairs or rows of packed shards."""
    if "val" not in splits:
        if val_fraction > 0:
            splits["train"], splits["val"] = seeded_split(splits["train"], val_fraction, split_seed)
            if not splits["val"]:
                raise DataError(f"data.val_fraction={val_fraction} holds out 0 of the {len(splits['train'])} images in "
                                f"{root / 'train'}; raise data.val_fraction or add a val/ folder")
        elif "test" in splits:
            splits["val"] = splits["test"]  # all of train trains; the test split validates (see data.val_fraction)
        else:
            raise DataError(f"{root} has no val/ or test/ folder and data.val_fraction is 0: nothing to validate on")
    return splits


def open_voc(dataset_class, root, year: str, image_set: str):
    """torchvision's VOCSegmentation or VOCDetection (`dataset_class`) over an existing copy (root holds
    VOCdevkit/VOC<year>/), offline, with each way it can fail said in one line naming the folder or the file;
    returned with that VOC<year> folder."""
    from torchvision.datasets.voc import DATASET_YEAR_DICT

    year = str(year)
    where = os.path.join(str(root), DATASET_YEAR_DICT.get(year, {}).get("base_dir", f"VOCdevkit/VOC{year}"))
    try:
        voc = dataset_class(str(root), year=year, image_set=image_set, download=False)
    except ValueError as err:  # torchvision's verify_str_arg: an unknown year or image set
        raise DataError(f"Pascal VOC: {err} (data.voc_year {year!r}, split {image_set!r})") from None
    except RuntimeError:  # "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"Pascal VOC {year} not found: looked for {where} under data.root={root}; data.download is not "
                        f"supported for VOC: download and extract VOCtrainval (and for 2007 VOCtest) from "
                        f"http://host.robots.ox.ac.uk/pascal/VOC/ on a machine with internet and point data.root at "
                        f"the folder holding VOCdevkit/") from None
    except OSError as err:  # the image-set list is missing
        raise DataError(f"Pascal VOC {year} under {where} has no {image_set} split list: {err.filename} "
                        f"is missing") from None
    if not voc.images:
        raise DataError(f"Pascal VOC {year} {image_set} split lists no images ({where})")
    return voc, where


def voc_pairs(root, year: str = "2012", image_set: str = "train") -> List[Pair]:
    """(image, mask) pairs of an existing Pascal VOC copy (root holds VOCdevkit/VOC<year>/), read offline through
    torchvision's VOCSegmentation: JPEGImages/<id>.jpg with SegmentationClass/<id>.png (palette indices)."""
    from torchvision.datasets import VOCSegmentation

    voc, _ = open_voc(VOCSegmentation, root, year, image_set)
    pairs = list(zip(voc.images, voc.masks))
    missing = [p for pair in pairs for p in pair if not os.path.isfile(p)]
    if missing:
        raise DataError(f"Pascal VOC {year} {image_set}: {len(missing)} listed file(s) missing, e.g. {missing[0]} "
                        f"(an incomplete extraction?)")
    return pairs


# ---- reading masks ----

def read_mask(path) -> np.ndarray:
    """A mask file's class indices (a path, or a PackedFile) as a 2-D integer array (uint8, uint16 or int32), in
    its stored frame.

    Palette images (mode P) give their indices, never their colours; 1-bit masks give 0/1."""
    return read_mask_file(path)[0]


def read_mask_file(path) -> Tuple[np.ndarray, dict]:
    """read_mask's indices, and what writing them again as the same file needs (trainer pack --max-side
    does): {"mode": PIL's, "palette": a P mask's palette (else None), "transparency": its PNG's (else None)}."""
    try:
        with open_source(path) as fh, Image.open(fh) as img:
            mode = img.mode
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
                raise DataError(f"mask {path} is a colour image (mode {mode}): masks must be single-channel PNGs of "
                                f"class indices (mode L or P); convert a colour mask to indices first")
            if mode not in ("L", "P", "1", "I") and not mode.startswith("I;16"):
                raise DataError(f"mask {path} has mode {mode}: masks must be single-channel PNGs of class indices "
                                f"(mode L or P, or 16-bit)")
            arr = np.array(img)
            how = {"mode": mode, "palette": img.getpalette() if mode == "P" else None,
                   "transparency": img.info.get("transparency")}
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for a bad file: name it
        raise DataError(f"cannot read mask {path}: {image_error(err)}") from None
    return (arr.astype(np.uint8) if arr.dtype == bool else arr), how


def mask_size_error(image_path, mask_path, image_size: Tuple[int, int], mask_size: Tuple[int, int],
                    orientation: Callable[[], int]) -> str:
    """"" when a mask is its image's stored size (width, height), else the line saying that it is not;
    `orientation()`: the image's EXIF orientation, asked only then (a quarter turn explains a swapped size)."""
    if mask_size == image_size:
        return ""
    # the image's orientation turns both at load, so the stored sizes must agree whatever it is
    why = (f"mask {mask_path} is {mask_size[0]}x{mask_size[1]} (WxH) but its image {image_path} is "
           f"{image_size[0]}x{image_size[1]}")
    try:
        turned = orientation() in QUARTER_TURNS
    except Exception:
        turned = False
    if turned and mask_size == image_size[::-1]:
        why += (" as stored (its EXIF orientation turns it to the mask's size): draw masks on the stored pixels, "
                "which the image's orientation then turns with it, or save the image upright")
    return why


def _png_may_hold_orientation(fh) -> bool:
    """Whether a PNG has any chunk PIL reads an orientation from (eXIf, the 'Raw profile type exif' text, XMP),
    found by walking the chunk headers: no pixel is decoded (PIL's getexif decodes a PNG whole to find out)."""
    fh.seek(8)  # past the signature
    while True:
        head = fh.read(8)
        if len(head) < 8:
            return True  # truncated: let PIL say what it finds
        length, kind = struct.unpack(">I4s", head)
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        after = fh.tell() + length + 4  # data, then the CRC
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword = fh.read(min(length, 80)).split(b"\0", 1)[0]
            if keyword in (b"Raw profile type exif", b"XML:com.adobe.xmp"):
                return True
        fh.seek(after)


def image_orientation(path) -> int:
    """The EXIF orientation (1-8; 1 = none) that decode_rgb applies to this image file (a path, a PackedFile or the
    file's bytes), read without decoding it.

    JPEGs: folders.jpeg_orientation, the rule of every JPEG decode. Other formats: what PIL's getexif finds,
    as load_rgb reads it."""
    with open_source(path) as fh:
        start = fh.read(8)
        if start[:3] == JPEG_MAGIC:
            fh.seek(0)
            with Image.open(fh) as img:
                return jpeg_orientation(img)
        if start == b"\x89PNG\r\n\x1a\n" and not _png_may_hold_orientation(fh):
            return 1
        fh.seek(0)
        with Image.open(fh) as img:
            return int(img.getexif().get(EXIF_ORIENTATION, 1))


def stored_size(img: Image.Image) -> Tuple[int, int]:
    """(width, height) of an opened image's stored pixels, before any EXIF turn. Pillow 13 reports a TIFF's size
    already turned by its orientation (it turns TIFFs on load): the TIFF's own width and length tags say what
    is stored."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 256 in tags and 257 in tags:  # ImageWidth, ImageLength
        return int(tags[256]), int(tags[257])
    return img.size


def checked_stored_size(source) -> Tuple[int, int]:
    """stored_size of an image file (a path, or a PackedFile) from its header, no pixel decoded, after checking
    that the file is whole: a copy cut short keeps its header, so its end marker is looked for (as image folders
    do), and a file without one (cut short, or with a camera trailer after it) is decoded in full: a DataError
    naming it when that fails."""
    with open_source(source) as fh, Image.open(fh) as img:
        size = stored_size(img)
        complete = ends_complete(fh, img.format)
    if not complete:
        read_image(source, exif_orientation=False)
    return size


def _check_pair(pair: Pair, num_classes: int, ignore_index: int):
    """(per-class pixel counts, "") of one pair, or (None, why) when it is bad."""
    image_path, mask_path = pair
    try:
        image_size = checked_stored_size(image_path)
        mask = read_mask(mask_path)
    except DataError as err:
        return None, str(err)
    except Exception as err:
        return None, f"cannot read image {image_path}: {image_error(err)}"
    why = mask_size_error(image_path, mask_path, image_size, (mask.shape[1], mask.shape[0]),
                          lambda: image_orientation(image_path))
    if why:
        return None, why
    if mask.dtype.kind == "u" or (mask.min() >= 0 and mask.max() <= 65535):  # uint8/16, or int32 in 16 bits
        hist = np.bincount(mask.ravel(), minlength=num_classes)
        values = np.flatnonzero(hist)
        counts = hist[values]
    else:  # negative or beyond 16 bits (mode I): a sparse count
        values, counts = np.unique(mask, return_counts=True)
    ok = ((values >= 0) & (values < num_classes)) | (values == ignore_index)
    if not ok.all():
        worst = int(values[~ok][-1])  # the largest value that is no class
        why = (f"mask {mask_path} has value {worst}, neither a class index (0-{num_classes - 1}) nor "
               f"data.ignore_index={ignore_index} ({int(counts[~ok].sum())} such pixel(s), {int((~ok).sum())} "
               f"distinct value(s))")
        if worst >= num_classes:
            why += (f"; the class list (classes.txt or data.class_names) has too few names: {num_classes} for mask "
                    f"values up to {worst}")
        return None, why
    total = np.zeros(num_classes, dtype=np.int64)
    real = (values >= 0) & (values < num_classes)  # ignore_index may be among the values, and is no class
    total[values[real]] = counts[real]
    return total, ""


def check_masks(pairs: Sequence[Pair], num_classes: int, ignore_index: int, threads: int = 4) -> List[int]:
    """Decode every mask once and check it against its image; returns the pixels of each class over all the
    masks (ignored pixels left out), for class weights.

    Each mask must be a single-channel image of class indices (mode L, P or 16-bit) the size of its image (read
    from the image's header, no decode), with every value < num_classes or == ignore_index. The first bad pair
    in order raises a DataError naming its file. Threads: PNG decoding releases the GIL.
    """
    total = np.zeros(num_classes, dtype=np.int64)
    first_bad, n_bad = "", 0
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        for counts, why in pool.map(lambda pair: _check_pair(pair, num_classes, ignore_index), pairs):
            if why:
                first_bad, n_bad = first_bad or why, n_bad + 1
            else:
                total += counts
    except BaseException:  # a stop request mid-way: drop the queued masks instead of decoding them all first
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    if first_bad:
        raise DataError(first_bad + (f" (and {n_bad - 1} more bad mask(s))" if n_bad > 1 else ""))
    return [int(v) for v in total]


# ---- dataset ----

class MaskDataset(SeededDataset):
    """(image, mask) pairs; items are transform(image, mask) under a per-sample seeded RNG: (seed, epoch, index)
    decides every random choice, so a resumed run sees the same augmentation."""

    def __init__(self, pairs: Sequence[Pair], transform=None, seed: int = 0, exif_orientation: bool = True):
        super().__init__(transform, seed)
        self.paths = [str(p) for p, _ in pairs]
        self.mask_paths = [str(m) for _, m in pairs]
        self.exif_orientation = exif_orientation

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """The image as a (3, H, W) uint8 RGB tensor, turned by its EXIF orientation when exif_orientation."""
        return decode_named(self.image_bytes(index), self.exif_orientation, self.image_source(index))

    def image_bytes(self, index: int) -> bytes:
        """The image file's bytes: read once per sample, the image decoded and its orientation (for the mask)
        read from them (one file opened per image, not two)."""
        return read_bytes(self.image_source(index))

    def image_source(self, index: int):
        """What read_mask, image_orientation and check_masks read the image from: its path here."""
        return self.paths[index]

    def mask_source(self, index: int):
        return self.mask_paths[index]

    def pairs(self) -> List[Pair]:
        """Every (image, mask) source, for check_masks."""
        return [(self.image_source(i), self.mask_source(i)) for i in range(len(self))]

    def load_mask(self, index: int, image_bytes: Optional[bytes] = None) -> torch.Tensor:
        """The mask as an int64 (H, W) tensor of class indices, turned by its IMAGE's EXIF orientation exactly as
        the image is (masks are drawn on the stored pixels and carry no tag); `image_bytes`: the image file's,
        when already read."""
        mask = read_mask(self.mask_source(index))
        if self.exif_orientation:
            image = self.image_source(index)
            try:
                orientation = image_orientation(image if image_bytes is None else image_bytes)
            except Exception as err:
                raise DataError(f"cannot read image {image}: {image_error(err)}") from None
            if orientation in ORIENT_MASK:
                mask = ORIENT_MASK[orientation](mask)
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64))

    def __getitem__(self, index: int):
        data = self.image_bytes(index)
        image = decode_named(data, self.exif_orientation, self.image_source(index))
        mask = self.load_mask(index, data)
        if tuple(image.shape[-2:]) != tuple(mask.shape):  # transforms would misalign them silently
            raise DataError(f"mask {self.mask_source(index)} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                            f"{self.image_source(index)} is {image.shape[2]}x{image.shape[1]}")
        if self.transform is None:
            return image, mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.transform(image, mask)


def collate_masks(batch):
    """(images stacked [B, 3, S, S], masks): stacked [B, H, W] when all one size, else a list of [H_i, W_i]
    tensors (evaluation keeps each mask at its image's original size)."""
    images = torch.stack([image for image, _ in batch])
    masks = [mask for _, mask in batch]
    if all(m.shape == masks[0].shape for m in masks):
        return images, torch.stack(masks)
    return images, masks


# ---- transforms ----

class _JointTransform:
    """A v2 chain on (image uint8 [3,H,W], mask [H,W]) as tv_tensors, returned as plain tensors:
    (image float32 normalised, mask int64)."""

    def __init__(self, steps: list, mean, std):
        self.chain = v2.Compose(steps + [
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(mean=list(mean), std=list(std))])  # Normalize and ToDtype's scale touch images only

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        x, m = self.chain(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return x.as_subclass(torch.Tensor), m.as_subclass(torch.Tensor)


def mask_train_transform(image_size: int, mean, std, hflip: bool, crop_padding: int, random_resized_crop: bool,
                         rrc_min_scale: float, color_jitter: float, ignore_index: int = 255,
                         scale_range: Optional[Sequence[float]] = None):
    """Training augmentation moving image and mask together -> (image float [3,S,S] normalised, mask int64 [S,S]).

    scale_range (both ways, trainer/data/scale.py): a resize to a square of factor x S, the factor drawn from
    [min, max], padded right/bottom to S where smaller and randomly cropped to S (torchvision's segmentation
    reference, in the S x S frame this trainer trains and evaluates in); random_resized_crop:
    RandomResizedCrop(S, scale=(rrc_min_scale, 1)) (zooms in only); else a resize to SxS and, with
    crop_padding > 0, a constant pad and random crop back to S. Padding: the image with the mean colour (0 once
    normalised), the mask with ignore_index (a reflected mask would invent labels). Then the flip, and the
    colour jitter on the image only. Masks are resized NEAREST (v2 never interpolates a Mask).
    """
    steps = []
    mean_colour = [int(round(255 * v)) for v in mean]  # uint8 image: the fill is on the 0-255 scale
    if scale_range is not None:
        steps += scale_crop_steps(image_size, scale_range, fit=False, image_fill=mean_colour, mask_fill=ignore_index)
    elif random_resized_crop:
        steps.append(v2.RandomResizedCrop(image_size, scale=(rrc_min_scale, 1.0), antialias=True))
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
        if crop_padding > 0:
            if crop_padding >= image_size:
                raise DataError(f"data.augment.crop_padding={crop_padding} must be smaller than the image side "
                                f"{image_size}")
            steps.append(v2.RandomCrop(image_size, padding=crop_padding, padding_mode="constant",
                                       fill={tv_tensors.Image: mean_colour, tv_tensors.Mask: ignore_index}))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    return _JointTransform(steps, mean, std)


class _EvalMaskTransform:
    def __init__(self, image_size: int, mean, std):
        self.image = v2.Compose([v2.Resize((image_size, image_size), antialias=True),
                                 v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))])

    def __call__(self, image: torch.Tensor, mask: torch.Tensor):
        return self.image(tv_tensors.Image(image)).as_subclass(torch.Tensor), mask.long()


def mask_eval_transform(image_size: int, mean, std):
    """(image resized to SxS and normalised, mask untouched at its original size): evaluation scores each image
    at its own resolution, the logits resized back to the mask."""
    return _EvalMaskTransform(image_size, mean, std)
