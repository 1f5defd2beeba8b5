"""Multi-label data (data.format=multilabel, and the generated multilabel variant): a CSV per split.

Layout: ROOT/train.csv, ROOT/val.csv and optionally ROOT/test.csv, each with a column of image paths (relative
to ROOT, the CSV's folder, or absolute) and a column of class names joined by a separator (data.csv: by default
`image` and `labels`, space-separated: the Kaggle/fastai convention); an empty labels cell is an image with no
label (every class negative). The classes are ROOT/classes.txt (one name a line) when present, else the sorted
union of train.csv's labels.

Start-up checks, as for image folders, each one line naming the culprit (a DataError, exit 2, nothing
written): a CSV without its columns, a missing image file, an unreadable image (data.verify_images /
data.skip_bad_images, as image folders), a label of val or test that is not a class (not in classes.txt, or
never seen in train.csv), and a class with no positive training image (nothing to learn it from).

The targets of an image are a float32 multi-hot row (1 = the class is present): what BCEWithLogitsLoss takes.
`trainer pack` packs such a folder (trainer/data/shards.py, kind "multilabel": each row's classes stored with
its image, the classes in the index; the checks above made when packing), and data.format=shards reads it here
as the same samples, in the same order, with the same targets. Not covered: the scan cache (image folders only;
masks and COCO folders have none either).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from trainer.data import generated
from trainer.data.datasets import FileDataset, Fit, measure_mean_std, set_split_transforms
from trainer.data.folders import verify_images
from trainer.errors import DataError

SPLIT_FILES = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}


class MultilabelDataset(FileDataset):
    """Images with their multi-hot targets: `labels` is an (N, C) float32 array, sample i is (image, labels[i]).
    A training file unreadable when needed is replaced by one with the same label set (FileDataset.stand_ins)."""

    def __init__(self, paths: Sequence[str], targets: np.ndarray, transform=None, seed: int = 0,
                 exif_orientation: bool = True, stand_ins: bool = False):
        super().__init__([(p, 0) for p in paths], transform, seed, exif_orientation, stand_ins)
        self.labels = np.ascontiguousarray(targets, dtype=np.float32)


def read_classes(root: Path) -> Optional[List[str]]:
    """ROOT/classes.txt's names (blank lines skipped), or None without one; a repeated name is refused."""
    path = root / "classes.txt"
    if not path.is_file():
        return None
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path} names class '{repeated[0]}' more than once")
    if not names:
        raise DataError(f"{path} names no class")
    return names


def read_split_csv(path: Path, csv_cfg) -> List[Tuple[str, List[str], int]]:
    """(image path, its label names, CSV line) of every row of one split's CSV, paths resolved against the CSV's
    folder; one line naming the file (and line) for a missing column or an empty image cell."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: a spreadsheet's byte-order mark
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            for key, column in (("image_column", csv_cfg.image_column), ("labels_column", csv_cfg.labels_column)):
                if column not in columns:
                    raise DataError(f"{path} has no column '{column}' (data.csv.{key}); its columns: {columns}")
            rows = []
            for row in reader:
                line = reader.line_num
                image = (row.get(csv_cfg.image_column) or "").strip()
                if not image:
                    raise DataError(f"{path} line {line}: no image path in column '{csv_cfg.image_column}'")
                names = [n for n in (row.get(csv_cfg.labels_column) or "").split(csv_cfg.separator) if n.strip()]
                rows.append((str(path.parent / image), [n.strip() for n in names], line))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    return rows


def read_multilabel_splits(root, csv_cfg, splits: Sequence[str]) -> Tuple[List[str], Dict[str, tuple]]:
    """The classes and, per split, (paths, (N, C) float32 targets, CSV lines): every check but the images'."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a folder")
    wanted = list(dict.fromkeys(["train", *splits] if (root / SPLIT_FILES["train"]).is_file() else splits))
    rows = {}
    for split in wanted:
        if split not in SPLIT_FILES:
            raise DataError(f"eval.split={split} is for image folders; a multi-label folder has train, val and test")
        path = root / SPLIT_FILES[split]
        if not path.is_file():
            raise DataError(f"{path} not found: data.format=multilabel reads a CSV per split (train.csv, val.csv, "
                            f"optional test.csv) under data.root")
        rows[split] = read_split_csv(path, csv_cfg)
    classes = read_classes(root)
    source = f"{root / 'classes.txt'}" if classes is not None else f"{root / 'train.csv'}"
    if classes is None:
        if "train" not in rows:
            raise DataError(f"{root} has neither classes.txt nor train.csv to say its classes")
        classes = sorted({name for _, names, _ in rows["train"] for name in names})
    index = {name: i for i, name in enumerate(classes)}
    found = {}
    for split in splits:
        path = root / SPLIT_FILES[split]
        targets = np.zeros((len(rows[split]), len(classes)), dtype=np.float32)
        for r, (image, names, line) in enumerate(rows[split]):
            for name in names:
                if name not in index:
                    raise DataError(f"{path} line {line}: label '{name}' is not a class of {source} "
                                    f"(classes: {' '.join(classes)})")
                targets[r, index[name]] = 1.0
            if not Path(image).is_file():
                raise DataError(f"{path} line {line}: image {image} not found")
        if not rows[split]:
            raise DataError(f"the {split} split of {root} is empty: {path} lists no image")
        found[split] = ([image for image, _, _ in rows[split]], targets, [line for _, _, line in rows[split]])
    return classes, found


