"""What a data config's targets are, from the config alone, before any data is read: "labels" (a class per
image), "masks" (a class per pixel), "boxes" (boxes with their classes) or "label sets" (any number of classes
per image, none included). For data.format=shards the pack's index says what was packed, and an image folder
holding train.csv is a multi-label CSV folder. Each task declares the targets it trains on (trainer/tasks); the
data is read by the builder of its targets (trainer/data). No torch here: a config is checked before torch is
imported.
"""
from __future__ import annotations

from pathlib import Path

# the formats whose images do not each have one class label, and what they hold instead
FORMAT_TARGETS = {"masks": "masks", "voc": "masks", "coco": "boxes", "voc_detection": "boxes",
                  "multilabel": "label sets"}
# the generated variants written in another format than class folders (trainer/data/generated.py)
GENERATED_FORMATS = {"segmentation": "masks", "detection": "coco", "multilabel": "multilabel"}
# what `trainer pack` packed (its index's "kind"), as the format of the folder it packed
PACKED_FORMATS = {"masks": "masks", "coco": "coco", "multilabel": "multilabel"}


def data_targets(data_cfg) -> str:
    """"labels", "masks", "boxes" or "label sets": what the `data` section's images come with."""
    fmt = data_cfg.format
    if fmt == "generated":
        fmt = GENERATED_FORMATS.get(data_cfg.generated.variant, fmt)
    elif fmt == "imagefolder" and data_cfg.root and Path(data_cfg.root, "train.csv").is_file():
        return "label sets"  # a multi-label CSV folder (its train.csv) given as an image folder: read as what it is
    elif fmt == "shards" and data_cfg.root:  # what was packed: its index says (a masks folder's: masks)
        from trainer.data.shards import packed_kind

        fmt = PACKED_FORMATS.get(packed_kind(data_cfg.root), fmt)
    return FORMAT_TARGETS.get(fmt, "labels")
