"""What is logged into a run directory: metrics.jsonl (the source of truth) and, when enabled, W&B
through accelerate's tracker; the environment a run records (trainer.rundir owns the folder itself). Only the
main process writes; other ranks get no-ops, so call sites never branch on rank.
"""
from __future__ import annotations

import json
import math
import os
import platform
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from trainer.distributed import SharedError, agree
from trainer.files import disk_error


def default_run_dir(name: Optional[str]) -> Path:
    return Path("runs") / f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def git_revision() -> Optional[str]:
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode != 0:
        return None
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(num_processes: int, device: str, mixed_precision: str) -> dict:
    import accelerate
    import torch
    import torchvision

    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "torch": torch.__version__, "torchvision": torchvision.__version__, "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "num_processes": num_processes, "device": device, "mixed_precision": mixed_precision,
        "git_revision": git_revision(), "command": sys.argv, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def new_run_id() -> str:
    """An id for the W&B run, made once per training run and kept across restarts."""
    return secrets.token_hex(4)


def truncate_rows(out, rel: str, keep: int) -> int:
    """Cut the run's metrics.jsonl (`rel` in the run's folder `out`) back to its first `keep` rows (those a
    checkpoint knows of), so a resumed run neither repeats nor skips a step. Returns the highest step in the
    file before cutting (-1 if none): W&B already has the rows up to there from before the interruption."""
    path = out.root / rel
    if not path.is_file():
        return -1
    lines = path.read_text().splitlines()
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut by a crash mid-write
            pass
    out.write(rel, "".join(line + "\n" for line in lines[:keep]))
    return max(steps, default=-1)


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
            numbers = {prefix + k: v for k, v in row.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
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
