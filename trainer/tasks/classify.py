"""Binary and multi-class image classification: everything these two tasks mean, in one place.

Binary: one logit, BCEWithLogitsLoss (optional pos_weight), sigmoid + threshold when predicting.
Multi-class: C logits, CrossEntropyLoss (optional label smoothing and class weights), softmax when predicting.
The loss always receives raw logits: no sigmoid/softmax layer sits in front of it.

`Task` is that loss-and-prediction head; `Classification` is the task behind the protocol of trainer/tasks
(options checked against the data, training loss, evaluator, reports, model.json fields, predictions). Its
metrics are in classify_metrics.py, its plots, summary and prediction CSV in classify_reports.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from trainer.data.datasets import Fit, eval_transform
from trainer.errors import ConfigError, DataError, TrainerError
from trainer.metrics import scalar_metrics
from trainer.models import build_model, forward_tta
from trainer.prediction_files import Given, output_path
from trainer.tasks.classify_metrics import ClassificationEvaluator, class_weights, compute_metrics
from trainer.tasks.classify_reports import PLOT_FILES, CsvPredictions, format_summary, write_eval_report
from trainer.tasks.classify_spec import ClassificationSpec, resolve_task
from trainer.tasks.protocol import (DataInfo, Example, OneSizeOneLoss, Sections, check_monitor, refuse_box_options,
                                    refuse_threshold)


@dataclass
class Task:
    kind: str  # "binary" or "multiclass"
    num_classes: int
    label_smoothing: float = 0.0
    pos_weight: Optional[float] = None
    weights: Optional[List[float]] = None  # per class, from training counts

    @property
    def num_outputs(self) -> int:
        return 1 if self.kind == "binary" else self.num_classes

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Per-sample losses, or their mean. `labels`: class indices (N,), or soft targets (N, C) of class
        probabilities as float (mixup/CutMix, trainer/data/mixing.py): multiclass takes the cross-entropy
        against them (label smoothing applied on top of the mixing), binary the BCE against class 1's column.
        With class weights, a sample counts by its true class's weight (soft: the weight expected under its
        target) and the mean divides by the total weight (CrossEntropyLoss's weighted mean)."""
        logits = logits.float()  # the loss in fp32 whatever the autocast dtype
        soft = labels.is_floating_point()
        if soft:
            labels = labels.float()
        if self.kind == "binary":
            pos_weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
            target = labels[:, 1] if soft else labels.float()  # P(class 1), the class the single logit scores
            per_sample = F.binary_cross_entropy_with_logits(logits.view(-1), target, reduction="none",
                                                            pos_weight=pos_weight)
        else:
            per_sample = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="none")
        if self.weights is None:
            return per_sample if reduction == "none" else per_sample.mean()
        table = logits.new_tensor(self.weights)
        # elementwise, not a matmul: exact for one-hot targets (no TF32 rounding on GPUs)
        w = (labels * table).sum(1) if soft else table[labels]
        return per_sample * w if reduction == "none" else (per_sample * w).sum() / w.sum().clamp_min(1e-12)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, num_classes) probabilities; for binary, columns are [P(class 0), P(class 1)]."""
        logits = logits.float()
        if self.kind == "binary":
            p = torch.sigmoid(logits.view(-1))
            return torch.stack([1 - p, p], dim=1)
        return torch.softmax(logits, dim=1)

    def predict(self, probs: torch.Tensor, threshold: float = 0.5, positive_index: int = 1) -> torch.Tensor:
        """Class indices: binary = the positive class when P(positive) >= threshold; multiclass = argmax."""
        if self.kind == "binary":
            positive = probs[:, positive_index] >= threshold
            return torch.where(positive, positive_index, 1 - positive_index).long()
        return probs.argmax(dim=1)


# ---- the task protocol for binary and multi-class classification (trainer/tasks/protocol.py) ----

class ImageBatches(OneSizeOneLoss):
    """What the tasks of whole-image targets (classification, multi-label) do alike: a classification network
    with an output per logit; a batch of (images, targets) with one loss, no parts, moved to the device, the
    network (with test-time augmentation) on its images."""

    # `trainer predict` may decode a JPEG at a reduced DCT scale (data.scaled_decode): predict_batch only resizes
    # each image to the square input, as evaluation does, and no output maps back onto the stored image
    decodes_to_fit = True

    def build_model(self, name: str, image_size: int, small_input_stem: Optional[bool] = None,
                    pretrained_path: Optional[str] = None, log=print, drop_path: Optional[float] = None,
                    dropout: Optional[float] = None):
        """`drop_path`, `dropout`: None = the model's own (see `trainer.models.build_model`)."""
        return build_model(name, self.num_outputs, image_size=image_size, small_input_stem=small_input_stem,
                           pretrained_path=pretrained_path, log=log, drop_path=drop_path, dropout=dropout)

    def to_device(self, batch, device, memory_format=torch.contiguous_format):
        x, y = batch
        return (x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True))

    @staticmethod
    def forward(net, batch, tta: str = "none") -> torch.Tensor:
        return forward_tta(net, batch[0], tta)


