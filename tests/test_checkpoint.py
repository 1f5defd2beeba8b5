"""Checkpoints never lose work: a run killed (SIGKILL) anywhere, even during a save, resumes bit for bit.

Each interrupted run is a real process killed with SIGKILL by a small driver that wraps one function of
the trainer (no hook in the product): at a chosen optimizer update, or in the middle of writing a
checkpoint. The resumed run is the plain CLI command, run again.
"""
from __future__ import annotations

import glob
import json
import os
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import (PYTHONPATH, ROOT, assert_same_run, rows, run_cli, run_forked, run_torchrun,
                            tiny_overrides, weights)
from trainer.checkpoint import POINTER, checkpoint_folders, read_checkpoint, rotate
from trainer.errors import TrainerError
from trainer.outputs import Folder

DRIVER = r'''
import os, signal, sys
import trainer.checkpoint as C
import trainer.loop as L
from trainer.cli import main

mode, n = os.environ["FAULT"], int(os.environ["FAULT_AT"])
# kill_at_update: SIGKILL when the learning rate of update n is asked for (mid-step);
# sigterm_at_update: a real preemption signal at the same point, handled by the trainer
at_update = {"kill_at_update": signal.SIGKILL, "sigterm_at_update": signal.SIGTERM}
if mode in at_update:
    original = L.lr_at
    def lr_at(update, *a, **k):
        if update == n:
            os.kill(os.getpid(), at_update[mode])
        return original(update, *a, **k)
    L.lr_at = lr_at
elif mode == "kill_during_save":  # SIGKILL after writing part of the n-th checkpoint
    original, calls = C.save_file, []
    def save_file(tensors, path, *a, **k):
        calls.append(path)
        original(tensors, path, *a, **k)
        if len(calls) == 3 * n - 1:  # model + optimizer of checkpoint n written, rng and state not yet
            os.kill(os.getpid(), signal.SIGKILL)
    C.save_file = save_file
main(sys.argv[1:])
'''


def overrides(tmp_path: Path, run: str, **extra) -> list:
    base = {"run.dir": str(tmp_path / run), "train.epochs": 3, "checkpoint.every_steps": 3,
            "checkpoint.keep_last": 2, "train.log_every_steps": 2}
    base.update(extra)
    return tiny_overrides(tmp_path, "multiclass", **base)


def run_driver(tmp_path: Path, args: list, fault: str, at: int, processes: int = 1, env=None):
    """DRIVER with its fault: on one process forked like run_cli's commands (conftest.run_forked)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    fault_env = {"FAULT": fault, "FAULT_AT": str(at), "PYTHONPATH": PYTHONPATH, **(env or {})}
    if processes == 1:
        return run_forked(["train", "-", *args], env=fault_env, timeout=300, cwd=ROOT, script=driver)
    return run_torchrun(["train", "-", *args], processes, env=fault_env, timeout=300, cwd=ROOT, script=driver)


def run_train(args: list, processes: int = 1, env=None):
    if processes == 1:
        return run_cli("train", "-", *args, env=env)
    return run_torchrun(["train", "-", *args], processes, env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per configuration, to compare resumed runs with."""
    tmp = tmp_path_factory.mktemp("ref")
    made = {}

    def get(processes: int, **extra):
        key = (processes, tuple(sorted(extra.items())))
        if key not in made:
            run = f"ref{len(made)}"
            res = run_train(overrides(tmp, run, **extra), processes)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            made[key] = tmp / run
        return made[key]

    return get


# dropout (mobilenet's classifier) and worker processes make RNG and prefetching matter
ONE_PROCESS = {"model.name": "mobilenet_v3_small", "data.num_workers": 2}


