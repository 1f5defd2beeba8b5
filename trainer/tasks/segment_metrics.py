"""Semantic-segmentation metrics and losses.

Metrics come from one int64 confusion matrix (rows = true class, columns = predicted) over every labelled
pixel of the split: the dataset-level IoU that torchvision's references/segmentation, mmseg, detectron2 and
the VOC/Cityscapes benchmarks report. Per-process matrices are summed exactly (an all_reduce of int64). Not
torchmetrics' MeanIoU, which averages per-image IoUs and knows no ignore_index. Pixels whose target is
`ignore_index` (255 by convention: void borders, padding from the collate) count nowhere.

Losses take logits [B, C, H, W] and targets int64 [B, H, W]; neither syncs the GPU (no .item(), no
data-dependent branch), and a batch whose every pixel is ignored gives a loss of 0 with working gradients.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from trainer.errors import TrainerError

# ---- confusion matrix and the metrics derived from it ----


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """int64 [C, C] counts, rows = true class, columns = predicted, over the pixels whose target is not
    `ignore_index`. A target value that is neither a class nor `ignore_index` (a mask saved with another
    palette, a resize that interpolated labels) is a TrainerError naming it, as is a prediction outside
    [0, C): bincount would silently file it under another cell. The checks read two booleans back from the
    device; once per eval batch, that is negligible."""
    if pred.shape != target.shape:
        raise TrainerError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} differ in shape")
    c = num_classes
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    bad = (target < 0) | (target >= c)
    if bad.any():
        values = sorted(set(target[bad].unique().tolist()))
        raise TrainerError(f"target value(s) {values[:10]} are neither a class index in [0, {c}) nor the "
                           f"ignore_index {ignore_index}")
    bad = (pred < 0) | (pred >= c)
    if bad.any():
        raise TrainerError(f"predicted class(es) {sorted(set(pred[bad].unique().tolist()))[:10]} outside [0, {c})")
    return torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0 (then turned into None or left out, never averaged)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean(values: np.ndarray, over: np.ndarray) -> Optional[float]:
    return float(values[over].mean()) if over.any() else None


def _opt(value: float) -> Optional[float]:
    return None if np.isnan(value) else float(value)


def metrics_from_confusion(cm: Union[torch.Tensor, np.ndarray], classes: List[str]) -> dict:
    """Every segmentation metric from one confusion matrix (rows = true, columns = predicted), in float64.

    pixel_accuracy       correct / labelled pixels
    mean_class_accuracy  mean recall TP / (TP + FN) over the classes present in the labels
    miou, mean_dice      mean IoU = TP / (TP + FP + FN) and Dice = 2TP / (2TP + FP + FN) over the classes present
                         in the labels or the predictions; a class in neither has no IoU, is left out of the
                         means and listed in `absent_classes` (a class only predicted counts, with IoU 0)
    fwiou                sum over classes of label frequency x IoU
    per_class            name -> {"iou", "dice", "accuracy" (recall), "pixels" (label count)}, None where undefined
    num_pixels           labelled (not ignored) pixels; 0 -> every mean is None
    """
    cm = cm.detach().cpu().numpy() if torch.is_tensor(cm) else np.asarray(cm)
    c = len(classes)
    if cm.shape != (c, c):
        raise TrainerError(f"confusion matrix of shape {cm.shape} for {c} classes")
    if len(set(classes)) != c:
        raise TrainerError(f"class names repeat: {classes}")
    counts = cm.astype(np.int64)
    tp = np.diag(counts).astype(np.float64)
    labelled = counts.sum(axis=1).astype(np.float64)  # per true class: TP + FN
    predicted = counts.sum(axis=0).astype(np.float64)  # per predicted class: TP + FP
    total = float(counts.sum())
    in_labels = labelled > 0
    present = in_labels | (predicted > 0)
    iou = _ratio(tp, labelled + predicted - tp)  # defined exactly where the class is present
    dice = _ratio(2 * tp, labelled + predicted)
    recall = _ratio(tp, labelled)
    return {
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else None,
        "mean_class_accuracy": _mean(recall, in_labels),
        "miou": _mean(iou, present),
        "mean_dice": _mean(dice, present),
        "fwiou": float((labelled[in_labels] / total * iou[in_labels]).sum()) if total > 0 else None,
        "num_pixels": int(total),
        "absent_classes": [name for name, p in zip(classes, present) if not p],
        "per_class": {name: {"iou": _opt(iou[k]), "dice": _opt(dice[k]), "accuracy": _opt(recall[k]),
                             "pixels": int(labelled[k])} for k, name in enumerate(classes)},
        "confusion_matrix": counts.tolist(),
    }


# ---- losses ----


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                       class_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """F.cross_entropy's mean over the non-ignored pixels (weighted by the true class's weight, as torch's own
    weighted mean), in fp32 whatever the autocast dtype.

    Computed as the summed loss over its denominator rather than reduction="mean", because torch's mean is
    0/0 = NaN on a batch with every pixel ignored (a crop of void border), and a check for that would sync
    the GPU every step. With no pixel left the sum is an exact 0 still connected to the logits, so the loss
    is 0 and backward gives zero gradients."""
    logits = logits.float()
    weight = None if class_weights is None else logits.new_tensor(list(class_weights))
    loss_sum = F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction="sum",
                               label_smoothing=label_smoothing)
    valid = target != ignore_index
    if weight is None:
        denom = valid.sum().to(logits.dtype)
    else:  # torch's weighted mean divides by the summed weight of each pixel's true class
        denom = torch.where(valid, weight[target.clamp(0, weight.numel() - 1)], 0.0).sum()
    # the smallest positive float: the exact mean whenever any pixel (of nonzero weight) is left, 0 / tiny = 0 when none
    return loss_sum / denom.clamp_min(torch.finfo(logits.dtype).tiny)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice: per class, (2 sum(p * t) + eps) / (sum(p) + sum(t) + eps) over every non-ignored pixel of
    the batch (one Dice per class for the whole batch, not per image), p the softmax probability, t the one-hot
    target; ignored pixels count in neither sum and get no gradient.

    Averaged over the classes present in the batch's targets. Not over the classes with predicted mass:
    under softmax every class has some mass on every pixel, so that would be all classes, and a class absent
    from the batch scores eps / (sum(p) + eps), close to 0 however little it is predicted, a loss of ~1 that
    swamps the rest. Probability put on an absent class is still penalised: it is taken from the true class,
    which loses intersection. eps (in pixels) keeps the ratio defined and smooth for tiny classes. No class
    present (every pixel ignored): 0, with zero gradients."""
    num_classes = logits.shape[1]
    valid = (target != ignore_index).unsqueeze(1)  # [B, 1, H, W]
    # torch.where rather than multiplying by the mask: a NaN or inf logit on an ignored pixel cannot leak in
    probs = torch.where(valid, torch.softmax(logits.float(), dim=1), 0.0)
    onehot = F.one_hot(torch.where(valid.squeeze(1), target, 0), num_classes).permute(0, 3, 1, 2)
    onehot = (onehot * valid).to(probs.dtype)  # [B, C, H, W]
    dims = (0, 2, 3)
    intersection, prob_mass, target_mass = (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)
    dice = (2 * intersection + eps) / (prob_mass + target_mass + eps)
    present = (target_mass > 0).to(dice.dtype)
    return ((1 - dice) * present).sum() / present.sum().clamp_min(1)


def pixel_class_weights(counts: Sequence[int]) -> List[float]:
    """N / (C x count_c) from each class's training pixel count (ignored pixels not counted): 1.0 for every
    class when balanced; a class with no pixel gets 0. The same formula as classify_metrics.class_weights."""
    total, c = sum(counts), len(counts)
    return [total / (c * n) if n > 0 else 0.0 for n in counts]
