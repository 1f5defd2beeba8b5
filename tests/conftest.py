"""Shared test helpers: tiny generated datasets, image folders with chosen defects, quick configs."""
from __future__ import annotations

import atexit
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 cores: keep test processes from oversubscribing
os.environ.setdefault("WANDB_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
# The import path of every process the tests start: the project first, then the caller's own PYTHONPATH, kept:
# packages installed with `pip install --target DIR` and found through PYTHONPATH=DIR (a GPU machine without
# network carrying wheels, a cluster's environment modules) must reach the trainer commands too.
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


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
    """`python -m trainer ARGS` in its own process: its exit code and output, as subprocess.run gives them
    (see run_forked)."""
    return run_forked([str(a) for a in args], env=env, timeout=timeout, cwd=cwd)


def run_forked(argv: list, env=None, timeout=300, cwd=None, script=None) -> subprocess.CompletedProcess:
    """`python -m trainer ARGV`, or `python SCRIPT ARGV` (a test's driver that wraps trainer functions, then
    calls the CLI), in its own process: its exit code and output, as subprocess.run gives them.

    The process is forked from a server that imported the trainer once (tests/cli_zygote.py --serve, one per
    test process): each command would otherwise spend ~5 s of this 2-core machine on imports before doing
    anything. Everything else is the command's own: pid, process group, current directory, environment,
    argv, signal handlers, exit status, stdout and stderr. TRAINER_TESTS_FORK_CLI=0 runs each as a fresh
    interpreter; the bad-input catalogue (tests/test_faults.py) runs a sample both ways and compares them.
    Where torch sees a GPU each is a fresh interpreter too: a CUDA run must own its CUDA context from the start."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cwd = str(cwd or ROOT)
    if not FORK_CLI:
        return subprocess.run([sys.executable, *([str(script)] if script else ["-m", "trainer"]), *argv],
                              capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    return _CLI_SERVER.run(argv, full_env, cwd, timeout, script)


def run_torchrun(argv: list, processes: int, env=None, timeout=300, cwd=None,
                 script=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node PROCESSES` of `-m trainer ARGV` (or of SCRIPT ARGV). Where
    run_forked forks, torchrun's own configuration and agent run in tests/forked_torchrun.py with the ranks
    forked too (no ~5 s of imports per rank); elsewhere it is torchrun itself. tests/test_launch.py and the
    other two-process tests keep launching the real torchrun."""
    launch = ["--standalone", "--nproc_per_node", str(processes), *([str(script)] if script else ["-m", "trainer"]),
              *[str(a) for a in argv]]
    if FORK_CLI:
        return run_forked(launch, env=env, timeout=timeout, cwd=cwd, script=ROOT / "tests" / "forked_torchrun.py")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *launch], capture_output=True, text=True,
                          timeout=timeout, cwd=str(cwd or ROOT),
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


FORK_CLI = os.environ.get("TRAINER_TESTS_FORK_CLI", "0" if torch.cuda.is_available() else "1") == "1"


class _CliServer:
    """The client side of `tests/cli_zygote.py --serve`, started on first use, stopped at exit."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.lines: "queue.Queue[str]" = queue.Queue()

    def _started(self) -> subprocess.Popen:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_zygote.py"), "--serve"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH})
            self.lines = queue.Queue()
            # a reader thread: a line waited for with a timeout (select would miss lines already buffered)
            threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
            atexit.register(self.proc.kill)
        return self.proc

    @staticmethod
    def _read(proc: subprocess.Popen, lines: "queue.Queue[str]") -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put("")  # the server ended

    def run(self, argv: list, environ: dict, cwd: str, timeout: float, script=None) -> subprocess.CompletedProcess:
        proc = self._started()
        case = {"argv": argv, "cwd": cwd, "environ": environ, **({"script": str(script)} if script else {})}
        proc.stdin.write(json.dumps(case) + "\n")
        proc.stdin.flush()
        deadline = time.monotonic() + timeout
        pid = self._reply(proc, deadline + 120)["pid"]  # the server's own imports: at most once
        deadline = time.monotonic() + timeout
        try:
            done = self._reply(proc, deadline)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(pid, signal.SIGKILL)  # the command and whatever it started, as a timeout should
            except ProcessLookupError:
                pass
            done = self._reply(proc, time.monotonic() + 60)
            raise subprocess.TimeoutExpired([str(script or "trainer"), *argv], timeout, output=done["stdout"],
                                            stderr=done["stderr"]) from None
        return subprocess.CompletedProcess([sys.executable, *([str(script)] if script else ["-m", "trainer"]), *argv],
                                           done["returncode"], done["stdout"], done["stderr"])

    def _reply(self, proc: subprocess.Popen, deadline: float) -> dict:
        """The server's next line, or TimeoutExpired at `deadline` (time.monotonic)."""
        try:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            raise subprocess.TimeoutExpired("tests/cli_zygote.py --serve", 0) from None
        if not line:
            self.proc = None
            raise RuntimeError(f"tests/cli_zygote.py --serve ended (exit {proc.wait()}); its stderr went to "
                               f"pytest's")
        return json.loads(line)


_CLI_SERVER = _CliServer()


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

# The temporary files of every process the tests start (torchrun's log folders, multiprocessing's socket folders,
# the CLI server's case files: about a thousand folders a suite, none of which their makers remove when killed)
# go to one folder of this test session, removed at its end, not left in the machine's /tmp. The process that
# imports this first keeps its own temporary folder (pytest's basetemp is made there: kept for a failure's
# inspection as pytest keeps it); the processes it starts, xdist workers included, inherit TMPDIR.
if "TRAINER_TESTS_TMPDIR" not in os.environ:
    tempfile.gettempdir()  # resolved (and cached) before TMPDIR changes: this process's own stays
    os.environ["TRAINER_TESTS_TMPDIR"] = os.environ["TMPDIR"] = tempfile.mkdtemp(prefix="trainer-tests-tmp-")
    atexit.register(shutil.rmtree, os.environ["TRAINER_TESTS_TMPDIR"], ignore_errors=True)


# The test files whose tests take longest, heaviest first (worker seconds in a CI=true run of the suite here,
# 2026-12-03, with --durations=0: detection 400, faults ~360 once its two-process runs were forked, segmentation
# 338, launch 333, bench 272, tune 252, checkpoint ~200, bench_gpu_check 136, end_to_end 127, ema 123, onnx 100,
# bench_throughput 80; every other file under 60; docs ~100 measured alone on 2026-12-06 with the cores shared). pytest-xdist (--dist loadfile --no-loadscope-reorder, as
# launch/test.sh runs it) hands whole files to its workers in collection order, so the longest go first and the
# short ones fill in at the end: otherwise one worker can still be running a long file minutes after the other
# has finished. Without --no-loadscope-reorder xdist orders the files by their number of tests instead, and
# test_detection.py (few, long tests) ran last.
HEAVIEST_FIRST = ("test_detection.py", "test_faults.py", "test_segmentation.py", "test_launch.py", "test_bench.py",
                  "test_tune.py", "test_checkpoint.py", "test_bench_gpu_check.py", "test_end_to_end.py", "test_docs.py",
                  "test_ema.py", "test_onnx.py", "test_bench_throughput.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order
