"""The run directory's rules, in-process and fast (the real-process faults are in test_faults.py; the write gate's
own rules in test_outputs.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

from trainer.errors import TrainerError
from trainer.files import is_pickle, load_safetensors, read_lines
from trainer.outputs import LEDGER, Inputs
from trainer.rundir import LOCK, MARKER, STALE_AFTER_S, RunLock, check_location, is_run, run_folder


def a_run(folder):
    """The files a finished run leaves (written through the gate), plus a user's own, some inside the trainer's
    folders and some named like the trainer's files."""
    out = run_folder(folder)
    out.claim()
    for rel in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "config_history/start-001.yaml",
                "plots/training_curves.png", "checkpoints/latest.json"):
        out.write(rel, "x")
    for sub in ("model", "best", "checkpoints/step-00000004", "checkpoints/step-00000008"):
        with out.replacing(sub) as tmp:
            for name in ("model.safetensors", "model.json" if "step" not in sub else "state.json"):
                (tmp / name).write_text("x")
            (tmp / "plots").mkdir()
            (tmp / "plots" / "roc_curve.png").write_text("x")
    out.move("checkpoints/step-00000008", "checkpoints/step-00000008.corrupt")
    (folder / "wandb" / "run-2026-abc" / "files").mkdir(parents=True)
    (folder / "wandb" / "run-2026-abc" / "files" / "output.log").write_text("W&B's")
    (folder / "wandb" / "latest-run").symlink_to("run-2026-abc")
    mine = {"notes.txt": "mine", "model/README.md": "about", "model/plots/my_plot.png": "plot",
            "plots/my_figure.png": "fig", "checkpoints/keep.txt": "k", "config_history/my_experiment.yaml": "e",
            "checkpoints/step-00000004/my_extra.safetensors": "extra",
            "checkpoints/step-00000006-mybackup/model.safetensors": "backup",
            "checkpoints/step-00000006-mybackup/state.json": "backup"}
    for rel, text in mine.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    (folder / "my_empty_folder").mkdir()
    (folder / "link_to_elsewhere").symlink_to(folder.parent, target_is_directory=True)
    return mine


def test_overwrite_deletes_only_the_trainers_files_and_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = a_run(run)
    (run / LOCK).write_text("{}")
    deleted, kept = run_folder(run).remove_tree(spare=(LOCK,))
    # 7 files, 3 x 3 in model/ best/ and a checkpoint, 3 in the damaged one; W&B's run folder and its link
    assert deleted == 7 + 9 + 3 + 2
    for rel, text in mine.items():
        assert (run / rel).read_text() == text
    assert (run / "my_empty_folder").is_dir() and (run / "link_to_elsewhere").is_symlink()
    assert (run / LOCK).exists()  # the start doing the overwrite holds it
    assert sorted(kept) == sorted([*mine, "link_to_elsewhere"])
    assert not (run / "best").exists() and not (run / "checkpoints" / "step-00000008.corrupt").exists()
    assert (run / "model" / "plots").is_dir()  # still holds the user's plot
    assert is_run(run)  # the ledger stays: still a run, which a new start fills again


def test_an_overwrite_cut_half_way_still_leaves_a_run(tmp_path, monkeypatch):
    """The ledger is never removed by an overwrite: one killed mid-way leaves a folder the next start still
    knows as a run, with a record of what is left of the trainer's files."""
    run = tmp_path / "run"
    run.mkdir()
    a_run(run)
    calls = {"n": 0}
    real_unlink = type(run).unlink

    def unlink(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as a kill would stop it
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(type(run), "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        run_folder(run).remove_tree(spare=(LOCK,))
    monkeypatch.undo()
    assert is_run(run)
    assert run_folder(run).owns("model/model.json")


def test_a_run_is_known_by_its_ledger_its_old_marker_or_an_old_run_json(tmp_path):
    assert not is_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"derived": {}}))
    assert is_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text("{}")  # someone else's run.json
    assert not is_run(other)
    (other / MARKER).write_text("{}")
    assert is_run(other)
    new = tmp_path / "new"
    run_folder(new).claim()
    assert is_run(new) and sorted(p.name for p in new.iterdir()) == [LEDGER]


