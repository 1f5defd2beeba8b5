"""Submitting a SLURM job array of one of the project's sbatch scripts (sweeps: one run per task; tunes: one
worker per task)."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import List

from trainer.errors import TrainerError


def submit_array(script: str, tasks: int, out_dir: Path, export: str, sbatch_args: List[str], limit: int = 0) -> str:
    """`sbatch --array=0-(tasks-1)[%limit]` with each task's output in out_dir/slurm-<job>_<task>.out and
    `export` (NAME=VALUE) in its environment; returns the array job id."""
    cmd = ["sbatch", "--parsable", f"--array=0-{tasks - 1}" + (f"%{limit}" if limit else ""),
           f"--output={out_dir}/slurm-%A_%a.out", f"--export=ALL,{export}", *sbatch_args, script]
    print("+ " + " ".join(cmd), flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise TrainerError(f"sbatch failed: {res.stderr.strip()}")
    return res.stdout.strip().split(";")[0]
