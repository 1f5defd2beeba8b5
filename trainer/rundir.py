"""The run directory as one concept: where it may be, which files in it are the trainer's, who is using it,
and what state it is in.

The promise: a user's files are never deleted or overwritten.
- A run directory is marked (`.cnn-trainer-run`) when the trainer first writes into it. A non-empty folder
  without the marker is not a run and is never written into, with or without `run.overwrite=true`.
- `run.overwrite=true` deletes only files the trainer itself writes (`OWNED`, by name); anything else in
  the folder stays, and is listed.
- A run directory may not be, contain or lie inside a data root, a home directory, `/`, or the current
  directory or one of its parents.
- One training at a time: a lock file (`.lock`: host, pid, process start time) taken before anything is
  written, refreshed every `HEARTBEAT_S`; a lock whose holder is gone (same host: the process no longer
  exists; another host: no heartbeat for `STALE_AFTER_S`) is taken over.
- Opening decides, reading only: new, resumed from the newest checkpoint that verifies (damaged newer ones
  are moved aside when the start commits, never deleted), restarted (ours, no checkpoint yet, nothing of
  value), complete, or refused with one line that says what to do. A refused or failed start leaves the
  folder as it was.
"""
from __future__ import annotations

import fnmatch
import json
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from trainer.checkpoint import find_checkpoint, move_aside, resolve_resume
from trainer.errors import TrainerError
from trainer.files import atomic_write_json, carry_over, disk_error

MARKER = ".cnn-trainer-run"
LOCK = ".lock"
HEARTBEAT_S = 30  # the lock holder touches the lock this often
STALE_AFTER_S = 300  # a lock from another host not touched for this long belongs to a dead training

# Every file the trainer writes, as paths relative to the run directory ('*' within one path component).
# `run.overwrite=true` deletes these and nothing else; folders are removed only once empty.
OWNED = (
    MARKER, LOCK, "config.yaml", "run.json", "metrics.jsonl", "summary.json", "eval.json",
    "config_history/*.yaml", "plots/*.png",
    *(f"{d}/{f}" for d in ("model", "best") for f in ("model.safetensors", "model.json", "eval.json", "plots/*.png")),
    "checkpoints/latest.json", "checkpoints/step-*/*.safetensors", "checkpoints/step-*/state.json",
    "wandb/latest-run", "wandb/debug*.log",
)
# Folders wholly the trainer's (temporaries of atomic writes) or W&B's (its run folders, written for us).
OWNED_TREES = (".*.tmp-*", ".*.old-*", "checkpoints/.*.tmp-*", "checkpoints/.*.old-*", "model/.*.tmp-*",
               "best/.*.tmp-*", "wandb/run-*", "wandb/offline-run-*")
# Folders the trainer makes: removed by an overwrite once empty (an empty folder of the user's stays).
OWNED_DIRS = ("config_history", "plots", "model", "best", "model/plots", "best/plots", "checkpoints",
              "checkpoints/step-*", "wandb")
# What makes a run worth keeping: with none of it loadable, a start is refused rather than begun again.
VALUABLE = ("model", "best", "summary.json", "eval.json", "checkpoints/step-*")


def _matches(rel: Tuple[str, ...], patterns) -> bool:
    return any(len(p := tuple(pat.split("/"))) == len(rel) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(rel, p))
               for pat in patterns)


def is_run(run_dir: Path) -> bool:
    """Ours: the marker, or a run written before the marker existed (run.json holding derived numbers)."""
    if (run_dir / MARKER).is_file():
        return True
    try:
        return "derived" in json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def _is_empty(folder: Path) -> bool:
    """No entry but a lock: a first start killed before it wrote anything leaves only that."""
    return folder.is_dir() and all(p.name == LOCK for p in folder.iterdir())


def owned_and_foreign(run_dir: Path) -> Tuple[List[Path], List[Path]]:
    """(the trainer's files and folders, everything else) below `run_dir`; symlinks are never followed."""
    owned, foreign = [], []

    def visit(folder: Path, rel: Tuple[str, ...]) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            r = rel + (entry.name,)
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if _matches(r, OWNED_TREES):
                    owned.append(path)
                else:
                    visit(path, r)
            elif _matches(r, OWNED):
                owned.append(path)
            else:
                foreign.append(path)

    visit(run_dir, ())
    return owned, foreign


def remove_owned(run_dir: Path, spare: Tuple[str, ...] = (LOCK,)) -> Tuple[int, List[Path]]:
    """Delete the trainer's files (and then its folders if empty), except the top-level names in `spare`
    (the lock of the start doing it); returns (number deleted, files kept)."""
    owned, foreign = owned_and_foreign(run_dir)
    owned = [p for p in owned if not (p.parent == run_dir and p.name in spare)]
    # the marker last: an overwrite killed half-way leaves a run (which the next overwrite finishes), not a
    # folder of leftovers that looks like someone else's
    owned.sort(key=lambda p: p == run_dir / MARKER)
    for path in owned:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for rel in sorted(OWNED_DIRS, key=lambda r: r.count("/"), reverse=True):  # deepest first
        for folder in run_dir.glob(rel):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()
    return len(owned), foreign


