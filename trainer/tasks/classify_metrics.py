"""Classification metrics: computed once, on the main process, from every sample's outputs, and the
evaluator that gathers them (`ClassificationEvaluator`).

How samples are collected (trainer.evaluation and `ClassificationEvaluator` below):
the split is cut into contiguous, non-overlapping shards, one per process (no padding, so no duplicates),
each process runs its shard through the unwrapped model, then the shards are gathered to the main process
only. The main process checks that it holds exactly len(split) samples, computes the metrics and broadcasts
the (small) metrics dict, so every rank agrees on what it saw.

Memory: the main process holds the split's (N, C) float32 probabilities, N x C x 4 bytes (50,000 images x
1,000 classes = 200 MB; 500,000 x 1,000 = 2 GB); every other process holds only its own shard,
N / processes x C x 4 bytes. Each shard travels once.

Arithmetic: scikit-learn computes everything (curves, AUCs, confusion matrices, averaged P/R/F1). It is the
reference users compare with, it works in float64, and it is already a dependency; torchmetrics was measured
to differ from it by ~7e-8 (float32 states) and would add a dependency for no gain.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from sklearn import metrics as skm

from trainer.distributed import agree, gather_to_main
from trainer.errors import TrainerError
from trainer.evaluation import split_order

THRESHOLD_CRITERIA = ("max_f1", "youden", "target_recall")


# ---- metrics ----

def _sk(fn, *args, **kwargs):
    """scikit-learn call with its 'ill-defined' warnings silenced: we report those cases explicitly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _per_class(labels, preds, probs, classes) -> List[dict]:
    c = len(classes)
    p, r, f, s = _sk(skm.precision_recall_fscore_support, labels, preds, labels=list(range(c)), zero_division=0)
    table = []
    for i, name in enumerate(classes):
        y = labels == i
        auc = float(_sk(skm.roc_auc_score, y, probs[:, i])) if 0 < y.sum() < len(y) else None
        table.append({"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                      "support": int(s[i]), "roc_auc": auc})
    return table


def class_weights(counts: Sequence[int]) -> List[float]:
    """N / (C x count_c): 1.0 for every class when balanced; a class with no images gets weight 0."""
    total, c = sum(counts), len(counts)
    return [total / (c * n) if n > 0 else 0.0 for n in counts]


def binary_metrics(score: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    """y in {0,1} (1 = positive class), score = P(positive); predicted positive when score >= threshold."""
    pred = (score >= threshold).astype(int)
    (tn, fp), (fn, tp) = skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()
    both = 0 < y.sum() < len(y)
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(_sk(skm.balanced_accuracy_score, y, pred)),
        "precision": float(_sk(skm.precision_score, y, pred, zero_division=0)),
        "recall": float(_sk(skm.recall_score, y, pred, zero_division=0)),
        "specificity": float(_sk(skm.recall_score, y, pred, pos_label=0, zero_division=0)),
        "f1": float(_sk(skm.f1_score, y, pred, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, score)) if both else None,  # undefined with one class present
        "pr_auc": float(_sk(skm.average_precision_score, y, score)) if y.any() else None,  # no positives: undefined
        "log_loss": float(skm.log_loss(y, np.clip(score.astype(np.float64), 0, 1), labels=[0, 1])),
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def multiclass_metrics(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], topk: Sequence[int]) -> dict:
    c = len(classes)
    probs64 = probs.astype(np.float64)
    preds = probs.argmax(axis=1)
    out = {"accuracy": float(skm.accuracy_score(labels, preds))}
    for k in sorted({min(k, c) for k in topk if k > 1}):
        out[f"top{k}_accuracy"] = 1.0 if k == c else float(
            skm.top_k_accuracy_score(labels, probs64, k=k, labels=list(range(c))))
    out["balanced_accuracy"] = float(_sk(skm.balanced_accuracy_score, labels, preds))
    for avg in ("macro", "weighted"):
        p, r, f, _ = _sk(skm.precision_recall_fscore_support, labels, preds, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    # one-vs-rest macro ROC-AUC over the classes that have both positives and negatives in this split;
    # equal to sklearn's roc_auc_score(multi_class="ovr") when every class is present (which sklearn requires)
    per_class = _per_class(labels, preds, probs64, classes)
    aucs = [row["roc_auc"] for row in per_class if row["roc_auc"] is not None]
    out["roc_auc"] = float(np.mean(aucs)) if aucs else None
    out["roc_auc_absent_classes"] = [row["class"] for row in per_class if row["roc_auc"] is None]
    out["log_loss"] = float(_sk(skm.log_loss, labels, probs64, labels=list(range(c))))  # float32 softmax rows sum to 1 +- 1e-7
    out["confusion_matrix"] = skm.confusion_matrix(labels, preds, labels=list(range(c))).tolist()
    out["per_class"] = per_class
    return out


def compute_metrics(probs: np.ndarray, labels: np.ndarray, losses: np.ndarray, task,
                    classes: Sequence[str], threshold: float = 0.5, topk: Sequence[int] = (5,),
                    positive_index: int = 1) -> dict:
    """Every metric of the split, from per-sample probabilities (N, C), labels (N,) and losses (N,); `task`: the
    head (trainer.tasks.classify.Task), whose `kind` says binary or multiclass."""
    n = int(len(labels))
    out: dict = {"num_samples": n}
    if n == 0:
        return out
    out["loss"] = float(np.mean(losses, dtype=np.float64))
    if task.kind == "binary":
        y = (labels == positive_index).astype(int)
        out.update(binary_metrics(probs[:, positive_index], y, threshold))
        out["positive_class"] = classes[positive_index]
        out["per_class"] = _per_class(labels, np.where(probs[:, positive_index] >= threshold, positive_index,
                                                       1 - positive_index), probs.astype(np.float64), classes)
    else:
        out.update(multiclass_metrics(probs, labels, classes, topk))
    return out


def score_outputs(outputs: dict, task, classes: Sequence[str], threshold: float, topk: Sequence[int],
                  positive_index: int = 1, tuning: Optional[str] = None, target_recall: float = 0.9) -> dict:
    """Metrics of collected outputs; for binary with `tuning`, the threshold is first chosen on these outputs."""
    if task.kind == "binary" and tuning and len(outputs["labels"]):
        score = outputs["probs"][:, positive_index]
        threshold = tune_threshold(score, (outputs["labels"] == positive_index).astype(int), tuning, target_recall)
    return compute_metrics(outputs["probs"], outputs["labels"], outputs["losses"], task, classes, threshold, topk,
                           positive_index)


def tune_threshold(score: np.ndarray, y: np.ndarray, criterion: str, target_recall: float = 0.9) -> float:
    """Decision threshold on P(positive) chosen on a validation split (predict positive when score >= t).

    max_f1: the threshold with the highest F1; youden: the one maximising TPR - FPR; target_recall: the highest
    threshold whose recall is still >= target_recall. Needs both classes in the split.
    """
    if not 0 < y.sum() < len(y):
        raise TrainerError("threshold tuning needs both classes in the validation split")
    score64 = score.astype(np.float64)
    if criterion == "youden":
        fpr, tpr, thr = skm.roc_curve(y, score64)
        j = np.where(np.isfinite(thr), tpr - fpr, -np.inf)
        chosen = thr[int(np.argmax(j))]
    elif criterion in ("max_f1", "target_recall"):
        precision, recall, thr = skm.precision_recall_curve(y, score64)
        precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
        if criterion == "max_f1":
            f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
            chosen = thr[int(np.argmax(f1))]
        else:
            chosen = thr[recall >= target_recall].max()  # recall at the lowest threshold is 1: never empty
    else:
        raise ValueError(f"unknown threshold criterion {criterion}; valid: {THRESHOLD_CRITERIA}")
    return _between_scores(score, float(chosen))


def _between_scores(score: np.ndarray, chosen: float) -> float:
    """A threshold that classifies the split exactly as `chosen` (one of the scores) does, but sits halfway to
    the next lower score and is a float32 number: no sample lies on it, so predictions do not depend on how
    probabilities were rounded or printed (float32 on device, float64 in a CSV)."""
    below = score[score < chosen]
    lower = float(below.max()) if below.size else 0.0
    mid = float(np.float32((lower + chosen) / 2))
    return mid if lower < mid < chosen else chosen


# ---- the evaluator ----

def gathered_rows(rows: List[torch.Tensor], width: int, indices: torch.Tensor, num_samples: int,
                  accelerator) -> Optional[torch.Tensor]:
    """The one collective of a per-sample evaluator: this rank's float32 rows (`width` columns each; the split
    index of each in `indices`) gathered to the main rank and put in split order, every sample of the split
    there exactly once; None on the other ranks. Classification and multi-label gather their rows with it."""
    local = torch.cat(rows) if rows else torch.zeros((0, width))
    table = gather_to_main(local.float(), accelerator)
    order = split_order(indices, num_samples, accelerator)
    return None if table is None else table[order]


class ClassificationEvaluator:
    """Per-sample rows (probabilities, label, loss) of this rank's shard; `finish` gathers them to the main rank
    (the one collective), checks that every sample of the split is there exactly once, scores them once
    there and gives every rank the same metrics. `task`: the Classification scored (its classes, threshold,
    top-k and the plain log-loss head `eval_head`)."""

    def __init__(self, task, num_samples: int, indices: torch.Tensor):
        self.task, self.num_samples, self.rows = task, num_samples, []
        self.indices = indices  # the split index of each row this rank adds, in the order added
        self.head = task.eval_head

    def add(self, batch, logits: torch.Tensor) -> None:
        y = batch[1]
        losses = self.head.loss(logits, y, reduction="none")
        self.rows.append(torch.cat([self.head.probabilities(logits), y[:, None].float(), losses[:, None]], dim=1).cpu())

    def gather(self, accelerator) -> Optional[dict]:
        """Every rank's rows on the main rank, in split order; None elsewhere."""
        c = self.head.num_classes
        table = gathered_rows(self.rows, c + 2, self.indices, self.num_samples, accelerator)
        if table is None:
            return None
        return {"probs": table[:, :c].numpy(), "labels": table[:, c].round().long().numpy(),
                "losses": table[:, c + 1].numpy()}

    def finish(self, accelerator) -> Tuple[dict, Optional[dict]]:
        """(metrics on every rank, the gathered outputs on the main rank for its reports)."""
        outputs = self.gather(accelerator)
        t = self.task
        metrics = agree(accelerator, lambda: score_outputs(outputs, self.head, t.classes, t.threshold, t.topk,
                                                           t.positive_index, t.threshold_tuning, t.target_recall),
                        main_only=True, share=True)
        return metrics, outputs
