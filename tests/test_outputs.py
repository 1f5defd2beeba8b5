"""The write gate (trainer/outputs.py), in-process: its rules one by one. The commands end to end, against every
kind of collision, are in test_faults.py (the collision table)."""
from __future__ import annotations

import ast
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.errors import TrainerError
from trainer.outputs import (LEDGER, Folder, Inputs, Ledger, open_folder, output_file)

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict:
    """Every file and link below root (links not followed) with its bytes or target."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def users(root: Path, files: dict) -> dict:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return files


def unchanged_files(root: Path, files: dict) -> bool:
    return all((root / rel).read_text() == text for rel, text in files.items())


# ---- rule 1: inputs ----

def test_an_input_is_found_through_links_and_relative_paths(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    inputs = Inputs([("data.root", "data")])
    assert inputs.hit(tmp_path / "link" / "cat" / "x.csv") == ("data.root", "data")
    assert inputs.hit(tmp_path / "data") is not None
    assert inputs.hit(tmp_path / "data2" / "x") is None  # a sibling whose name starts the same is not inside
    with pytest.raises(TrainerError, match="lies inside data.root data"):
        output_file(tmp_path / "link" / "cat" / "preds.csv", "predict", "--output", inputs, overwrite=True)


# ---- rules 2 and 3: only the trainer's own files are replaced ----

def test_a_file_written_is_replaced_by_the_next_write_and_a_users_file_never(tmp_path):
    out = Folder(tmp_path / "out", "eval")
    out.write("eval.json", "{}")
    out.write("eval.json", '{"a": 1}')  # a rerun replaces its own
    assert (tmp_path / "out" / "eval.json").read_text() == '{"a": 1}'
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(TrainerError, match="notes.txt was not written by the trainer"):
        out.write("notes.txt", "x")
    (tmp_path / "out" / "eval.json").write_text('{"a": 1, "mine": true}')  # edited by hand: the user's now
    with pytest.raises(TrainerError, match="eval.json was not written by the trainer"):
        Folder(tmp_path / "out", "eval").write("eval.json", "{}")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "out" / "eval.json").read_text() == '{"a": 1, "mine": true}'


def test_a_copy_without_its_times_is_still_the_trainers(tmp_path):
    out = Folder(tmp_path / "a", "eval")
    out.write("eval.json", "{}")
    subprocess.run(["cp", "-r", str(tmp_path / "a"), str(tmp_path / "b")], check=True)  # new times, same bytes
    os.utime(tmp_path / "b" / "eval.json", ns=(1, 1))
    assert Folder(tmp_path / "b", "eval").owns("eval.json")


def test_a_single_output_file_of_the_user_needs_overwrite_and_an_input_is_never_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mytable.csv").write_text("the user's")
    with pytest.raises(TrainerError, match=r"mytable.csv was not written by the trainer.*--overwrite"):
        output_file(tmp_path / "out" / "mytable.csv", "predict", "--output")
    folder, name = output_file(tmp_path / "out" / "mytable.csv", "predict", "--output", overwrite=True)
    folder.write(name, "path,label\n")
    assert (tmp_path / "out" / "mytable.csv").read_text() == "path,label\n"
    folder, name = output_file(tmp_path / "out" / "mytable.csv", "predict", "--output")  # ours now: no flag needed
    listing = tmp_path / "out" / "list.txt"
    listing.write_text("a.png\n")
    with pytest.raises(TrainerError, match="is list file"):
        output_file(listing, "predict", "--output", Inputs([("list file", listing)]), overwrite=True)
    assert listing.read_text() == "a.png\n"


def test_links_are_never_written_through_nor_replaced(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "figure.png").write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / "plots").symlink_to(elsewhere, target_is_directory=True)
    (run / "summary.json").symlink_to(elsewhere / "figure.png")
    out = Folder(run, "train")
    with pytest.raises(TrainerError, match="plots is a link"):
        out.write("plots/training_curves.png", b"png")
    with pytest.raises(TrainerError, match="summary.json is a link"):
        out.write("summary.json", "{}")
    with pytest.raises(TrainerError, match="plots is a link"):
        with out.replacing("plots"):
            pass
    assert tree(elsewhere) == {"figure.png": b"mine"} and (run / "plots").is_symlink()
    # the folder named itself may be a link: the user chose it (runs/ on a scratch file system)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "named").symlink_to(tmp_path / "scratch", target_is_directory=True)
    Folder(tmp_path / "named", "train").write("a.json", "{}")
    assert (tmp_path / "scratch" / "a.json").is_file()


def test_a_failed_write_leaves_neither_a_temporary_nor_a_record(tmp_path, monkeypatch):
    out = Folder(tmp_path, "eval")
    out.write("eval.json", "old")
    real = os.replace

    def fail(src, dst):
        if str(dst).endswith("eval.json"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(TrainerError, match="no space left"):
        out.write("eval.json", "new")
    monkeypatch.setattr(os, "replace", real)
    assert (tmp_path / "eval.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "eval.json"]
    assert Ledger.read(tmp_path).pending == {}


# ---- staging and replacing folders ----

def test_staged_files_are_all_checked_before_any_is_placed(tmp_path):
    out = Folder(tmp_path, "eval")
    out.write("plots/roc_curve.png", b"old")
    (tmp_path / "plots" / "confusion_matrix.png").write_text("the user's")
    with pytest.raises(TrainerError, match="confusion_matrix.png was not written"):
        with out.staged() as stage:
            (stage / "plots").mkdir()
            for name in ("roc_curve.png", "confusion_matrix.png"):
                (stage / "plots" / name).write_bytes(b"new")
    assert (tmp_path / "plots" / "roc_curve.png").read_bytes() == b"old"  # nothing placed
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "plots"]  # the stage is gone
    with out.staged(stale=["plots/roc_curve.png", "plots/confusion_matrix.png"]) as stage:
        (stage / "eval.json").write_text("{}")
    assert not (tmp_path / "plots" / "roc_curve.png").exists()  # ours, not written this time: stale
    assert (tmp_path / "plots" / "confusion_matrix.png").read_text() == "the user's"


def test_replacing_a_folder_keeps_the_users_files_at_any_depth(tmp_path):
    run = Folder(tmp_path, "train", owner="run")
    with run.replacing("model") as tmp:
        (tmp / "plots").mkdir()
        (tmp / "model.json").write_text("v1")
        (tmp / "plots" / "roc_curve.png").write_text("v1")
    mine = users(tmp_path, {"model/my_notes.txt": "notes", "model/plots/my_plot.png": "plot",
                            "model/deep/er/file.txt": "deep"})
    with run.replacing("model") as tmp:
        (tmp / "plots").mkdir()
        (tmp / "model.json").write_text("v2")
        (tmp / "plots" / "pr_curve.png").write_text("v2")
    assert unchanged_files(tmp_path, mine)
    assert (tmp_path / "model" / "model.json").read_text() == "v2"
    assert not (tmp_path / "model" / "plots" / "roc_curve.png").exists()  # the trainer's old plot, not redrawn
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "model"]
    # a user's file at a name the new version has: refused before anything moves
    (tmp_path / "model" / "model.json").write_text("the user's")
    with pytest.raises(TrainerError, match="model.json was not written by the trainer"):
        with run.replacing("model") as tmp:
            (tmp / "model.json").write_text("v3")
    assert (tmp_path / "model" / "model.json").read_text() == "the user's" and unchanged_files(tmp_path, mine)


def _swap_script(root: Path, text: str, nth: int, at_rename: str) -> str:
    """A child process's script: replace root/model/ with a model.json holding `text`, running the statement
    `at_rename` right after its `nth` rename."""
    return f"""
