"""The fault-injection suite: real processes, real signals, real file systems.

Each interrupted run is the plain CLI wrapped by tests/fault_driver.py, which injects one fault at a chosen
moment (no hook in the product); each recovery is the same command run again. What is checked is what a
user relies on: final weights and metrics rows bitwise equal to an uninterrupted run, every user and data
file byte for byte as it was, one clear line for every refusal, and no hang.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import itertools
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import (PYTHONPATH, ROOT, assert_same_run, make_folder, run_cli, run_forked, run_torchrun, tiny_overrides,
                            write_image)
from trainer.checkpoint import POINTER, verify_checkpoint
from trainer.config import load_config
from trainer.data import build_data

pytestmark = pytest.mark.slow  # every test here starts real processes: `-m "not slow"` leaves them out
DRIVER = str(ROOT / "tests" / "fault_driver.py")
IN_CI = os.environ.get("CI") == "true"

# 160 training images / global batch 16 = 10 updates per epoch, 3 epochs; a checkpoint every 2 updates
RUN = {"train.epochs": 3, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2, "train.log_every_steps": 2}
UPDATES, EPOCH = 30, 10


def args_for(tmp: Path, run: str, processes: int = 1, **extra) -> list:
    """The run above; on several processes the same global batch (so the same updates), split among them."""
    return tiny_overrides(tmp, "multiclass", **{**RUN, "train.batch_size": 16 // processes, "run.dir": str(tmp / run),
                                                **extra})


def run_driver(args: list, fault: str, at: int = 0, processes: int = 1, env=None, timeout=300):
    """The run with one fault injected (tests/fault_driver.py): on one process forked like run_cli's commands
    (tests/conftest.py: run_forked), on several under torchrun."""
    fault_env = {"FAULT": fault, "FAULT_AT": str(at), "PYTHONPATH": PYTHONPATH, **(env or {})}
    if processes == 1:
        return run_forked(["train", "-", *args], env=fault_env, timeout=timeout, cwd=ROOT, script=DRIVER)
    return run_torchrun(["train", "-", *args], processes, env=fault_env, timeout=timeout, cwd=ROOT, script=DRIVER)


def run_train(args: list, processes: int = 1, env=None, timeout=300):
    if processes == 1:
        return run_cli("train", "-", *args, env=env, timeout=timeout)
    return run_torchrun(["train", "-", *args], processes, env=env, timeout=timeout, cwd=ROOT)


def digest(root: Path) -> dict:
    """Every file below `root` by relative path -> sha256 (symlinks -> their target): a tree to compare."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs to compare recovered runs with, one per process count."""
    tmp = tmp_path_factory.mktemp("ref")
    made = {}

    def get(processes: int = 1) -> Path:
        if processes not in made:
            res = run_train(args_for(tmp, f"ref{processes}", processes), processes)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            made[processes] = tmp / f"ref{processes}"
        return made[processes]

    return get


# ---- kill -9 at seeded random moments over one run ----

def kill_moments(seed: int, count: int = 20) -> list:
    """`count` (fault, update) pairs at distinct, increasing updates: SIGKILL mid-update, while writing a
    checkpoint, or during an evaluation. Increasing, because a resume restarts from a checkpoint at or
    before the previous kill, so every later moment is reached again. The two epoch ends are among them,
    one killed during its evaluation and one during its save, so every kind occurs whatever the seed."""
    rng = random.Random(seed)
    ends = {EPOCH: "kill_during_eval", 2 * EPOCH: "kill_during_save"}
    updates = sorted(rng.sample([u for u in range(1, UPDATES) if u not in ends], count - len(ends)) + list(ends))
    moments = []
    for update in updates:
        kinds = ["kill_at_update"] + (["kill_during_save"] if update % RUN["checkpoint.every_steps"] == 0 else [])
        moments.append((ends.get(update) or rng.choice(kinds), update))
    return moments