# ---- where a run directory may be ----

def check_location(run_dir: Path, data_roots: Dict[str, Path]) -> None:
    """Refuse a run directory whose files would mix with data or whose overwrite could reach far."""
    here = Path(run_dir).resolve()
    home = Path.home().resolve()
    cwd = Path.cwd().resolve()
    if here == Path(here.anchor):
        raise TrainerError(f"run.dir {run_dir} is the file-system root; give a folder of its own, e.g. runs/NAME")
    if here == home or here in home.parents:
        raise TrainerError(f"run.dir {run_dir} is a home directory or above one; give a folder of its own, "
                           f"e.g. runs/NAME")
    if here == cwd or here in cwd.parents:
        raise TrainerError(f"run.dir {run_dir} is the current directory or one of its parents; give a folder of "
                           f"its own, e.g. runs/NAME")
    for key, root in data_roots.items():
        data = Path(root).resolve()
        if here == data or data in here.parents:
            raise TrainerError(f"run.dir {run_dir} lies inside {key} {root}: its files would become part of the "
                               f"data (a class named after them); put runs outside the data")
        if here in data.parents:
            raise TrainerError(f"run.dir {run_dir} contains {key} {root}: the run's files would mix with the data, "
                               f"and run.overwrite could reach it; put runs outside the data")


# ---- one training at a time ----

def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict, lock_mtime: float) -> bool:
    if holder.get("host") != socket.gethostname():
        return time.time() - lock_mtime < STALE_AFTER_S
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return time.time() - lock_mtime < STALE_AFTER_S
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    started = holder.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


class RunLock:
    """An exclusive lock on a run directory: created with O_EXCL (atomic on local file systems and NFSv3+),
    refreshed by a heartbeat thread, removed on every exit path that runs Python (a SIGKILL leaves it, and
    the next start sees its holder is gone)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:
                raise disk_error(err, self.path) from None
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise TrainerError(f"could not lock {self.path}: other trainings keep taking it")

    def _take_over_if_stale(self) -> None:
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # being written this instant, or cut by a crash: judged by its age
        if _alive(holder, mtime):
            raise TrainerError(
                f"run.dir {self.path.parent} is in use by another training (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, since {holder.get('since', '?')}); two trainings on one run directory "
                f"would overwrite each other. Wait for it or stop it; if its machine is gone, delete {self.path}")
        stale = self.path.with_name(f"{LOCK}.stale-{self.token}")
        try:
            os.rename(self.path, stale)  # of several starters that saw it stale, one renames it
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass


# ---- what a start does with the folder ----

@dataclass
class RunPlan:
    """What the main process found (reading only) and will do once every check has passed."""
    dir: Path
    kind: str  # new | resume | restart | complete
    checkpoint: Optional[Path] = None  # resume (and complete, when one verifies)
    in_place: bool = False  # resuming this run's own checkpoint (its log and W&B run continue)
    damaged: List[Tuple[Path, str]] = field(default_factory=list)  # newer checkpoints to move aside
    created: List[Path] = field(default_factory=list)  # folders this start made (removed if it fails)
    notes: List[str] = field(default_factory=list)
    lock: Optional[RunLock] = None  # the main process's; other ranks get the plan without it
    committed: bool = False

    def __getstate__(self) -> dict:  # sent to the other ranks: the lock (a thread) stays on the main rank
        return {**self.__dict__, "lock": None}

    def __enter__(self) -> "RunPlan":
        return self

    def __exit__(self, *exc) -> bool:
        """Every exit path: the lock goes; a start that failed before `commit` also removes what it made."""
        if self.lock is not None:
            if exc[0] is not None and not self.committed:
                abandon(self, self.lock)
            else:
                self.lock.release()
        return False


def open_run(run_dir: Path, resume: Optional[str], overwrite: bool, data_roots: Dict[str, Path]) -> RunPlan:
    """Main process only: check the place, lock it, and decide what this start is. Writes only the lock
    (and the folder, if absent); leaving the plan's `with` block after a failure undoes both."""
    run_dir = Path(run_dir)
    check_location(run_dir, data_roots)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainerError(f"run.dir {run_dir} exists and is not a folder")
    if run_dir.is_dir() and not _is_empty(run_dir) and not is_run(run_dir):
        raise TrainerError(f"run.dir {run_dir} already exists and is not a trainer run (a non-empty folder without "
                           f"{MARKER}); nothing in it is touched"
                           f"{' (run.overwrite only deletes the files of a trainer run)' if overwrite else ''}. "
                           f"Choose another run.dir")
    created = [p for p in [run_dir, *run_dir.parents] if not p.exists()][::-1]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(err, run_dir) from None
    plan = RunPlan(run_dir, "new", created=created)
    lock = RunLock(run_dir)
    try:
        lock.acquire()
        _decide(plan, resume, overwrite)
    except BaseException:
        abandon(plan, lock)
        raise
    plan.lock = lock
    return plan