import os, sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from trainer.outputs import Folder
renames = []
real = os.rename
def rename(a, b):
    real(a, b)
    renames.append(b)
    if len(renames) == {nth}:
        {at_rename}
os.rename = rename
with Folder(Path({str(root)!r}), "train", owner="run").replacing("model") as tmp:
    (tmp / "model.json").write_text({text!r})
"""


@pytest.mark.parametrize("cut_after", [1, 2])
def test_a_swap_killed_between_or_after_its_renames_is_finished_by_the_next_writer(tmp_path, cut_after):
    """A child process replaces model/ and is killed after its first or second rename; the next command's
    clean-up restores the old version or finishes the new one, and every user file is there."""
    run = Folder(tmp_path, "train", owner="run")
    with run.replacing("model") as tmp:
        (tmp / "model.json").write_text("v1")
    mine = users(tmp_path, {"model/plots/my_plot.png": "plot", "model/notes.txt": "n"})
    res = subprocess.run([sys.executable, "-c", _swap_script(tmp_path, "v2", cut_after, "os.kill(os.getpid(), 9)")])
    assert res.returncode == -signal.SIGKILL
    lines = Folder(tmp_path, "train", owner="run").clean_leftovers()
    assert len(lines) == 1
    assert (tmp_path / "model" / "model.json").read_text() == ("v1" if cut_after == 1 else "v2")
    assert unchanged_files(tmp_path, mine)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "model"]  # no temporary left
    assert Folder(tmp_path, "train", owner="run").owns("model/model.json")


def test_a_second_process_replacing_a_folder_mid_swap_waits_for_the_swap_and_succeeds(tmp_path):
    """Sweep tasks on several nodes may draw one generated dataset at once (ensure_generated): a child stops for
    2 s right after renaming its new model/ into place; the parent replacing model/ meanwhile must not take the
    child's files for a user's (in place but not yet recorded), and both end well."""
    flag = tmp_path / "swapped"
    out = tmp_path / "out"
    pause = f"Path({str(flag)!r}).write_text(''); time.sleep(2)"
    child = subprocess.Popen([sys.executable, "-c", _swap_script(out, "child", 1, pause)])
    try:
        for _ in range(3000):
            if flag.exists() or child.poll() is not None:
                break
            time.sleep(0.01)
        assert flag.exists(), "the child never swapped"
        with Folder(out, "train", owner="run").replacing("model") as tmp:
            (tmp / "model.json").write_text("parent")
        assert child.wait(60) == 0
    finally:
        child.kill()
    assert (out / "model" / "model.json").read_text() == "parent"
    assert Folder(out, "train", owner="run").owns("model/model.json")
    assert sorted(p.name for p in out.iterdir()) == [LEDGER, "model"]  # no temporary left


def test_a_temporary_is_removed_only_once_its_process_is_gone_and_a_lookalike_never(tmp_path):
    out = Folder(tmp_path, "eval")
    out.write("eval.json", "{}")
    (tmp_path / ".eval.json.tmp-99999-abcd").write_text("the user's, named like a temporary")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ledger = Ledger.read(tmp_path)
        ledger.pending = {".a.tmp-1-x": {"host": os.uname().nodename, "pid": sleeper.pid, "proc_start": None},
                          ".b.tmp-2-y": {"host": os.uname().nodename, "pid": 2 ** 22 + 7, "proc_start": None}}
        ledger.save(tmp_path)
        for name in ledger.pending:
            (tmp_path / name).write_text("ours")
        Folder(tmp_path, "eval").clean_leftovers()
        assert (tmp_path / ".a.tmp-1-x").exists() and not (tmp_path / ".b.tmp-2-y").exists()
        assert (tmp_path / ".eval.json.tmp-99999-abcd").read_text() == "the user's, named like a temporary"
    finally:
        sleeper.kill()


def test_removing_a_tree_deletes_only_the_trainers_files_and_empty_folders(tmp_path):
    run = Folder(tmp_path, "train", owner="run")
    with run.replacing("checkpoints/step-00000008") as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "state.json").write_text("{}")
    run.write("plots/training_curves.png", b"png")
    (tmp_path / "wandb" / "run-2026-abc" / "files").mkdir(parents=True)
    (tmp_path / "wandb" / "run-2026-abc" / "files" / "output.log").write_text("W&B's")
    (tmp_path / "wandb" / "latest-run").symlink_to("run-2026-abc")
    mine = users(tmp_path, {"plots/my_figure.png": "fig", "checkpoints/step-00000008/my_extra.safetensors": "e",
                            "checkpoints/step-00000006-mybackup/model.safetensors": "b", "notes.txt": "n"})
    deleted, kept = run.remove_tree()
    assert deleted == 5  # 3 files, W&B's run folder and its link
    assert sorted(kept) == sorted(mine)
    assert unchanged_files(tmp_path, mine)
    assert not (tmp_path / "wandb").exists() or not any((tmp_path / "wandb").iterdir())



def test_the_loggers_folders_are_the_runs_own_and_a_users_file_beside_them_stays(tmp_path):
    """tracking.log_with's libraries write for the run (outputs.LIVE_TREES): TensorBoard's event files, MLflow's
    file store, Comet's offline archives. An overwrite removes them; a user's file in those folders is kept."""
    run = Folder(tmp_path, "train", owner="run")
    written = {"tensorboard/events.out.tfevents.1796510268.vm.19804.0": "events",
               "mlflow/0/meta.yaml": "default experiment", "mlflow/98950568/meta.yaml": "experiment",
               "mlflow/98950568/22cbe533/metrics/train/loss": "1 0.5 2", "mlflow/98950568/22cbe533/params/seed": "0",
               "comet_ml/91c468627ff9418595786c40f1058ffe-gNZqIT.zip": "archive"}
    for rel, text in written.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "mlflow" / ".trash").mkdir()
    run.write("config.yaml", "the run's")  # the folder claimed as a run: its ledger names the owner
    assert all(run.owns(rel) for rel in written), [rel for rel in written if not run.owns(rel)]
    mine = users(tmp_path, {"tensorboard/my_notes.txt": "n", "mlflow/my_notes.txt": "m",
                            "comet_ml/my_notes.txt": "c"})
    assert not any(run.owns(rel) for rel in mine)
    deleted, kept = run.remove_tree()
    assert deleted == 5  # config.yaml, the event file, the two experiments' folders, the archive
    # an empty folder is no file: left, like W&B's empty wandb/ (MLflow's store reuses it)
    assert sorted(p.name for p in (tmp_path / "mlflow").iterdir()) == [".trash", "my_notes.txt"]
    assert sorted(kept) == sorted(mine)
    assert unchanged_files(tmp_path, mine)


# ---- rule 4: a folder named as an output ----

def test_an_output_folder_must_be_new_empty_or_the_same_commands(tmp_path):
    (tmp_path / "mysweep").mkdir()
    (tmp_path / "mysweep" / "sweep.json").write_text("the user's")
    with pytest.raises(TrainerError, match="not a sweep folder"):
        open_folder(tmp_path / "mysweep", "sweep", "sweep", "--dir")
    (tmp_path / "empty").mkdir()
    open_folder(tmp_path / "empty", "sweep", "sweep", "--dir").write("tasks.json", "[]")
    open_folder(tmp_path / "empty", "sweep", "sweep", "--dir")  # its own: reopened
    with pytest.raises(TrainerError, match="holds sweep outputs"):
        open_folder(tmp_path / "empty", "tune", "tune", "--dir")
    with pytest.raises(TrainerError, match="lies inside data.root"):
        open_folder(tmp_path / "data" / "sw", "sweep", "sweep", "--dir", Inputs([("data.root", tmp_path / "data")]))


def test_a_run_written_before_ledgers_is_adopted_by_the_names_of_that_time(tmp_path):
    for rel in (".cnn-trainer-run", "config.yaml", "model/model.json", "checkpoints/step-00000002/state.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    (tmp_path / "notes.txt").write_text("mine")
    run = open_folder(tmp_path, "run", "train", "run.dir")
    assert run.owns("config.yaml") and run.owns("checkpoints/step-00000002/state.json")
    assert not run.owns("notes.txt")


# ---- two writers at once ----

def _write_many(root: str, prefix: str) -> None:
    out = Folder(Path(root), "predict")
    for i in range(40):
        out.write(f"{prefix}{i}.txt", "x")


def test_two_commands_writing_into_one_folder_keep_each_others_records(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(tmp_path), p)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(Ledger.read(tmp_path).files) == 80



def _take_and_hold(lock_path: str, log: str, start: float) -> None:
    from trainer.outputs import LOCK_WAIT_S, LockFile
    while time.time() < start:  # every taker at the dead holder's lock at once
        pass
    lock = LockFile(Path(lock_path), LOCK_WAIT_S)
    while lock.try_acquire() is not None:
        time.sleep(0.001)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"+")
    time.sleep(0.005)
    os.write(fd, b"-")
    os.close(fd)
    lock.release()


def test_takers_of_a_killed_holders_lock_never_hold_it_two_at_once(tmp_path):
    """Six processes find the ledger's lock of a killed holder at the same instant: each judges it stale, and
    one breaking it must never remove the lock another taker took meanwhile (which gave two holders at once:
    lost records, a torn ledger). Each holder logs + on entry and - on leaving: never two + in a row."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    lock, log = tmp_path / "x.lock", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    overlaps = 0
    for _ in range(25):
        lock.write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}, "proc_start": "1", "token": "d"}}')
        log.write_text("")
        start = time.time() + 0.05
        procs = [ctx.Process(target=_take_and_hold, args=(str(lock), str(log), start)) for _ in range(6)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(60)
        assert [proc.exitcode for proc in procs] == [0] * 6
        overlaps += "++" in log.read_text()
        assert log.read_text().count("+") == 6
    assert overlaps == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # no lock and no break file left



_HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import trainer.outputs as outputs
outputs.LOCK_BEAT_S = 0.2
with outputs._ledger_locked(Path({folder!r})):
    Path({flag!r}).write_text("")
    time.sleep(4)
"""


def test_a_long_hold_of_a_ledger_stays_live_and_a_stuck_one_is_named(tmp_path, monkeypatch):
    """A holder placing a million files holds the ledger for about a minute: its heartbeat keeps the lock fresh,
    so a writer on another host waits for it instead of breaking it as a dead holder's (here: a 4 s hold, locks
    stale after 1.5 s, refreshed every 0.2 s). A holder that stops (SIGSTOP) stops refreshing, and a writer here
    says so in one line."""
    import trainer.outputs as outputs
    monkeypatch.setattr(outputs, "LOCK_WAIT_S", 1.5)

    def hold():
        flag = tmp_path / "held"
        flag.unlink(missing_ok=True)
        child = subprocess.Popen([sys.executable, "-c", _HOLD.format(root=str(ROOT), folder=str(tmp_path),
                                                                     flag=str(flag))])
        while not flag.exists():
            assert child.poll() is None, "the holder ended before it held the lock"
            time.sleep(0.01)
        return child

    child = hold()
    with monkeypatch.context() as other_host:
        other_host.setattr(outputs.socket, "gethostname", lambda: "another-node")
        start = time.time()
        with outputs._ledger_locked(tmp_path):
            waited = time.time() - start
    assert child.wait(30) == 0
    assert waited > 3, "the live holder's lock was broken as stale"
    child = hold()
    try:
        child.send_signal(signal.SIGSTOP)
        with pytest.raises(TrainerError, match=f"process {child.pid} .* has not refreshed it for over 2 s"):
            with outputs._ledger_locked(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGCONT)
        child.wait(30)

_KILL_AT_PLACING = """
import os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import trainer.outputs as outputs
real = os.replace
def replace(a, b):  # killed right before or right after the rename that places a file
    if not str(b).endswith(outputs.LEDGER) and {before}:
        os.kill(os.getpid(), 9)
    real(a, b)
    if not str(b).endswith(outputs.LEDGER):
        os.kill(os.getpid(), 9)
