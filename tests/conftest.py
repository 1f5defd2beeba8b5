"""Shared test helpers: tiny generated datasets, image folders with chosen defects, quick configs."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: keep test processes from oversubscribing
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]


def write_image(path: Path, size=(16, 16), mode="RGB", seed=0, fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_folder(root: Path, classes=("cat", "dog"), per_class=6, ext=".png", size=(16, 16)) -> Path:
    for c_idx, name in enumerate(classes):
        for i in range(per_class):
            write_image(root / name / f"{i}{ext}", size=size, seed=c_idx * 1000 + i)
    return root


def tiny_overrides(tmp_path: Path, variant="multiclass", **extra) -> list:
    """A generated dataset small enough for seconds-long runs, in tmp_path."""
    base = {
        "data.format": "generated", "data.generated.variant": variant,
        "data.generated.train_per_class": 40, "data.generated.val_per_class": 13,
        "data.generated.test_per_class": 5, "data.root": str(tmp_path / f"gen-{variant}"),
        "data.num_workers": 0, "model.name": "small_cnn", "train.epochs": 1, "train.batch_size": 16,
        "train.progress_bar": False, "run.dir": str(tmp_path / "run"), "optim.name": "adamw", "optim.lr": 0.003,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(*args, env=None, timeout=300, cwd=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or ROOT)


def weights(run_dir: Path) -> dict:
    """A run's final exported weights."""
    return load_file(str(run_dir / "model" / "model.safetensors"))


def rows(run_dir: Path) -> list:
    """metrics.jsonl without the wall-clock fields."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        row.pop("throughput", None)
        out.append(row)
    return out


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same final weights and the same metrics rows: what a resumed run must end with."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"weights differ: {k}"
    ra, rb = rows(a), rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]  # no step repeated or missing
    assert ra == rb  # same losses, lr, metrics at every step


@pytest.fixture
def tiny(tmp_path):
    return lambda variant="multiclass", **extra: tiny_overrides(tmp_path, variant, **extra)


# The image-folder scan cache (trainer.data.manifest) of every run the tests start goes to a folder of this test
# session, not the user's ~/.cache; subprocesses inherit it (and one that imports this again keeps it).
if "TRAINER_CACHE_DIR" not in os.environ:
    os.environ["TRAINER_CACHE_DIR"] = tempfile.mkdtemp(prefix="trainer-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["TRAINER_CACHE_DIR"], ignore_errors=True)
