"""Optimizer with parameter groups, and the learning-rate schedule as a pure function of the update count.

The schedule is counted in optimizer updates derived from the global batch, so it has the same shape on 1 or
N processes (accelerate's prepared schedulers step once per process: a known trap), and resuming needs only
the update count.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Weight decay on conv/linear weights only; none on biases and norm parameters (every tensor with ndim <= 1)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False, betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"unknown optimizer {name}")


def lr_at(update: int, total_updates: int, peak_lr: float, warmup_updates: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0, milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """Learning rate for optimizer update number `update` (0-based) of `total_updates`.

    Linear warmup from ~0 over `warmup_updates`, then cosine to `min_lr_ratio x peak`, step decay at the
    update `milestones`, or constant.
    """
    if warmup_updates > 0 and update < warmup_updates:
        return peak_lr * (update + 1) / warmup_updates
    if schedule == "constant":
        return peak_lr
    if schedule == "step":
        return peak_lr * gamma ** sum(update >= m for m in milestones)
    span = max(total_updates - warmup_updates, 1)
    progress = min(max(update - warmup_updates, 0) / span, 1.0)
    floor = peak_lr * min_lr_ratio
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