os.replace = replace
out = outputs.Folder(Path({folder!r}), "predict")
if {staged}:
    with out.staged() as stage:
        for name in ("a.png", "b.png"):
            (stage / name).write_text("v2")
else:
    out.write("a.png", "v2")
"""


@pytest.mark.parametrize("staged", [False, True], ids=["write", "staged"])
@pytest.mark.parametrize("before", [True, False], ids=["before-rename", "after-rename"])
def test_a_kill_at_a_placing_rename_leaves_the_file_the_trainers_on_either_side(tmp_path, staged, before):
    """Preempted by SIGKILL as a new version lands: whichever version the file holds, the rerun replaces it as
    its own (it was taken for a user's when killed after the rename, before the ledger's save)."""
    Folder(tmp_path, "predict").write("a.png", "v1")
    script = _KILL_AT_PLACING.format(root=str(ROOT), folder=str(tmp_path), staged=staged, before=before)
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert (tmp_path / "a.png").read_text() == ("v1" if before else "v2")
    rerun = Folder(tmp_path, "predict")
    rerun.clean_leftovers()
    assert rerun.owns("a.png")
    rerun.write("a.png", "v3")
    assert (tmp_path / "a.png").read_text() == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "a.png"]  # the temporaries went


def test_replacing_refuses_a_target_that_became_a_link_or_a_file_while_it_was_written(tmp_path):
    """The user puts a link to their own folder (or a file) where model/ was, while its new version is being
    written: the swap is refused, and nothing of theirs moves (it used to empty the linked folder into the run)."""
    mine = tmp_path / "my_models"
    users(mine, {"weights.bin": "w", "sub/notes.txt": "n"})
    run = Folder(tmp_path / "run", "train", owner="run")
    with run.replacing("model") as tmp:
        (tmp / "model.json").write_text("v1")
    with pytest.raises(TrainerError, match="is a link"):
        with run.replacing("model") as tmp:
            (tmp / "model.json").write_text("v2")
            subprocess.run(["rm", "-r", str(tmp_path / "run" / "model")], check=True)
            (tmp_path / "run" / "model").symlink_to(mine)
    assert tree(mine) == {"sub/notes.txt": b"n", "weights.bin": b"w"}
    (tmp_path / "run" / "model").unlink()
    with pytest.raises(TrainerError, match="is a file where a folder goes"):
        with run.replacing("model") as tmp:
            (tmp / "model.json").write_text("v3")
            (tmp_path / "run" / "model").write_text("the user's")
    assert (tmp_path / "run" / "model").read_text() == "the user's"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LEDGER, "model"]  # no temporary left


def test_another_hosts_staging_folder_is_live_while_anything_below_it_changes(tmp_path, monkeypatch):
    """A predict on another node fills its staging folder's sub-folders for over an hour (the folder's own
    time then stays old): a writer here must not take it for a dead one's and delete it; once nothing below
    it has changed for an hour, it is removed."""
    out = Folder(tmp_path, "predict")
    out.write("x.txt", "x")
    ledger = Ledger.read(tmp_path)
    stage = ".stage.cnn-trainer-stage-1-abcd"
    ledger.pending[stage] = {"host": "another-node", "pid": 1, "proc_start": None}
    ledger.save(tmp_path)
    users(tmp_path / stage, {"cls/img0.png": "p"})
    hour_ago = time.time() - 7200
    os.utime(tmp_path / stage, (hour_ago, hour_ago))
    Folder(tmp_path, "predict").clean_leftovers()
    assert (tmp_path / stage / "cls" / "img0.png").exists()
    for path in [tmp_path / stage / "cls" / "img0.png", tmp_path / stage / "cls", tmp_path / stage]:
        os.utime(path, (hour_ago, hour_ago))
    Folder(tmp_path, "predict").clean_leftovers()
    assert not (tmp_path / stage).exists()

# ---- one gate: nothing else writes ----

# The calls that write, rename or delete files. Outside the gate (and files.py's primitives it calls) each
# use in trainer/ and bench/ must be listed below with why it is safe: a new writer anywhere else fails this
# test. Calls on the gate's own objects (a `Folder` held as `out`, `folder`, ...) are the gate. `save` is PIL's,
# torch's (and the ledger's, inside the gate); `extractall` a tarball's.
WRITERS = {"write_text", "write_bytes", "unlink", "rmtree", "rmdir", "rename", "mkdir", "makedirs", "savefig",
           "save_file", "symlink_to", "touch", "utime", "copyfile", "copytree", "remove", "symlink", "link", "save",
           "extractall"}
OS_ONLY = {"replace", "copy", "move", "copy2"}  # names too common to flag unless called on os or shutil
GATE_RECEIVERS = {"out", "self.out", "plan.out", "folder", "self.files", "ctx.out_folder"}
STAGING = "writes only into a staging folder the gate made (Folder.staged / Folder.replacing), which it places"
MADE_ONCE = STAGING + " (bench/gate.py's made_once)"
IN_MEMORY = "PIL's save into memory (a BytesIO)"
# bench/peers.py and bench/gpu_check.py run in a work folder of their own: a tempfile.TemporaryDirectory, or the
# --work named, which they refuse unless it is new or empty, so nothing in it is anyone else's
WORK = "into the run's own work folder (a tempfile.TemporaryDirectory, or a --work refused unless new or empty)"
ALLOWED = {
    # (file, function): why
    ("trainer/files.py", "*"): "the primitives the gate calls",
    ("trainer/outputs.py", "*"): "the gate",
    ("trainer/checkpoint.py", "write_checkpoint"): STAGING,
    ("trainer/export.py", "write_model"): STAGING,
    ("trainer/evaluation.py", "write_best_report"): STAGING + " (best/'s weights and model.json, copied as they are)",
    ("trainer/onnx_export.py", "export_onnx"): STAGING,
    ("trainer/tasks/classify_reports.py", "write_eval_report"): STAGING,
    ("trainer/reports.py", "start_report"): STAGING,
    ("trainer/reports.py", "figure_png"): "savefig into memory (a BytesIO)",
    ("trainer/reports.py", "png_bytes"): IN_MEMORY,
    ("trainer/reports.py", "save_figure"): STAGING,
    ("trainer/reports.py", "save_pixels"): STAGING,
    ("trainer/tasks/segment_reports.py", "write_segmentation_report"): STAGING,
    ("trainer/tasks/detect_reports.py", "write_detection_report"): STAGING,
    ("trainer/tasks/detect_reports.py", "draw_boxes"): STAGING + " (predict's PredictionFolder)",
    ("trainer/prediction_files.py", "path"): STAGING + " (predict's PredictionFolder)",
    ("trainer/data/generated.py", "_write_segmentation"): STAGING + " (ensure_generated)",
    ("trainer/data/generated.py", "_write_variant"): STAGING + " (ensure_generated)",
    ("trainer/data/generated.py", "ensure_generated"): STAGING,
    ("trainer/data/generated.py", "write_generated_coco"): STAGING + " (ensure_generated)",
    ("trainer/data/generated.py", "write_generated_multilabel"): STAGING + " (ensure_generated)",
    ("trainer/tune.py", "_plots"): STAGING,
    ("trainer/rundir.py", "_beat"): "the run lock's heartbeat: the lock file is the run's own (outputs.LIVE)",
    ("trainer/data/order.py", "line"): "the test-only sample trace: a file the test names in TRAINER_SAMPLE_TRACE, "
                                       "appended, never a run's output (off unless that variable is set)",
    ("trainer/tasks/segment_reports.py", "write_png"): STAGING + " (predict's PredictionFolder)",
    # ---- bench/: results, logs and data folders go through bench/gate.py; these are what is left ----
    ("bench/gate.py", "made_once"): STAGING + " (the marker, into Folder.replacing's staging folder)",
    ("bench/ablation.py", "extract"): MADE_ONCE,
    ("bench/ablation.py", "draw"): MADE_ONCE,
    ("bench/airbench_side_by_side.py", "draw"): MADE_ONCE,
    ("bench/scaled_decode_accuracy.py", "draw"): MADE_ONCE,
    ("bench/data_scale.py", "write_class"): MADE_ONCE,
    ("bench/dense_shards.py", "draw_dense"): MADE_ONCE,
    ("bench/unet_study.py", "draw_digits"): MADE_ONCE,
    ("bench/vs_reference.py", "draw_voc"): MADE_ONCE,
    ("bench/vs_reference.py", "draw_coco"): MADE_ONCE,
    ("bench/data_scale.py", "noisy_jpegs"): IN_MEMORY,
    ("trainer/data/shards.py", "_shrunk"): IN_MEMORY,
    ("trainer/data/shards.py", "_shrunk_mask"): IN_MEMORY,
    ("bench/dense_shards.py", "_mask_png"): IN_MEMORY,
    ("bench/data_scale.py", "first_step"): "into a tempfile.mkdtemp folder main made for this measurement and removes",
    ("bench/data_scale.py", "main"): "removes the tempfile.mkdtemp folders it made",
    ("bench/dense_shards.py", "main"): "removes the tempfile.mkdtemp folder it made",
    ("bench/input_pipeline.py", "make_photos"): "into a tempfile.TemporaryDirectory main made and removes",
    ("bench/checkpoint_io.py", "drop_page_cache"): "/proc/sys/vm/drop_caches: a kernel setting, not a file (root only)",
    ("bench/peers.py", "main"): WORK + ": makes it",
    ("bench/peers.py", "make_synthetic"): WORK,
    ("bench/peers.py", "build_views"): WORK + "; symlinks, which the gate never makes",
    ("bench/gpu_check.py", "main"): WORK + ": makes it",
    ("bench/gpu_check.py", "fake_cifar_tars"): WORK,
    ("bench/gpu_check.py", "cifar_root"): WORK + "; symlinks, which the gate never makes",
}


def _outside_functions(node):
    """The nodes below `node` that no function holds: a script's top-level lines write as well."""
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
            yield from _outside_functions(child)


