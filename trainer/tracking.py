"""The run directory and what is logged into it: metrics.jsonl (the source of truth) and, when enabled, W&B
through accelerate's tracker. Only the main process writes; other ranks get no-ops, so call sites never
branch on rank.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from trainer.errors import TrainerError


def default_run_dir(name: Optional[str]) -> Path:
    return Path("runs") / f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
    """An existing, non-empty run directory is never written into unless the user said run.overwrite=true."""
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainerError(f"run.dir {run_dir} exists and is not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise TrainerError(f"run.dir {run_dir} already exists and is not empty; choose another run.dir "
                           f"or pass run.overwrite=true to replace it")


def create_run_dir(run_dir: Path, overwrite: bool) -> None:
    if run_dir.is_dir() and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


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


def write_json(path: Path, obj) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def new_run_id() -> str:
    """An id for the W&B run, made once per training run and kept across restarts."""
    return secrets.token_hex(4)


def truncate_rows(path: Path, keep: int) -> int:
    """Cut metrics.jsonl back to its first `keep` rows (those a checkpoint knows of), so a resumed run neither
    repeats nor skips a step. Returns the highest step in the file before cutting (-1 if none): W&B already
    has the rows up to there from before the interruption."""
    if not path.is_file():
        return -1
    lines = path.read_text().splitlines()
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut by a crash mid-write
            pass
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines[:keep]))
    os.replace(tmp, path)
    return max(steps, default=-1)


class Tracker:
    """metrics.jsonl on the main process, plus W&B through accelerate when enabled."""

    def __init__(self, accelerator, run_dir: Path, use_wandb: bool, rows: int = 0, wandb_after_step: int = -1):
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.use_wandb = use_wandb
        self.rows = rows  # rows in metrics.jsonl so far (checkpoints record it)
        self.wandb_after_step = wandb_after_step  # rows up to this step reached W&B before a restart
        self.path = run_dir / "metrics.jsonl"
        self._fh = open(self.path, "a", buffering=1) if self.is_main else None  # line-buffered: each row lands whole

    def log(self, row: dict) -> None:
        self.rows += 1  # counted on every rank, so any rank's checkpoint state agrees
        if not self.is_main:
            return
        self._fh.write(json.dumps(row) + "\n")
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
