"""Multi-label metrics, computed once on the main process from every sample's gathered probabilities and targets
(as classification's, trainer/tasks/classify_metrics.py: contiguous shards, no padding, gathered to the main
rank in split order, scored there with scikit-learn in float64, the metrics broadcast), and the evaluator.

Memory on the main rank: N x (2C + 1) x 4 bytes (100,000 images x 1,000 classes: 800 MB).

Definitions (scikit-learn's): `map` = the mean over classes of average_precision_score (a class with no
positive in the split has no AP and is left out, named in map_absent_classes); F1/precision/recall micro
(pooled over every image-class decision) and macro (mean over classes), at the per-class thresholds (predicted
present when P >= threshold); subset_accuracy = every class of an image right; hamming_loss = the fraction of
image-class decisions wrong; roc_auc per class where the split holds both a positive and a negative.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from trainer.distributed import agree
from trainer.tasks.classify_metrics import _sk, gathered_rows, tune_threshold


def multilabel_metrics(probs: np.ndarray, targets: np.ndarray, losses: np.ndarray, thresholds: Sequence[float],
                       classes: Sequence[str]) -> dict:
    """Every metric of the split from per-sample probabilities (N, C), 0/1 targets (N, C) and losses (N,)."""
    n = int(len(targets))
    out: dict = {"num_samples": n}
    if n == 0:
        return out
    y = np.asarray(targets).round().astype(int)
    p64 = np.asarray(probs, dtype=np.float64)  # float32 probabilities, compared and scored in float64
    t = np.asarray(thresholds, dtype=np.float64)
    pred = (p64 >= t[None, :]).astype(int)
    table = []
    for c, name in enumerate(classes):
        yc, positives = y[:, c], int(y[:, c].sum())
        pr, rc, f1, _ = _sk(skm.precision_recall_fscore_support, yc, pred[:, c], average="binary", zero_division=0)
        ap = float(_sk(skm.average_precision_score, yc, p64[:, c])) if positives else None  # none: undefined
        auc = float(skm.roc_auc_score(yc, p64[:, c])) if 0 < positives < n else None  # needs both labels
        table.append({"class": name, "ap": ap, "f1": float(f1), "precision": float(pr), "recall": float(rc),
                      "support": positives, "roc_auc": auc, "threshold": float(t[c])})
    aps = [row["ap"] for row in table if row["ap"] is not None]
    aucs = [row["roc_auc"] for row in table if row["roc_auc"] is not None]
    out["loss"] = float(np.mean(losses, dtype=np.float64))
    out["map"] = float(np.mean(aps)) if aps else None
    for avg in ("micro", "macro"):
        pr, rc, f1, _ = _sk(skm.precision_recall_fscore_support, y, pred, average=avg, zero_division=0)
        out.update({f"f1_{avg}": float(f1), f"precision_{avg}": float(pr), f"recall_{avg}": float(rc)})
    out["subset_accuracy"] = float(skm.accuracy_score(y, pred))
    out["hamming_loss"] = float(skm.hamming_loss(y, pred))
    out["roc_auc"] = float(np.mean(aucs)) if aucs else None
    out["map_absent_classes"] = [row["class"] for row in table if row["ap"] is None]
    out["thresholds"] = [float(v) for v in t]
    out["per_class"] = table
    return out


def tune_thresholds(probs: np.ndarray, targets: np.ndarray, default: Sequence[float]) -> List[float]:
    """Each class's threshold chosen on these outputs for its F1 (binary's max_f1 tuning, class by class); a
    class without both positives and negatives here keeps its `default`."""
    y = np.asarray(targets).round().astype(int)
    return [tune_threshold(probs[:, c], y[:, c], "max_f1") if 0 < y[:, c].sum() < len(y) else float(default[c])
            for c in range(y.shape[1])]


def score_outputs(outputs: dict, thresholds: Sequence[float], classes: Sequence[str], tuning: Optional[str]) -> dict:
    """Metrics of gathered outputs; with `tuning` (max_f1) the thresholds are first chosen on them."""
    if tuning and len(outputs["targets"]):
        thresholds = tune_thresholds(outputs["probs"], outputs["targets"], thresholds)
    return multilabel_metrics(outputs["probs"], outputs["targets"], outputs["losses"], thresholds, classes)


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """(N,) BCE-with-logits per image, the mean over its classes (fp32 whatever the autocast dtype)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), pos_weight=pos_weight,
                                              reduction="none").mean(1)


class MultilabelEvaluator:
    """Per-sample rows (probabilities, targets, plain BCE) of this rank's shard; `finish` gathers them to the main
    rank (classification's `gathered_rows`), scores them once there, and gives every rank the same metrics."""

    def __init__(self, task, num_samples: int, indices: torch.Tensor):
        self.task, self.num_samples, self.indices, self.rows = task, num_samples, indices, []

    def add(self, batch, logits: torch.Tensor) -> None:
        y = batch[1].float()
        self.rows.append(torch.cat([torch.sigmoid(logits.float()), y, per_sample_loss(logits, y)[:, None]],
                                   dim=1).cpu())

    def gather(self, accelerator) -> Optional[dict]:
        c = len(self.task.classes)
        table = gathered_rows(self.rows, 2 * c + 1, self.indices, self.num_samples, accelerator)
        if table is None:
            return None
        return {"probs": table[:, :c].numpy(), "targets": table[:, c:2 * c].round().numpy(),
                "losses": table[:, 2 * c].numpy()}

    def finish(self, accelerator) -> Tuple[dict, Optional[dict]]:
        outputs = self.gather(accelerator)
        t = self.task
        metrics = agree(accelerator, lambda: score_outputs(outputs, t.thresholds, t.classes, t.threshold_tuning),
                        main_only=True, share=True)
        return metrics, outputs