def _writes(path: Path):
    """(function, call, line) of each write, named by the innermost function holding it (a write in a nested
    function is that function's alone); "<module>" for one outside every function."""
    tree_ = ast.parse(path.read_text())
    scopes = [(func.name, _outside_functions(func)) for func in ast.walk(tree_)
              if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))] + [("<module>", _outside_functions(tree_))]
    for scope, nodes in scopes:
        for node in nodes:
            if isinstance(node, ast.Call):
                receiver = ast.unparse(node.func.value) if isinstance(node.func, ast.Attribute) else ""
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None) or next(
                    (k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)), None)
                if receiver in GATE_RECEIVERS:
                    continue
                if name in WRITERS or (name in OS_ONLY and receiver in ("os", "shutil")) or (
                        name in ("open", "fdopen") and isinstance(mode, str) and set(mode) & set("wax+")):
                    yield scope, name, node.lineno


def test_every_write_outside_the_gate_is_listed_with_its_reason():
    unlisted = []
    for path in sorted([*(ROOT / "trainer").rglob("*.py"), *(ROOT / "bench").glob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for func, call, line in _writes(path):
            if (rel, "*") not in ALLOWED and (rel, func) not in ALLOWED:
                unlisted.append(f"{rel}:{line} {func}() calls {call}")
    assert not unlisted, "writes outside trainer/outputs.py:\n" + "\n".join(sorted(set(unlisted)))
    stale = [key for key in ALLOWED if key[1] != "*" and not any(
        func == key[1] for func, _, _ in _writes(ROOT / key[0]))]
    assert not stale, f"allowed, but they write nothing (any more): {stale}"