@pytest.mark.slow
@pytest.mark.parametrize("fault, at", [
    ("kill_at_update", 1),   # before the first checkpoint: the same command starts it again
    ("kill_at_update", 7),   # mid-epoch (10 updates per epoch), one update after a checkpoint
    ("kill_at_update", 10),  # at the epoch boundary
    ("kill_during_save", 2),  # while writing the 2nd checkpoint: the 1st must be used
])
def test_sigkill_then_same_command_is_bitwise_identical_one_process(reference, tmp_path, fault, at):
    ref = reference(1, **ONE_PROCESS)
    args = overrides(tmp_path, "run", **ONE_PROCESS)
    killed = run_driver(tmp_path, args, fault, at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "run" / "model").exists()  # it really died before the end
    resumed = run_train(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ("resuming from" in resumed.stdout) == (at > 3 or fault == "kill_during_save")
    assert_same_run(ref, tmp_path / "run")


# the fast path: device-resident data with batched augmentation, alternating flips, lookahead (its slow
# weights are part of the checkpoint) and the airbench net, with the speed recipe's rules: BN biases at a
# larger lr with the weights' decay, the whitening bias frozen after the first epoch, full batches only
DEVICE_PATH = {"data.loader": "device", "data.augment.flip_mode": "alternating", "model.name": "airbench",
               "optim.name": "sgd", "optim.lr": 0.2, "optim.nesterov": True, "optim.lookahead_every": 2,
               "optim.bias_lr_scale": 4.0, "optim.bias_lr_scale_scope": "norm", "optim.bias_decay": True,
               "optim.freeze_after_epochs": "{whiten.bias: 1}", "train.drop_last": True,
               "eval.tta": "flip_translate"}


@pytest.mark.slow
@pytest.mark.parametrize("processes, at", [(1, 7), (2, 5)])
def test_sigkill_on_the_device_data_path_resumes_bitwise(reference, tmp_path, processes, at):
    ref = reference(processes, **DEVICE_PATH)
    args = overrides(tmp_path, "run", **DEVICE_PATH)
    killed = run_driver(tmp_path, args, "kill_at_update", at, processes=processes)
    assert killed.returncode != 0
    assert not (tmp_path / "run" / "model").exists()
    resumed = run_train(args, processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(ref, tmp_path / "run")
    assert (ref / "checkpoints" / json.loads((ref / "checkpoints" / POINTER).read_text())["checkpoint"]
            / "lookahead.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("fault, at", [("kill_at_update", 5), ("kill_during_save", 2)])
def test_sigkill_then_same_command_is_bitwise_identical_two_processes(reference, tmp_path, fault, at):
    ref = reference(2)
    args = overrides(tmp_path, "run")
    killed = run_driver(tmp_path, args, fault, at, processes=2)
    assert killed.returncode != 0
    resumed = run_train(args, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(ref, tmp_path / "run")


def test_a_checkpoint_on_two_processes_has_the_same_files_as_on_one(reference):
    one, two = reference(1, **ONE_PROCESS), reference(2)
    ckpt_one = sorted((one / "checkpoints").glob("step-*"))[-1]
    ckpt_two = sorted((two / "checkpoints").glob("step-*"))[-1]
    assert sorted(p.name for p in ckpt_one.iterdir()) == sorted(p.name for p in ckpt_two.iterdir())
    assert {k.split(".")[0] for k in load_file(str(ckpt_two / "rng.safetensors"))} == {"rank0", "rank1"}
    assert {k.split(".")[0] for k in load_file(str(ckpt_one / "rng.safetensors"))} == {"rank0"}


def test_no_file_of_a_checkpoint_is_a_pickle(reference):
    run = reference(2)
    files = [p for p in (run / "checkpoints").rglob("*") if p.is_file()]
    assert files
    for f in files:
        head = f.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f
        assert f.suffix in (".safetensors", ".json"), f


def test_resume_from_explicit_checkpoint_into_a_new_run(reference, tmp_path):
    ref = reference(1, **ONE_PROCESS)
    first = sorted((ref / "checkpoints").glob("step-*"))[0]
    res = run_train(overrides(tmp_path, "other", **ONE_PROCESS) + [f"run.resume={first}"])
    assert res.returncode == 0, res.stderr[-2000:]
    for k, v in weights(ref).items():
        assert torch.equal(v, weights(tmp_path / "other")[k])


@pytest.mark.slow
def test_sigterm_saves_stops_and_w_and_b_continues_the_same_run(tmp_path):
    """Preemption: SIGTERM -> checkpoint at the next step -> exit 3; the same command finishes the run, and
    the offline W&B run read back has every step exactly once, under one run id."""
    pytest.importorskip("wandb", reason="W&B is a dev dependency; installed by launch/test.sh")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_CACHE_DIR": str(tmp_path / "wbc"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg")}
    args = overrides(tmp_path, "run", **{"wandb.enabled": "true", "checkpoint.every_steps": 0})
    stopped = run_driver(tmp_path, args, "sigterm_at_update", 13, env=env)
    assert stopped.returncode == 3, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "stopped on request" in stopped.stdout
    resumed = run_train(args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = tmp_path / "run"
    run_id = json.loads((run_dir / "run.json").read_text())["wandb_run_id"]
    runs = sorted(glob.glob(str(run_dir / "wandb" / f"offline-run-*-{run_id}")))
    assert len(runs) == 2, runs  # one W&B run id, written in two sittings
    history = [row for r in runs for row in read_offline_run(r)["history"]]
    logged = [row["_step"] for row in history]
    assert len(logged) == len(set(logged)), "a step reached W&B twice"
    jsonl_steps = sorted({r["step"] for r in rows(run_dir)})
    assert sorted(logged) == jsonl_steps  # and none is missing
    train_loss = {r["step"]: r["loss"] for r in rows(run_dir) if r["type"] == "train"}
    for row in history:
        if "train/loss" in row:
            assert row["train/loss"] == pytest.approx(train_loss[row["_step"]])


def read_offline_run(run_dir: str) -> dict:
    """Read an offline .wandb file (LevelDB-log framing of protobuf records) with wandb's own protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(glob.glob(os.path.join(run_dir, "*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    out, pos, buf = {"history": []}, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (kind == 0 and n == 0):
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (2, 3):
            buf = chunk if kind == 2 else buf + chunk
            continue
        record = pb.Record()
        record.ParseFromString(chunk if kind == 1 else buf + chunk)
        if record.WhichOneof("record_type") == "history":
            out["history"].append({"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json)
                                   for i in record.history.item})
    return out


def test_a_pickle_is_refused_with_a_clear_message(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"w": torch.zeros(1)}, ckpt / "model.safetensors")
    with pytest.raises(TrainerError, match="pickle"):
        read_checkpoint(ckpt)
    res = run_cli("train", "-", *tiny_overrides(tmp_path, "multiclass"), "--resume", str(ckpt / "model.safetensors"))
    assert res.returncode == 2 and "pickle" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_mismatched_checkpoint_says_what_differs(reference, tmp_path):
    ckpt = sorted((reference(2) / "checkpoints").glob("step-*"))[0]  # 4-class small_cnn
    res = run_cli("train", "-", *tiny_overrides(tmp_path, "binary", **{"model.name": "small_cnn"}),
                  f"run.resume={ckpt}")
    assert res.returncode == 2, res.stderr
    assert "does not match" in res.stderr and "4 classes vs 2" in res.stderr and "task multiclass vs binary" in res.stderr


def test_rotation_keeps_last_k_best_and_the_pointer_and_a_users_file(tmp_path):
    run = Folder(tmp_path, "train", owner="run")
    root = tmp_path / "checkpoints"
    for step in (3, 6, 9, 12, 15):
        with run.replacing(f"checkpoints/step-{step:08d}") as tmp:
            (tmp / "state.json").write_text("{}")
    (root / "step-00000006" / "my_notes.txt").write_text("the user's")
    (root / ".step-00000018.tmp-123").mkdir()  # a folder named like a temporary: not the trainer's, kept
    run.write_json(f"checkpoints/{POINTER}", {"checkpoint": "step-00000009", "update": 9})
    deleted = rotate(run, keep_last=2, keep="step-00000003")
    assert sorted(deleted) == ["step-00000006"]
    assert sorted(p.name for p in root.iterdir()) == [".step-00000018.tmp-123", POINTER, "step-00000003",
                                                      "step-00000006", "step-00000009", "step-00000012",
                                                      "step-00000015"]
    assert [p.name for p in (root / "step-00000006").iterdir()] == ["my_notes.txt"]  # the checkpoint is gone
    assert "step-00000006" not in [p.name for p in checkpoint_folders(root)]  # and no longer one


def test_checkpoints_on_disk_respect_keep_last(reference):
    run = reference(2)
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    pointer = json.loads((run / "checkpoints" / POINTER).read_text())["checkpoint"]
    assert pointer == names[-1] and len(names) <= 3  # last 2 + the best
    assert json.loads((run / "checkpoints" / pointer / "state.json").read_text())["done"] is True
