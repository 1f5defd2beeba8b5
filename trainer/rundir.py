"""The run directory as one concept: where it may be, who is using it, and what state it is in. Which files
in it are the trainer's is the write gate's record (trainer/outputs.py): every write into a run goes through
the run's `Folder` (`RunPlan.out`).

The promise: a user's files are never deleted or overwritten.
- A run directory is the trainer's once its ledger says so (owner "run"; a run written before ledgers is known
  by its marker `.cnn-trainer-run` or its run.json). A non-empty folder that is not a run is never written
  into, with or without `run.overwrite=true`.
- `run.overwrite=true` deletes only files the trainer wrote (recorded, unchanged since); anything else in the
  folder, at any depth, stays, and is listed.
- A run directory may not be, contain or lie inside a data root or another input, a home directory, `/`, or the
  current directory or one of its parents.
- One training at a time: a lock file (`.lock`: host, pid, process start time) taken before anything is
  written, refreshed every `HEARTBEAT_S`; a lock whose holder is gone (same host: the process no longer
  exists; another host: no heartbeat for `STALE_AFTER_S`) is taken over.
- Opening decides, reading only: new, resumed from the newest checkpoint that verifies (damaged newer ones
  are moved aside when the start commits, never deleted), restarted (ours, no checkpoint yet, nothing of
  value), complete, or refused with one line that says what to do. Every file the run will write at a fixed
  name is checked then too (a user's file, or a link, where the run would write is one line now, not a failed
  export hours later). A refused or failed start leaves the folder as it was.
"""
from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from trainer.checkpoint import find_checkpoint, move_aside, resolve_resume
from trainer.errors import TrainerError
from trainer.files import read_json
from trainer.outputs import GATE_FILES, Folder, Inputs, LockFile, open_folder

MARKER = ".cnn-trainer-run"  # what marked a run before ledgers (still read: such runs are adopted)
LOCK = ".lock"
HEARTBEAT_S = 30  # the lock holder touches the lock this often
STALE_AFTER_S = 300  # a lock from another host not touched for this long belongs to a dead training

# What the trainer writes at fixed names in a run (checked at every start: nothing of the user's may be there);
# model/ and best/ also hold the task's report (`Task.report_files`).
RUN_FILES = ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "plots/training_curves.png",
             "checkpoints/latest.json")
RUN_FOLDERS = ("model", "best", "checkpoints", "config_history", "plots")
MODEL_FILES = ("model.safetensors", "model.json")
# What makes a run worth keeping: with none of it loadable, a start is refused rather than begun again.
VALUABLE = ("model", "best", "summary.json", "eval.json", "checkpoints/step-*")


def run_folder(run_dir: Path, inputs: Optional[Inputs] = None) -> Folder:
    """The run's folder as the write gate sees it (its ledger read, or adopted from a run of before)."""
    return Folder(run_dir, "train", inputs, f"run.dir {run_dir}", owner="run")


def is_run(run_dir: Path) -> bool:
    """Ours: the ledger says so, or a run written before ledgers (its marker, or run.json with derived numbers)."""
    return Path(run_dir).is_dir() and run_folder(Path(run_dir)).ledger.owner == "run"


def _is_empty(folder: Path) -> bool:
    """No entry but a lock (and the gate's own files): a first start killed before it wrote anything."""
    return folder.is_dir() and all(p.name in (LOCK, *GATE_FILES) for p in folder.iterdir())


# ---- where a run directory may be ----

def check_location(run_dir: Path, inputs: Inputs) -> None:
    """Refuse a run directory whose files would mix with its inputs or whose overwrite could reach far."""
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
    hit = inputs.hit(here)
    if hit is not None:
        raise TrainerError(f"run.dir {run_dir} lies inside {hit[0]} {hit[1]}: its files would become part of the "
                           f"data (a class named after them); put runs outside the data")
    for what, given, real in inputs.items:  # the data's folders (a file named as an input may be inside a run)
        if what.startswith("data") and Path(real) != here and here in Path(real).parents:
            raise TrainerError(f"run.dir {run_dir} contains {what} {given}: the run's files would mix with the data, "
                               f"and run.overwrite could reach it; put runs outside the data")


# ---- one training at a time ----

