"""Optimizer with parameter groups, and the learning-rate schedule as a pure function of the update count.

The schedule is counted in optimizer updates derived from the global batch, so it has the same shape on 1 or
N processes (accelerate's prepared schedulers step once per process: a known trap), and resuming needs only
the update count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from trainer.finetune import parameter_depths


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float, bias_lr_scale: float = 1.0, head_lr_scale: float = 1.0,
                 layer_decay: Optional[float] = None, model_name: Optional[str] = None, bias_decay: bool = False,
                 bias_lr_scale_scope: str = "all") -> list:
    """Weight decay on conv/linear weights; biases and norm parameters (every tensor with ndim <= 1) take none
    unless `bias_decay`, and may take a larger lr: `bias_lr_scale`, on all of them (`bias_lr_scale_scope`
    "all") or on the parameters of normalisation layers only ("norm", as airbench94 scales BatchNorm biases).
    With `bias_decay` their weight decay is divided by their bias_lr_scale, so that the decay per update
    (lr x weight decay, in SGD and AdamW alike) is the weights' (airbench94: "scales up learning rate (but
    not weight decay)"). Each group's `lr_scale` multiplies the scheduled lr.

    Fine-tuning (`model_name` gives the split, `trainer.finetune`): the head's lr x `head_lr_scale`, and with
    `layer_decay` a parameter at depth d of a model whose head is at depth D takes lr x layer_decay^(D - d)
    (BEiT, timm). The factors multiply; parameters with the same weight decay and lr_scale share a group.
    Without them the groups are those of old, in the same order (weights, then biases and norm parameters):
    old optimizer states still load; scope "norm" adds a third, the other biases, last."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}

    def bias_scale(p) -> float:  # the bias/norm lr factor of a parameter with ndim <= 1
        return bias_lr_scale if bias_lr_scale_scope == "all" or id(p) in norm_params else 1.0

    def bias_weight_decay(scale: float) -> float:
        return weight_decay / scale if bias_decay else 0.0

    if head_lr_scale == 1.0 and layer_decay is None:
        groups = {"weights": {"params": [], "weight_decay": weight_decay, "lr_scale": 1.0},
                  bias_lr_scale: {"params": [], "weight_decay": bias_weight_decay(bias_lr_scale),
                                  "lr_scale": bias_lr_scale}}
        for p in model.parameters():
            if p.requires_grad:
                key = "weights" if p.ndim > 1 else bias_scale(p)
                if key not in groups:  # scope "norm": the other biases, at lr
                    groups[key] = {"params": [], "weight_decay": bias_weight_decay(key), "lr_scale": key}
                groups[key]["params"].append(p)
        return list(groups.values())  # build_optimizer drops the empty ones
    key = "optim.layer_decay" if layer_decay is not None else "optim.head_lr_scale"
    if model_name is None:
        raise ValueError(f"{key} needs the model's name for its backbone/head split")
    depths = parameter_depths(model, model_name, key)
    head = max(depths.values())
    groups: dict = {}  # (weight decay, lr_scale) -> group, in the order of the parameters
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = bias_scale(p) if p.ndim <= 1 else 1.0
        decay = bias_weight_decay(scale) if p.ndim <= 1 else weight_decay
        if depths[name] == head:
            scale *= head_lr_scale
        if layer_decay is not None:
            scale *= layer_decay ** (head - depths[name])
        groups.setdefault((decay, scale), {"params": [], "weight_decay": decay, "lr_scale": scale})["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    nesterov: bool = False, betas: Sequence[float] = (0.9, 0.999), bias_lr_scale: float = 1.0,
                    fused: bool = False, head_lr_scale: float = 1.0, layer_decay: Optional[float] = None,
                    model_name: Optional[str] = None, bias_decay: bool = False,
                    bias_lr_scale_scope: str = "all") -> torch.optim.Optimizer:
    """`fused`: one kernel for the whole update (CUDA; CPU too on recent torch) instead of a loop of ops."""
    groups = [g for g in param_groups(model, weight_decay, bias_lr_scale, head_lr_scale, layer_decay, model_name,
                                      bias_decay, bias_lr_scale_scope)
              if g["params"]]
    extra = {"fused": True} if fused else {}
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0, **extra)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
    raise ValueError(f"unknown optimizer {name}")


