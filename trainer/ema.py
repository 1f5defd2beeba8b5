"""An exponential moving average (EMA) of the weights, kept beside the training weights and scored instead of them.

    ema = d x ema + (1 - d) x weights,   every `every` optimizer updates, in float32 whatever the training precision

Short runs: the decay at EMA update t (0-based) is min(decay, 1 - (1 + t)^-warmup_power), timm's ModelEmaV3
warm-up, so the average does not cling to the random initial weights (t = 0 copies the weights; with power
3/4 the cap passes 0.99 near t = 460 and 0.999 near t = 10,000).

Buffers: BatchNorm running statistics are averaged like the weights (floating buffers), integer buffers
(num_batches_tracked) copied; both references do this by default (timm's ModelEmaV2/V3 average the whole
state_dict; torchvision's reference ExponentialMovingAverage uses use_buffers=True).

Unlike Lookahead (trainer/optim.py), the EMA never writes back into the training weights: it is swapped in
only while evaluating or exporting, then the training weights are restored bit for bit.

Several processes: the weights are the same on every rank after each update (DDP all-reduces gradients), so the
averaged weights are too; BatchNorm buffers are not (each rank updates its own from its own batch). Rank 0's
average is the EMA: `sync` gives every rank rank 0's before anything reads it on every rank (evaluation) and it
is rank 0's that checkpoints hold, so a resumed run follows the same trajectory as an uninterrupted one.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
from torch import distributed as dist
from torch import nn

_UPDATES = "__updates__"  # the EMA's own update count, stored with its tensors


class ModelEma:
    """The EMA, and an extension of the step loop (trainer/extensions.py): updated every `every` optimizer
    updates, its tensors in checkpoints under "ema", and the weights that evaluation scores (`scoring`)."""
    key = "ema"

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True, warmup_power: float = 0.75,
                 every: int = 1, evaluate: str = "ema"):
        self.decay, self.warmup, self.warmup_power, self.every = decay, warmup, warmup_power, every
        self.evaluate = evaluate  # ema.evaluate: the weights evaluation scores (raw, ema, both)
        self._start(model)

    def _start(self, model: nn.Module) -> None:
        """The average begins as a copy of the model's weights."""
        self.updates = 0
        self.average: Dict[str, torch.Tensor] = {
            k: (v.detach().float() if v.is_floating_point() else v.detach()).clone()
            for k, v in model.state_dict().items()}
        params = {k for k, _ in model.named_parameters()}
        self.buffer_keys = [k for k in self.average if k not in params]  # only these differ between ranks

    def decay_at(self, t: int) -> float:
        """The decay used by EMA update number t (0-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + t) ** -self.warmup_power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.decay_at(self.updates)
        for k, v in model.state_dict().items():
            avg = self.average[k]
            if avg.is_floating_point():
                avg.lerp_(v.float(), 1.0 - d)  # avg + (1 - d) x (v - avg)
            else:
                avg.copy_(v)
        self.updates += 1

    def after_update(self, core: nn.Module, update: int, total: int) -> None:
        if update % self.every == 0:
            self.update(core)

    def sync(self, accelerator) -> None:
        """Every rank gets rank 0's averaged buffers (the averaged weights already agree)."""
        if accelerator.num_processes == 1:
            return
        for k in self.buffer_keys:
            dist.broadcast(self.average[k], src=0)

    @contextmanager
    def scoring(self, model: nn.Module, accelerator) -> Iterator[None]:
        """Around an evaluation on every rank: every rank's model holds rank 0's average inside the block."""
        self.sync(accelerator)
        with self.swapped_in(model):
            yield

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[None]:
        """The model holds the averaged weights inside the block and its own, bitwise, after it."""
        state = model.state_dict()
        saved = {k: v.detach().clone() for k, v in state.items()}
        with torch.no_grad():
            for k, v in state.items():
                v.copy_(self.average[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(saved[k])

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {**self.average, _UPDATES: torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: Optional[Dict[str, torch.Tensor]], model: Optional[nn.Module] = None
                        ) -> Optional[str]:
        """From a checkpoint; without a state (fine-tuning from a run without EMA) the average starts from the
        loaded weights of `model`, and the note says so."""
        if state is None:
            self._start(model)
            return "has no EMA state: the average starts from its weights"
        missing = sorted(set(self.average) - set(state))
        if missing:
            raise ValueError(f"EMA state lacks {missing[:3]}")
        for k, avg in self.average.items():
            avg.copy_(state[k])
        self.updates = int(state[_UPDATES]) if _UPDATES in state else 0
        return None
