"""The run directory's rules and the one atomic writer, in-process and fast (the real-process faults are in
test_faults.py)."""
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
from trainer.files import atomic_dir, atomic_write, is_pickle, load_safetensors, read_lines
from trainer.rundir import (LOCK, MARKER, STALE_AFTER_S, RunLock, check_location, clean_leftovers, is_run,
                            owned_and_foreign, remove_owned)


def a_run(folder):
    """The files a finished run leaves, plus a user's own."""
    for rel in (MARKER, "config.yaml", "run.json", "metrics.jsonl", "summary.json", "config_history/start-001.yaml",
                "model/model.safetensors", "model/model.json", "model/eval.json", "model/plots/roc_curve.png",
                "best/model.json", "plots/training_curves.png", "checkpoints/latest.json",
                "checkpoints/step-00000004/model.safetensors", "checkpoints/step-00000004/state.json",
                "checkpoints/step-00000002.corrupt/state.json", "checkpoints/.step-00000006.tmp-99/model.safetensors",
                "wandb/run-2026-abc/files/output.log", "wandb/debug.log"):
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text("x")
    (folder / "wandb" / "latest-run").symlink_to("run-2026-abc")
    mine = {"notes.txt": "mine", "model/README.md": "about", "checkpoints/keep.txt": "k",
            "checkpoints/step-00000004/comment.txt": "c", "config_history/notes.md": "n"}
    for rel, text in mine.items():
        (folder / rel).write_text(text)
    (folder / "my_empty_folder").mkdir()
    (folder / "link_to_elsewhere").symlink_to(folder.parent, target_is_directory=True)
    return mine


def test_overwrite_deletes_only_the_trainers_files_and_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mine = a_run(run)
    (run / LOCK).write_text("{}")
    deleted, kept = remove_owned(run)
    # 17 files of the run, 2 trees (an interrupted save's folder, W&B's run folder), W&B's link; not the lock
    assert deleted == 20
    for rel, text in mine.items():
        assert (run / rel).read_text() == text
    assert (run / "my_empty_folder").is_dir() and (run / "link_to_elsewhere").is_symlink()
    assert (run / LOCK).exists()  # the start doing the overwrite holds it
    assert sorted(str(p.relative_to(run)) for p in kept) == sorted([*mine, "link_to_elsewhere"])
    assert not (run / "wandb").exists() and not (run / "best").exists()  # emptied: removed
    assert (run / "model").is_dir()  # still holds the user's README


def test_owned_files_are_known_by_name_and_links_never_followed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    a_run(run)
    (tmp_path / "outside.txt").write_text("out")
    owned, foreign = owned_and_foreign(run)
    names = {str(p.relative_to(run)) for p in owned}
    assert "checkpoints/.step-00000006.tmp-99" in names  # a temporary folder: the whole tree
    assert "wandb/run-2026-abc" in names and "wandb/latest-run" in names
    assert "checkpoints/step-00000004/comment.txt" not in names
    assert all(tmp_path / "outside.txt" != p for p in owned + foreign)  # the link was not entered


def test_a_run_is_known_by_its_marker_or_an_old_run_json(tmp_path):
    assert not is_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"derived": {}}))
    assert is_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text("{}")  # someone else's run.json
    assert not is_run(other)
    (other / MARKER).write_text("{}")
    assert is_run(other)


@pytest.mark.parametrize("where, message", [
    ("/", "root"), ("HOME", "home directory"), ("CWD", "current directory"), ("CWD_PARENT", "current directory"),
    ("DATA", "lies inside"), ("DATA/sub", "lies inside"), ("ABOVE_DATA", "contains")])
def test_places_a_run_directory_may_not_be(tmp_path, monkeypatch, where, message):
    data = tmp_path / "above" / "data"
    data.mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = {"/": "/", "HOME": os.path.expanduser("~"), "CWD": ".", "CWD_PARENT": "..", "DATA": str(data),
            "DATA/sub": str(data / "sub"), "ABOVE_DATA": str(tmp_path / "above")}[where]
    with pytest.raises(TrainerError, match=message):
        check_location(path, {"data.root": data})
    check_location(tmp_path / "runs" / "x", {"data.root": data})  # beside the data: fine


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