class Lookahead:
    """A slow copy of the weights (float parameters and buffers) that the weights are pulled back to every few
    updates: slow += (1 - decay) x (weights - slow); weights = slow. `decay` 0 keeps the weights as they are,
    1 replaces them by the slow copy (the final step). Its tensors go into every checkpoint (exact resume).

    As an extension of the step loop (trainer/extensions.py, optim.lookahead_every/lookahead_decay): every `every`
    updates a step with decay `decay x (update / total)^3` (airbench's schedule), and at the run's end the
    final step (the model becomes the slow copy), each after every rank took rank 0's BatchNorm statistics so
    that the slow copy is the same on every rank."""
    key = "lookahead"

    def __init__(self, model: nn.Module, every: int = 1, decay: float = 0.0, acc=None):
        self.every, self.decay, self.acc = every, decay, acc
        self._start(model)

    def _start(self, model: nn.Module) -> None:
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def after_update(self, core: nn.Module, update: int, total: int) -> None:
        if update % self.every == 0:
            self._synced_step(core, self.decay * (update / total) ** 3)

    def end(self, core: nn.Module) -> None:
        self._synced_step(core, 1.0)  # the final model is the slow copy

    def _synced_step(self, core: nn.Module, decay: float) -> None:
        from trainer.distributed import sync_buffers

        sync_buffers(core, self.acc)  # the same slow copy on every rank
        self.step(core, decay)

    @torch.no_grad()
    def step(self, model: nn.Module, decay: float) -> None:
        for k, v in model.state_dict().items():
            if k in self.slow:
                self.slow[k].lerp_(v, 1.0 - decay)
                v.copy_(self.slow[k])

    def state_dict(self) -> dict:
        return dict(self.slow)

    def load_state_dict(self, state: Optional[dict], model: Optional[nn.Module] = None) -> Optional[str]:
        """From a checkpoint; without a state (weights from a run without Lookahead) the slow copy starts from
        the loaded weights of `model`, and the note says so."""
        if state is None:
            self._start(model)
            return "has no lookahead state: the slow weights start from its weights"
        missing = sorted(set(self.slow) - set(state))
        if missing:
            raise ValueError(f"lookahead state lacks {missing[:3]}")
        for k in self.slow:
            self.slow[k].copy_(state[k])
        return None


def lr_at(update: float, total_updates: int, peak_lr: float, warmup_updates: int = 0, schedule: str = "cosine",
          min_lr_ratio: float = 0.0, milestones: Sequence[int] = (), gamma: float = 0.1,
          warmup_start_ratio: float = 0.0, poly_power: float = 0.9, one_cycle_pct_start: float = 0.3,
          one_cycle_div_factor: float = 25.0, one_cycle_final_div_factor: float = 1e4,
          one_cycle_anneal: str = "cos", one_cycle_momentum: Optional[Sequence[float]] = None) -> float:
    """Learning rate for optimizer update number `update` (0-based; a float where a resume with another global
    batch re-planned the schedule, `Schedule.position`) of `total_updates`.

    Linear warmup from `warmup_start_ratio x peak` (0: from ~0) over `warmup_updates`, then cosine, linear or
    polynomial (`poly`: (1 - progress)^poly_power, torch's PolynomialLR over the updates after the warm-up, as
    torchvision's segmentation reference) to `min_lr_ratio x peak` at the last update, step decay at the update
    `milestones`, or constant. `one_cycle` is torch's OneCycleLR (two phases, `three_phase=False`) with
    max_lr = peak: from peak / div_factor up to the peak over the first pct_start of the updates, then down to
    peak / div_factor / final_div_factor at the last, annealed by cosine or linearly; it is its own warm-up
    (the config refuses warmup_epochs with it). Its momentum cycle (`one_cycle_momentum`) is `momentum_at`'s:
    one set of keyword arguments serves both.
    """
    if schedule == "one_cycle":
        return _one_cycle(update, total_updates, peak_lr, one_cycle_pct_start, one_cycle_div_factor,
                          one_cycle_final_div_factor, one_cycle_anneal)
    if warmup_updates > 0 and update < warmup_updates:
        if warmup_start_ratio > 0:
            return peak_lr * (warmup_start_ratio + (1 - warmup_start_ratio) * update / warmup_updates)
        return peak_lr * (update + 1) / warmup_updates
    if schedule == "constant":
        return peak_lr
    if schedule == "step":
        return peak_lr * gamma ** sum(update >= m for m in milestones)
    span = max(total_updates - warmup_updates, 1)
    progress = min(max(update - warmup_updates, 0) / span, 1.0)
    floor = peak_lr * min_lr_ratio
    if schedule == "linear":
        return peak_lr + (floor - peak_lr) * progress
    if schedule == "poly":
        return floor + (peak_lr - floor) * (1.0 - progress) ** poly_power
    return floor + (peak_lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def momentum_at(update: float, total_updates: int, schedule: str = "cosine", one_cycle_pct_start: float = 0.3,
                one_cycle_anneal: str = "cos", one_cycle_momentum: Optional[Sequence[float]] = None,
                **_lr_only) -> Optional[float]:
    """The momentum (SGD's, or AdamW's beta1) of update `update`, where the schedule cycles it: one_cycle with
    `one_cycle_momentum` = (base, max), torch's OneCycleLR with cycle_momentum (max at the start, down to base
    as the learning rate peaks, back to max at the end). None: the optimizer's own momentum stays. Takes the
    schedule's keyword arguments (those only `lr_at` reads are ignored)."""
    if schedule != "one_cycle" or one_cycle_momentum is None:
        return None
    base, top = (float(v) for v in one_cycle_momentum)
    return _one_cycle(update, total_updates, top, one_cycle_pct_start, 1.0, 1.0, one_cycle_anneal, start=top,
                      peak=base, end=top)


def set_momentum(group: dict, momentum: float) -> None:
    """Momentum into an optimizer parameter group: SGD's momentum, or AdamW's beta1."""
    if "betas" in group:
        group["betas"] = (momentum, group["betas"][1])
    else:
        group["momentum"] = momentum


def _one_cycle(update: float, total_updates: int, max_lr: float, pct_start: float, div_factor: float,
               final_div_factor: float, anneal: str, start: Optional[float] = None, peak: Optional[float] = None,
               end: Optional[float] = None) -> float:
    """torch.optim.lr_scheduler.OneCycleLR's learning rate at its step `update` of `total_updates` (its
    `_schedule_phases` without the third phase, written out: the phase ends are steps pct_start x total - 1
    and total - 1); `start`, `peak`, `end` replace the three values (its momentum: max, base, max)."""
    initial = max_lr / div_factor
    start = initial if start is None else start
    peak = max_lr if peak is None else peak
    end = initial / final_div_factor if end is None else end
    phases = ((float(pct_start * total_updates) - 1, start, peak), (float(total_updates - 1), peak, end))
    start_step = 0.0
    for i, (end_step, start_lr, end_lr) in enumerate(phases):
        if update <= end_step or i == len(phases) - 1:
            pct = (update - start_step) / (end_step - start_step) if end_step != start_step else 1.0
            pct = min(max(pct, 0.0), 1.0)  # past the last update (a resume's rounding) stays at the end
            if anneal == "linear":
                return (end_lr - start_lr) * pct + start_lr
            return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1)
        start_step = end_step
    raise AssertionError("unreachable")


