"""Mixup and CutMix: batch transforms for classification (and multi-label classification), applied by the
training loaders after collation.

timm's semantics in its "batch" mode (timm/data/mixup.py; written anew here, not copied): per batch, with
probability `mix_prob` the batch is mixed at all; when both alphas are on, CutMix with probability
`switch_prob`, else mixup; one lambda ~ Beta(alpha, alpha) for the whole batch; each image's partner is the
image at the mirrored position of the batch (`x.flip(0)`). CutMix pastes one box of area ~(1 - lambda) from
the partner, clipped to the image, and lambda is then corrected to the pasted area. The targets become soft:
lambda x onehot(y) + (1 - lambda) x onehot(y of the partner), an (N, C) float tensor.

Every draw comes from a numpy generator seeded by (seed, epoch, batch index within the epoch, rank): a
resumed run mixes batch k exactly as an uninterrupted one did, ranks mix their own batches differently, and
the global torch RNG is never touched. The draws are a handful of scalars per batch; the mixing itself runs
wherever the batch already is (the GPU for data.loader=device and for prepared DataLoaders).
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

# An extra word in every mixing seed: numpy's SeedSequence pads short entropy with zeros, so without it
# rank 0's [seed, epoch, batch, 0] would be the per-sample augmentation seed [seed, epoch, index] of sample
# `batch` (trainer/data/datasets.py). 0x6D6978 is "mix" in ASCII.
MIX_STREAM = 0x6D6978


def cutmix_box(rng: np.random.Generator, lam: float, height: int, width: int) -> Tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box with sides sqrt(1 - lam) x the image's, centred on a uniformly drawn
    pixel and clipped to the image (so its area is at most, not exactly, (1 - lam) x the image's)."""
    ratio = float(np.sqrt(1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    top, left = cy - cut_h // 2, cx - cut_w // 2
    return (max(top, 0), min(top + cut_h, height), max(left, 0), min(left + cut_w, width))


def mixed_targets(labels: torch.Tensor, num_classes: int, lam: float) -> torch.Tensor:
    """(N, C) float32 targets: lam of each sample's own, 1 - lam of its partner's. `labels`: class indices (N,),
    or multi-hot float rows (N, C) of multi-label data, mixed as they are (each class's target becomes the
    share of the mixed image that shows it: timm's multi-label mixing)."""
    if labels.is_floating_point():
        onehot = labels.float().clone()  # a copy: the loader's batch is not changed in place
    else:  # scatter, not F.one_hot: one_hot checks the label range, a GPU sync per batch
        onehot = torch.zeros((len(labels), num_classes), device=labels.device).scatter_(1, labels.long()[:, None], 1.0)
    partner = onehot.flip(0)  # a copy, taken before the in-place scaling below
    return onehot.mul_(lam).add_(partner, alpha=1.0 - lam)


class BatchMixer:
    """This process's mixup/CutMix: `mixer(x, y, epoch, batch)` -> the batch mixed in place and its soft
    targets, or (x, y) untouched (integer labels) when this batch's draw says not to mix (`mix_prob`)."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, mix_prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0, rank: int = 0):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("BatchMixer needs mixup_alpha or cutmix_alpha > 0 (build_mixer gives None instead)")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob = mix_prob, switch_prob
        self.seed, self.rank = seed, rank

    def generator(self, epoch: int, batch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, batch, self.rank, MIX_STREAM])

    def plan(self, epoch: int, batch: int, height: int, width: int):
        """(lam, CutMix box or None) of one batch, or None when it is not mixed; lam is already corrected to
        the box's area. The draws, in order: mix at all, CutMix or mixup (only when both are on), lambda, box."""
        rng = self.generator(epoch, batch)
        if rng.random() >= self.mix_prob:
            return None
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not use_cutmix:
            return lam, None
        box = cutmix_box(rng, lam, height, width)
        top, bottom, left, right = box
        return 1.0 - (bottom - top) * (right - left) / (height * width), box

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int):
        """`x`: (N, C, H, W) float images, mixed in place (the loader's own fresh batch; its memory format kept);
        `y`: (N,) class indices, or (N, C) multi-hot rows (multi-label). `batch`: the index of this batch within
        the epoch on this process."""
        planned = self.plan(epoch, batch, x.shape[-2], x.shape[-1])
        if planned is None:
            return x, y
        lam, box = planned
        partner = x.flip(0)  # a copy: x can be overwritten below
        if box is None:
            x.mul_(lam).add_(partner, alpha=1.0 - lam)
        else:
            top, bottom, left, right = box
            x[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
        return x, mixed_targets(y, self.num_classes, lam)


def build_mixer(augment_cfg, num_classes: int, seed: int, rank: int) -> Optional[BatchMixer]:
    """The mixer `data.augment` asks for (`augment_cfg` is that section), or None when both alphas are 0."""
    a = augment_cfg
    if a.mixup_alpha <= 0 and a.cutmix_alpha <= 0:
        return None
    return BatchMixer(num_classes, a.mixup_alpha, a.cutmix_alpha, a.mix_prob, a.mix_switch_prob, seed, rank)