class RunLock:
    """An exclusive lock on a run directory (outputs.LockFile), refreshed by a heartbeat thread, removed on
    every exit path that runs Python (a SIGKILL leaves it, and the next start sees its holder is gone)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.file = LockFile(self.path, STALE_AFTER_S)
        self.token = self.file.token
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        holder = self.file.try_acquire()
        if holder is not None:
            raise TrainerError(
                f"run.dir {self.path.parent} is in use by another training (host {holder.get('host', '?')}, pid "
                f"{holder.get('pid', '?')}, since {holder.get('since', '?')}); two trainings on one run directory "
                f"would overwrite each other. Wait for it or stop it; if its machine is gone, delete {self.path}")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)  # the lock is the run's own live file (outputs.LIVE)
            except OSError:
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread = None
        self.file.release()


# ---- what a start does with the folder ----

@dataclass
class RunPlan:
    """What the main process found (reading only) and will do once every check has passed."""
    dir: Path
    kind: str  # new | resume | restart | complete
    out: Folder  # every write into the run goes through it (the write gate)
    checkpoint: Optional[Path] = None  # resume (and complete, when one verifies)
    in_place: bool = False  # resuming this run's own checkpoint (its log and W&B run continue)
    damaged: List[Tuple[Path, str]] = field(default_factory=list)  # checkpoints to move aside
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


def open_run(run_dir: Path, resume: Optional[str], overwrite: bool, inputs: Inputs) -> RunPlan:
    """Main process only: check the place, lock it, and decide what this start is. Writes only the lock
    (and the folder, if absent), and finishes or undoes a folder swap a killed start left (the trainer's own
    files, as any next writer would); leaving the plan's `with` block after a failure undoes the first two."""
    run_dir = Path(run_dir)
    check_location(run_dir, inputs)
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise TrainerError(f"run.dir {run_dir} exists and is not a folder")
    if _is_empty(run_dir):
        out = run_folder(run_dir, inputs)
    else:
        # a folder of the user's is never written into, run.overwrite=true or not (it deletes only a run's own)
        out = open_folder(run_dir, "run", "train", "run.dir", inputs, what="a trainer run")
    plan = RunPlan(run_dir, "new", out)
    out.make()  # the folder (and its parents) made now for the lock; removed again if the start fails
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
    ours = plan.out.ledger.owner == "run"
    if overwrite:
        plan.kind = "new"
        return  # deleting waits for `commit`: a start refused later must leave everything in place
    if resume:
        if ours and any(p.name not in (LOCK, *GATE_FILES) for p in run_dir.iterdir()):
            raise TrainerError(f"run.dir {run_dir} already holds a run; to continue from {resume} choose a new "
                               f"run.dir (or drop run.resume to continue this run)")
        plan.kind, plan.checkpoint = "resume", resolve_resume(resume)
        plan.in_place = run_dir.resolve() in plan.checkpoint.resolve().parents
        return
    if not ours:
        return  # empty or just made: a new run
    if plan.out.ledger.pending:  # a start killed mid-swap (a checkpoint written again under its name): its old
        # version put back or its new one finished before looking for checkpoints, which would otherwise miss it
        plan.notes += plan.out.clean_leftovers()
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


def check_targets(plan: RunPlan, report_files: Sequence[str]) -> None:
    """Every file the run will write at a fixed name, before anything is written: absent, or the trainer's (an
    overwrite deletes those first). `report_files`: what the task writes beside a model (`Task.report_files`)."""
    out = plan.out
    ours_go = plan.kind == "new" and out.ledger.owner == "run"  # run.overwrite=true: the trainer's files go first
    files = [*RUN_FILES, *(f"{d}/{f}" for d in ("model", "best") for f in (*MODEL_FILES, *report_files))]
    problems = [p for rel in files if (p := out.problem(rel)) and not (ours_go and out.owns(rel))]
    problems += [p for rel in RUN_FOLDERS if (p := out.problem(rel, folder=True))]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TrainerError(f"run.dir {plan.dir}: {problems[0]}{more}, where the run writes; nothing was changed. "
                           f"Move it away or choose another run.dir")


def commit(plan: RunPlan) -> List[str]:
    """Main process, once every check has passed: the changes the plan implies. Returns lines to print."""
    lines = list(plan.notes)
    out = plan.out
    if plan.kind == "new" and out.ledger.owner == "run":  # run.overwrite=true on an existing run
        deleted, kept = out.remove_tree(spare=(LOCK,))
        lines.append(f"run.overwrite=true: deleted {deleted} file(s) the trainer wrote in {plan.dir}"
                     + (f"; kept {len(kept)} other file(s), e.g. {kept[0]}" if kept else ""))
    for folder, problem in plan.damaged:
        moved = move_aside(out, folder)
        lines.append(f"checkpoint {folder.name} is damaged ({problem}): moved aside to {moved.name}, not deleted"
                     + (f"; resuming from {plan.checkpoint.name}" if plan.checkpoint else ""))
    lines += out.clean_leftovers()
    out.claim()  # from here on the folder is a run, even before its first file
    plan.committed = True  # a failure from now on keeps the folder
    return lines


def default_run_dir(name: Optional[str]) -> Path:
    return Path("runs") / f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"


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


def new_run_id() -> str:
    """An id for the W&B run, made once per training run and kept across restarts."""
    return secrets.token_hex(4)


def truncate_rows(out, rel: str, keep: int) -> int:
    """Cut the run's metrics.jsonl (`rel` in the run's folder `out`) back to its first `keep` rows (those a
    checkpoint knows of), so a resumed run neither repeats nor skips a step. Returns the highest step in the
    file before cutting (-1 if none): a continued logger run has the rows up to there from before the interruption."""
    path = out.root / rel
    if not path.is_file():
        return -1
    lines = path.read_text().splitlines()
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut by a crash mid-write
            pass
    out.write(rel, "".join(line + "\n" for line in lines[:keep]))
    return max(steps, default=-1)


