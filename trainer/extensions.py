"""What rides along the weights during training: the extensions of the step loop, behind five call points.

An extension acts on the unwrapped model (`core`) at fixed points of the loop, and may keep state that
checkpoints hold. The loop holds one `Extensions` and calls its points in this order; it never asks which
extensions are on (trainer/loop.py names none of them):

    start_epoch(core, epoch)                       before an epoch's first batch
    before_forward(core)                           before each training forward pass
    before_step(core, epoch)                       after backward, before clipping and the optimizer step
    after_update(core, update, total)              after each optimizer update (update counts from 1)
    end(core)                                      once, when the run ends, before its final evaluation
    key, state_dict(), load_state_dict(state, core) -> note   its tensors in a checkpoint's "extra" (by key)

A member implements the points it needs (plain classes, no base class); `Extensions` calls those it has, in
the order of `build_extensions`. Which weights an evaluation scores and an export stands for is the one
question the loop asks (`evaluations`, `scored_weights`): the EMA's or the raw ones.

The members: backbone freezing and parameter freezing (trainer/finetune.py), Lookahead (trainer/optim.py), the
EMA (trainer/ema.py). A new weight-side feature (SWA, a distillation teacher) is a class here or in its own
module, one line in `build_extensions`, its config section and its tests: the loop does not change.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Dict, List, Tuple

import torch
from torch import nn

POINTS = ("start_epoch", "before_forward", "before_step", "after_update", "end")


class Extensions:
    """The extensions of one run, called in order at each point; what checkpoints hold of them; and which
    weights are scored: a member with other weights to score (`scoring`, `swapped_in`, and `evaluate`: raw, its
    own or both; the EMA) is the scorer, the last such member if several."""

    def __init__(self, members: List[object], raw_scored: bool = False):
        self.members = members
        # each point's methods, in order (a member implements the points it needs; an attribute that happens to
        # share a point's name is not a point)
        self._calls: Dict[str, List[Callable]] = {p: [getattr(m, p) for m in members if callable(getattr(m, p, None))]
                                                  for p in POINTS}
        self.scorer = next((m for m in reversed(members) if hasattr(m, "scoring")), None)
        self.evaluate = self.scorer.evaluate if self.scorer is not None else "raw"
        # the weights best/ and model/ stand for (and model.json's "weights"): the scorer's (its key) unless the
        # monitor names the raw ones (eval.monitor=raw_<metric>) or they are not evaluated
        self.scored = "raw" if self.evaluate == "raw" or raw_scored else self.scorer.key

    def start_epoch(self, core: nn.Module, epoch: int) -> None:
        for call in self._calls["start_epoch"]:
            call(core, epoch)

    def before_forward(self, core: nn.Module) -> None:
        for call in self._calls["before_forward"]:
            call(core)

    def before_step(self, core: nn.Module, epoch: int) -> None:
        for call in self._calls["before_step"]:
            call(core, epoch)

    def after_update(self, core: nn.Module, update: int, total: int) -> None:
        for call in self._calls["after_update"]:
            call(core, update, total)

    def end(self, core: nn.Module) -> None:
        for call in self._calls["end"]:
            call(core)

    # ---- checkpoints ----

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Each stateful member's tensors under its key (a checkpoint's "extra" files: lookahead, ema)."""
        return {m.key: m.state_dict() for m in self.members if getattr(m, "key", None)}

    def load_state_dict(self, extra: Dict[str, Dict[str, torch.Tensor]], core: nn.Module, source) -> List[str]:
        """From a checkpoint's "extra"; a member whose state it lacks (weights from a run without it) starts from
        the loaded weights. Returns the notes to print."""
        notes = []
        for m in self.members:
            if getattr(m, "key", None):
                note = m.load_state_dict(extra.get(m.key), core)
                if note:
                    notes.append(f"{source} {note}")
        return notes

    # ---- which weights are scored ----

    def evaluations(self, core: nn.Module, acc) -> List[Tuple[str, ContextManager]]:
        """Each evaluation of a scoring, in order: (the prefix of its metric names, the weights it scores: a
        context manager holding them in the model). With the EMA evaluated both ways, the raw weights' metrics
        are logged as raw_<metric>."""
        if self.evaluate == "raw":
            return [("", nullcontext())]
        swapped = self.scorer.scoring(core, acc)
        return [("", swapped), ("raw_", nullcontext())] if self.evaluate == "both" else [("", swapped)]

    def scored_prefix(self) -> str:
        """The prefix of the evaluation that best/ and model/ stand for."""
        return "raw_" if self.evaluate == "both" and self.scored == "raw" else ""

    def scored_weights(self, core: nn.Module) -> ContextManager:
        """The weights an export stands for, held in the model inside the block (the main process's: rank 0's
        average is the EMA)."""
        return self.scorer.swapped_in(core) if self.scored != "raw" else nullcontext()


def build_extensions(cfg, core: nn.Module, acc) -> Extensions:
    """The run's extensions from their config sections (the only reader of ema.*, optim.lookahead_*,
    model.freeze_backbone_epochs and optim.freeze_after_epochs), in the order they act at each point."""
    from trainer.ema import ModelEma
    from trainer.finetune import BackboneFreeze, FreezeAfter
    from trainer.monitor import names_raw
    from trainer.optim import Lookahead

    members: List[object] = []
    # fine-tuning: the backbone (weights and BN statistics) held still for the first epochs; only the head trains
    if cfg.model.freeze_backbone_epochs:
        members.append(BackboneFreeze(core, cfg.model.name, until_epoch=cfg.model.freeze_backbone_epochs))
    if cfg.optim.freeze_after_epochs:  # named parameters that stop training after some epochs (airbench94)
        members.append(FreezeAfter(core, cfg.optim.freeze_after_epochs))
    if cfg.optim.lookahead_every:  # the slow weights, the same on every rank (they follow the synchronised ones)
        members.append(Lookahead(core, every=cfg.optim.lookahead_every, decay=cfg.optim.lookahead_decay, acc=acc))
    if cfg.ema.decay > 0:  # the average of the weights, scored instead of them (ema.evaluate)
        members.append(ModelEma(core, cfg.ema.decay, cfg.ema.warmup, cfg.ema.warmup_power, every=cfg.ema.every,
                                evaluate=cfg.ema.evaluate))
    return Extensions(members, raw_scored=names_raw(cfg.eval.monitor))