@dataclass
class Classification(ImageBatches, ClassificationSpec):
    """Binary or multi-class image classification behind the task protocol: batches are (images, labels),
    the training loss is `head`'s, evaluation gathers every sample's probabilities to the main rank and scores
    them once with scikit-learn (exact on any process count), reports are eval.json + confusion/ROC/PR plots,
    predictions are a CSV of probabilities."""

    kind: str  # binary | multiclass
    classes: List[str]
    head: Task  # the training loss (label smoothing, pos_weight, class weights)
    positive_index: int = 1  # binary: the class whose probability the threshold applies to
    threshold: float = 0.5
    threshold_tuning: Optional[str] = None
    target_recall: float = 0.9
    topk: Sequence[int] = (5,)
    collate = None  # the default collate: (images, labels) batches
    drop_last = False  # every training image counts, the last batch too
    report_plots = tuple(PLOT_FILES.values())  # what write_report may draw into plots/

    @property
    def name(self) -> str:
        return self.kind

    @property
    def num_outputs(self) -> int:
        return self.head.num_outputs

    @property
    def eval_head(self) -> Task:
        """Metrics use the plain log loss: no smoothing, no class weights."""
        return Task(self.kind, len(self.classes))

    # -- construction: every option checked against the data --

    @classmethod
    def build(cls, classes: Sequence[str], data: DataInfo, cfg: Sections) -> "Classification":
        loss_cfg, eval_cfg = cfg.loss, cfg.eval
        if loss_cfg.name != "ce":
            raise ConfigError(f"loss.name={loss_cfg.name} is for segmentation; classification trains with ce")
        classes = list(classes)
        kind = resolve_task(cfg.task, len(classes))
        if kind == "binary" and loss_cfg.label_smoothing > 0:
            raise ConfigError("loss.label_smoothing applies to multiclass tasks only")
        if kind == "multiclass" and loss_cfg.pos_weight is not None:
            raise ConfigError("loss.pos_weight applies to binary tasks only (use loss.class_weighted for multiclass)")
        head = Task(kind, len(classes), label_smoothing=loss_cfg.label_smoothing, pos_weight=loss_cfg.pos_weight,
                    weights=class_weights(data.train_counts) if loss_cfg.class_weighted else None)
        positive_index = 1
        if eval_cfg.positive_class is not None:
            if kind != "binary":
                raise ConfigError("eval.positive_class applies to binary tasks only")
            if eval_cfg.positive_class not in classes:
                raise ConfigError(f"eval.positive_class '{eval_cfg.positive_class}' is not a class; classes: {classes}")
            positive_index = classes.index(eval_cfg.positive_class)
        made = cls(kind, classes, head, positive_index, eval_cfg.threshold, eval_cfg.threshold_tuning,
                   eval_cfg.target_recall, tuple(eval_cfg.topk))
        check_monitor(made, eval_cfg.monitor or made.default_monitor)
        return made

    @classmethod
    def from_meta(cls, meta: dict) -> "Classification":
        """The task of an exported model (model.json), for `trainer eval` and `trainer predict`."""
        classes = meta["classes"]
        positive_index = classes.index(meta["positive_class"]) if meta.get("positive_class") else 1
        return cls(meta["task"], classes, Task(meta["task"], len(classes)), positive_index,
                   meta.get("threshold") or 0.5)

    def metric_names(self) -> List[str]:
        """The scalar metrics an evaluation reports (what eval.monitor may name)."""
        c = len(self.classes)
        probe = compute_metrics(np.eye(c, dtype=np.float32), np.arange(c), np.zeros(c), self.eval_head,
                                self.classes, topk=self.topk)
        return [k for k in scalar_metrics(probe) if k not in ("num_samples", "threshold")]

    # -- training --

    def train_loss(self, model, batch, memory_format=torch.contiguous_format) -> Tuple[torch.Tensor, int, dict]:
        """The loss to backpropagate, the number of samples in this process's batch, no parts."""
        x, y = batch
        x = x.to(memory_format=memory_format)
        return self.head.loss(model(x), y), x.shape[0], {}

    # -- evaluation --

    def evaluator(self, dataset, indices: torch.Tensor) -> ClassificationEvaluator:
        return ClassificationEvaluator(self, len(dataset), indices)

    def match_data(self, data, dataset) -> None:
        """Classes in another order, or a subset, are scored by name; a class the model does not know cannot be."""
        if data.classes == self.classes:
            return
        unknown = sorted(set(data.classes) - set(self.classes))
        if unknown:
            raise DataError(f"classes in {data.source} that the model does not know: {unknown} "
                            f"(model classes: {self.classes})")
        dataset.labels = [self.classes.index(data.classes[label]) for label in dataset.labels]

    # -- reports, export, predictions --

    def write_report(self, out_dir, metrics: dict, outputs: dict, name: str = "eval.json") -> None:
        """Main rank: eval.json and the confusion matrix, ROC and precision-recall plots beside it."""
        write_eval_report(out_dir, metrics, outputs["probs"], outputs["labels"], self.classes, self.kind,
                          self.positive_index, name=name)

    def summary(self, metrics: dict) -> str:
        return format_summary(metrics, self.classes, self.kind)

    def export_meta(self, metrics: dict) -> dict:
        """This task's fields of model.json (with the threshold the evaluation used, tuned or not)."""
        binary = self.kind == "binary"
        return {"task": self.kind, "num_outputs": self.num_outputs, "classes": list(self.classes),
                "class_to_idx": {c: i for i, c in enumerate(self.classes)},
                "threshold": metrics.get("threshold", self.threshold) if binary else None,
                "positive_class": self.classes[self.positive_index] if binary else None}

    def check_predict_options(self, threshold: Optional[float], draw: Optional[str],
                              score_threshold: Optional[float]) -> None:
        refuse_box_options(self.kind, draw, score_threshold)
        if self.kind != "binary":
            hint = f" ({len(self.classes)} classes, predicted by the highest probability)"
            refuse_threshold(self.kind, threshold, hint)

    @staticmethod
    def predict_batch(images: list, meta: dict, device) -> tuple:  # each image as evaluation reads it, stacked
        transform = eval_transform(meta["image_size"], meta["mean"], meta["std"], Fit.from_meta(meta))
        return (torch.stack([transform(image).to(device) for image in images]),)

    def prediction_writer(self, output: str, given: Given, overlay: bool = False, draw: Optional[str] = None,
                          overwrite: bool = False) -> CsvPredictions:
        """`trainer predict`: a CSV of labels and probabilities (`output` is its path)."""
        if overlay:
            raise TrainerError("--overlay is for segmentation models; this one classifies")
        return CsvPredictions(self, output_path(output, given, "CSV", overwrite))

    csv_label_column = "label"  # the prediction CSV's column of the predicted class

    def csv_predictions(self, logits: torch.Tensor) -> tuple:
        """(N, C) probabilities on the CPU, and each image's predicted class name (CsvPredictions' row cells)."""
        probs = self.head.probabilities(logits).cpu()
        labels = self.head.predict(probs, self.threshold, self.positive_index)
        return probs, [self.classes[label] for label in labels.tolist()]

    @classmethod
    def example(cls, name: str, tmp) -> Example:
        """Seeded random 16-px images with class labels."""
        classes = ["a", "b"] if name == "binary" else ["a", "b", "c"]

        def images(n: int, seed: int) -> tuple:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, len(classes), (n,), generator=g)

        x, y = images(7, 1)
        return Example(classes, "small_cnn", {"data.format": "generated"}, images(6, 0), list(zip(x, y)), x[:2],
                       "preds.csv")
