"""What is logged into a run directory: metrics.jsonl (the source of truth) and, when enabled, W&B through
accelerate's tracker, and the training rows' bookkeeping (`LossLog`, `TrainLog`). trainer.rundir owns the folder
and its other files. Only the main process writes; other ranks get no-ops, so call sites never branch on rank.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from trainer.distributed import SharedError, agree
from trainer.files import disk_error
from trainer.metrics import is_number


class Tracker:
    """metrics.jsonl on the main process, plus W&B through accelerate when enabled."""

    def __init__(self, accelerator, out, use_wandb: bool, rows: int = 0, wandb_after_step: int = -1):
        """`out`: the run's folder (the write gate), where the main process appends to metrics.jsonl."""
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.use_wandb = use_wandb
        self.rows = rows  # rows in metrics.jsonl so far (checkpoints record it)
        self.wandb_after_step = wandb_after_step  # rows up to this step reached W&B before a restart
        self.path = out.root / "metrics.jsonl"
        self._fh = out.append("metrics.jsonl") if self.is_main else None  # line-buffered: each row lands whole

    def log(self, row: dict) -> None:
        """Every rank calls it; the main process writes (a failed write, e.g. a full disk, ends every rank
        with the same one line: the only collective here, once per logged row)."""
        self.rows += 1  # counted on every rank, so any rank's checkpoint state agrees
        agree(self.accelerator, lambda: self._write(row), main_only=True)

    def _write(self, row: dict) -> None:
        try:
            self._fh.write(json.dumps(row) + "\n")
        except OSError as err:
            raise disk_error(err, self.path) from None
        if self.use_wandb and row["step"] > self.wandb_after_step:
            prefix = f"{row['split']}/" if row.get("type") == "eval" else "train/"
            numbers = {prefix + k: v for k, v in row.items() if is_number(v) and k != "step"}
            self.accelerator.log(numbers, step=row["step"])

    def log_images(self, images: dict, step: int) -> None:
        """PNG files as W&B images (main process, W&B on); metrics.jsonl keeps only numbers."""
        if not (self.is_main and self.use_wandb):
            return
        import wandb

        self.accelerator.log({name: wandb.Image(str(path)) for name, path in images.items() if Path(path).is_file()},
                             step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class LossLog:
    """The training loss (and its named parts, e.g. a detector's box and class losses) between two log rows:
    summed on the device (`.item()` would sync the GPU every update), in float64 so a resumed sum equals the
    uninterrupted one exactly, averaged over all ranks when a row is written. Its state goes into every
    checkpoint (each rank's sums), so a resumed run writes the same rows."""

    def __init__(self, accelerator, saved: Optional[dict], update: int, parts: Sequence[str] = ()):
        self.accelerator, self.parts = accelerator, list(parts)
        width = 1 + len(self.parts)
        saved = saved or {"loss_sum": [[0.0] * width] * accelerator.num_processes, "loss_count": 0,
                          "from_update": update}
        sums = [v if isinstance(v, list) else [v] for v in saved["loss_sum"]]  # older checkpoints: the loss only
        sums = [v + [0.0] * (width - len(v)) for v in sums]
        own = sums[accelerator.process_index] if len(sums) == accelerator.num_processes \
            else [sum(col) / accelerator.num_processes for col in zip(*sums)]  # another process count: keep the mean
        self.sum = torch.tensor(own[:width], dtype=torch.float64, device=accelerator.device)
        self.count, self.from_update = saved["loss_count"], saved["from_update"]

    def add(self, loss: torch.Tensor, parts: Optional[dict] = None) -> None:
        if self.parts:
            values = [loss.detach().reshape(())] + [parts[name].detach().reshape(()) for name in self.parts]
            self.sum += torch.stack(values).to(self.sum.dtype)
        else:
            self.sum += loss.detach()
        self.count += 1

    def mine(self) -> list:
        """This rank's sums, for the checkpoint (one collective gathers every rank's)."""
        return self.sum.tolist()

    def state(self, per_rank_sums: list) -> dict:
        return {"loss_sum": per_rank_sums, "loss_count": self.count, "from_update": self.from_update}

    def mean_and_reset(self, update: int) -> Tuple[float, dict]:
        """The mean loss and parts over every rank since the last row (a collective: every rank calls it)."""
        totals = self.accelerator.reduce(torch.cat([self.sum, self.sum.new_tensor([float(self.count)])]),
                                         reduction="sum")
        means = (totals[:-1] / totals[-1].clamp_min(1)).tolist()
        mean = means[0]
        if not math.isfinite(mean):  # all-reduced: the same on every rank, so raised by all alike
            raise SharedError(f"non-finite training loss ({mean}) between updates {self.from_update} and {update}; "
                              f"lower optim.lr, set train.clip_grad_norm, or check the data")
        self.sum, self.count, self.from_update = self.sum * 0, 0, update
        return mean, dict(zip(self.parts, means[1:]))


def replaced_on_all_ranks(acc, dataset) -> int:
    """Unreadable training files stood in for since this start, over all ranks (a collective; see
    datasets.FileDataset). Counted when read, so batches the workers read ahead count too: a console line and
    summary.json carry it, not metrics.jsonl, whose rows a resumed run repeats exactly."""
    from trainer.data.datasets import replaced_images

    return int(acc.reduce(torch.tensor([replaced_images(dataset)], device=acc.device), "sum").item())


class TrainLog:
    """The training rows (every train.log_every_steps updates and at an epoch's end): the mean loss and its parts
    over every rank since the last row, the learning rate, the throughput; a console line too unless a progress
    bar shows. `loop`: the run's LoopState; `lr_of(update)`: the schedule; `dataset`: the training split (its files
    stood in for are counted)."""

    def __init__(self, acc, tracker: "Tracker", loss_log: "LossLog", loop, lr_of, dataset, say, bar: bool):
        self.acc, self.tracker, self.loss_log, self.loop = acc, tracker, loss_log, loop
        self.lr_of, self.dataset, self.say, self.bar = lr_of, dataset, say, bar
        self.t, self.samples = time.time(), loop.samples_seen

    def replaced(self) -> int:
        return replaced_on_all_ranks(self.acc, self.dataset)

    def __call__(self, epoch_float: float) -> float:
        """Every rank (the mean loss is all-reduced); the main process writes the row. Returns the mean loss."""
        loop = self.loop
        mean_loss, parts = self.loss_log.mean_and_reset(loop.update)
        replaced = self.replaced()
        now = time.time()
        lr, throughput = self.lr_of(max(loop.update - 1, 0)), (loop.samples_seen - self.samples) / max(now - self.t, 1e-9)
        self.tracker.log({"type": "train", "step": loop.update, "epoch": round(epoch_float, 4),
                          "samples_seen": loop.samples_seen, "lr": lr, "loss": mean_loss, **parts,
                          "throughput": throughput})
        if not self.bar:
            self.say(f"[train] step {loop.update} epoch {epoch_float:.2f} loss {mean_loss:.4f} lr {lr:.3g} "
                     f"{throughput:.0f} img/s" + (f" ({replaced} unreadable image(s) replaced since start)"
                                                  if replaced else ""))
        self.t, self.samples = now, loop.samples_seen
        return mean_loss
