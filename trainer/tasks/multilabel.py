"""Multi-label image classification behind the task protocol (trainer/tasks/protocol.py): any number of classes
per image, none included.

A logit per class, each an independent sigmoid; BCEWithLogitsLoss against the multi-hot targets, with
loss.class_weighted a per-class pos_weight = negatives / positives of the training split (torch's documented
way to balance a rare class: its positives count as often as its negatives). An image's predicted labels are
the classes whose probability reaches that class's threshold (eval.threshold for all, or each tuned on val for
its F1 with eval.threshold_tuning=max_f1); the thresholds the evaluation used are saved in model.json and used
by `trainer eval` and `trainer predict`. The networks are classification's (trainer/models.py): only the
output count differs. Metrics in multilabel_metrics.py, reports in multilabel_reports.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer.data.datasets import Fit, eval_transform
from trainer.errors import ConfigError, DataError, TrainerError
from trainer.metrics import scalar_metrics
from trainer.prediction_files import Given, output_path
from trainer.tasks.classify import ImageBatches
from trainer.tasks.classify_reports import CsvPredictions
from trainer.tasks.multilabel_metrics import MultilabelEvaluator, multilabel_metrics, per_sample_loss
from trainer.tasks.multilabel_reports import PLOT_FILES, format_summary, write_multilabel_report
from trainer.tasks.multilabel_spec import MultilabelSpec
from trainer.tasks.protocol import DataInfo, Example, Sections, check_monitor, refuse_box_options


def positive_weights(positives: Sequence[int], num_images: int) -> List[float]:
    """Per class, negatives / positives of the training split (BCEWithLogitsLoss's pos_weight)."""
    return [(num_images - n) / n if n > 0 else 1.0 for n in positives]


@dataclass
class Multilabel(ImageBatches, MultilabelSpec):
    classes: List[str]
    thresholds: List[float]  # per class: predicted present when P(class) >= its threshold
    pos_weight: Optional[List[float]] = None  # per class (loss.class_weighted)
    threshold_tuning: Optional[str] = None  # max_f1: each class's threshold chosen on val for its F1
    name: str = "multilabel"
    collate = None  # the default collate: (images, multi-hot float targets) batches
    drop_last = False
    report_plots = tuple(PLOT_FILES.values())
    csv_label_column = "labels"  # the prediction CSV's column: the predicted classes, space-separated
    topk: Sequence[int] = field(default=())  # (`trainer eval` sets it for every task; multi-label has no top-k)

    @property
    def num_outputs(self) -> int:
        return len(self.classes)

    @property
    def threshold(self) -> float:
        return self.thresholds[0]

    @threshold.setter
    def threshold(self, value: float) -> None:  # `trainer eval eval.threshold=T`: every class's threshold
        self.thresholds = [float(value)] * len(self.classes)

    # -- construction --

    @classmethod
    def build(cls, classes: Sequence[str], data: DataInfo, cfg: Sections) -> "Multilabel":
        loss_cfg, eval_cfg = cfg.loss, cfg.eval
        if loss_cfg.name != "ce":
            raise ConfigError(f"loss.name={loss_cfg.name} is for segmentation; multilabel trains with BCE (ce)")
        classes = list(classes)
        pos_weight = None
        if loss_cfg.class_weighted:
            if not data.num_images:
                raise ConfigError("loss.class_weighted needs the size of the training split (multilabel pos_weight)")
            pos_weight = positive_weights(data.train_counts, data.num_images)
        made = cls(classes, [float(eval_cfg.threshold)] * len(classes), pos_weight, eval_cfg.threshold_tuning)
        check_monitor(made, eval_cfg.monitor or made.default_monitor)
        return made

    @classmethod
    def from_meta(cls, meta: dict) -> "Multilabel":
        return cls(list(meta["classes"]), [float(t) for t in meta["thresholds"]])

    def metric_names(self) -> List[str]:
        c = len(self.classes)
        eye = np.eye(c, dtype=np.float32)
        probe = multilabel_metrics(eye, eye, np.zeros(c), self.thresholds, self.classes)
        return [k for k in scalar_metrics(probe) if k != "num_samples"]

    # -- training --

    def train_loss(self, model, batch, memory_format=torch.contiguous_format) -> Tuple[torch.Tensor, int, dict]:
        """The mean over images and classes of the (pos_weighted) BCE: BCEWithLogitsLoss's mean."""
        x, y = batch
        x = x.to(memory_format=memory_format)
        logits = model(x)
        weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight, dtype=torch.float32)
        return per_sample_loss(logits, y, weight).mean(), x.shape[0], {}

    # -- evaluation --

    def evaluator(self, dataset, indices: torch.Tensor) -> MultilabelEvaluator:
        return MultilabelEvaluator(self, len(dataset), indices)

    def match_data(self, data, dataset) -> None:
        """The data's classes against the model's: columns renumbered by name; a class the model does not know
        cannot be scored."""
        if data.classes == self.classes:
            return
        unknown = sorted(set(data.classes) - set(self.classes))
        if unknown:
            raise DataError(f"classes in {data.source} that the model does not know: {unknown} "
                            f"(model classes: {self.classes})")
        targets = np.zeros((len(dataset.labels), len(self.classes)), dtype=np.float32)
        targets[:, [self.classes.index(c) for c in data.classes]] = dataset.labels
        dataset.labels = targets

    # -- reports, export, predictions --

    def write_report(self, out_dir, metrics: dict, outputs: dict, name: str = "eval.json") -> None:
        write_multilabel_report(out_dir, metrics, outputs["probs"], outputs["targets"], self.classes, name=name)

    def summary(self, metrics: dict) -> str:
        return format_summary(metrics, self.classes)

    def export_meta(self, metrics: dict) -> dict:
        """model.json's fields, with the thresholds the evaluation used (tuned or not)."""
        return {"task": self.name, "num_outputs": self.num_outputs, "classes": list(self.classes),
                "class_to_idx": {c: i for i, c in enumerate(self.classes)},
                "thresholds": [float(t) for t in metrics.get("thresholds", self.thresholds)]}

    def check_predict_options(self, threshold: Optional[float], draw: Optional[str],
                              score_threshold: Optional[float]) -> None:
        """--threshold is taken: one number for every class (`trainer predict` sets it, as `trainer eval
        eval.threshold=T` does)."""
        refuse_box_options(self.name, draw, score_threshold)

    @staticmethod
    def predict_batch(images: list, meta: dict, device) -> tuple:  # each image as evaluation reads it, stacked
        transform = eval_transform(meta["image_size"], meta["mean"], meta["std"], Fit.from_meta(meta))
        return (torch.stack([transform(image).to(device) for image in images]),)

    def csv_predictions(self, logits: torch.Tensor) -> tuple:
        """(N, C) probabilities, and each image's classes at their thresholds, space-separated (compared in
        float64, as the evaluation compares them: eval and predict name the same labels)."""
        probs = torch.sigmoid(logits.detach().float()).cpu()
        present = probs.numpy().astype(np.float64) >= np.asarray(self.thresholds, dtype=np.float64)[None, :]
        return probs, [" ".join(c for c, on in zip(self.classes, row) if on) for row in present]

    def prediction_writer(self, output: str, given: Given, overlay: bool = False, draw: Optional[str] = None,
                          overwrite: bool = False) -> CsvPredictions:
        if overlay:
            raise TrainerError("--overlay is for segmentation models; this one is multilabel")
        return CsvPredictions(self, output_path(output, given, "CSV", overwrite))

    @classmethod
    def example(cls, name: str, tmp) -> Example:
        """Seeded random 16-px images with random label sets (some with none)."""
        classes = ["a", "b", "c"]

        def images(n: int, seed: int) -> tuple:
            g = torch.Generator().manual_seed(seed)
            return torch.randn(n, 3, 16, 16, generator=g), (torch.rand(n, 3, generator=g) < 0.4).float()

        x, y = images(7, 1)
        return Example(classes, "small_cnn", {"data.format": "multilabel", "data.root": str(tmp)}, images(6, 0),
                       list(zip(x, y)), x[:2], "preds.csv")