def _decide(plan: RunPlan, resume: Optional[str], overwrite: bool) -> None:
    run_dir = plan.dir
    ours = is_run(run_dir)
    if overwrite:
        plan.kind = "new"
        return  # deleting waits for `commit`: a start refused later must leave everything in place
    if resume:
        if ours and any(p.name not in (LOCK,) for p in run_dir.iterdir()):
            raise TrainerError(f"run.dir {run_dir} already holds a run; to continue from {resume} choose a new "
                               f"run.dir (or drop run.resume to continue this run)")
        plan.kind, plan.checkpoint = "resume", resolve_resume(resume)
        plan.in_place = run_dir.resolve() in plan.checkpoint.resolve().parents
        return
    if not ours:
        return  # empty or just made: a new run
    found, damaged = find_checkpoint(run_dir / "checkpoints")
    plan.damaged = damaged
    if (run_dir / "summary.json").is_file():
        plan.kind, plan.checkpoint, plan.in_place = "complete", found, True
        return
    if found is not None:
        plan.kind, plan.checkpoint, plan.in_place = "resume", found, True
        return
    valuable = [str(p.relative_to(run_dir)) for pat in VALUABLE for p in sorted(run_dir.glob(pat))]
    if valuable:
        why = "; ".join(f"{f.name}: {problem}" for f, problem in damaged) or "no checkpoint"
        raise TrainerError(
            f"run.dir {run_dir} has no loadable checkpoint ({why}) but holds outputs ({', '.join(valuable[:4])}); "
            f"nothing was changed. Pass run.overwrite=true to train it again from scratch (only the trainer's own "
            f"files are deleted), run.resume=PATH to start from another checkpoint, or choose another run.dir")
    plan.kind = "restart"
    plan.notes.append(f"{run_dir} has no checkpoint yet: starting it again from the beginning")


def commit(plan: RunPlan) -> List[str]:
    """Main process, once every check has passed: the changes the plan implies. Returns lines to print."""
    lines = list(plan.notes)
    if plan.kind == "new" and is_run(plan.dir):  # run.overwrite=true on an existing run
        deleted, kept = remove_owned(plan.dir)
        lines.append(f"run.overwrite=true: deleted {deleted} file(s) the trainer wrote in {plan.dir}"
                     + (f"; kept {len(kept)} other file(s), e.g. {kept[0].relative_to(plan.dir)}" if kept else ""))
    for folder, problem in plan.damaged:
        moved = move_aside(folder)
        lines.append(f"checkpoint {folder.name} is damaged ({problem}): moved aside to {moved.name}, not deleted"
                     + (f"; resuming from {plan.checkpoint.name}" if plan.checkpoint else ""))
    lines += clean_leftovers(plan.dir)
    if not (plan.dir / MARKER).is_file():
        atomic_write_json(plan.dir / MARKER, {"format": "cnn-trainer-run",
                                              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    plan.created, plan.committed = [], True  # from here on the folder is a run: a failure keeps it
    return lines


def clean_leftovers(run_dir: Path) -> List[str]:
    """Temporaries of writes that a killed process left (`.NAME.tmp-PID`, `.NAME.old-PID`, ours by name).
    A folder swap cut between its two renames left NAME missing and `.NAME.old-PID` whole: that old
    version is put back, never deleted; cut after them, what the old version holds that the new one does
    not (a user's files) is carried into NAME first (files.atomic_dir). Only under the lock (no other
    process of ours is writing)."""
    lines = []
    for folder in (run_dir, run_dir / "model", run_dir / "best", run_dir / "checkpoints", run_dir / "plots"):
        if not folder.is_dir():
            continue
        for old in sorted(folder.glob(".*.old-*")):
            target = folder / old.name[1:].rsplit(".old-", 1)[0]
            if not os.path.lexists(target):
                os.rename(old, target)
                lines.append(f"restored {target} from an interrupted replacement")
            elif not target.is_dir() and old.is_dir() and not old.is_symlink():
                raise TrainerError(f"{old} holds the old version of {target}, which is no longer a folder; move what "
                                   f"you need out of it, then start again")
            else:
                stuck = carry_over(old, target)
                if stuck:
                    raise TrainerError(f"{old} holds files an interrupted replacement of {target} did not carry "
                                       f"into it ({stuck[0][0]}: {stuck[0][1]}); move them yourself, then start again")
        for leftover in sorted([*folder.glob(".*.tmp-*"), *folder.glob(".*.old-*")]):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
    return lines


def abandon(plan: RunPlan, lock: RunLock) -> None:
    """A start that failed before committing: remove the lock and the folders it made (if still empty)."""
    lock.release()
    for folder in reversed(plan.created):
        try:
            folder.rmdir()
        except OSError:
            break


def check_output_location(path: Path, data_roots: Dict[str, Path]) -> None:
    """An evaluation report (and its plots/ folder) may not be written into the data it scores."""
    here = Path(path).resolve().parent
    for key, root in data_roots.items():
        data = Path(root).resolve()
        if here == data or data in here.parents:
            raise TrainerError(f"output {path} lies inside {key} {root}: its plots would become part of the data; "
                               f"write it elsewhere")