def start(plan: RunPlan, say, task, config_yaml: str, derived: dict, env: dict, loop,
          resumed_from: Optional[Path], replanned: Optional[str] = None) -> int:
    """Main process, once every check has passed: every file the run writes at a fixed name checked, the plan
    committed (an overwrite's deletions, damaged checkpoints moved aside), then config.yaml (+ its copy in
    config_history/), run.json (the derived numbers, the environment, every start) and metrics.jsonl cut back to
    the checkpoint's rows (`loop`: the run's LoopState; `replanned`: what a resume with another global batch did
    to the schedule, recorded in the start's entry). Returns the last step the loggers' runs a resume continues
    already hold (-1: none; a restart without a checkpoint starts new ones)."""
    from trainer.tasks import report_files

    check_targets(plan, report_files(task))
    for line in commit(plan):
        say(f"[trainer] {line}")
    out, run_dir = plan.out, plan.dir
    continues = plan.in_place or plan.kind == "restart"  # this run's own log: cut back to the checkpoint's rows
    seen_step = truncate_rows(out, "metrics.jsonl", loop.metrics_rows) if continues else -1
    previous = read_json(run_dir / "run.json").get("starts", [])  # deleted by an overwrite; none if new
    number = len(previous) + 1
    while os.path.lexists(run_dir / f"config_history/start-{number:03d}.yaml"):  # a file kept by that name
        number += 1
    history = f"config_history/start-{number:03d}.yaml"
    out.write(history, config_yaml)
    out.write("config.yaml", config_yaml)
    out.write_json("run.json", {"derived": derived, "environment": env, "wandb_run_id": loop.run_ids.get("wandb"),
                                "starts": previous + [{"update": loop.update, "kind": plan.kind, "config": history,
                                                       "resumed_from": str(resumed_from) if resumed_from else None,
                                                       "processes": derived["processes"],
                                                       "global_batch": derived["global_batch"],
                                                       **({"schedule": replanned} if replanned else {}),
                                                       "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]})
    return seen_step if plan.in_place else -1


def finish(plan: RunPlan, summary: dict) -> Optional[Path]:
    """Main process, at the end: the training curves (if there was anything to draw), then summary.json, last:
    from then on the same command says the run is complete. Returns the curves' path."""
    from trainer.reports import plot_training_curves

    curves = plot_training_curves(plan.dir / "metrics.jsonl")
    drawn = plan.out.write("plots/training_curves.png", curves) if curves else None
    plan.out.write_json("summary.json", summary)
    return drawn


def final_model_lost(run_dir: Path) -> bool:
    """The run's final model (model/) lacks a file the trainer exports there."""
    return any(not (run_dir / "model" / name).is_file() for name in MODEL_FILES)


def model_missing(plan: RunPlan, seen: dict) -> bool:
    """Main process, on a complete run: its final model (model/) lacks a file the trainer exports and a
    checkpoint loads under an unchanged config, so the start can export it again (loop.re_export)."""
    return (final_model_lost(plan.dir) and plan.checkpoint is not None and not seen.get("changes")
            and not seen.get("unloadable"))


def complete_lines(run_dir: Path, seen: dict, re_exported: bool = False) -> List[str]:
    """What a start of a complete run says: it has nothing (more) to do (`re_exported`: its final model was
    exported again), why it cannot continue if none of its checkpoints loads (`seen`: what
    trainer.state.compare_with_checkpoint found), what it does not apply."""
    done = "its final model was exported again; nothing more to do" if re_exported else "nothing to do"
    lines = [f"[trainer] {run_dir} is already complete (update {seen.get('update', '?')}); {done}. "
             f"Pass run.overwrite=true to train it again from scratch"]
    if seen.get("unloadable"):
        lines.append(f"[trainer] {seen['unloadable']}: the run cannot be continued from them; nothing was moved or "
                     f"changed")
        if final_model_lost(run_dir):
            lines.append(f"[trainer] {run_dir / 'model'} is missing and cannot be exported again without a loadable "
                         f"final checkpoint; {run_dir / 'best'} holds the best model")
    if seen.get("changes"):
        lines.append(f"[trainer] not applied, this config differs from the run's: {'; '.join(seen['changes'])}"
                     + ("" if seen.get("unloadable") else
                        " (run.allow_config_change=true continues training it under them)"))
        if not seen.get("unloadable") and final_model_lost(run_dir):
            lines.append(f"[trainer] {run_dir / 'model'} is missing: the same command without these changes exports "
                         f"it again from the final checkpoint")
    return lines


def abandon(plan: RunPlan, lock: RunLock) -> None:
    """A start that failed before committing: remove the lock and the folders it made (if still empty)."""
    lock.release()
    plan.out.abandon()
