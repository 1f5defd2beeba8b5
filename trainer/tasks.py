"""What binary and multi-class mean: output size, loss, and turning logits into probabilities and labels.

Binary: one logit, BCEWithLogitsLoss (optional pos_weight), sigmoid + threshold when predicting.
Multi-class: C logits, CrossEntropyLoss (optional label smoothing and class weights), softmax when predicting.
The loss always receives raw logits: no sigmoid/softmax layer sits in front of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from trainer.errors import ConfigError


def resolve_task(task: str, num_classes: int) -> str:
    if task == "auto":
        return "binary" if num_classes == 2 else "multiclass"
    if task == "binary" and num_classes != 2:
        raise ConfigError(f"task=binary needs exactly 2 classes, the data has {num_classes}")
    return task


def class_weights(counts: Sequence[int]) -> List[float]:
    """N / (C x count_c): 1.0 for every class when balanced; a class with no images gets weight 0."""
    total, c = sum(counts), len(counts)
    return [total / (c * n) if n > 0 else 0.0 for n in counts]


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
        """Per-sample losses, or their mean; with class weights, a sample counts by its true class's weight
        and the mean divides by the total weight (CrossEntropyLoss's weighted mean)."""
        logits = logits.float()  # the loss in fp32 whatever the autocast dtype
        if self.kind == "binary":
            pos_weight = None if self.pos_weight is None else logits.new_tensor(self.pos_weight)
            per_sample = F.binary_cross_entropy_with_logits(logits.view(-1), labels.float(), reduction="none",
                                                            pos_weight=pos_weight)
        else:
            per_sample = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="none")
        if self.weights is None:
            return per_sample if reduction == "none" else per_sample.mean()
        w = logits.new_tensor(self.weights)[labels]
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
