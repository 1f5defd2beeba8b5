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
from PIL import Image

from trainer.data.masks import collate_masks
from trainer.distributed import agree, gather_to_main
from trainer.errors import ConfigError
from trainer.evaluation import split_order
from trainer.prediction_files import Given, PredictionFolder
from trainer.tasks.segment_metrics import (confusion_matrix, cross_entropy_loss, dice_loss, metrics_from_confusion,
                                           pixel_class_weights)
from trainer.tasks.segment_models import SEGMENTATION_MODELS, build_segmentation_model
from trainer.tasks.segment_reports import PLOTS, format_segmentation_summary, write_segmentation_report

OVERLAY_IMAGES = 8  # validation images kept (main rank, the first of its shard) for the overlay grid
METRICS = ("miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice", "fwiou", "loss")


@dataclass
class Segmentation:
    classes: List[str]
    ignore_index: int = 255
    loss_name: str = "ce"  # ce | dice | ce+dice
    dice_weight: float = 1.0
    aux_weight: float = 0.5
    label_smoothing: float = 0.0
    class_weights: Optional[List[float]] = None
    name = "segmentation"
    default_monitor = "miou"
    report_plots = PLOTS  # what write_report may draw into plots/
    drop_last = True  # a last training batch of one image would break BatchNorm in DeepLabV3's pooling branch
    collate = staticmethod(collate_masks)  # evaluation: images of different sizes keep their own masks

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    # -- construction --

    @classmethod
    def build(cls, task: str, classes: Sequence[str], train_counts: Sequence[int], loss_cfg, eval_cfg,
              ignore_index: int = 255) -> "Segmentation":
        """`train_counts`: pixels per class in the training masks (for loss.class_weighted)."""
        if eval_cfg.positive_class is not None or eval_cfg.threshold_tuning:
            raise ConfigError("eval.positive_class and eval.threshold_tuning apply to binary classification only")
        if not 0 <= ignore_index <= 255 or ignore_index < len(classes):
            raise ConfigError(f"data.ignore_index={ignore_index} must be in [{len(classes)}, 255]: a class index "
                              f"cannot be ignored, and masks are 8-bit PNGs")
        made = cls(list(classes), ignore_index, loss_cfg.name, loss_cfg.dice_weight, loss_cfg.aux_weight,
                   loss_cfg.label_smoothing, pixel_class_weights(train_counts) if loss_cfg.class_weighted else None)
        monitor = eval_cfg.monitor or made.default_monitor
        if monitor not in made.metric_names():
            raise ConfigError(f"eval.monitor '{monitor}' is not a segmentation metric; choose one of "
                              f"{sorted(made.metric_names())}")
        return made

    @classmethod
    def from_meta(cls, meta: dict) -> "Segmentation":
        return cls(list(meta["classes"]), meta.get("ignore_index", 255))

    def build_model(self, name: str, image_size: int, small_input_stem: Optional[bool] = None,
                    pretrained_path: Optional[str] = None, verbose=print, drop_path: Optional[float] = None,
                    dropout: Optional[float] = None):
        """Any input size (the U-Net pads to its stride; torchvision's models are fully convolutional)."""
        if drop_path or dropout is not None:  # the config refuses them first; a direct caller is told here too
            raise ConfigError(f"model.drop_path and model.dropout are for classification models; {name} keeps its own")
        if name not in SEGMENTATION_MODELS:
            raise ConfigError(f"model.name '{name}' is not a segmentation model; valid: "
                              f"{', '.join(sorted(SEGMENTATION_MODELS))}")
        return build_segmentation_model(name, len(self.classes), pretrained_path, aux_loss=self.aux_weight > 0,
                                        verbose=verbose)

    def metric_names(self) -> List[str]:
        return list(METRICS)

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return metric != "loss"

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

    @staticmethod
    def loss_parts(model_name: str) -> List[str]:
        return []

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

    # -- reports, export, predictions --

    def write_report(self, out_dir, metrics: dict, outputs: dict, name: str = "eval.json") -> None:
        write_segmentation_report(out_dir, metrics, outputs, self.classes, name=name)

    def summary(self, metrics: dict) -> str:
        return format_segmentation_summary(metrics, self.classes)

    def export_meta(self, metrics: dict) -> dict:
        return {"task": self.name, "num_outputs": self.num_outputs, "classes": list(self.classes),
                "class_to_idx": {c: i for i, c in enumerate(self.classes)}, "ignore_index": self.ignore_index}

    def prediction_writer(self, output: str, given: Given, overlay: bool = False, draw: Optional[str] = None,
                          overwrite: bool = False) -> "MaskPredictions":
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


class MaskPredictions:
    """One single-channel PNG of class indices per image, at the image's own size, named after its path below
    the folder it was given in (suffix .png); with `overlay`, a colour overlay beside it (NAME.overlay.jpg: not
    a .png, so a glob of the masks never picks it up). The files go through a PredictionFolder: moved into
    --output only when every image is done, never over an input or a file predict did not write."""

    def __init__(self, task: Segmentation, files: PredictionFolder, overlay: bool):
        self.task, self.files, self.overlay = task, files, overlay

    def add(self, inputs: Sequence[Tuple[str, str]], logits: torch.Tensor, sizes, images) -> None:
        for (path, _), mask, image in zip(inputs, self.task.masks_at(logits, sizes), images):
            indices = mask.to(torch.uint8).cpu().numpy()
            write_png(self.files.path(path, ".png"), Image.fromarray(indices, "L"))
            if self.overlay:
                from trainer.tasks.segment_reports import overlay

                blended = overlay(image.permute(1, 2, 0).numpy(), indices, len(self.task.classes))
                write_png(self.files.path(path, ".overlay.jpg"), Image.fromarray(blended), fmt="JPEG")

    def abort(self) -> None:
        self.files.abort()

    def close(self) -> int:
        return self.files.close()


def write_png(path: Path, image, fmt: str = "PNG") -> None:
    """Into the staging folder of a PredictionFolder, which places it whole."""
    image.save(path, format=fmt)