def test_a_run_written_before_ledgers_keeps_the_users_files_on_overwrite(tmp_path):
    run = tmp_path / "run"
    for rel in (MARKER, "config.yaml", "model/model.json", "checkpoints/step-00000004/state.json"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    (run / "model" / "README.md").write_text("the user's")
    deleted, kept = run_folder(run).remove_tree(spare=(LOCK,))
    assert deleted == 4 and kept == ["model/README.md"]


@pytest.mark.parametrize("where, message", [
    ("/", "root"), ("HOME", "home directory"), ("CWD", "current directory"), ("CWD_PARENT", "current directory"),
    ("DATA", "lies inside"), ("DATA/sub", "lies inside"), ("ABOVE_DATA", "contains"), ("COCO_IMAGES", "lies inside")])
def test_places_a_run_directory_may_not_be(tmp_path, monkeypatch, where, message):
    data = tmp_path / "above" / "data"
    data.mkdir(parents=True)
    images = tmp_path / "coco" / "train2017"
    images.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = {"/": "/", "HOME": os.path.expanduser("~"), "CWD": ".", "CWD_PARENT": "..", "DATA": str(data),
            "DATA/sub": str(data / "sub"), "ABOVE_DATA": str(tmp_path / "above"), "COCO_IMAGES": str(images / "run")}[where]
    inputs = Inputs([("data.root", data), ("data.coco_files.train.images", images)])
    with pytest.raises(TrainerError, match=message):
        check_location(path, inputs)
    check_location(tmp_path / "runs" / "x", inputs)  # beside the data: fine


def test_the_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    held = json.loads((tmp_path / LOCK).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(TrainerError, match="in use by another training"):
        RunLock(tmp_path).acquire()
    first.release()
    assert not (tmp_path / LOCK).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": int(gone.stdout)}))
    second = RunLock(tmp_path)
    second.acquire()  # its holder has exited: stale
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    second.release()


def test_a_lock_from_another_host_is_stale_only_without_a_heartbeat(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(TrainerError, match="host elsewhere"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 10
    os.utime(lock, (old, old))
    taker = RunLock(tmp_path)
    taker.acquire()
    taker.release()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "proc_start": "1"}))
    lock = RunLock(tmp_path)
    lock.acquire()  # this pid is alive, but started at another time: another process had it
    lock.release()


def test_a_users_text_file_is_read_as_utf8_and_anything_else_is_one_line(tmp_path):
    listing = tmp_path / "classes.txt"
    listing.write_bytes("\ufeffbackground\r\n\n  leaf \n".encode("utf-8"))  # Notepad: a BOM, CRLF
    assert read_lines(listing, "class list") == ["background", "leaf"]
    listing.write_text("background\nleaf\n", encoding="utf-16")  # PowerShell's `>`
    with pytest.raises(TrainerError, match=r"class list .*classes.txt is not UTF-8 text \(byte 0xff at offset 0\)"):
        read_lines(listing, "class list")


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_not_a_pickle(tmp_path):
    """The low byte of a safetensors header length can be 0x80, the pickle magic: 1 in 256 good files."""
    for n in range(1, 400):
        path = tmp_path / "w.safetensors"
        save_file({"w" * n: torch.zeros(1)}, str(path))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length with a 0x80 low byte found")
    assert not is_pickle(path)
    assert list(load_safetensors(path, "weights")) == ["w" * n]
    torch.save({"w": torch.zeros(1)}, tmp_path / "p.safetensors")
    assert is_pickle(tmp_path / "p.safetensors")
    with pytest.raises(TrainerError, match="pickle"):
        load_safetensors(tmp_path / "p.safetensors", "weights")


