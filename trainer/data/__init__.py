"""Building the splits of any supported source: ImageFolder, CIFAR-10/100, the generated dataset.

`build_data(cfg.data, seed, splits)` is the one entry point; it returns datasets with their transforms, the
class names, the normalisation and the training class counts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.data import generated
from trainer.data.coco import (DetectionDataset, check_same_categories, detection_eval_transform,
                               detection_train_transform, read_coco_splits, voc_detection_split)
from trainer.data.datasets import (ArrayDataset, EpochWeightedSampler, FileDataset, Fit, measure_mean_std,
                                   set_split_transforms)
from trainer.data.masks import (VOC_CLASSES, MaskDataset, check_ignore_index, check_masks, mask_eval_transform,
                                mask_train_transform, read_class_names, scan_mask_folder, voc_pairs, with_val_split)
from trainer.data.folders import (SkippedPath, describe_skipped, find_bad_images, find_classes, imagefolder_splits,
                                  lost_class_message, scan_imagefolder, scan_split, stratified_split, verify_images)
from trainer.data.manifest import Manifest, cache_file
from trainer.data.multilabel import build_multilabel_data
from trainer.data.shards import ShardDataset, ShardDetectionDataset, ShardMaskDataset, read_packed, read_packed_coco
from trainer.data.manifest import load as load_manifest
from trainer.data.manifest import save as save_manifest
from trainer.errors import DataError
from trainer.outputs import Inputs
from trainer.targets import data_targets

# Published CIFAR statistics (per channel, [0,1] scale) as used by most CIFAR recipes.
CIFAR_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
}


@dataclass
class Data:
    classes: List[str]
    datasets: Dict[str, object]  # split name -> dataset (train has the augmenting transform)
    mean: List[float]
    std: List[float]
    train_counts: List[int]  # images per class in the training split
    skipped: List[str] = field(default_factory=list)  # unreadable files dropped (data.skip_bad_images)
    source: str = ""
    category_ids: List[int] = field(default_factory=list)  # detection: the annotation file's id of each class


def _load_cifar(fmt: str, root: Optional[str], download: bool):
    import torchvision

    cls = torchvision.datasets.CIFAR10 if fmt == "cifar10" else torchvision.datasets.CIFAR100
    root = root or "data/cifar"
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"{fmt} not found under data.root={root} ({err}); set data.download=true on a machine "
                        f"with internet, or point data.root at a folder holding it") from None
    return train, test, root


def build_data(data_cfg, seed: int, splits: Sequence[str] = ("train", "val"), log=print,
               scan: Optional["FolderScan"] = None) -> Data:
    """Datasets for `splits` (any of train/val/test); errors name the path or key at fault. `scan`: scan_files'
    result when already made (build_data_on_ranks: the checks it holds were split across the processes)."""
    fmt = data_cfg.format
    size = data_cfg.image_size
    builder = BUILDERS.get(data_targets(data_cfg))  # images with masks or boxes (else labels: below)
    if builder is not None:
        return builder(data_cfg, seed, splits, log)
    if fmt in ("cifar10", "cifar100"):
        train_set, test_set, root = _load_cifar(fmt, data_cfg.root, data_cfg.download)
        classes = list(train_set.classes)
        labels = np.asarray(train_set.targets)
        samples = list(zip(range(len(labels)), labels.tolist()))  # (row, label) pairs, split like files
        if data_cfg.val_fraction > 0:
            tr, va = stratified_split(samples, data_cfg.val_fraction, data_cfg.split_seed)
            parts = {"train": [i for i, _ in tr], "val": [i for i, _ in va]}
        else:  # no held-out part: validate on the test set, as the classic CIFAR tutorials do
            parts = {"train": list(range(len(labels))), "val": None}
        if "val" in splits and parts["val"] == []:
            raise DataError(f"the val split of {fmt} is empty: data.val_fraction={data_cfg.val_fraction} holds out 0 "
                            f"of every class; raise data.val_fraction, or set it to 0 to validate on the test set")
        arrays = {"train": (train_set.data, labels), "test": (test_set.data, np.asarray(test_set.targets))}
        mean, std = (data_cfg.mean, data_cfg.std) if data_cfg.mean and data_cfg.std else CIFAR_STATS[fmt]
        counts = np.bincount(labels[parts["train"]], minlength=len(classes)).tolist()
        made = {}
        for split in splits:
            if split == "all":
                raise DataError("eval.split=all is for image folders; CIFAR has the splits train, val and test")
            if split == "test" or (split == "val" and parts["val"] is None):
                images, labs = arrays["test"]
            else:
                images, labs = arrays["train"][0][parts[split]], arrays["train"][1][parts[split]]
            made[split] = ArrayDataset(images, labs, seed=seed)
        source = f"{fmt} at {root}"
        skipped: List[str] = []
    elif fmt == "shards":  # packed by `trainer pack` (trainer.data.shards): checked when packed
        root = Path(data_cfg.root)
        if "all" in splits:
            raise DataError("eval.split=all is for image folders; score a split of the shards (val or test)")
        pack = read_packed(root)
        classes, found = imagefolder_splits(root, data_cfg.val_fraction, data_cfg.split_seed,
                                            scanned=(pack.classes, pack.found))
        _check_splits(root, found, splits, data_cfg.val_fraction)
        if "train" in splits:
            _check_every_class_packed(root, classes, found["train"], pack.skipped)

        def shard_split(samples) -> ShardDataset:
            rows = np.array([row for row, _ in samples], dtype=np.int64)
            return ShardDataset(pack.shards, rows, np.array([label for _, label in samples], dtype=np.int64),
                                pack.paths.take(rows), seed=seed, exif_orientation=data_cfg.exif_orientation)

        made = {split: shard_split(found[split]) for split in splits}
        skipped = []
        counts, mean, std = _train_stats(data_cfg, made, found, len(classes), shard_split)
        source = f"shards at {root}"
    else:
        scan = scan if scan is not None else scan_files(data_cfg, splits, log)
        root, classes, found, manifest = scan.root, scan.classes, scan.found, scan.manifest
        skipped = []
        made = {}
        checked = {}  # id of a sample list -> its readable samples: val and test may be one list (val_fraction=0)
        for split in splits:
            samples = found[split]
            full = check_of(data_cfg, split)
            if full is not None:
                if id(samples) not in checked:
                    known = manifest.known_bad(samples, full) if manifest is not None else None
                    if known is None:
                        known = find_bad_images(samples, full)
                        if manifest is not None:
                            manifest.record(samples, full, known)
                            save_scan(scan, log)  # before a bad file stops the start: found once
                    good, bad = verify_images(samples, data_cfg.skip_bad_images, known_bad=known)
                    skipped += bad
                    if not good:
                        raise DataError(f"the {split} split of {root} is empty: all {len(samples)} of its files are "
                                        f"unreadable (data.skip_bad_images=true skipped them), e.g. {bad[0]}")
                    if split == "train" and bad:
                        _check_every_class_kept(samples, good, bad, classes)
                    checked[id(samples)] = good
                samples = checked[id(samples)]
            made[split] = FileDataset(samples, seed=seed, exif_orientation=data_cfg.exif_orientation,
                                      stand_ins=split == "train")  # never a crash after hours of training
        counts, mean, std = _train_stats(data_cfg, made, found, len(classes), lambda samples: FileDataset(
            samples, exif_orientation=data_cfg.exif_orientation))
        source = f"{fmt} at {root}"
    if len(classes) < 2:
        raise DataError(f"need at least 2 classes, found {len(classes)} ({classes}) in {source}")
    for split, ds in made.items():  # whatever the path above: never train or evaluate on nothing
        if len(ds) == 0:
            raise DataError(f"the {split} split of {source} is empty")
    set_split_transforms(made, data_cfg.augment, size, mean, std, Fit.from_cfg(data_cfg))
    for ds in made.values():
        ds.scaled_decode = data_cfg.scaled_decode
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s) (data.skip_bad_images=true), e.g. {skipped[0]}")
    return Data(classes=classes, datasets=made, mean=list(mean), std=list(std), train_counts=counts,
                skipped=skipped, source=source)


@dataclass
class FolderScan:
    """What build_data reads of a folder of class folders before it checks or loads a file: the classes, the
    samples of each split, and (image folders) the manifest of the scan and of the checks done so far."""
    root: Path
    classes: List[str]
    found: Dict[str, List]  # split -> [(path, label)]; val is test when data.val_fraction=0 and no val/
    manifest: Optional[Manifest] = None  # image folders (not eval.split=all): kept in memory with cache_dir=off
    cache: Optional[Path] = None  # where the manifest is cached (None: data.cache_dir=off)


def scan_files(data_cfg, splits: Sequence[str], log=print) -> FolderScan:
    """The files of an image folder or of the generated dataset (which it writes first if missing), from the
    cached scan when nothing changed; errors name the missing or empty split."""
    fmt = data_cfg.format
    if fmt == "generated":
        g = data_cfg.generated
        root = Path(data_cfg.root) if data_cfg.root else generated.default_root(g.variant, data_cfg.image_size, g.seed)
        counts_per_split = {"train": g.train_per_class, "val": g.val_per_class, "test": g.test_per_class}
        counts_per_split = {k: v for k, v in counts_per_split.items() if v > 0}
        generated.ensure_generated(root, g.variant, data_cfg.image_size, g.seed, counts_per_split)
    else:
        root = Path(data_cfg.root)
    walk_skipped: List[SkippedPath] = []  # folder links not followed, broken links: reported below
    manifest, cache = None, None
    if "all" in splits:  # evaluation of a plain folder of class folders, unsplit
        classes = find_classes(Path(root))
        found = {"all": scan_split(Path(root), classes, walk_skipped)}
    else:
        cache = cache_file(root, data_cfg.cache_dir, data_inputs(data_cfg)) if fmt == "imagefolder" else None
        manifest = load_manifest(cache, root)
        if manifest is None:
            listed: Dict[str, int] = {}
            scanned = scan_imagefolder(Path(root), walk_skipped, listed)
            if fmt == "imagefolder":
                manifest = Manifest(str(root), scanned[0], scanned[1], listed, list(walk_skipped))
        else:
            scanned = (manifest.classes, manifest.splits)
            walk_skipped.extend(manifest.skipped)
        classes, found = imagefolder_splits(root, data_cfg.val_fraction, data_cfg.split_seed, scanned=scanned)
        if found.get("val") is not None and found.get("val") is found.get("test"):
            log(f"data.val_fraction=0 and no val/ folder: validating on {root}/test")
    scan = FolderScan(Path(root), classes, found, manifest, cache)
    if manifest is not None and manifest.changed:
        save_scan(scan, log)
    if walk_skipped:
        log(f"{describe_skipped(walk_skipped)} (under {root})")
    _check_splits(root, found, splits, data_cfg.val_fraction)
    return scan


def _check_splits(root, found: Dict[str, List], splits: Sequence[str], val_fraction: float) -> None:
    missing = [s for s in splits if s not in found]
    if missing:
        raise DataError(f"{root} has no {missing[0]}/ split (found: {sorted(found)})")
    for split in splits:
        if not found[split]:
            why = _why_empty(split, root, val_fraction)
            raise DataError(f"the {split} split of {root} is empty: {why}")


def _train_stats(data_cfg, made: Dict[str, object], found: Dict[str, List], num_classes: int, dataset_of):
    """Images per class of the training split, and the normalisation: data.mean/std, else measured on the
    training images (`dataset_of` makes a dataset of them when the training split is not among `made`)."""
    train = made.get("train")
    labels = train.labels if train is not None else [label for _, label in found.get("train", [])]
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    if data_cfg.mean and data_cfg.std:
        return counts, list(data_cfg.mean), list(data_cfg.std)
    stats_set = train if train is not None else dataset_of(found["train"])
    mean, std = measure_mean_std(stats_set, data_cfg.image_size, seed=data_cfg.split_seed)
    return counts, mean, std


def check_of(data_cfg, split: str) -> Optional[bool]:
    """How build_data checks the files of `split` at start-up: True a full decode, False the header, None not at
    all. Evaluation splits are always checked (fully, unless data.verify_images=header asks for the header check
    there too): with data.verify_images=off (the speed recipe) a bad file there would only fail after all of
    training. Cost: CIFAR-10's 10,000-image JPEG test split (32 px, /work/shared/data) took 1.9-2.1 s (3 runs;
    PIL decode in 4 threads on this 2-core VM, files in the page cache; the folder walk 0.03 s). Generated files
    are written by us: never checked."""
    if data_cfg.format != "imagefolder" or (split == "train" and data_cfg.verify_images == "off"):
        return None
    return data_cfg.verify_images == "full" if split == "train" else data_cfg.verify_images != "header"


def unchecked(scan: FolderScan, data_cfg, splits: Sequence[str]) -> List[Tuple[str, bool]]:
    """(split, full) of each sample list build_data would check that the manifest holds no answer for."""
    todo, seen = [], set()
    for split in splits:
        full, samples = check_of(data_cfg, split), scan.found[split]
        if full is None or id(samples) in seen:
            continue
        seen.add(id(samples))
        if scan.manifest is None or scan.manifest.known_bad(samples, full) is None:
            todo.append((split, full))
    return todo


def save_scan(scan: FolderScan, log) -> None:
    """Cache the manifest (when data.cache_dir is not off); a cache that cannot be written is a note, not an error."""
    if scan.cache is not None and scan.manifest is not None:
        problem = save_manifest(scan.cache, scan.manifest)
        if problem:
            log(f"note: {problem}")


def check_mask_classes(split: str, root, classes: Sequence[str], pixels: Sequence[int], ignore_index: int) -> None:
    """A training split needs pixels of two classes at least, an evaluated one some pixel that counts. Masks
    saved as 0/255 (the usual binary masks) would otherwise train and score nothing and say so nowhere: their
    objects are the ignore index."""
    present = [name for name, n in zip(classes, pixels) if n]
    if len(present) >= (2 if split == "train" else 1):
        return
    which = f"class {present[0]!r} or " if present else ""
    hint = (f"; masks saved as 0/255 mark their objects with {ignore_index}: map it to class 1 (mask // 255)"
            if ignore_index == 255 and len(classes) == 2 else "")
    raise DataError(f"every mask pixel of the {split} split of {root} is {which}data.ignore_index={ignore_index} "
                    f"(which counts nowhere): nothing to {'learn' if split == 'train' else 'score'}{hint}")


def build_mask_data(data_cfg, seed: int, splits: Sequence[str], log=print) -> Data:
    """Images with masks of class indices (segmentation): a masks folder, Pascal VOC, the generated
    segmentation variant, or a masks folder packed into shards. Every mask of every requested split is checked
    at start-up (sizes, values, mode: ~0.3 ms per 64-px mask); `train_counts` are the training split's pixels
    per class (loss.class_weighted)."""
    pack = None
    fmt, size, aug = data_cfg.format, data_cfg.image_size, data_cfg.augment
    if "all" in splits:
        raise DataError("eval.split=all is for image folders of classes; score a segmentation split (val or test)")
    if fmt == "voc":
        root = data_cfg.root or "data/voc"
        classes = list(VOC_CLASSES)
        found = {split: voc_pairs(root, data_cfg.voc_year, split) for split in ("train", "val") if split in splits}
        if "test" in splits:
            raise DataError("Pascal VOC's segmentation test split has no public masks; score val")
    elif fmt == "shards":  # a masks folder packed by `trainer pack`: rows, split as the folder's pairs are
        root = Path(data_cfg.root)
        pack = read_packed(root)
        classes = pack.classes if data_cfg.class_names is None else read_class_names(root, data_cfg.class_names)
        check_ignore_index(classes, data_cfg.ignore_index, "data.class_names" if data_cfg.class_names is not None
                           else f"the classes.txt packed into {root}")
        found = with_val_split(root, {split: [row for row, _ in rows] for split, rows in pack.found.items()},
                               data_cfg.val_fraction, data_cfg.split_seed)
    else:
        if fmt == "generated":
            g = data_cfg.generated
            root = data_cfg.root or generated.default_root(g.variant, size, g.seed)
            per_split = {"train": g.train_per_class, "val": g.val_per_class, "test": g.test_per_class}
            generated.ensure_generated(root, g.variant, size, g.seed, {k: v for k, v in per_split.items() if v > 0})
        else:
            root = data_cfg.root
        classes, found = scan_mask_folder(root, data_cfg.val_fraction, data_cfg.split_seed, data_cfg.class_names,
                                          data_cfg.ignore_index)
    missing = [s for s in splits if s not in found]
    if missing:
        raise DataError(f"{root} has no {missing[0]} split (found: {sorted(found)})")

    def dataset(items) -> MaskDataset:
        if pack is None:
            return MaskDataset(items, seed=seed, exif_orientation=data_cfg.exif_orientation)
        rows = np.array(items, dtype=np.int64)
        return ShardMaskDataset(pack.shards, rows, pack.paths.take(rows), pack.mask_paths.take(rows), seed=seed,
                                exif_orientation=data_cfg.exif_orientation)

    made, counts = {}, []
    for split in splits:
        if not found[split]:
            raise DataError(f"the {split} split of {root} is empty")
        made[split] = dataset(found[split])
        pixels = check_masks(made[split].pairs(), len(classes), data_cfg.ignore_index)  # every mask, before training
        check_mask_classes(split, root, classes, pixels, data_cfg.ignore_index)
        if split == "train":
            counts = pixels
    if data_cfg.mean and data_cfg.std:
        mean, std = list(data_cfg.mean), list(data_cfg.std)
    else:
        stats = made.get("train") or dataset(found["train"])
        mean, std = measure_mean_std(stats, size, seed=data_cfg.split_seed)
    for split, ds in made.items():
        ds.transform = (mask_train_transform(size, mean, std, aug.hflip, aug.crop_padding, aug.random_resized_crop,
                                             aug.rrc_min_scale, aug.color_jitter, data_cfg.ignore_index,
                                             aug.scale_range)
                        if split == "train" else mask_eval_transform(size, mean, std))
    return Data(classes=list(classes), datasets=made, mean=list(mean), std=list(std), train_counts=counts,
                source=f"{fmt} at {root}")


# torchvision's detectors normalise inside the model (GeneralizedRCNNTransform: these ImageNet statistics); the
# data pipeline hands them images in [0, 1], and model.json records the numbers the model uses
DETECTOR_MEAN, DETECTOR_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_box_data(data_cfg, seed: int, splits: Sequence[str], log=print) -> Data:
    """Images with boxes (detection): a COCO folder, Pascal VOC's XML boxes, the generated detection variant, or
    a COCO folder packed into shards. Every annotation and every image header of each requested split is checked
    at start-up (one line naming the file and annotation at fault); `train_counts` are the training split's
    boxes per class (crowd left out)."""
    fmt, aug = data_cfg.format, data_cfg.augment
    pack, rows = None, {}  # packed shards: the pack, and per split the row of each of its images
    if "all" in splits:
        raise DataError("eval.split=all is for image folders of classes; score a detection split (val or test)")
    exif = data_cfg.exif_orientation
    if fmt == "voc_detection":
        root = data_cfg.root or "data/voc"
        found = {split: voc_detection_split(root, data_cfg.voc_year, split, log=log, exif_orientation=exif)
                 for split in splits}
        check_same_categories(found)
    elif fmt == "shards":  # a COCO folder packed by `trainer pack`: its annotation files, its images by row
        root = Path(data_cfg.root)
        pack = read_packed(root)
        found = {}
        for split in splits:
            found[split], rows[split] = read_packed_coco(pack, split, log=log, exif_orientation=exif)
        check_same_categories(found)
    else:
        if fmt == "generated":
            g = data_cfg.generated
            root = data_cfg.root or generated.default_root(g.variant, data_cfg.image_size, g.seed)
            per_split = {"train": g.train_per_class, "val": g.val_per_class, "test": g.test_per_class}
            generated.ensure_generated(root, g.variant, data_cfg.image_size, g.seed,
                                       {k: v for k, v in per_split.items() if v > 0})
        else:
            root = data_cfg.root
        found = read_coco_splits(root, list(splits), files=data_cfg.coco_files, log=log, exif_orientation=exif)
    made, counts = {}, []
    for split in splits:
        coco = found[split]
        if len(coco) == 0:
            raise DataError(f"the {split} split ({coco.source}) has no images")
        if not (~coco.iscrowd).any():
            raise DataError(f"the {split} split ({coco.source}) has no (non-crowd) boxes: nothing to "
                            + ("learn" if split == "train" else "score (trainer predict needs no boxes)"))
        if split == "train":
            counts = np.bincount(coco.labels[~coco.iscrowd], minlength=coco.num_classes + 1)[1:].tolist()
        transform = (detection_train_transform(aug.hflip, tuple(aug.scale_jitter) if aug.scale_jitter else None,
                                               aug.iou_crop, aug.color_jitter, aug.scale_range, data_cfg.image_size)
                     if split == "train" else detection_eval_transform())
        made[split] = (DetectionDataset(coco, transform, seed=seed) if pack is None else
                       ShardDetectionDataset(coco, pack.shards, rows[split], transform, seed=seed))
    first = found[splits[0]]
    return Data(classes=first.class_names, datasets=made, mean=list(DETECTOR_MEAN), std=list(DETECTOR_STD),
                train_counts=counts, source=f"{fmt} at {root}", category_ids=[cid for cid, _ in first.categories])


# the data of each kind of targets (trainer/targets.py) other than a class label per image, which build_data reads
BUILDERS = {"masks": build_mask_data, "boxes": build_box_data, "label sets": build_multilabel_data}


def _why_empty(split: str, root, val_fraction: float) -> str:
    """Why an image-folder split came out empty, with the fix: the one way is a held-out val part too small."""
    root = Path(root)
    held_out = split == "val" and val_fraction > 0 and not ((root / "train").is_dir() and (root / "val").is_dir())
    if held_out:  # as imagefolder_splits decides: val is a stratified part of train unless there is a val/ folder
        return (f"data.val_fraction={val_fraction} holds out 0 of every class; raise data.val_fraction or add a "
                f"val/ folder")
    return "no image files found in it"


def _check_every_class_kept(samples, good, bad: List[str], classes: List[str]) -> None:
    """data.skip_bad_images must not drop a class from training without a word: fail naming it."""
    kept = {label for _, label in good}
    label_of = dict(samples)
    lost = sorted({label_of[p] for p in bad} - kept)
    if lost:
        dropped = [p for p in bad if label_of[p] == lost[0]]
        raise DataError(lost_class_message(classes[lost[0]], "data.skip_bad_images=true", dropped, len(lost) - 1)
                        + "; fix or remove them")


def _check_every_class_packed(root, classes: List[str], train: List, skipped: List) -> None:
    """A pack made with --skip-bad-images before pack refused it may hold a class with no training image:
    refused as the folder path refuses it (its left-out files are named train/<class>/... or <class>/...)."""
    lost = sorted(set(range(len(classes))) - {label for _, label in train})
    if lost:
        name = classes[lost[0]]
        dropped = [path for path, _ in skipped if path.split("/")[0] == name or path.split("/")[:2] == ["train", name]]
        raise DataError(lost_class_message(name, "trainer pack --skip-bad-images", dropped, len(lost) - 1)
                        + f" (the shards at {root} hold none of its images); fix or remove them and pack again")


def class_balanced_sampler(labels: Sequence[int], num_classes: int, seed: int) -> EpochWeightedSampler:
    """Each class drawn equally often in expectation: weight of a sample = 1 / count of its class."""
    counts = np.bincount(labels, minlength=num_classes)
    weights = 1.0 / counts[np.asarray(labels)]
    return EpochWeightedSampler(weights.tolist(), num_samples=len(labels), seed=seed)


def data_inputs(data_cfg) -> Inputs:
    """What a run reads its data from (given or default), named by the key that names it: the data root, and
    data.coco_files' annotation files and image folders. Nothing is ever written into them (trainer.outputs)."""
    fmt = data_cfg.format
    inputs = Inputs()
    if fmt in ("cifar10", "cifar100"):
        inputs.add("data.root", data_cfg.root or "data/cifar")
    elif fmt in ("voc", "voc_detection"):
        inputs.add("data.root", data_cfg.root or "data/voc")
    elif fmt == "generated" and not data_cfg.root:
        g = data_cfg.generated
        inputs.add("the generated data folder", generated.default_root(g.variant, data_cfg.image_size, g.seed))
    else:
        inputs.add("data.root", data_cfg.root)
    for split, entry in (data_cfg.coco_files or {}).items():
        if isinstance(entry, dict):  # (its form is checked where it is read: one line naming the key)
            for key in ("annotations", "images"):
                if isinstance(entry.get(key), (str, os.PathLike)):
                    inputs.add(f"data.coco_files.{split}.{key}", entry[key])
    return inputs


