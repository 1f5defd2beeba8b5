"""Semantic segmentation behind the task protocol of trainer/tasks: batches are (images [B,3,S,S], masks of
class indices), the loss is pixel cross-entropy and/or soft Dice with `ignore_index` (plus the auxiliary
head's, weighted), and evaluation scores every image at its ORIGINAL resolution (the logits are resized back
before the argmax) into one int64 confusion matrix per process, summed by one all-reduce: exact on any
number of processes. Models: trainer/tasks/segment_models.py; metrics and losses: segment_metrics.py;
plots: segment_reports.py; predictions: one PNG of class indices per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.data.datasets import eval_transform
from trainer.data.masks import collate_masks
from trainer.distributed import agree, gather_to_main
from trainer.errors import ConfigError, DataError
from trainer.evaluation import split_order
from trainer.models import unknown_name
from trainer.prediction_files import Given, PredictionFolder
from trainer.tasks.segment_metrics import (confusion_matrix, cross_entropy_loss, dice_loss, metrics_from_confusion,
                                           pixel_class_weights)
from trainer.tasks.segment_models import SEGMENTATION_MODELS, TIMM_PREFIX, build_segmentation_model
from trainer.tasks.protocol import (DataInfo, Example, OneSizeOneLoss, Sections, check_monitor, refuse_box_options,
                                    refuse_threshold)
from trainer.tasks.segment_reports import PLOTS, MaskPredictions, format_segmentation_summary, write_segmentation_report
from trainer.tasks.segment_spec import SegmentationSpec

OVERLAY_IMAGES = 8  # validation images kept (main rank, the first of its shard) for the overlay grid
METRICS = ("miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice", "fwiou", "loss")


@dataclass
class Segmentation(OneSizeOneLoss, SegmentationSpec):
    classes: List[str]
    ignore_index: int = 255
    loss_name: str = "ce"  # ce | dice | ce+dice
    dice_weight: float = 1.0
    aux_weight: float = 0.5
    label_smoothing: float = 0.0
    class_weights: Optional[List[float]] = None
    name = "segmentation"
    report_plots = PLOTS  # what write_report may draw into plots/
    drop_last = True  # a last training batch of one image would break BatchNorm in DeepLabV3's pooling branch
    collate = staticmethod(collate_masks)  # evaluation: images of different sizes keep their own masks

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    # -- construction --

    @classmethod
    def build(cls, classes: Sequence[str], data: DataInfo, cfg: Sections) -> "Segmentation":
        """`data.train_counts`: pixels per class in the training masks (for loss.class_weighted)."""
        loss_cfg, ignore_index = cfg.loss, cfg.data.ignore_index
        if not 0 <= ignore_index <= 255 or ignore_index < len(classes):
            raise ConfigError(f"data.ignore_index={ignore_index} must be in [{len(classes)}, 255]: a class index "
                              f"cannot be ignored, and masks are 8-bit PNGs")
        weights = pixel_class_weights(data.train_counts) if loss_cfg.class_weighted else None
        made = cls(list(classes), ignore_index, loss_cfg.name, loss_cfg.dice_weight, loss_cfg.aux_weight,
                   loss_cfg.label_smoothing, weights)
        check_monitor(made, cfg.eval.monitor or made.default_monitor)
        return made

    @classmethod
    def from_meta(cls, meta: dict) -> "Segmentation":
        return cls(list(meta["classes"]), meta.get("ignore_index", 255))

    def build_model(self, name: str, image_size: int, small_input_stem: Optional[bool] = None,
                    pretrained_path: Optional[str] = None, log=print, drop_path: Optional[float] = None,
                    dropout: Optional[float] = None):
        """Any input size (the U-Net pads to its stride; torchvision's models are fully convolutional)."""
        if drop_path or dropout is not None:  # the config refuses them first; a direct caller is told here too
            raise ConfigError(f"model.drop_path and model.dropout are for classification models; {name} keeps its own")
        if name not in SEGMENTATION_MODELS and not name.startswith(TIMM_PREFIX):  # timm's: checked when built
            raise unknown_name("model.name (a segmentation model)", name, SEGMENTATION_MODELS)
        return build_segmentation_model(name, len(self.classes), pretrained_path, aux_loss=self.aux_weight > 0,
                                        log=log)

    def metric_names(self) -> List[str]:
        return list(METRICS)

    # -- training --

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the loss in fp32 whatever the autocast dtype
        weights = None if self.class_weights is None else logits.new_tensor(self.class_weights)
        loss = logits.new_zeros(())
        if self.loss_name in ("ce", "ce+dice"):
            loss = loss + cross_entropy_loss(logits, target, self.ignore_index, weights, self.label_smoothing)
        if self.loss_name in ("dice", "ce+dice"):
            loss = loss + (self.dice_weight if self.loss_name == "ce+dice" else 1.0) * \
                dice_loss(logits, target, self.ignore_index)
        return loss

    def train_loss(self, model, batch, memory_format=torch.contiguous_format) -> Tuple[torch.Tensor, int, dict]:
        x, y = batch
        out = model(x.to(memory_format=memory_format))
        loss = self.pixel_loss(out["out"], y.long())
        if "aux" in out and self.aux_weight > 0:
            loss = loss + self.aux_weight * self.pixel_loss(out["aux"], y.long())
        return loss, x.shape[0], {}

    # -- evaluation --

    def to_device(self, batch, device, memory_format=torch.contiguous_format):
        x, masks = batch
        masks = masks.to(device) if torch.is_tensor(masks) else [m.to(device) for m in masks]
        return x.to(device, non_blocking=True, memory_format=memory_format), masks

    @staticmethod
    def forward(net, batch, tta: str = "none") -> torch.Tensor:
        """Logits [B, C, S, S]; flip TTA: the mean of the logits and of the mirrored image's, mirrored back."""
        x = batch[0]
        logits = net(x)["out"].float()
        if tta == "flip":
            logits = (logits + net(torch.flip(x, dims=[3]))["out"].float().flip(3)) / 2
        return logits

    def evaluator(self, dataset, indices: torch.Tensor) -> "SegmentationEvaluator":
        return SegmentationEvaluator(self, len(dataset), indices)

    def match_data(self, data, dataset) -> None:
        if data.classes != self.classes:  # mask values are class indices
            raise DataError(f"{data.source} has the classes {data.classes}; the model was trained on {self.classes} "
                            f"(mask values are class indices, so the lists must be the same, in the same order)")

    # -- reports, export, predictions --

    def write_report(self, out_dir, metrics: dict, outputs: dict, name: str = "eval.json") -> None:
        write_segmentation_report(out_dir, metrics, outputs, self.classes, name=name)

    def summary(self, metrics: dict) -> str:
        return format_segmentation_summary(metrics, self.classes)

    def export_meta(self, metrics: dict) -> dict:
        return {"task": self.name, "num_outputs": self.num_outputs, "classes": list(self.classes),
                "class_to_idx": {c: i for i, c in enumerate(self.classes)}, "ignore_index": self.ignore_index}

    def check_predict_options(self, threshold: Optional[float], draw: Optional[str],
                              score_threshold: Optional[float]) -> None:
        refuse_box_options(self.name, draw, score_threshold)
        refuse_threshold(self.name, threshold, f" ({len(self.classes)} classes, predicted by the highest probability)")

    @staticmethod
    def predict_batch(images: list, meta: dict, device) -> tuple:
        """Each image resized and normalised as evaluation reads it, stacked (`masks_at` sizes the masks back)."""
        transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])
        return (torch.stack([transform(image).to(device) for image in images]),)

    @classmethod
    def example(cls, name: str, tmp) -> Example:
        """Seeded random 16-px images with masks of class indices."""
        classes = ["background", "a", "b"]

        def images(n: int, seed: int) -> tuple:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, len(classes), (n, 16, 16), generator=g)

        x, y = images(7, 1)
        return Example(classes, "unet", {"data.format": "masks"}, images(6, 0), list(zip(x, y)), x[:2], "masks")

    def prediction_writer(self, output: str, given: Given, overlay: bool = False, draw: Optional[str] = None,
                          overwrite: bool = False) -> MaskPredictions:
        """`trainer predict`: one PNG of class indices per image into the folder `output` (--overwrite is for
        single files: a folder of masks is new, empty or predict's own)."""
        suffixes = (".png", ".overlay.jpg") if overlay else (".png",)
        return MaskPredictions(self, PredictionFolder(Path(output), "--output", given, suffixes), overlay)

    @staticmethod
    def masks_at(logits: torch.Tensor, sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
        """Class indices per image at its own size: the logits resized (bilinear) before the argmax, never the
        indices afterwards. What evaluation scores and `trainer predict` writes."""
        return [F.interpolate(logits[i:i + 1], size=size, mode="bilinear", align_corners=False)[0].argmax(0)
                for i, size in enumerate(sizes)]


class SegmentationEvaluator:
    """This rank's int64 confusion matrix of non-ignored pixels, each image scored at its original size, and
    per-image loss sums; `finish` sums the matrices with one all-reduce (exact) and gathers the per-image
    losses in split order (so the mean loss is the same float on any process count)."""

    def __init__(self, task: Segmentation, num_images: int, indices: torch.Tensor):
        self.task, self.num_images = task, num_images
        c = len(task.classes)
        self.cm = torch.zeros((c, c), dtype=torch.int64)
        self.losses: List[torch.Tensor] = []  # per image: [summed pixel loss, pixels], float64
        self.samples: list = []  # (image, mask, prediction) for the overlay grid
        self.indices = indices  # the split index of each image this rank adds, in the order added

    def add(self, batch, logits: torch.Tensor) -> None:
        x, masks = batch
        masks = list(masks) if torch.is_tensor(masks) else masks
        for i, target in enumerate(masks):
            one = F.interpolate(logits[i:i + 1], size=tuple(target.shape), mode="bilinear", align_corners=False)
            pred = one[0].argmax(0)
            self.cm += confusion_matrix(pred, target, len(self.task.classes), self.task.ignore_index).cpu()
            pixel = F.cross_entropy(one.float(), target[None].long(), ignore_index=self.task.ignore_index,
                                    reduction="none")
            # summed by numpy (pairwise, one thread): torch's own sum splits across threads, and its float
            # rounding then depends on how many threads the process has
            total = float(pixel.double().cpu().numpy().sum())
            valid = int((target != self.task.ignore_index).sum())
            self.losses.append(torch.tensor([total, valid], dtype=torch.float64))
            if len(self.samples) < OVERLAY_IMAGES:
                self.samples.append((x[i].float().cpu(), target.cpu(), pred.cpu()))

    def finish(self, accelerator) -> Tuple[dict, Optional[dict]]:
        cm = self.cm.to(accelerator.device)
        if accelerator.num_processes > 1:
            dist.all_reduce(cm)  # int64: the sum is exact
        local = torch.stack(self.losses) if self.losses else torch.zeros((0, 2), dtype=torch.float64)
        table = gather_to_main(local, accelerator)
        order = split_order(self.indices, self.num_images, accelerator)
        table = table[order] if table is not None else None  # summed in split order: the same float on any count

        def score() -> dict:
            loss_sum, pixels = float(table[:, 0].numpy().sum()), float(table[:, 1].numpy().sum())
            return {"num_images": self.num_images, **metrics_from_confusion(cm.cpu(), self.task.classes),
                    "loss": loss_sum / pixels if pixels > 0 else None}

        metrics = agree(accelerator, score, main_only=True, share=True)
        outputs = {"samples": self.samples} if accelerator.is_main_process else None
        return metrics, outputs