def check_classes(classes: Sequence[str], train_targets: np.ndarray, where) -> None:
    """Every class has a positive training image (`where`: the train split's source, for the message), and
    there are at least 2 classes: checked by a training start and by trainer pack alike."""
    empty = [name for name, n in zip(classes, train_targets.sum(0)) if n == 0]
    if empty:
        more = f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""
        raise DataError(f"class '{empty[0]}'{more} has no positive image in {where}: nothing to learn it from; "
                        f"label some images with it, or remove it from classes.txt")
    if len(classes) < 2:  # one class is a binary task: an image folder of 2 class folders trains it
        raise DataError(f"need at least 2 classes, found {len(classes)} ({list(classes)}) in {where}")


def check_mode(verify_images: str, split: str) -> Optional[bool]:
    """As image folders (trainer.data.check_of): evaluation splits always checked (fully unless header), the
    training split as data.verify_images says (True a full decode, False the header, None not at all)."""
    if split == "train":
        return None if verify_images == "off" else verify_images == "full"
    return verify_images != "header"


def build_multilabel_data(data_cfg, seed: int, splits: Sequence[str], log=print):
    """The Data of a multi-label CSV folder (or the generated multilabel variant, written first if missing, or
    such a folder packed by trainer pack); `train_counts` are the training split's positive images per class
    (pos_weight from them: the task)."""
    from trainer.data import Data  # the package imports this module: its Data only once both exist
    from trainer.data.shards import ShardDataset, read_packed  # and trainer.data.shards imports it too

    fmt, size, aug = data_cfg.format, data_cfg.image_size, data_cfg.augment
    pack = None
    if fmt == "shards":  # the folder packed: its rows and their classes, in the folder's order; checked when packed
        root, verify = Path(data_cfg.root), "off"
        pack = read_packed(root)
        classes, found = pack.classes, {}
        for split in splits:
            if split not in SPLIT_FILES:
                raise DataError(f"eval.split={split} is for image folders; a multi-label folder has train, val and "
                                f"test")
            if split not in pack.found:
                raise DataError(f"the shards at {root} hold no {split} split (found: {', '.join(sorted(pack.found))})")
            rows = np.array([row for row, _ in pack.found[split]], dtype=np.int64)
            found[split] = (rows, pack.multi_hot(rows), None)
    elif fmt == "generated":
        g = data_cfg.generated
        root = Path(data_cfg.root) if data_cfg.root else generated.default_root(g.variant, size, g.seed)
        per_split = {"train": g.train_per_class, "val": g.val_per_class, "test": g.test_per_class}
        generated.ensure_generated(root, g.variant, size, g.seed, {k: v for k, v in per_split.items() if v > 0})
        verify = "off"  # written by us: never checked (as the other generated variants)
    else:
        root, verify = Path(data_cfg.root), data_cfg.verify_images
    if pack is None:
        classes, found = read_multilabel_splits(root, data_cfg.csv, splits)

    def dataset(paths, targets, stand_ins: bool = False):
        if pack is None:
            return MultilabelDataset(paths, targets, seed=seed, exif_orientation=data_cfg.exif_orientation,
                                     stand_ins=stand_ins)
        # packed (`paths` are rows): the same images as bytes from the shards, named by their packed paths
        return ShardDataset(pack.shards, paths, np.ascontiguousarray(targets, dtype=np.float32),
                            pack.paths.take(paths), seed=seed, exif_orientation=data_cfg.exif_orientation)

    made, skipped = {}, []
    for split in splits:
        paths, targets, lines = found[split]
        full = None if fmt in ("generated", "shards") else check_mode(verify, split)
        if full is not None:
            good, bad = verify_images([(p, r) for r, p in enumerate(paths)], data_cfg.skip_bad_images, full=full)
            skipped += bad
            if not good:
                raise DataError(f"the {split} split of {root} is empty: all {len(paths)} of its files are "
                                f"unreadable (data.skip_bad_images=true skipped them), e.g. {bad[0]}")
            keep = [r for _, r in good]
            paths, targets = [paths[r] for r in keep], targets[keep]
        if split == "train":
            check_classes(classes, targets, root / "train.csv" if pack is None else f"the shards at {root}")
        made[split] = dataset(paths, targets, stand_ins=split == "train")
    if len(classes) < 2:  # (checked with the training split's classes above when it is read)
        raise DataError(f"need at least 2 classes, found {len(classes)} ({classes}) in {root}")
    counts = made["train"].labels.sum(0).astype(int).tolist() if "train" in made else []
    if data_cfg.mean and data_cfg.std:
        mean, std = list(data_cfg.mean), list(data_cfg.std)
    else:
        if "train" not in found and pack is not None:  # evaluating a pack: its training rows, for the statistics
            rows = np.array([row for row, _ in pack.found["train"]], dtype=np.int64)
            found["train"] = (rows, pack.multi_hot(rows), None)
        stats = made.get("train") or dataset(found["train"][0], found["train"][1])
        mean, std = measure_mean_std(stats, size, seed=data_cfg.split_seed)
    set_split_transforms(made, aug, size, mean, std, Fit.from_cfg(data_cfg))
    for ds in made.values():
        ds.scaled_decode = data_cfg.scaled_decode
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s) (data.skip_bad_images=true), e.g. {skipped[0]}")
    return Data(classes=list(classes), datasets=made, mean=list(mean), std=list(std), train_counts=counts,
                skipped=skipped, source=f"{fmt} at {root}")