@dataclass
class Schedule:
    """The learning rate of every update of a run: `lr_at`'s arguments (`kwargs`, in the updates of the
    schedule as first planned), the update the run ends at (`total_updates`), and `anchor` once a resume changed
    the global batch: (update u0, its position p0 in the planned schedule, planned updates per update), so that
    update u stands at p0 + (u - u0) x rate. A checkpoint holds it (trainer/state.py)."""
    kwargs: dict
    total_updates: int
    anchor: Optional[Tuple[int, float, float]] = None

    def position(self, update: int) -> float:
        """Where update `update` stands in the planned schedule (itself, unless a resume re-planned it)."""
        if self.anchor is None:
            return update
        u0, p0, rate = self.anchor
        return p0 + (update - u0) * rate

    def stretched(self, update: int, total_updates: int) -> "Schedule":
        """The rest of this schedule spread over the updates from `update` to `total_updates` (a resume with
        another global batch: the samples left take another number of updates). The learning rate follows the
        samples trained: its curve keeps its shape and ends where it would have."""
        p0 = self.position(update)
        rate = (self.kwargs["total_updates"] - p0) / max(total_updates - update, 1)
        return Schedule(self.kwargs, total_updates, (update, p0, rate))

    def to_json(self) -> dict:
        return {"kwargs": self.kwargs, "total_updates": self.total_updates,
                "anchor": list(self.anchor) if self.anchor is not None else None}

    @classmethod
    def from_json(cls, saved: dict) -> "Schedule":
        return cls(dict(saved["kwargs"]), saved["total_updates"],
                   tuple(saved["anchor"]) if saved.get("anchor") is not None else None)


# ---- from the config section (the builders' boundary: only these two read `optim`) ----

def optimizer_from(model: nn.Module, optim_cfg, fused: bool, model_name: Optional[str] = None) -> torch.optim.Optimizer:
    """`model_name` (model.name): the backbone/head split that optim.head_lr_scale and optim.layer_decay need."""
    return build_optimizer(model, optim_cfg.name, optim_cfg.lr, optim_cfg.weight_decay, optim_cfg.momentum,
                           optim_cfg.nesterov, optim_cfg.betas, optim_cfg.bias_lr_scale, fused,
                           optim_cfg.head_lr_scale, optim_cfg.layer_decay, model_name, optim_cfg.bias_decay,
                           optim_cfg.bias_lr_scale_scope)


def schedule_from(optim_cfg, total_updates: int, updates_per_epoch: int) -> dict:
    """The keyword arguments of `lr_at` after `update` (epochs in the config become updates here)."""
    return {"total_updates": total_updates, "peak_lr": optim_cfg.lr,
            "warmup_updates": round(optim_cfg.warmup_epochs * updates_per_epoch), "schedule": optim_cfg.schedule,
            "min_lr_ratio": optim_cfg.min_lr_ratio,
            "milestones": [round(e * updates_per_epoch) for e in optim_cfg.step_milestones],
            "gamma": optim_cfg.step_gamma, "warmup_start_ratio": optim_cfg.warmup_start_ratio,
            "poly_power": optim_cfg.poly_power, "one_cycle_pct_start": optim_cfg.one_cycle_pct_start,
            "one_cycle_div_factor": optim_cfg.one_cycle_div_factor,
            "one_cycle_final_div_factor": optim_cfg.one_cycle_final_div_factor,
            "one_cycle_anneal": optim_cfg.one_cycle_anneal,
            "one_cycle_momentum": (list(optim_cfg.one_cycle_momentum) if optim_cfg.one_cycle_momentum is not None
                                   else None)}