@pytest.mark.parametrize("processes", [1, 2])
def test_twenty_seeded_sigkills_over_one_run_end_bitwise_identical(reference, tmp_path, processes):
    ref = reference(processes)
    args = args_for(tmp_path, "run", processes)
    moments = kill_moments(seed=11 + processes)
    for fault, update in moments:
        killed = run_driver(args, fault, update, processes)
        assert killed.returncode != 0, f"{fault} at {update} never happened:\n{killed.stdout[-1500:]}"
        if processes == 1:  # the process's own status (torchrun exits 1 when a rank is killed)
            assert killed.returncode == -signal.SIGKILL, (fault, update, killed.stderr[-1500:])
        assert not (tmp_path / "run" / "summary.json").exists()
    done = run_train(args, processes)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(ref, tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.tmp-*")), "a temporary file survived"
    assert not (tmp_path / "run" / ".lock").exists()
    assert {f for f, _ in moments} == {"kill_at_update", "kill_during_save", "kill_during_eval"}


def test_kill_during_the_final_export_then_the_same_command_completes_it(reference, tmp_path):
    args = args_for(tmp_path, "run")
    killed = run_driver(args, "kill_during_export")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "model" / "model.json").exists()
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(reference(1), tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.tmp-*"))


# ---- damaged checkpoints and pointers: fall back to the newest that verifies, delete nothing ----

@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run killed during update 9: checkpoints at updates 6 and 8 (keep_last=2), no final model."""
    tmp = tmp_path_factory.mktemp("interrupted")
    args = args_for(tmp, "run")
    killed = run_driver(args, "kill_at_update", 9)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    names = sorted(p.name for p in (tmp / "run" / "checkpoints").glob("step-*"))
    assert names == ["step-00000006", "step-00000008"], names
    return tmp / "run"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 100] ^= 0x10  # in the tensor data, past the header: the file still parses
    path.write_bytes(bytes(data))


def drop_key(path: Path, key: str = "samples_seen") -> None:
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))


NEWEST = "checkpoints/step-00000008"
CASES = {  # name: (damage to the interrupted run, checkpoint resumed from, damaged folder moved aside)
    "truncated model.safetensors": (lambda r: truncate(r / NEWEST / "model.safetensors"), 6, True),
    "truncated optimizer.safetensors": (lambda r: truncate(r / NEWEST / "optimizer.safetensors"), 6, True),
    "bit flip in model.safetensors": (lambda r: flip_a_bit(r / NEWEST / "model.safetensors"), 6, True),
    "state.json missing a key": (lambda r: drop_key(r / NEWEST / "state.json"), 6, True),
    "state.json garbage": (lambda r: (r / NEWEST / "state.json").write_text("{not json"), 6, True),
    "rng.safetensors missing": (lambda r: (r / NEWEST / "rng.safetensors").unlink(), 6, True),
    "latest.json garbage": (lambda r: (r / "checkpoints" / POINTER).write_text("\x00garbage"), 8, False),
    "latest.json empty": (lambda r: (r / "checkpoints" / POINTER).write_text(""), 8, False),
    "latest.json missing": (lambda r: (r / "checkpoints" / POINTER).unlink(), 8, False),
    "latest.json names a missing folder": (lambda r: (r / "checkpoints" / POINTER).write_text(
        json.dumps({"checkpoint": "step-00000099", "update": 99})), 8, False),
    "newest checkpoint folder deleted": (lambda r: shutil.rmtree(r / NEWEST), 6, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_checkpoint_or_pointer_falls_back_and_deletes_nothing(reference, interrupted, tmp_path, case):
    damage, expected, moved = CASES[case]
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    (run_dir / "notes.txt").write_text("a user's file")
    damage(run_dir)
    before = digest(run_dir)
    res = run_train(args_for(tmp_path, "run"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming from {run_dir}/checkpoints/step-{expected:08d}" in res.stdout, res.stdout[-2000:]
    assert "Traceback" not in res.stderr
    after = digest(run_dir)
    if moved:  # the damaged folder is kept, renamed, every byte as it was
        assert "is damaged" in res.stdout and "moved aside" in res.stdout
        for rel, sha in before.items():
            if rel.startswith(NEWEST + "/"):
                assert after[rel.replace(NEWEST, NEWEST + ".corrupt")] == sha, rel
    assert after["notes.txt"] == before["notes.txt"]
    assert_same_run(reference(1), run_dir)


@pytest.mark.parametrize("fault", ["kill_between_renames", "kill_after_rename"])
def test_a_kill_inside_a_checkpoints_swap_resumes_from_it_and_ends_bitwise_identical(reference, tmp_path, fault):
    """RUN saves update 10 mid-epoch and again at the epoch's end, replacing step-10 under its own name. Killed
    between the swap's two renames, no folder was named step-10 (its old version aside), so the next start found
    no checkpoint and refused the run (or restarted it); killed right after the first step-10 landed, before the
    ledger recorded it, the next start took it for a user's folder and refused every later start. The start now
    puts the old version back, or finishes the swap, before it looks for checkpoints."""
    args = args_for(tmp_path, "run")
    killed = run_driver(args, fault, 10)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    res = run_train(args)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"resuming from {tmp_path / 'run'}/checkpoints/step-00000010" in res.stdout, res.stdout[-2000:]
    assert_same_run(reference(1), tmp_path / "run")


def test_no_loadable_checkpoint_with_outputs_is_refused_and_nothing_changes(interrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        truncate(ckpt / "model.safetensors")
    (run_dir / ".lock").unlink()  # the killed run's stale lock: taken over and released, not user data
    before = digest(run_dir)
    res = run_train(args_for(tmp_path, "run"))
    assert res.returncode == 2
    line = one_error_line(res.stderr)
    assert "no loadable checkpoint" in line and "run.overwrite=true" in line
    assert digest(run_dir) == before



def test_a_complete_run_whose_checkpoints_are_all_damaged_names_them_and_is_not_continued(reference, tmp_path):
    """Every checkpoint of a finished run replaced by a pickle: the same command still says complete, at the
    update summary.json holds, and names the damaged checkpoints; asked to continue it (a longer schedule under
    run.allow_config_change=true) it says it cannot, naming them. Nothing is loaded, written or moved."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference(1), run_dir)
    ckpts = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(ckpts) >= 2
    for ckpt in ckpts:
        (ckpt / "model.safetensors").write_bytes(pickle.dumps({"weights": [0.0]}, protocol=4))
    before = digest(run_dir)
    same = run_train(args_for(tmp_path, "run"))
    assert same.returncode == 0, same.stdout[-2000:] + same.stderr[-2000:]
    assert f"is already complete (update {UPDATES})" in same.stdout, same.stdout[-2000:]
    assert all(f"{c.name}: model.safetensors is a pickle" in same.stdout for c in ckpts), same.stdout[-2000:]
    assert digest(run_dir) == before
    longer = run_train(args_for(tmp_path, "run", **{"train.epochs": 4, "run.allow_config_change": "true"}))
    assert longer.returncode == 2, longer.stdout[-2000:] + longer.stderr[-2000:]
    line = one_error_line(longer.stderr)
    assert "cannot continue" in line and "train.epochs: 3 -> 4" in line, line
    assert all(f"{c.name}: model.safetensors is a pickle" in line for c in ckpts), line
    assert digest(run_dir) == before

def test_a_run_killed_before_its_first_checkpoint_restarts_and_keeps_user_files(reference, tmp_path):
    args = args_for(tmp_path, "run")
    assert run_driver(args, "kill_at_update", 1).returncode == -signal.SIGKILL
    (tmp_path / "run" / "notes.txt").write_text("mine")
    res = run_train(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "starting it again from the beginning" in res.stdout
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert_same_run(reference(1), tmp_path / "run")
    starts = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
    assert [s["kind"] for s in starts] == ["new", "restart"]


def test_a_first_start_killed_before_writing_anything_is_started_again(reference, tmp_path):
    """SIGKILL while the data are read: the new folder holds only the dead start's lock; the same command
    takes it over and trains."""
    args = args_for(tmp_path, "run")
    assert run_driver(args, "kill_in_startup").returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    res = run_train(args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert_same_run(reference(1), tmp_path / "run")


# ---- overwrite and the places a run directory may not be ----

@pytest.fixture
def data_and_user_files(tmp_path):
    """A generated dataset (as data.root) and a folder of a user's files, with their digests."""
    args = tiny_overrides(tmp_path, "multiclass", **{"train.max_steps": 1, "run.dir": str(tmp_path / "warm")})
    assert run_train(args).returncode == 0  # writes the generated data once
    shutil.rmtree(tmp_path / "warm")
    user = tmp_path / "precious"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (user / "sub" / "results.json").write_text("{}")
    (user / "config.yaml").write_text("mine: true")  # a name the trainer also uses
    return tmp_path / "gen-multiclass", user


@pytest.mark.parametrize("where, overwrite, expect", [
    ("user", True, "not a trainer run"),
    ("user", False, "not a trainer run"),
    ("data", True, "lies inside"),
    ("data_class", True, "lies inside"),
    ("above_data", True, "contains"),
    ("inside_data", False, "lies inside"),
])
def test_a_run_dir_on_user_files_or_data_is_refused_and_every_file_stays(data_and_user_files, tmp_path, where,
                                                                          overwrite, expect):
    data, user = data_and_user_files
    run_dir = {"user": user, "data": data, "data_class": data / "train" / "circle", "above_data": tmp_path,
               "inside_data": data / "runs" / "x"}[where]
    before = digest(tmp_path)
    res = run_cli("train", "-", *tiny_overrides(tmp_path, "multiclass", **{
        "run.dir": str(run_dir), "run.overwrite": str(overwrite).lower()}))
    assert res.returncode == 2
    assert expect in one_error_line(res.stderr)
    assert digest(tmp_path) == before


def test_overwrite_deletes_only_the_trainers_own_files(tmp_path):
    args = tiny_overrides(tmp_path, "multiclass", **{"train.max_steps": 3})
    assert run_train(args).returncode == 0
    run_dir = tmp_path / "run"
    mine = {run_dir / "notes.txt": "top", run_dir / "model" / "README.md": "about this model",
            run_dir / "checkpoints" / "keep.txt": "x", run_dir / "plots" / "extra.txt": "y"}
    for path, text in mine.items():
        path.write_text(text)
    res = run_train(args + ["run.overwrite=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "kept 4 other file(s)" in res.stdout
    for path, text in mine.items():
        assert path.read_text() == text, path
    assert len(json.loads((run_dir / "run.json").read_text())["starts"]) == 1  # the old run is gone


# ---- one training per run directory ----

def test_a_second_training_on_a_run_dir_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    args = tiny_overrides(tmp_path, "multiclass", **{"train.epochs": 200, "checkpoint.every_steps": 5})
    first = subprocess.Popen([sys.executable, "-m", "trainer", "train", "-", *args], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in first.stdout:  # the lock is taken before the first step; the first log line is after it
            if line.startswith("[train]"):
                break
        lock = json.loads((tmp_path / "run" / ".lock").read_text())
        assert lock["pid"] == first.pid and lock["host"] == socket.gethostname()
        second = run_cli("train", "-", *args)
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert "in use by another training" in line and str(first.pid) in line
    finally:
        first.kill()  # SIGKILL: the lock stays behind, its holder gone
        first.communicate()
    assert (tmp_path / "run" / ".lock").exists()
    third = run_train(args + ["train.epochs=1", "run.allow_config_change=true"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert not (tmp_path / "run" / ".lock").exists()


# ---- a full disk ----

@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root only): a real file system that fills up."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        reason = "mounting a tmpfs needs root"
        if IN_CI:
            pytest.fail(f"{reason}, and under CI=true this test must run")
        pytest.skip(reason)
    mount = tmp_path / "disk"
    mount.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True)
    if res.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs: {res.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_is_one_line_and_the_previous_checkpoint_is_intact(reference, tmp_path, small_disk):
    args = args_for(tmp_path, "run", **{"run.dir": str(small_disk / "run")})
    res = run_driver(args, "fill_disk_at_save", 8, env={"FAULT_DISK": str(small_disk)})
    assert res.returncode == 2, res.stdout[-1500:] + res.stderr[-1500:]
    line = one_error_line(res.stderr)
    assert "no space left" in line and "step-00000006 is intact" in line
    ckpts = small_disk / "run" / "checkpoints"
    assert not list(ckpts.glob(".*tmp*")), "the temporary checkpoint folder was left behind"
    assert verify_checkpoint(ckpts / "step-00000006") is None
    (small_disk / "filler.bin").unlink()
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(reference(1), small_disk / "run")



def test_disk_full_during_the_final_export_is_one_line_and_the_same_command_completes_it(reference, tmp_path,
                                                                                          small_disk):
    """The disk fills inside safetensors' own writer of model/model.safetensors (its error is no OSError)."""
    args = args_for(tmp_path, "run", **{"run.dir": str(small_disk / "run")})
    res = run_driver(args, "fill_disk_at_export", env={"FAULT_DISK": str(small_disk)})
    assert res.returncode == 2, res.stdout[-1500:] + res.stderr[-1500:]
    line = one_error_line(res.stderr)
    assert "no space left" in line and str(small_disk / "run" / "model") in line, line
    run = small_disk / "run"
    assert not (run / "model").exists() and not list(run.rglob("*.tmp-*")), "half an export was left behind"
    assert verify_checkpoint(run / "checkpoints" / "step-00000028") is None  # the last one before the end
    (small_disk / "filler.bin").unlink()
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_run(reference(1), run)

# ---- dead and frozen processes: the others leave within seconds, never hang ----

def start_ranks(args: list, fault: str, at: int, timeout_s: int) -> list:
    """Two processes started without a launcher (a launcher would add its own 30 s grace period), rendezvous
    on loopback, as two nodes would."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH, "FAULT": fault, "FAULT_AT": str(at),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, DRIVER, "train", "-", *args, f"train.dist_timeout_s={timeout_s}"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.parametrize("fault, limit_s", [("kill_rank1_at_update", 10), ("stop_rank1_at_update", 10 + 15)])
def test_a_dead_or_frozen_rank_ends_the_others_with_one_line(tmp_path, fault, limit_s):
    """Dead (SIGKILL): gloo sees the closed connection at once. Frozen (SIGSTOP): the collective times out
    after train.dist_timeout_s (10 s here); the margin (15 s) covers process exit on a loaded 2-core VM."""
    procs = start_ranks(args_for(tmp_path, "run"), fault, 5, timeout_s=10)
    try:
        for line in procs[0].stdout:  # rank 0 reaches the loop; rank 1 is then at most one update behind
            if line.startswith("[train]") or "run directory:" in line:
                break
        start = time.time()
        procs[0].wait(timeout=limit_s + 30)
        waited = time.time() - start
        err = procs[0].stderr.read()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode not in (0, None)
    assert waited < limit_s, f"rank 0 took {waited:.1f} s"
    line = one_error_line(err)
    assert "lost contact with another process" in line
    assert (tmp_path / "run" / "checkpoints" / "step-00000004").is_dir()  # the latest checkpoint is intact


# ---- inputs ----

@pytest.mark.timeout(180)
def test_folder_loops_in_the_data_are_cut_and_every_link_to_a_file_trains_and_is_predicted(tmp_path):
    data = make_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=8)
    (data / "cat" / "again").symlink_to(data / "cat", target_is_directory=True)  # a loop
    (data / "dog" / "up").symlink_to(data, target_is_directory=True)  # a loop through the parent
    (data / "dog" / "cats").symlink_to(data / "cat", target_is_directory=True)  # a second path to a folder
    # equal images stored as links (DVC's caches): each path is a sample of the class folder it is in
    os.link(data / "cat" / "0.png", data / "cat" / "0-twin.png")  # a hardlink, same class
    (data / "cat" / "1-twin.png").symlink_to("1.png")  # a symlink, same class
    (data / "dog" / "from-cat.png").symlink_to(data / "cat" / "2.png")  # a symlink into another class
    res = run_cli("train", "-", "data.format=imagefolder", f"data.root={data}", "data.val_fraction=0.25",
                  "data.num_workers=0", "model.name=small_cnn", "data.image_size=16", "train.epochs=1",
                  "train.batch_size=4", "train.progress_bar=false", f"run.dir={tmp_path / 'run'}", timeout=100)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads((tmp_path / "run" / "run.json").read_text())["derived"]
    assert run["train_samples"] + run["val_samples"] == 19  # 16 files + 3 links to files; no folder twice
    assert "skipped 3 path(s)" in res.stdout and "3 symlinked folder(s) already visited" in res.stdout
    preds = tmp_path / "preds.csv"
    res = run_cli("predict", "--model", str(tmp_path / "run"), str(data), "--output", str(preds), timeout=100)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(preds) as fh:
        rows = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    assert sorted(Path(p).relative_to(data).as_posix() for p in rows) == sorted(
        [f"cat/{i}.png" for i in range(8)] + [f"dog/{i}.png" for i in range(8)]
        + ["cat/0-twin.png", "cat/1-twin.png", "dog/from-cat.png"])


@pytest.mark.parametrize("fault", ["sigterm_in_startup", "stop_file_in_startup"])
def test_a_stop_request_during_start_up_leaves_at_once_with_nothing_written(tmp_path, fault):
    args = tiny_overrides(tmp_path, "multiclass")
    assert run_train(args + ["train.max_steps=1", f"run.dir={tmp_path / 'warm'}"]).returncode == 0
    shutil.rmtree(tmp_path / "warm")  # the data exist now; what follows reads them
    before = digest(tmp_path)
    start = time.time()
    res = run_driver(args, fault, env={"TRAINER_STOP_FILE": str(tmp_path / "run.stop")}, timeout=60)
    took = time.time() - start
    assert res.returncode == 3, res.stdout[-1500:] + res.stderr[-1500:]
    assert "stopped on request during start-up" in res.stderr
    assert "start-up was not stopped" not in res.stderr
    assert took < 30, f"{took:.1f} s"  # process start and imports included; the stop itself is within 0.5 s
    (tmp_path / "run.stop").unlink(missing_ok=True)
    assert digest(tmp_path) == before  # no run directory, no lock, no temporary file


PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h: orphaned descendants are handed to this process, not to init


@contextlib.contextmanager
def adopting_orphans():
    """While inside, a process started by one of ours whose parent dies becomes our child, so that its exit
    status can be read (os.waitpid)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    assert prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def exit_status_within(pid: int, limit_s: float):
    """The exit status of our child `pid` if it ends within `limit_s`; else it is SIGKILLed and None."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def folder_of_photos(root: Path, per_class: int) -> Path:
    """root/train/{a,b} with `per_class` JPEGs of 384 x 384 px each (~1 ms to decode one here: 3,000 take the
    device loader's decode, or a full check, a few seconds), root/val/{a,b} with 5 each. One encoded
    gradient written to every path: each file is its own, the encoding is paid once."""
    y, x = np.mgrid[0:384, 0:384]
    pixels = np.stack([x * 255 // 384, y * 255 // 384, (x + y) * 127 // 384], -1).astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, "JPEG", quality=90)
    for split, count in (("train", per_class), ("val", 5)):
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{i:05d}.jpg").write_bytes(encoded.getvalue())
    return root


@pytest.mark.timeout(120)
@pytest.mark.parametrize("phase", ["decode", "verify"])
def test_a_sigterm_to_the_launcher_mid_decode_or_verify_ends_the_start_within_2_s(tmp_path, tmp_path_factory, phase):
    """`accelerate launch` of one process, SIGTERMed while the start-up decodes the training split for the
    device loader, or checks every training file with a full decode: the trainer leaves within 2 s with
    status 3 and its one line, the phase cut short, nothing written. (That launcher forwards no signal: the
    trainer used to go on, orphaned, to the end of its run.)"""
    data = folder_of_photos(tmp_path / "data", per_class=1500)
    args = ["train", "-", "data.format=imagefolder", f"data.root={data}", "data.loader=device", "data.image_size=16",
            f"data.verify_images={'full' if phase == 'verify' else 'off'}", "model.name=small_cnn",
            "train.batch_size=16", "train.epochs=1", "train.device=cpu", "train.progress_bar=false",
            f"run.dir={tmp_path / 'run'}"]
    before = digest(tmp_path)
    logs = tmp_path_factory.mktemp("launcher-logs")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH, "FAULT": "announce_phases",
           "PYTHONUNBUFFERED": "1"}
    with adopting_orphans(), open(logs / "stderr", "w+") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                     str(ROOT / "launch" / "accelerate" / "cpu_1proc.yaml"), "--num_processes", "1",
                                     DRIVER, *args], stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT)
        try:
            out = []
            for line in launcher.stdout:  # the driver's line when the phase begins names the trainer's pid
                out.append(line)
                if line.startswith(f"PHASE {phase} begins"):
                    break
            assert out and out[-1].startswith(f"PHASE {phase} begins"), "".join(out)[-2000:]
            trainer_pid = int(out[-1].split("pid=")[1])
            start = time.time()
            launcher.send_signal(signal.SIGTERM)
            # accelerate 1.15's one-process launcher dies of it, forwarding nothing: the trainer is ours now
            assert launcher.wait(timeout=10) == -signal.SIGTERM
            status = exit_status_within(trainer_pid, limit_s=2)
            took = time.time() - start
        finally:
            if launcher.poll() is None:
                launcher.kill()
                launcher.wait()
        out.append(launcher.stdout.read())
        err.seek(0)
        stderr = err.read()
    assert status == 3, f"{status} after {took:.1f} s\n" + "".join(out)[-1500:] + stderr[-1500:]
    assert f"PHASE {phase} ends" not in "".join(out)  # stopped inside it, not after it
    assert [line for line in stderr.splitlines() if line.startswith("[trainer]")] == [
        "[trainer] stopped on request during start-up (SIGTERM during start-up); nothing is left half-written. "
        "Run the same command to start again"], stderr[-2000:]
    assert digest(tmp_path) == before  # no run directory, no lock, no temporary file


# ---- the catalogue of bad input ----
# Every mistake a user can make on the command line, in a recipe, a sweep file, a data folder, a run
# directory, a checkpoint or an exported model. For each: exit code 2, exactly one line on stderr that starts
# with "error:" and names the culprit, and nothing written anywhere (the whole workspace, data and run
# directories included, compared file by file before and after). Every case is a real `python -m trainer`
# process; they run two at a time (2 cores).

RUN_NAMES = itertools.count()
RECIPE = ROOT / "configs" / "quickstart_binary.yaml"  # by its full path: the cases run in a folder of their own


def seg_args(root: Path, **extra) -> list:
    """A segmentation folder to train on, and a run directory of its own (which must never appear)."""
    base = {"data.format": "masks", "data.root": str(root), "data.image_size": 16, "data.num_workers": 0,
            "model.name": "unet", "train.epochs": 1, "train.batch_size": 2, "train.progress_bar": False,
            "run.dir": str(root.parent / "runs" / f"run{next(RUN_NAMES)}")}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def gen_args(w: Path, variant: str = "multiclass", **extra) -> list:
    """A tiny generated dataset (already written) and a run directory of its own that must never appear."""
    return tiny_overrides(w, variant, **{"run.dir": str(w / "runs" / f"run{next(RUN_NAMES)}"), **extra})


def folder_args(root: Path, run: str = "", **extra) -> list:
    """An image folder to train on; each call its own run directory (which must never appear)."""
    run = run or f"run{next(RUN_NAMES)}"
    base = {"data.format": "imagefolder", "data.root": str(root), "data.image_size": 16, "data.num_workers": 0,
            "data.val_fraction": 0.5,
            "model.name": "small_cnn", "train.epochs": 1, "train.batch_size": 2, "train.progress_bar": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()] + [f"run.dir={root.parent / 'runs' / run}"]


def build_workspace(w: Path) -> dict:
    """Everything the cases read: datasets, finished runs, damaged files. Built once, then never written."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(args):
        res = subprocess.run([sys.executable, "-m", "trainer", "train", "-", *args], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env=env)
        assert res.returncode == 0, res.stderr[-2000:]

    train(tiny_overrides(w, "multiclass", **{"train.max_steps": 2, "run.dir": str(w / "done")}))
    train(tiny_overrides(w, "binary", **{"train.max_steps": 2, "run.dir": str(w / "done_binary")}))
    shutil.rmtree(w / "done_binary")  # only its data are needed
    p = {}
    ckpt = sorted((w / "done" / "checkpoints").glob("step-*"))[-1]
    p["ckpt"] = ckpt
    # a resumable run (its final checkpoint, not yet complete)
    shutil.copytree(w / "done", w / "unfinished")
    (w / "unfinished" / "summary.json").unlink()
    state = json.loads(next((w / "unfinished" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["done"] is True
    # exported models: intact (without a run around it), and damaged in each way
    def exported(name: str) -> Path:
        target = w / "models" / name
        shutil.copytree(w / "done" / "model", target)
        return target
    exported("alone")
    (exported("garbage_json") / "model.json").write_text("{nope")
    meta = json.loads((w / "done" / "model" / "model.json").read_text())
    (exported("incomplete_json") / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "mean"}))
    (exported("few_classes") / "model.json").write_text(json.dumps({**meta, "classes": meta["classes"][:3]}))
    weights = exported("truncated_weights") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    torch.save({"w": torch.zeros(1)}, exported("pickled_weights") / "model.safetensors")
    # image folders
    good = make_folder(w / "imgs" / "images", per_class=6)
    p["good"] = good
    (w / "nocls" / "images").mkdir(parents=True)
    write_image(w / "nocls" / "images" / "loose.png")  # images, but no class folders
    make_folder(w / "empty_class" / "images", per_class=3)
    shutil.rmtree(w / "empty_class" / "images" / "dog")
    (w / "empty_class" / "images" / "dog").mkdir()
    (w / "empty_class" / "images" / "dog" / "readme.txt").write_text("no images")
    make_folder(w / "not_image" / "images", per_class=4)
    (w / "not_image" / "images" / "cat" / "oops.png").write_text("this is text")
    make_folder(w / "truncated" / "images", per_class=4)
    jpg = write_image(w / "truncated" / "images" / "dog" / "cut.jpg", size=(64, 64), fmt="JPEG")
    jpg.write_bytes(jpg.read_bytes()[:300])
    make_folder(w / "extra_val" / "images" / "train", per_class=4)
    make_folder(w / "extra_val" / "images" / "val", classes=("cat", "dog", "bird"), per_class=2)
    make_folder(w / "one_class" / "images", classes=("cat",), per_class=4)
    make_folder(w / "bad_val" / "images" / "train", per_class=4)
    make_folder(w / "bad_val" / "images" / "val", per_class=2)
    (w / "bad_val" / "images" / "val" / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    make_folder(w / "all_bad_dog" / "images", per_class=4)
    for f in (w / "all_bad_dog" / "images" / "dog").iterdir():
        f.write_text("not an image")
    make_folder(w / "same_class" / "images", per_class=3)
    # a class folder that is another class's folder: refused, where links to files are samples (scan_split:
    # every image would be both classes, which no model can tell apart)
    (w / "same_class" / "images" / "puppy").symlink_to(w / "same_class" / "images" / "dog", target_is_directory=True)
    make_folder(w / "other_classes" / "images", classes=("cat", "dog", "zebra"), per_class=3)
    make_folder(w / "flat" / "images", per_class=3)
    # packed shards (trainer pack): one with a shard missing, one with a shard cut short
    from trainer.data.shards import pack

    for name in ("shards_missing", "shards_cut"):
        pack(good, w / name, shard_mb=0.002, say=lambda *_: None)
    (w / "shards_missing" / "train-00001.arrow").unlink()
    cut = w / "shards_cut" / "train-00000.arrow"
    cut.write_bytes(cut.read_bytes()[:-64])
    # files standing in for other things
    (w / "a_file").write_text("not a folder")
    (w / "precious").mkdir()
    (w / "precious" / "notes.txt").write_text("a user's notes")
    (w / "pickle0.pth").write_bytes(pickle.dumps({"w": [1, 2]}, protocol=0))
    torch.save({"w": torch.zeros(1)}, w / "pickle.safetensors")
    (w / "garbage.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}")
    (w / "ckpt.pt").write_bytes(pickle.dumps({"w": 1}, protocol=4))
    bad_ckpt = w / "bad_ckpt"
    shutil.copytree(ckpt, bad_ckpt)
    (bad_ckpt / "model.safetensors").write_bytes((bad_ckpt / "model.safetensors").read_bytes()[:500])
    # recipes and sweep files
    (w / "recipes").mkdir()
    (w / "recipes" / "bad.yaml").write_text("train:\n  epochs: [1\n")
    (w / "recipes" / "list.yaml").write_text("- a\n- b\n")
    (w / "recipes" / "typo.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    (w / "recipes" / "folder.yaml").mkdir()
    (w / "sweeps").mkdir()
    (w / "sweeps" / "bad.yaml").write_text(f"recipe: {RECIPE}\n" "parameters: {optim.lr: [0.1\n")
    (w / "sweeps" / "noparams.yaml").write_text(f"recipe: {RECIPE}\n")
    (w / "sweeps" / "unknown.yaml").write_text(f"recipe: {RECIPE}\n" "params: {}\nparameters: {optim.lr: [1]}\n")
    (w / "sweeps" / "typo.yaml").write_text(f"recipe: {RECIPE}\n" "parameters: {optim.lrr: [0.1]}\n")
    (w / "sweeps" / "list.yaml").write_text(f"recipe: {RECIPE}\n" "parameters: [optim.lr]\n")
    (w / "tunes").mkdir()
    tune = f"recipe: {RECIPE}\n" "trials: 4\n"
    lr = "parameters: {optim.lr: {type: float, low: 1.0e-4, high: 0.1, log: true}}\n"
    for name, text in {"unknown.yaml": tune + lr + "pruner_kind: asha\n",
                       "notype.yaml": tune + "parameters: {optim.lr: {low: 0.001, high: 0.1}}\n",
                       "grid.yaml": tune + lr + "sampler: grid\n",
                       "log0.yaml": tune + "parameters: {optim.lr: {type: float, low: 0.0, high: 0.1, log: true}}\n",
                       "typo.yaml": tune + "parameters: {optim.lrr: {type: float, low: 0.001, high: 0.1}}\n",
                       "stale.yaml": tune + lr + "stale_after_s: 5\n",
                       "sampler.yaml": tune + lr + "sampler: bayes\n",
                       "ok.yaml": tune + lr}.items():
        (w / "tunes" / name).write_text(text)
    (w / "tune_other").mkdir()
    (w / "tune_other" / "tune.json").write_text(json.dumps({"name": "another", "trials": 2}))
    (w / "list.txt").write_text(str(w / "missing.png") + "\n")
    # segmentation folders, each with one defect
    for name in ("seg_ok", "seg_nomask", "seg_size", "seg_value", "seg_rgb", "seg_noclasses"):
        mask_folder(w / name)
    (w / "seg_nomask" / "train" / "masks" / "m001.png").unlink()
    Image.fromarray(np.zeros((9, 9), np.uint8), "L").save(w / "seg_size" / "train" / "masks" / "m002.png")
    Image.fromarray(np.full((16, 16), 7, np.uint8), "L").save(w / "seg_value" / "train" / "masks" / "m003.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8), "RGB").save(w / "seg_rgb" / "train" / "masks" / "m000.png")
    (w / "seg_noclasses" / "classes.txt").unlink()
    for name in ("seg_binary255", "seg_cut_val", "seg_utf16"):
        mask_folder(w / name)
    for mask in (w / "seg_binary255").glob("*/masks/*.png"):  # the usual binary masks: 0 and 255
        Image.fromarray((np.array(Image.open(mask)) > 0).astype(np.uint8) * 255, "L").save(mask)
    (w / "seg_binary255" / "classes.txt").write_text("background\nobject\n")
    cut = w / "seg_cut_val" / "val" / "images" / "m001.png"
    cut.write_bytes(cut.read_bytes()[:len(cut.read_bytes()) // 2])  # a copy cut short: the header still parses
    (w / "seg_utf16" / "classes.txt").write_text("background\nleaf\nstem\n", encoding="utf-16")
    (w / "list16.txt").write_text(str(w / "gen-multiclass" / "val") + "\n", encoding="utf-16")
    # detection COCO folders, each with one defect
    for name, defect in DETECTION_DEFECTS.items():
        coco_folder(w / name, defect)
    noval = w / "det_noval" / "val" / "annotations.json"
    noval.write_text(json.dumps({**json.loads(noval.read_text()), "annotations": []}))
    # packed segmentation and detection folders; a masks folder without split folders
    pack(w / "seg_ok", w / "seg_packed", say=lambda *_: None)
    pack(w / "det_ok", w / "det_packed", say=lambda *_: None)
    (w / "det_packed_noann").mkdir()
    for f in (w / "det_packed").iterdir():
        shutil.copy(f, w / "det_packed_noann" / f.name)
    (w / "det_packed_noann" / "val-annotations.json").unlink()
    mask_folder(w / "seg_flat_src")
    shutil.copytree(w / "seg_flat_src" / "train", w / "seg_flat")
    # multi-label CSV folders, each with one defect
    for name in ("ml_ok", "ml_missing", "ml_unknown", "ml_empty_class", "ml_unreadable", "ml_nocolumn"):
        multilabel_folder(w / name)
    (w / "ml_missing" / "img" / "v1.png").unlink()
    (w / "ml_unknown" / "val.csv").write_text("image,labels\nimg/v0.png,cat zebra\n")
    (w / "ml_empty_class" / "classes.txt").write_text("cat\ndog\nfish\n")
    (w / "ml_unreadable" / "img" / "v1.png").write_text("not an image")
    (w / "ml_nocolumn" / "train.csv").write_text("image,tags\nimg/t0.png,cat\n")
    return p


def multilabel_folder(root: Path) -> Path:
    """A tiny multi-label CSV folder: 6 training and 3 validation images, labels cat/dog (one with none)."""
    sets = {"train": ["cat", "dog", "cat dog", "", "dog", "cat"], "val": ["cat", "dog cat", ""]}
    for split, labels in sets.items():
        rows = []
        for i, labs in enumerate(labels):
            name = f"img/{split[0]}{i}.png"
            write_image(root / name, seed=i + 10 * len(split))
            rows.append(f"{name},{labs}\n")
        (root / f"{split}.csv").write_text("image,labels\n" + "".join(rows))
    return root


def ml_args(root: Path, **extra) -> list:
    """A multi-label folder to train on, and a run directory of its own (which must never appear)."""
    base = {"data.format": "multilabel", "data.root": str(root), "data.image_size": 16, "data.num_workers": 0,
            "model.name": "small_cnn", "train.epochs": 1, "train.batch_size": 2, "train.progress_bar": False,
            "run.dir": str(root.parent / "runs" / f"run{next(RUN_NAMES)}")}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _drop_annotations_key(coco, root):
    del coco["annotations"]


def _unknown_image(coco, root):
    coco["annotations"][3]["image_id"] = 999


def _unknown_category(coco, root):
    coco["annotations"][3]["category_id"] = 42


def _zero_width(coco, root):
    coco["annotations"][3]["bbox"][2] = 0


def _far_outside(coco, root):
    coco["annotations"][3]["bbox"][0] = 500


def _missing_image(coco, root):
    (root / coco["images"][2]["file_name"]).unlink()


def _cut_image(coco, root):
    image = root / coco["images"][2]["file_name"]
    image.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])


def _id_beyond_64_bits(coco, root):
    coco["annotations"][3]["id"] = 2 ** 63


def _crowd_in_words(coco, root):
    coco["annotations"][3]["iscrowd"] = "no"


# folder name -> what breaks it (in its train split); det_ok is whole
DETECTION_DEFECTS = {"det_ok": None, "det_notcoco": _drop_annotations_key, "det_image": _unknown_image,
                     "det_category": _unknown_category, "det_zero": _zero_width, "det_far": _far_outside,
                     "det_file": _missing_image, "det_cut": _cut_image, "det_bigid": _id_beyond_64_bits,
                     "det_crowd": _crowd_in_words, "det_noval": None}


def coco_folder(root: Path, defect=None) -> Path:
    """A tiny generated COCO folder (train/ and val/, 32 px), `defect` applied to train/annotations.json."""
    from trainer.data.generated import write_generated_coco

    write_generated_coco(root, 32, 0, {"train": 8, "val": 4})
    if defect is not None:
        path = root / "train" / "annotations.json"
        coco = json.loads(path.read_text())
        defect(coco, root / "train")
        path.write_text(json.dumps(coco))
    return root


def det_args(root: Path, **extra) -> list:
    """A detection folder to train on, and a run directory of its own (which must never appear)."""
    base = {"data.format": "coco", "data.root": str(root), "data.image_size": 32, "data.num_workers": 0,
            "model.name": "retinanet_small", "train.epochs": 1, "train.batch_size": 2, "train.progress_bar": False,
            "run.dir": str(root.parent / "runs" / f"run{next(RUN_NAMES)}")}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def mask_folder(root: Path, n: int = 6, side: int = 16) -> Path:
    """A tiny segmentation folder: train/ and val/ with images/ and masks/ (3 classes), and classes.txt."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            write_image(root / split / "images" / f"m{i:03d}.png", size=(side, side), seed=i)
            (root / split / "masks").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 3, (side, side)).astype(np.uint8), "L").save(
                root / split / "masks" / f"m{i:03d}.png")
    (root / "classes.txt").write_text("background\nleaf\nstem\n")
    return root


def cases(w: Path, p: dict) -> list:
    """(name, argv after `python -m trainer`, what the one error line must contain)."""
    g, done, m = gen_args, w / "done", w / "models"
    pred = ["predict", "--model", str(done), str(w / "gen-multiclass" / "val"), "--output", str(w / "out" / "p.csv")]
    ev = ["eval", "--model", str(done)]
    c = [
        # -- config: keys, types, values --
        ("unknown key", ["train", "-", *g(w), "train.lrr=0.1"], "train.lrr"),
        ("key at the wrong level", ["train", "-", *g(w), "lr=0.1"], "lr"),
        ("not a number", ["train", "-", *g(w), "optim.lr=abc"], "optim.lr"),
        ("float for an int", ["train", "-", *g(w), "train.epochs=2.5"], "train.epochs"),
        ("unknown precision", ["train", "-", *g(w), "train.mixed_precision=fp8"], "train.mixed_precision"),
        ("unknown data format", ["train", "-", *g(w), "data.format=parquet"], "data.format"),
        ("zero batch", ["train", "-", *g(w), "train.batch_size=0"], "train.batch_size"),
        ("threshold out of range", ["train", "-", *g(w), "eval.threshold=1.5"], "eval.threshold"),
        ("alternating flip without device data", ["train", "-", *g(w), "data.augment.flip_mode=alternating"], "data.loader=device"),
        ("unknown loader", ["train", "-", *g(w), "data.loader=gpu"], "data.loader"),
        ("GPU decode on a CPU run", ["train", "-", *g(w), "data.format=imagefolder",
                                     f"data.root={w / 'gen-multiclass'}", "data.decode_device=cuda"], "no CUDA device"),
        ("GPU decode of generated PNGs", ["train", "-", *g(w), "data.decode_device=cuda"], "data.decode_device=cpu"),
        ("GPU decode with the device loader", ["train", "-", *g(w), "data.format=imagefolder",
                                               f"data.root={w / 'gen-multiclass'}", "data.loader=device",
                                               "data.decode_device=cuda"], "data.loader=workers"),
        ("unknown tta", ["train", "-", *g(w), "eval.tta=five_crop"], "eval.tta"),
        ("lookahead decay 1", ["train", "-", *g(w), "optim.lookahead_decay=1.0"], "optim.lookahead_decay"),
        ("warmup ratio 2", ["train", "-", *g(w), "optim.warmup_start_ratio=2"], "optim.warmup_start_ratio"),
        ("override without =", ["train", "-", *g(w), "train.epochs"], "key=value"),
        ("negative checkpoint cadence", ["train", "-", *g(w), "checkpoint.every_steps=-1"], "checkpoint.every_steps"),
        ("resume and overwrite", ["train", "-", *g(w), f"run.resume={p['ckpt']}", "run.overwrite=true"], "contradict"),
        ("imagefolder without root", ["train", "-", "data.format=imagefolder", f"run.dir={w / 'runs' / 'x'}"], "data.root"),
        ("skip without verify", ["train", "-", *g(w), "data.skip_bad_images=true", "data.verify_images=false"], "skip_bad_images"),
        ("mean of 2 values", ["train", "-", *g(w), "data.mean=[0.5,0.5]"], "data.mean"),
        ("std of 0", ["train", "-", *g(w), "data.std=[0,1,1]"], "data.std"),
        ("fp16 on cpu", ["train", "-", *g(w), "train.mixed_precision=fp16"], "fp16"),
        # every number in its declared range, nan and inf refused (issue 36)
        ("negative gradient clip", ["train", "-", *g(w), "train.clip_grad_norm=-1"], "train.clip_grad_norm must be > 0"),
        ("lr nan", ["train", "-", *g(w), "optim.lr=nan"], "optim.lr must be finite"),
        ("lr inf", ["train", "-", *g(w), "optim.lr=inf"], "optim.lr must be finite"),
        ("negative seed", ["train", "-", *g(w), "seed=-5"], "seed must be in [0, 4294967295]"),
        ("momentum 2", ["train", "-", *g(w), "optim.momentum=2"], "optim.momentum must be in [0, 1)"),
        ("negative step gamma", ["train", "-", *g(w), "optim.step_gamma=-1"], "optim.step_gamma"),
        ("mean on the 0-255 scale", ["train", "-", *g(w), "data.mean=[123.7,116.3,103.5]"], "data.mean entries"),
        # -- recipes --
        ("recipe missing", ["train", str(w / "recipes" / "nope.yaml")], "recipe file not found"),
        ("recipe invalid yaml", ["train", str(w / "recipes" / "bad.yaml")], "not valid YAML"),
        ("recipe a list", ["train", str(w / "recipes" / "list.yaml")], "not a mapping"),
        ("recipe a folder", ["train", str(w / "recipes" / "folder.yaml")], "folder.yaml"),
        ("recipe key typo", ["train", str(w / "recipes" / "typo.yaml"), *g(w)], "learning_rate"),
        # -- config against the data --
        ("label smoothing on binary", ["train", "-", *g(w, "binary"), "loss.label_smoothing=0.1"], "label_smoothing"),
        ("pos_weight on multiclass", ["train", "-", *g(w), "loss.pos_weight=2"], "pos_weight"),
        ("positive class on multiclass", ["train", "-", *g(w), "eval.positive_class=circle"], "positive_class"),
        ("positive class unknown", ["train", "-", *g(w, "binary"), "eval.positive_class=blob"], "blob"),
        ("monitor not a metric", ["train", "-", *g(w), "eval.monitor=f1"], "eval.monitor"),
        ("batch larger than the data", ["train", "-", *g(w), "train.batch_size=1000"], "larger than the training split"),
        ("unknown model", ["train", "-", *g(w), "model.name=resnet19"], "resnet19"),
        ("shards: a shard missing", ["train", "-", *folder_args(w / "shards_missing", **{"data.format": "shards"})],
         "train-00001.arrow is missing"),
        ("shards: a shard cut short", ["train", "-", *folder_args(w / "shards_cut", **{"data.format": "shards"})],
         "train-00000.arrow is"),
        ("shards: a folder, not a pack", ["train", "-", *folder_args(w / "imgs" / "images", **{"data.format": "shards"})],
         "not a packed dataset"),
        ("pack into its own source", ["pack", str(w / "imgs" / "images"), str(w / "imgs" / "images" / "packed")],
         "lies inside the folder packed"),
        ("pack over a user's folder", ["pack", str(w / "imgs" / "images"), str(w / "precious")],
         "is not a pack of the trainer"),
        ("pack a missing folder", ["pack", str(w / "nope"), str(w / "out" / "packed")], "does not exist"),
        ("image too small for the model", ["train", "-", *folder_args(w / "imgs" / "images", **{
            "model.name": "convnext_tiny", "model.small_input_stem": "false"})], "too small"),
        ("crop padding too large", ["train", "-", *g(w), "data.augment.crop_padding=40"], "crop_padding"),
        ("pretrained missing", ["train", "-", *g(w), f"model.pretrained_path={w / 'nope.safetensors'}"], "pretrained_path"),
        ("pretrained pickle named safetensors", ["train", "-", *g(w), f"model.pretrained_path={w / 'pickle.safetensors'}"], "pickle"),
        ("pretrained protocol-0 pickle", ["train", "-", *g(w), f"model.pretrained_path={w / 'pickle0.pth'}"], "pickle0.pth"),
        ("pretrained garbage", ["train", "-", *g(w), f"model.pretrained_path={w / 'garbage.safetensors'}"], "garbage.safetensors"),
        # -- data folders --
        ("data root missing", ["train", "-", *folder_args(w / "nowhere" / "images")], "does not exist"),
        ("data root a file", ["train", "-", *folder_args(w / "a_file")], "not a folder"),
        ("no class folders", ["train", "-", *folder_args(w / "nocls" / "images")], "no class folders"),
        ("empty class folder", ["train", "-", *folder_args(w / "empty_class" / "images")], "empty class folder"),
        ("a file that is not an image", ["train", "-", *folder_args(w / "not_image" / "images")], "oops.png"),
        ("a truncated image", ["train", "-", *folder_args(w / "truncated" / "images")], "cut.jpg"),
        ("val class not in train", ["train", "-", *folder_args(w / "extra_val" / "images")], "bird"),
        ("one class", ["train", "-", *folder_args(w / "one_class" / "images")], "at least 2 classes"),
        ("bad val image, no verify", ["train", "-", *folder_args(w / "bad_val" / "images", **{"data.verify_images": "false"})], "bad.png"),
        ("empty val split", ["train", "-", *folder_args(w / "imgs" / "images", **{"data.val_fraction": 0.01})], "val"),
        ("skipping drops a class", ["train", "-", *folder_args(w / "all_bad_dog" / "images", **{"data.skip_bad_images": "true"})], "dog"),
        ("two class folders one folder", ["train", "-", *folder_args(w / "same_class" / "images")], "same folder"),
        ("cifar missing offline", ["train", "-", *g(w), "data.format=cifar10", f"data.root={w / 'nocifar'}"], "cifar10"),
        # -- run directories --
        ("run dir a file", ["train", "-", *g(w), f"run.dir={w / 'a_file'}"], "not a folder"),
        ("run dir below a file", ["train", "-", *g(w), f"run.dir={w / 'a_file' / 'run'}"], "a_file"),
        ("run dir is the data", ["train", "-", *g(w), f"run.dir={w / 'gen-multiclass'}", "run.overwrite=true"], "lies inside"),
        ("run dir inside the data", ["train", "-", *g(w), f"run.dir={w / 'gen-multiclass' / 'runs' / 'a'}"], "lies inside"),
        ("run dir holds the data", ["train", "-", *g(w), f"run.dir={w}", "run.overwrite=true"], "contains"),
        ("run dir the current folder", ["train", "-", *g(w), "run.dir=."], "current directory"),
        ("run dir home", ["train", "-", *g(w), f"run.dir={Path.home()}"], "home directory"),
        ("run dir root", ["train", "-", *g(w), "run.dir=/", "run.overwrite=true"], "root"),
        ("run dir a user's folder", ["train", "-", *g(w), f"run.dir={w / 'precious'}"], "not a trainer run"),
        ("overwrite a user's folder", ["train", "-", *g(w), f"run.dir={w / 'precious'}", "run.overwrite=true"], "not a trainer run"),
        ("resume from nowhere", ["train", "-", *g(w), f"run.resume={w / 'nope'}"], "does not exist"),
        ("resume from a pickle", ["train", "-", *g(w), f"run.resume={w / 'ckpt.pt'}"], "pickle"),
        ("resume another task", ["train", "-", *g(w, "binary"), f"run.resume={p['ckpt']}"], "does not match"),
        ("resume another run's schedule", ["train", "-", *g(w), f"run.resume={p['ckpt']}"], "train.max_steps: 2 -> None"),
        ("resume a damaged checkpoint", ["train", "-", *g(w), f"run.resume={w / 'bad_ckpt'}"], "not a loadable checkpoint"),
        ("resume with another batch size", ["train", "-", *tiny_overrides(w, "multiclass", **{
            "run.dir": str(w / "unfinished"), "train.max_steps": 2, "train.batch_size": 8})], "would change from 16 to 8"),
        ("resume into a run", ["train", "-", *g(w), f"run.dir={done}", f"run.resume={p['ckpt']}"], "already holds a run"),
        # -- eval --
        ("eval model missing", ["eval", "--model", str(w / "nope")], "does not exist"),
        ("eval folder without a model", ["eval", "--model", str(w / "precious")], "no exported model"),
        ("eval exported model without data", ["eval", "--model", str(m / "alone")], "data.root"),
        ("eval garbage model.json", ["eval", "--model", str(m / "garbage_json"), f"data.root={w / 'gen-multiclass'}"], "not valid JSON"),
        ("eval incomplete model.json", ["eval", "--model", str(m / "incomplete_json"), f"data.root={w / 'gen-multiclass'}"], "mean"),
        ("eval fewer classes than outputs", ["eval", "--model", str(m / "few_classes"), f"data.root={w / 'gen-multiclass'}"], "do not fit"),
        ("eval truncated weights", ["eval", "--model", str(m / "truncated_weights"), f"data.root={w / 'gen-multiclass'}"], "safetensors"),
        ("eval pickled weights", ["eval", "--model", str(m / "pickled_weights"), f"data.root={w / 'gen-multiclass'}"], "pickle"),
        ("eval unknown classes", [*ev, "data.format=imagefolder", f"data.root={w / 'other_classes' / 'images'}", "eval.split=all"], "zebra"),
        ("eval output inside the data", [*ev, "--output", str(w / "gen-multiclass" / "eval.json")], "lies inside"),
        ("eval split missing", [*ev, "data.format=imagefolder", f"data.root={w / 'flat' / 'images'}", "eval.split=test"], "test"),
        ("eval unknown split", [*ev, "eval.split=holdout"], "eval.split"),
        # -- predict --
        ("predict batch 0", [*pred, "--batch-size", "0"], "--batch-size"),
        ("predict output a folder", ["predict", "--model", str(done), str(w / "gen-multiclass" / "val"), "--output", str(w / "precious")], "is a folder"),
        ("predict threshold 1.5", [*pred, "--threshold", "1.5"], "--threshold"),
        ("predict threshold -1", [*pred, "--threshold", "-1"], "--threshold"),
        ("predict threshold nan", [*pred, "--threshold", "nan"], "--threshold"),
        ("predict threshold on multiclass", [*pred, "--threshold", "0.3"], "binary models only"),
        ("predict input missing", ["predict", "--model", str(done), str(w / "nope.png"), "--output", str(w / "out" / "p.csv")], "nope.png"),
        ("predict folder without images", ["predict", "--model", str(done), str(w / "precious"), "--output", str(w / "out" / "p.csv")], "no image files"),
        ("predict unreadable image", ["predict", "--model", str(done), str(w / "not_image" / "images" / "cat" / "oops.png"), "--output", str(w / "out" / "p.csv")], "oops.png"),
        ("predict on a missing GPU", [*pred, "--device", "cuda"], "cuda"),
        ("predict over an input image", ["predict", "--model", str(done), str(p["good"] / "cat"), "--output", str(p["good"] / "cat" / "0.png")], "lies inside the input folder"),
        ("predict list missing", ["predict", "--model", str(done), "@" + str(w / "nolist.txt"), "--output", str(w / "out" / "p.csv")], "nolist.txt"),
        ("predict list naming a missing file", ["predict", "--model", str(done), "@" + str(w / "list.txt"), "--output", str(w / "out" / "p.csv")], "missing.png"),
        # -- segmentation --
        ("seg: an image without its mask", ["train", "-", *seg_args(w / "seg_nomask")], "m001"),
        ("seg: a mask of another size", ["train", "-", *seg_args(w / "seg_size")], "m002.png"),
        ("seg: a mask value that is no class", ["train", "-", *seg_args(w / "seg_value")], "m003.png"),
        ("seg: an RGB mask", ["train", "-", *seg_args(w / "seg_rgb")], "m000.png"),
        ("seg: classes.txt missing", ["train", "-", *seg_args(w / "seg_noclasses")], "classes.txt"),
        ("seg: a classification model", ["train", "-", *seg_args(w / "seg_ok", **{"model.name": "resnet18"})], "resnet18"),
        ("seg: a segmentation model on classes", ["train", "-", *g(w), "model.name=unet"], "unet"),
        ("seg: classification on masks", ["train", "-", *seg_args(w / "seg_ok", task="multiclass")], "task=segmentation"),
        ("seg: the device loader", ["train", "-", *seg_args(w / "seg_ok", **{"data.loader": "device"})], "data.loader=device"),
        ("seg: a classification monitor", ["train", "-", *seg_args(w / "seg_ok", **{"eval.monitor": "accuracy"})], "eval.monitor"),
        ("seg: ignore index is a class", ["train", "-", *seg_args(w / "seg_ok", **{"data.ignore_index": 1})], "ignore_index"),
        ("seg: dice loss for classes", ["train", "-", *g(w), "loss.name=dice"], "loss.name=dice"),
        ("seg: binary masks of 0 and 255", ["train", "-", *seg_args(w / "seg_binary255")], "map it to class 1"),
        ("seg: a val image cut short", ["train", "-", *seg_args(w / "seg_cut_val")], "m001.png"),
        ("seg: classes.txt in UTF-16", ["train", "-", *seg_args(w / "seg_utf16")], "not UTF-8"),
        ("seg: a detector's option", ["train", "-", *seg_args(w / "seg_ok", **{"model.detection.min_size": 64})],
         "model.detection.min_size"),
        ("det: a classification crop", ["train", "-", *det_args(w / "det_ok", **{
            "data.augment.random_resized_crop": "true"})], "random_resized_crop"),
        # -- detection --
        ("det: a JSON that is not COCO", ["train", "-", *det_args(w / "det_notcoco")], "annotations"),
        ("det: an annotation of an unknown image", ["train", "-", *det_args(w / "det_image")], "999"),
        ("det: an unknown category", ["train", "-", *det_args(w / "det_category")], "42"),
        ("det: a box of zero width", ["train", "-", *det_args(w / "det_zero")], "annotations.json"),
        ("det: a box far outside its image", ["train", "-", *det_args(w / "det_far")], "annotations.json"),
        ("det: a missing image file", ["train", "-", *det_args(w / "det_file")], "00002.png"),
        ("det: a classification model", ["train", "-", *det_args(w / "det_ok", **{"model.name": "resnet18"})], "resnet18"),
        ("det: an option the model cannot take", ["train", "-", *det_args(w / "det_ok", **{
            "model.name": "fcos_resnet50_fpn", "model.detection.anchor_sizes": "[32]"})], "anchor_sizes"),
        ("det: flip TTA", ["train", "-", *det_args(w / "det_ok", **{"eval.tta": "flip"})], "eval.tta"),
        ("det: a segmentation monitor", ["train", "-", *det_args(w / "det_ok", **{"eval.monitor": "miou"})], "eval.monitor"),
        ("det: box augmentation for classes", ["train", "-", *g(w), "data.augment.iou_crop=true"], "iou_crop"),
        ("det: classification on boxes", ["train", "-", *det_args(w / "det_ok", task="multiclass")], "task=detection"),
        ("det: an image cut short", ["train", "-", *det_args(w / "det_cut")], "00002.png"),
        ("det: an id beyond 64 bits", ["train", "-", *det_args(w / "det_bigid")], "9223372036854775808"),
        ("det: iscrowd in words", ["train", "-", *det_args(w / "det_crowd")], "iscrowd"),
        ("det: a val split without boxes", ["train", "-", *det_args(w / "det_noval")], "nothing to score"),
        ("det: two annotation files for a split", ["train", "-", *det_args(w / "det_ok", **{
            "data.coco_files": f"{{train: {{annotations: [a.json, b.json], images: {w / 'det_ok' / 'train'}}}}}"})],
         "must be one path"),
        ("eval a classifier on COCO data", [*ev, "data.format=coco", f"data.root={w / 'det_ok'}"], "cannot score"),
        ("predict list in UTF-16", ["predict", "--model", str(done), "@" + str(w / "list16.txt"), "--output",
                                    str(w / "out" / "p.csv")], "not UTF-8"),
        # -- packed segmentation and detection folders --
        ("shards: classification on packed masks", ["train", "-", *seg_args(w / "seg_packed", task="multiclass", **{
            "data.format": "shards"})], "task=segmentation"),
        ("shards: detection on packed masks", ["train", "-", *seg_args(w / "seg_packed", task="detection", **{
            "data.format": "shards"})], "task=detection trains on boxes"),
        ("shards: classification on packed COCO", ["train", "-", *det_args(w / "det_packed", task="multiclass", **{
            "data.format": "shards"})], "task=detection"),
        ("shards: a packed annotation file missing", ["train", "-", *det_args(w / "det_packed_noann", **{
            "data.format": "shards"})], "val-annotations.json is missing"),
        ("pack masks without split folders", ["pack", str(w / "seg_flat"), str(w / "out" / "packed")],
         "without split folders"),
        ("pack COCO leaving bad images out", ["pack", str(w / "det_ok"), str(w / "out" / "packed"),
                                              "--skip-bad-images"], "--skip-bad-images cannot"),
        ("det: --draw for a classifier", [*pred, "--draw", str(w / "out" / "drawn")], "--draw"),
        ("predict garbage model.json", ["predict", "--model", str(m / "garbage_json"), str(w / "gen-multiclass" / "val"), "--output", str(w / "out" / "p.csv")], "not valid JSON"),
        # -- multi-label CSV folders --
        ("ml: a missing image file", ["train", "-", *ml_args(w / "ml_missing")], "val.csv line 3: image"),
        ("ml: a val label not in train", ["train", "-", *ml_args(w / "ml_unknown")], "label 'zebra' is not a class"),
        ("ml: a class with no image", ["train", "-", *ml_args(w / "ml_empty_class")], "class 'fish' has no positive"),
        ("ml: an unreadable image", ["train", "-", *ml_args(w / "ml_unreadable")], "v1.png"),
        ("ml: a CSV without its column", ["train", "-", *ml_args(w / "ml_nocolumn")], "has no column 'labels'"),
        ("ml: youden thresholds", ["train", "-", *ml_args(w / "ml_ok", **{"eval.threshold_tuning": "youden"})],
         "eval.threshold_tuning=max_f1"),
        ("ml: the weighted sampler", ["train", "-", *ml_args(w / "ml_ok", **{"data.sampler": "weighted"})],
         "data.sampler=weighted"),
        ("ml: csv keys on image folders", ["train", "-", *g(w), "data.csv.labels_column=tags"],
         "data.csv.labels_column"),
        # packing one: the same checks as a training start, before anything is written
        ("pack ml: a missing image file", ["pack", str(w / "ml_missing"), str(w / "out" / "packed")],
         "val.csv line 3: image"),
        ("pack ml: a val label not in train", ["pack", str(w / "ml_unknown"), str(w / "out" / "packed")],
         "label 'zebra' is not a class"),
        ("pack ml: a class with no image", ["pack", str(w / "ml_empty_class"), str(w / "out" / "packed")],
         "class 'fish' has no positive"),
        ("pack ml: a CSV without its column", ["pack", str(w / "ml_nocolumn"), str(w / "out" / "packed")],
         "has no column 'labels'"),
        ("pack ml: csv columns of another name", ["pack", str(w / "ml_ok"), str(w / "out" / "packed"),
                                                  "data.csv.labels_column=tags"], "has no column 'tags'"),
        ("pack ml: a key other than data.csv", ["pack", str(w / "ml_ok"), str(w / "out" / "packed"),
                                                "data.root=x"], "'data.root=x'"),
        ("pack: csv keys on an image folder", ["pack", str(w / "imgs" / "images"), str(w / "out" / "packed"),
                                               "data.csv.separator=;"], "data.csv.* is for a multi-label"),
        # -- sweeps --
        ("sweep invalid yaml", ["sweep", str(w / "sweeps" / "bad.yaml"), "--local", "--dir", str(w / "sw")], "not valid YAML"),
        ("sweep without parameters", ["sweep", str(w / "sweeps" / "noparams.yaml"), "--local", "--dir", str(w / "sw")], "parameters"),
        ("sweep unknown key", ["sweep", str(w / "sweeps" / "unknown.yaml"), "--local", "--dir", str(w / "sw")], "params"),
        ("sweep key typo", ["sweep", str(w / "sweeps" / "typo.yaml"), "--local", "--dir", str(w / "sw")], "optim.lrr"),
        ("sweep parameters a list", ["sweep", str(w / "sweeps" / "list.yaml"), "--local", "--dir", str(w / "sw")], "parameters"),
        ("sweep file missing", ["sweep", str(w / "sweeps" / "nope.yaml"), "--local", "--dir", str(w / "sw")], "nope.yaml"),
        ("collect a non-sweep", ["collect", str(w / "precious")], "not a sweep folder"),
        # -- tunes --
        ("tune file missing", ["tune", str(w / "tunes" / "nope.yaml"), "--local", "--dir", str(w / "tu")], "nope.yaml"),
        ("tune unknown key", ["tune", str(w / "tunes" / "unknown.yaml"), "--local", "--dir", str(w / "tu")], "pruner_kind"),
        ("tune parameter without a type", ["tune", str(w / "tunes" / "notype.yaml"), "--local", "--dir", str(w / "tu")], "optim.lr"),
        ("tune grid over a range", ["tune", str(w / "tunes" / "grid.yaml"), "--local", "--dir", str(w / "tu")], "grid"),
        ("tune log scale from 0", ["tune", str(w / "tunes" / "log0.yaml"), "--local", "--dir", str(w / "tu")], "low > 0"),
        ("tune key typo", ["tune", str(w / "tunes" / "typo.yaml"), "--local", "--dir", str(w / "tu")], "optim.lrr"),
        ("tune stale_after_s too short", ["tune", str(w / "tunes" / "stale.yaml"), "--local", "--dir", str(w / "tu")], "stale_after_s"),
        ("tune unknown sampler", ["tune", str(w / "tunes" / "sampler.yaml"), "--local", "--dir", str(w / "tu")], "bayes"),
        ("tune zero workers", ["tune", str(w / "tunes" / "ok.yaml"), "--local", "--workers", "0", "--dir", str(w / "tu")], "--workers"),
        ("tune fixed override typo", ["tune", str(w / "tunes" / "ok.yaml"), "train.epochz=2", "--local", "--dir", str(w / "tu")], "train.epochz"),
        ("tune folder of another tune", ["tune", str(w / "tunes" / "ok.yaml"), "train.epochs=2", "--local", "--dir", str(w / "tune_other")], "different tune"),
        ("tune worker of a non-tune", ["tune-worker", str(w / "precious"), "--worker-id", "x"], "not a tune folder"),
    ]
    return c


def run_case(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *argv], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH})


def run_cases_forked(argvs: list, cwd: Path) -> list:
    """Each command line in its own process forked from one that imported the trainer once (tests/cli_zygote.py):
    the same exit code and output as `python -m trainer`, without ~5 s of imports per case."""
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_zygote.py"), "--jobs", "2"], capture_output=True,
                         text=True, timeout=900, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH},
                         input=json.dumps([{"argv": argv, "cwd": str(cwd)} for argv in argvs]))
    assert res.returncode == 0, res.stderr[-3000:]
    return [subprocess.CompletedProcess(argv, r["returncode"], r["stdout"], r["stderr"])
            for argv, r in zip(argvs, json.loads(res.stdout))]


# one case of each kind also runs as its own interpreter, as a user runs it: both ways must print the same
AS_THEIR_OWN_PROCESS = ("unknown key", "recipe key typo", "a truncated image", "run dir a user's folder",
                        "resume another run's schedule", "eval pickled weights", "predict unreadable image",
                        "seg: a mask of another size", "det: a missing image file", "sweep key typo")


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    p = build_workspace(w)
    catalogue = cases(w, p)
    assert len(catalogue) >= 60
    assert len({name for name, _, _ in catalogue}) == len(catalogue)
    (w / "runs").mkdir()  # the parent of every case's run directory (two at a time could race to make it)
    # The current directory is a folder of the user's inside the compared tree, not the project's checkout: what
    # a refused command would write by default (runs/, sweeps/, tunes/, data/generated/) lands in the tree and
    # fails the comparison, whatever the user did in the checkout before (a quick start's run in its runs/).
    cwd = tmp_path / "home"
    cwd.mkdir()
    before = digest(tmp_path)
    results = run_cases_forked([argv for _, argv, _ in catalogue], cwd)
    by_name = {name: (argv, res) for (name, argv, _), res in zip(catalogue, results)}
    sample = [by_name[name] for name in AS_THEIR_OWN_PROCESS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        own = list(pool.map(lambda case: run_case(case[0], cwd), sample))
    for name, (argv, forked), alone in zip(AS_THEIR_OWN_PROCESS, sample, own):
        assert (forked.returncode, forked.stdout, forked.stderr) == (alone.returncode, alone.stdout, alone.stderr), name
    failures = []
    for (name, argv, expected), res in zip(catalogue, results):
        lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
        ok = res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0]
        ok = ok and " at 0x" not in lines[0]  # no object repr: it tells the user nothing and differs run to run
        if not ok:
            failures.append(f"{name}: exit {res.returncode}, stderr:\n  " + "\n  ".join(lines[-8:]))
    assert not failures, f"{len(failures)} of {len(catalogue)} cases:\n" + "\n".join(failures)
    after = digest(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"written by a refused command: {changed[:10]}"


# ---- the collision table: every command that writes, against every way its target can collide ----
# For each command that writes and each kind of collision, a tree of the user's files is made and checksummed,
# the command runs, and either it succeeds (exit 0) and nothing of the user's changed, or it refuses (exit 2,
# one line) and nothing changed at all. A new command or output is added to COMMANDS (trainer/outputs.py is the
# one gate they all write through). Every step is a real `python -m trainer` process (forked, two at a time).

COLLISIONS = ("a user's file at the target", "the target is an input", "the target lies inside the data",
              "the target is a file of the model read", "a user's file deep in the trainer's folder",
              "a trainer's sub-folder is a link", "a killed earlier run")
SHARED_RUN = {"data.num_workers": 0, "model.name": "small_cnn", "train.max_steps": 2, "train.batch_size": 4,
              "train.progress_bar": False, "eval.every_epochs": 0}


def shared_workspace(s: Path) -> dict:
    """What the commands read and must never change: data of each kind, a finished run of each task, a sweep file
    and a tune file."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}

    def train(args):
        res = subprocess.run([sys.executable, "-m", "trainer", "train", "-", *args], capture_output=True, text=True,
                             timeout=600, cwd=s, env=env)
        assert res.returncode == 0, res.stderr[-2000:]

    images = make_folder(s / "images", per_class=6)
    train([f"{k}={v}" for k, v in {**SHARED_RUN, "data.format": "imagefolder", "data.root": images,
                                   "data.image_size": 16, "data.val_fraction": 0.5, "run.dir": s / "run"}.items()])
    mask_folder(s / "seg")
    train(seg_args(s / "seg", **{"run.dir": s / "seg_run", "train.max_steps": 1, "eval.every_epochs": 0}))
    coco_folder(s / "coco")
    train(det_args(s / "coco", **{"run.dir": s / "det_run", "train.max_steps": 1, "eval.every_epochs": 0}))
    recipe = s / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in {
        "data": {"format": "imagefolder", "root": str(images), "image_size": 16, "val_fraction": 0.5,
                 "num_workers": 0}, "model": {"name": "small_cnn"},
        "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False}, "eval": {"every_epochs": 0}}.items()))
    (s / "sweep.yaml").write_text(f"recipe: {recipe}\nparameters: {{optim.lr: [0.01]}}\n")
    (s / "tune.yaml").write_text(f"recipe: {recipe}\ntrials: 1\nsampler: random\npruner: none\n"
                                 f"parameters: {{optim.lr: {{type: float, low: 0.001, high: 0.1, log: true}}}}\n")
    return {"images": images, "run": s / "run", "seg_run": s / "seg_run", "det_run": s / "det_run",
            "sweep": s / "sweep.yaml", "tune": s / "tune.yaml"}


class Command:
    """How one command writes: `argv(C, out, again, force)` (again: its second run over its own output, e.g. train
    with run.overwrite=true; force: its --overwrite flag where it has one), where its output goes in a case
    folder C, the file of it a user's file can stand at (relative to the output folder; "" for a file output:
    the output itself), a sub-folder of its output it writes into ("" the output folder itself; None: it has
    none), the inputs and the data folder it reads (what its output is aimed at), whether it reads a model."""

    def __init__(self, name, argv, out, collide, sub, inputs=(), data=None, reads_model=False):
        self.name, self.argv, self.out, self.collide, self.sub = name, argv, out, collide, sub
        self.inputs, self.data, self.reads_model = inputs, data, reads_model


def commands(S: dict) -> list:
    from trainer.data.manifest import cache_file

    images, run, seg, coco = S["images"], S["run"], S["seg_run"].parent / "seg", S["det_run"].parent / "coco"
    val = images / "cat"
    force = lambda flag: ["--overwrite"] if flag else []  # noqa: E731
    cache = cache_file(images, "X").relative_to("X").as_posix()  # manifests/<key>.npz

    def train(C, out, again, **extra):
        args = {**SHARED_RUN, "data.format": "imagefolder", "data.root": images, "data.image_size": 16,
                "data.val_fraction": 0.5, "run.dir": out, **extra}
        return ["train", "-", *[f"{k}={v}" for k, v in args.items()]] + (["run.overwrite=true"] if again else [])

    return [
        Command("train", lambda C, out, again, f: train(C, out, again), lambda C: C / "run",
                "plots/training_curves.png", "model/plots", inputs=[images], data=images),
        Command("train (continued)", lambda C, out, again, f: train(C, out, False, **(
            {"train.max_steps": 4, "run.allow_config_change": "true"} if again else {})),
                lambda C: C / "run", "config.yaml", "checkpoints", inputs=[images], data=images),
        Command("train (scan cache)", lambda C, out, again, f: train(C, C / "run", again, **{"data.cache_dir": out}),
                lambda C: C / "cache", cache, "manifests", inputs=[images], data=images),
        Command("train (generated data)", lambda C, out, again, f: ["train", "-", *tiny_overrides(
            C, "multiclass", **{"data.root": out, "run.dir": C / "run", "train.max_steps": 1,
                                "data.generated.train_per_class": 4, "data.generated.val_per_class": 2,
                                "data.generated.test_per_class": 0, "train.batch_size": 4})]
                + (["run.overwrite=true"] if again else []), lambda C: C / "generated", "dataset.json", None),
        Command("eval", lambda C, out, again, f: ["eval", "--model", str(out.parent), *force(f)],
                lambda C: C / "run" / "eval.json", "", "plots"),
        Command("eval --output", lambda C, out, again, f: ["eval", "--model", str(run), "--output", str(out),
                                                           *force(f)],
                lambda C: C / "out" / "eval.json", "", "plots", inputs=[images, run / "model"], data=images,
                reads_model=True),
        Command("predict (CSV)", lambda C, out, again, f: ["predict", "--model", str(run), str(val), "--output",
                                                           str(out), *force(f)],
                lambda C: C / "out" / "preds.csv", "", None, inputs=[val / "0.png", val], data=images,
                reads_model=True),
        Command("predict (masks)", lambda C, out, again, f: ["predict", "--model", str(S["seg_run"]),
                                                             str(seg / "val" / "images"), "--output", str(out),
                                                             "--overlay"],
                lambda C: C / "masks", "m000.png", "", inputs=[seg / "val" / "images"], data=seg, reads_model=True),
        Command("predict (boxes, drawn)", lambda C, out, again, f: [
            "predict", "--model", str(S["det_run"]), str(coco / "val"), "--output", str(C / "boxes.json"), "--draw",
            str(out)], lambda C: C / "drawn", "00000.jpg", "", inputs=[coco / "val"], data=coco, reads_model=True),
        Command("export", lambda C, out, again, f: ["export", "--model", str(run), "--format", "onnx", "--output",
                                                    str(out), *force(f)], lambda C: C / "out" / "model.onnx", "", None,
                inputs=[run / "model" / "model.safetensors", val / "0.png"], data=images, reads_model=True),
        Command("pack", lambda C, out, again, f: ["pack", str(images), str(out), "--shard-mb", "0.002"],
                lambda C: C / "packed", "index.json", "", inputs=[images], data=images),
        Command("sweep", lambda C, out, again, f: ["sweep", str(S["sweep"]), "--local", "--dir", str(out)],
                lambda C: C / "sweep", "results.csv", "status", inputs=[S["sweep"], images], data=images),
        Command("tune", lambda C, out, again, f: ["tune", str(S["tune"]), "--local", "--dir", str(out)],
                lambda C: C / "tune", "results.md", "logs", inputs=[S["tune"], images], data=images),
        Command("collect", lambda C, out, again, f: ["collect", str(out)], lambda C: C / "sweep", "results.md", "",
                inputs=[S["sweep"]]),
    ]


class Cell:
    """One command against one kind of collision: its steps (each a process, with what to do before it and what
    it must end with), run step by step across all cells (each batch two at a time)."""

    def __init__(self, cmd: Command, kind: str, C: Path, S: dict):
        self.cmd, self.kind, self.C, self.S = cmd, kind, C, S
        self.steps, self.planted, self.failure = [], {}, None
        out = cmd.out(C)
        folder = out if out.suffix == "" else out.parent
        if cmd.name == "eval":  # it writes into the run it scores: its own copy
            self.steps.append(("copy", lambda: shutil.copytree(S["run"], C / "run", symlinks=True)))
        if cmd.name == "collect":  # it writes into a sweep's folder: one made first
            self.run(["sweep", str(S["sweep"]), "--local", "--dir", str(out)], 0)
        plant_at = (out / cmd.collide) if cmd.collide else out
        if kind == COLLISIONS[0]:  # a file of the user's where the command writes
            if cmd.collide and cmd.name != "collect":  # a folder output: made by a first run, one file replaced
                self.run(cmd.argv(C, out, False, False), 0)
            self.plant_step({plant_at: b"the user's own"})
            # refused in one line, or (a cache that cannot be written is a note) the run goes on without it
            self.run(cmd.argv(C, out, True, False), (0, 2) if cmd.name == "train (scan cache)" else 2)
        elif kind == COLLISIONS[1]:  # the output aimed at an input: refused whatever the flags
            for target in cmd.inputs:
                self.run(cmd.argv(C, self.aim(out, target), False, True), 2)
        elif kind == COLLISIONS[2] and cmd.data is not None:
            self.run(cmd.argv(C, self.aim(out, cmd.data / "inside"), False, True), 2)
        elif kind == COLLISIONS[3] and cmd.reads_model:
            self.run(cmd.argv(C, self.aim(out, S["run"] / "model" / "model.json"), False, True), 2)
        elif kind == COLLISIONS[4] and cmd.sub is not None:  # the trainer's folder holds the user's files too
            self.run(cmd.argv(C, out, False, False), 0)
            self.plant_step({folder / cmd.sub / "deep" / "er" / "mine.txt": b"deep", folder / cmd.sub / "mine.png":
                             b"a figure of the user's", folder / "notes.txt": b"notes"})
            self.run(cmd.argv(C, out, True, False), 0)
        elif kind == COLLISIONS[5] and cmd.sub:
            self.run(cmd.argv(C, out, False, False), 0)
            self.steps.append(("link", lambda: self.link(folder / cmd.sub)))
            self.run(cmd.argv(C, out, True, False), (0, 2))
        elif kind == COLLISIONS[6]:
            self.run(cmd.argv(C, out, False, False), -signal.SIGKILL, script=ROOT / "tests" / "collision_driver.py",
                     env={"COLLISION_KILL_UNDER": str(C)})
            lookalike = b"the user's, named like a temporary"
            # beside the output, and inside its folder if the killed run made it (planting there would make it)
            self.plant_step({out.parent / f".{out.name}.tmp-99999-abcdef01": lookalike},
                            {folder / ".model.tmp-99999-abcdef01": lookalike} if folder != out.parent else {})
            self.run(cmd.argv(C, out, False, False), 0)

    @staticmethod
    def aim(out: Path, at: Path) -> Path:
        """The command's output moved onto `at` (an input file or folder, or a place inside one)."""
        return at if out.suffix == "" or at.suffix else at / out.name

    def run(self, argv, expect, script=None, env=None):
        self.steps.append(("run", {"argv": [str(a) for a in argv], "cwd": str(self.C), "expect": expect,
                                   **({"script": str(script)} if script else {}), **({"env": env} if env else {})}))

    def plant_step(self, files: dict, if_there: dict = None):
        """Plant the user's `files` (and those of `if_there` whose folder exists by then)."""
        def plant():
            chosen = {**files, **{p: d for p, d in (if_there or {}).items() if p.parent.is_dir()}}
            for path, data in chosen.items():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                self.planted[path] = data
        self.steps.append(("plant", plant))

    def link(self, sub: Path):
        """The trainer's sub-folder moved aside (kept: nothing of it is lost) and replaced by a link to a folder of
        the user's, whose files are planted (they must not change)."""
        users = self.C / "users_folder"
        users.mkdir()
        (users / "mine.txt").write_bytes(b"the user's folder")
        self.planted[users / "mine.txt"] = b"the user's folder"
        if os.path.lexists(sub):
            os.rename(sub, self.C / "moved_aside")
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.symlink_to(users, target_is_directory=True)


def test_every_command_against_every_collision_keeps_every_users_file(tmp_path):
    S = shared_workspace(tmp_path / "shared")
    cells = []
    for cmd in commands(S):
        for i, kind in enumerate(COLLISIONS):
            C = tmp_path / "cases" / f"{len(cells):03d}"
            C.mkdir(parents=True)
            cell = Cell(cmd, kind, C, S)
            if any(step[0] == "run" for step in cell.steps):
                cells.append(cell)
            else:
                shutil.rmtree(C)
    shared_before = digest(tmp_path / "shared")
    covered = {(c.cmd.name, c.kind) for c in cells}
    depth = max(len(c.steps) for c in cells)
    for i in range(depth):
        batch = []
        for cell in cells:
            if cell.failure is None and i < len(cell.steps):
                what, step = cell.steps[i]
                if what == "run":
                    batch.append((cell, step, digest(cell.C)))
                else:
                    step()
        if not batch:
            continue
        res = subprocess.run([sys.executable, str(ROOT / "tests" / "cli_zygote.py"), "--jobs", "2"], capture_output=True,
                             text=True, timeout=3000, cwd=tmp_path,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH},
                             input=json.dumps([{k: v for k, v in step.items() if k != "expect"} for _, step, _ in batch]))
        assert res.returncode == 0, res.stderr[-3000:]
        for (cell, step, before), got in zip(batch, json.loads(res.stdout)):
            expect = step["expect"] if isinstance(step["expect"], tuple) else (step["expect"],)
            lines = [line for line in got["stderr"].strip().splitlines() if line.strip()]
            code = got["returncode"]
            why = None
            if code not in expect:
                why = f"exit {code}, expected {expect}"
            elif code == 2 and not (len(lines) == 1 and lines[0].startswith("error:")):
                why = "not one error line"
            elif code == 2 and digest(cell.C) != before:
                changed = sorted(k for k in set(before) | set(digest(cell.C)) if before.get(k) != digest(cell.C).get(k))
                why = f"refused, but changed {changed[:4]}"
            changed = [str(p) for p, data in cell.planted.items() if not p.is_file() or p.read_bytes() != data]
            if changed:
                why = f"a user's file changed or gone: {changed[:3]}"
            if code == 0 and cell.kind == COLLISIONS[6]:
                leftover = [str(p) for p in cell.C.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name
                            or "cnn-trainer-stage" in p.name if p not in cell.planted]
                if leftover:
                    why = f"a killed run's temporaries left: {leftover[:3]}"
            if why:
                cell.failure = f"{cell.cmd.name} / {cell.kind}: {' '.join(step['argv'][:1])}: {why}\n  " + \
                    "\n  ".join(lines[-6:])
    failures = [c.failure for c in cells if c.failure]
    assert not failures, f"{len(failures)} of {len(cells)} cells:\n" + "\n".join(failures)
    assert digest(tmp_path / "shared") == shared_before  # nothing any command read was changed
    # every command meets the collisions that apply to it: (commands x kinds) cells
    assert len(covered) >= 60, len(covered)


def test_a_read_only_run_dir_is_one_line_before_any_data_is_read(tmp_path):
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("a read-only mount needs root, and under CI=true this test must run")
        pytest.skip("a read-only mount needs root (root ignores file permissions, so a mode bit would not do)")
    ro = tmp_path / "ro"
    ro.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if res.returncode != 0:
        (pytest.fail if IN_CI else pytest.skip)(f"cannot mount a read-only tmpfs: {res.stderr.strip()}")
    try:
        # data.root does not exist either: the run directory is checked first, before any data is read
        res = run_case(["train", "-", *folder_args(tmp_path / "nodata"), f"run.dir={ro / 'run'}"], ROOT)
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "read-only" in lines[0], res.stderr


def test_accelerate_cpu_flag_with_two_processes_stops_with_the_message(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process without a word; the trainer says so."""
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "-m", "trainer", "train", "-", *gen_args(tmp_path)], capture_output=True, text=True,
                         timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode != 0
    assert "error: accelerate launch started one process although several were asked for" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_two_processes_one_user_error_is_one_line_from_the_trainer(tmp_path):
    """A mistake found after the processes have met (the monitor metric, checked against the data) is
    printed once, by rank 0; the other rank leaves quietly with the same code (the launcher's own failure
    report, torchrun's ~40 lines, follows it)."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "trainer", "train", "-", *gen_args(tmp_path), "eval.monitor=f1"], capture_output=True,
                         text=True, timeout=180, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if "error:" in line and "eval.monitor" in line]
    assert len(ours) == 1 and ours[0].startswith("error:"), res.stderr[-3000:]
    assert not [line for line in res.stderr.splitlines() if line.startswith(("[rank0]", "[rank1]", "[rank 1]"))]
    assert "exitcode  : 2" in res.stderr  # both ranks left with the user-error code
    assert not (tmp_path / "runs").exists()


def test_a_training_file_corrupted_after_the_scan_is_replaced_and_a_killed_run_still_resumes_bitwise(tmp_path):
    """A file rewritten after the cached scan passed it (its folder's mtime unchanged, so the scan stays valid)
    is met by a DataLoader worker mid-training: another file of its class stands in, a line names both, the
    run completes, and a run SIGKILLed half-way resumes to bitwise the same weights and metrics rows."""
    data = tmp_path / "imgs"
    make_folder(data / "train", per_class=12)
    make_folder(data / "val", per_class=2)
    run = {"train.epochs": 3, "train.batch_size": 4, "data.num_workers": 2, "checkpoint.every_steps": 2,
           "train.log_every_steps": 2, "data.verify_images": "header"}  # 24 images: 6 updates an epoch
    build_data(load_config(None, folder_args(data, "scan", **run)).data, seed=0, log=lambda *_: None)
    broken = data / "train" / "dog" / "3.png"
    size = broken.stat().st_size
    broken.write_bytes(b"\0" * size)  # rewritten in place: the cached header check still says it is fine
    ref = run_train(folder_args(data, "ref", **run))
    assert ref.returncode == 0, ref.stderr[-3000:]
    warnings = [line for line in ref.stderr.splitlines() if "warning: cannot read image" in line]
    assert warnings and all(str(broken) in line and "/dog/" in line.split("trained on ")[1] for line in warnings)
    assert len(warnings) >= 3  # met once per epoch at least
    ref_dir = data.parent / "runs" / "ref"
    assert json.loads((ref_dir / "summary.json").read_text())["replaced_images_this_start"] == len(warnings)
    args = folder_args(data, "killed", **run)
    killed = run_driver(args, "kill_at_update", 9)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    done = run_train(args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_run(ref_dir, data.parent / "runs" / "killed")