def data_fingerprint(dataset, classes: Sequence[str]) -> str:
    """The sha256 of what decides the batches of a run: the class names and, in order, each training sample's
    file path (relative to the common folder, so a moved copy matches) or array index, and its label (or mask
    file). A resume whose data differ would put the same position in the epoch on other images."""
    def relative(paths):
        paths = list(paths)
        if not paths:
            return []
        # the common folder of all = that of the first and last in sorted order (they share the longest prefix)
        common = os.path.commonpath([min(paths), max(paths)])
        start = len(os.path.join(common, ""))
        if all(p.startswith(common) and p[len(common):len(common) + 1] in ("/", os.sep) for p in paths):
            return [p[start:] for p in paths]  # what relpath gives here, ~20x faster (a million paths: ~1 s)
        return [os.path.relpath(p, common) for p in paths]  # "." or ".." parts: relpath normalises them

    items = relative(dataset.paths) if hasattr(dataset, "paths") else list(range(len(dataset)))
    if hasattr(dataset, "mask_paths"):  # segmentation: the masks
        targets = relative(dataset.mask_paths)
    elif hasattr(dataset, "split"):  # detection: every box and label, as read
        coco = dataset.split
        targets = [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                   for a in (coco.boxes, coco.labels, coco.iscrowd, coco.starts)]
    else:  # a class per image (ints), or a multi-hot row per image (multi-label: lists of 0.0/1.0)
        targets = np.asarray(dataset.labels).tolist()
    body = json.dumps([list(classes), items, targets])
    return hashlib.sha256(body.encode()).hexdigest()