def test_leftovers_of_killed_writes_are_cleaned_and_a_cut_swap_restored(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / ".model.tmp-7").mkdir()
    (tmp_path / ".best.old-7").mkdir()  # best/ was renamed away, the new one never arrived
    (tmp_path / ".best.old-7" / "model.json").write_text("old best")
    (tmp_path / ".metrics.jsonl.tmp-7").write_text("half")
    lines = clean_leftovers(tmp_path)
    assert (tmp_path / "best" / "model.json").read_text() == "old best" and len(lines) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "model"]


def test_atomic_write_leaves_nothing_behind_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(TrainerError, match="no space left"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_replacing_a_folder_keeps_the_files_it_does_not_write(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.json").write_text("old")
    (target / "README.md").write_text("the user's")
    with atomic_dir(target) as tmp:
        (tmp / "model.json").write_text("new")
    assert (target / "model.json").read_text() == "new" and (target / "README.md").read_text() == "the user's"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.json").write_text("newer")
            raise RuntimeError("failed half-way")
    assert (target / "model.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("fail_at", [1, 2, 3, 12, 22])  # the swap's two renames, then carrying 20 files over
@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), KeyboardInterrupt()])
def test_a_folder_swap_cut_at_any_rename_loses_none_of_the_users_files(tmp_path, monkeypatch, fail_at, error):
    """A rename refused (a folder the user cannot write, EACCES) or Ctrl-C between two renames: every file of
    the user's is in the folder or, after the next start's clean-up, back in it (they used to be removed with
    the temporary folder)."""
    run = tmp_path / "run"
    target = run / "best"
    target.mkdir(parents=True)
    (target / "model.json").write_text("old")
    notes = {f"note{i:02d}.txt": f"the user's {i}" for i in range(20)}
    for name, text in notes.items():
        (target / name).write_text(text)
    rename, calls = os.rename, []

    def flaky(src, dst):
        calls.append(src)
        if len(calls) == fail_at:
            raise error
        rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky)
    with pytest.raises((TrainerError, KeyboardInterrupt)):
        with atomic_dir(target) as tmp:
            (tmp / "model.json").write_text("new")
    monkeypatch.setattr(os, "rename", rename)
    assert len(calls) >= fail_at
    clean_leftovers(run)  # what the next start of this run does first
    assert {name: (target / name).read_text() for name in notes} == notes
    assert (target / "model.json").read_text() == ("old" if fail_at <= 2 else "new")
    assert sorted(p.name for p in run.iterdir()) == ["best"]


def test_an_old_version_beside_a_target_that_is_no_folder_is_kept_not_removed(tmp_path):
    run = tmp_path / "run"
    (run / ".best.old-123").mkdir(parents=True)
    (run / ".best.old-123" / "notes.txt").write_text("the user's")
    (run / "best").write_text("a file now")
    with pytest.raises(TrainerError, match="no longer a folder"):
        clean_leftovers(run)
    assert (run / ".best.old-123" / "notes.txt").read_text() == "the user's"


def test_a_symlinked_folder_is_replaced_as_a_link_and_what_it_points_to_is_not_emptied(tmp_path):
    deploy = tmp_path / "deploy"
    deploy.mkdir()
    (deploy / "serve.py").write_text("the user's")
    (deploy / "model.json").write_text("old")
    (tmp_path / "run").mkdir()
    target = tmp_path / "run" / "model"
    target.symlink_to(deploy)
    with atomic_dir(target) as tmp:
        (tmp / "model.json").write_text("new")
    assert not target.is_symlink() and (target / "model.json").read_text() == "new"
    assert sorted(p.name for p in deploy.iterdir()) == ["model.json", "serve.py"]
    assert (deploy / "serve.py").read_text() == "the user's" and (deploy / "model.json").read_text() == "old"


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


def test_an_overwrite_cut_half_way_still_leaves_a_run(tmp_path, monkeypatch):
    """The marker goes last: an overwrite killed mid-way leaves a folder the next start still knows as a run."""
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
        remove_owned(run)
    assert is_run(run)
