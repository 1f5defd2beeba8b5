"""Reading ImageFolder trees: finding classes and files, splitting, checking that every file decodes.

Errors name the folder or file at fault. Images of any mode (grayscale, RGBA, palette) are converted to RGB.
"""
from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from trainer.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
Sample = Tuple[str, int]  # (path, class index)


def is_image_file(path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb(path) -> Image.Image:
    """A file path or object, decoded fully by PIL and converted to RGB; palette images with transparency go
    through RGBA first."""
    with Image.open(path) as img:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


JPEG_MAGIC = b"\xff\xd8\xff"  # how a JPEG starts, whatever its file name says


def decode_jpeg_rgb(data: torch.Tensor) -> torch.Tensor:
    """torchvision's libjpeg-turbo decoder, always to 3-channel RGB (grayscale and CMYK converted)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB)


def decode_rgb(path: str) -> torch.Tensor:
    """One image file as a (3, H, W) uint8 RGB tensor: what the training, evaluation and predict paths read.

    JPEGs go through torchvision's `decode_jpeg`: with the file read, 2.2x PIL per CIFAR-size image and on
    par for photo-sized ones, and the uint8 tensor then feeds torchvision's vectorised uint8 resize (a
    224-px RandomResizedCrop sample 1.5-1.9x faster than from a PIL image; bench/input_pipeline.py). Other
    formats, and any JPEG that decoder refuses (a truncated one too), go through PIL (`load_rgb`), whose
    error then says what is wrong. EXIF orientation is not applied on either path, as before.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:3] == JPEG_MAGIC:
        try:
            return decode_jpeg_rgb(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:  # a JPEG variant libjpeg-turbo in torchvision does not take: PIL may
            pass
    return torch.from_numpy(np.array(load_rgb(io.BytesIO(data)))).permute(2, 0, 1)


def find_classes(folder: Path) -> List[str]:
    if not folder.exists():
        raise DataError(f"data path does not exist: {folder}")
    if not folder.is_dir():
        raise DataError(f"data path is not a folder: {folder}")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"no class folders in {folder} (expected {folder}/<class name>/<images>)")
    return classes


def scan_split(folder: Path, classes: Sequence[str]) -> List[Sample]:
    """All image files under folder/<class>/ (recursively), sorted, labelled by class index."""
    samples: List[Sample] = []
    for idx, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            raise DataError(f"class folder missing: {class_dir} (the training split has class '{name}')")
        files = sorted(str(Path(dirpath) / f) for dirpath, _, names in os.walk(class_dir, followlinks=True)
                       for f in names if is_image_file(f))
        if not files:
            raise DataError(f"empty class folder: {class_dir} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
        samples.extend((f, idx) for f in files)
    return samples


def stratified_split(samples: List[Sample], fraction: float, seed: int) -> Tuple[List[Sample], List[Sample]]:
    """Seeded split keeping each class's share: round(fraction x count) of every class goes to the second part.

    Each class keeps at least one training sample; the order inside each part stays sorted by path.
    """
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in samples])
    held = np.zeros(len(samples), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        n_held = min(int(round(fraction * len(idx))), len(idx) - 1)
        held[rng.permutation(idx)[:n_held]] = True
    return [s for s, h in zip(samples, held) if not h], [s for s, h in zip(samples, held) if h]


def _check_one(path: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "palette images with transparency" note; we convert anyway
            load_rgb(path)
        return ""
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        return f"{type(err).__name__}: {err}"


def verify_images(samples: List[Sample], skip_bad: bool, workers: int = 4) -> Tuple[List[Sample], List[str]]:
    """Decode every file once (PIL releases the GIL while decoding, so threads help).

    Returns the good samples and the bad paths; raises on the first bad file unless `skip_bad`.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(_check_one, [p for p, _ in samples], chunksize=64))
    bad = [(p, why) for (p, _), why in zip(samples, problems) if why]
    if bad and not skip_bad:
        path, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"cannot read image {path}: {why}{more}; fix or remove it, or set data.skip_bad_images=true")
    bad_paths = {p for p, _ in bad}
    return [s for s in samples if s[0] not in bad_paths], sorted(bad_paths)


def imagefolder_splits(root: Path, val_fraction: float, split_seed: int) -> Tuple[List[str], Dict[str, List[Sample]]]:
    """Class names and samples per split for either layout.

    - root/train/<class>/... (+ root/val/, + root/test/): val is split from train when there is no val/.
    - root/<class>/...: train and val are a stratified split of it.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    train_dir = root / "train"
    if train_dir.is_dir():
        classes = find_classes(train_dir)
        splits = {"train": scan_split(train_dir, classes)}
        for split in ("val", "test"):
            if (root / split).is_dir():
                extra = set(find_classes(root / split)) - set(classes)
                if extra:
                    raise DataError(f"{root / split} has classes not in train/: {sorted(extra)}")
                splits[split] = scan_split_allow_missing(root / split, classes)
    else:
        classes = find_classes(root)
        splits = {"train": scan_split(root, classes)}
    if "val" not in splits and val_fraction <= 0:
        if "test" not in splits:
            raise DataError(f"{root} has no val/ or test/ folder and data.val_fraction is 0: nothing to validate on")
        splits["val"] = splits["test"]  # all of train trains; validation is the test split (see data.val_fraction)
    if "val" not in splits:
        splits["train"], splits["val"] = stratified_split(splits["train"], val_fraction, split_seed)
    return classes, splits


def scan_split_allow_missing(folder: Path, classes: Sequence[str]) -> List[Sample]:
    """Like scan_split for val/test, where a class may be absent (its folder missing); empty folders still fail."""
    present = [c for c in classes if (folder / c).is_dir()]
    samples = scan_split(folder, present)
    remap = {i: classes.index(c) for i, c in enumerate(present)}
    return [(p, remap[label]) for p, label in samples]
