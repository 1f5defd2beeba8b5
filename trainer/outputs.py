"""One gate for every file the trainer writes, replaces or deletes.

Every command (train, eval, predict, export, pack, sweep, tune, collect, the scan cache, the generated data)
writes through here, under one policy (RELIABILITY.md; docs/checkpoints.md, "Your files are never lost"):

1. Never inside or over an input. `Inputs` holds what a command reads (data roots and annotation files,
   predict's images, folders and @lists, the model folder, a pack's source); a target that is one of them or
   lies inside one is refused, whatever flag is given.
2. Never replace or delete a file the trainer did not write. What a command writes in a folder is recorded in
   that folder's ledger (LEDGER: per file its size, modification time and the XXH3 of its bytes, and which
   command wrote it); only a file the ledger lists, unchanged since (the same bytes), is replaced or removed.
   A user's file anywhere inside an output or run folder, at any depth, stays byte for byte: replacing a
   sub-folder carries it into the new one, removing a sub-folder leaves it (and the folder holding it).
3. An existing single output file that the trainer did not write is refused in one line naming it and the flag
   that replaces it (`--overwrite`); one the trainer wrote (unchanged since) is replaced, as a rerun expects.
4. A folder named as an output (run.dir, --dir, predict's folders, pack's DEST, the scan cache) must be new,
   empty, or the same command's own: its ledger names its owner.
5. Links are followed for reading, never for writing or deleting. The output named may itself be a link
   (runs/ on a scratch file system); a link below it, where a write would pass through or land, is refused,
   and a link is never removed or emptied.
6. A temporary is recorded in the ledger before it exists, and a file placed by a rename before the rename
   (with the version it replaces). What a killed command left is removed by the next command that writes there
   once its process is gone; nothing else is ever removed as "left over".
7. Commands writing into one folder at once change its ledger one at a time, under its lock (`LockFile`,
   refreshed while held); a lock whose holder is gone is taken over by exactly one waiter.

Writers that produce files through a library (safetensors, matplotlib, PIL, Arrow) write into a staging folder
the gate made (`Folder.staged`, `Folder.replacing`). It holds only the trainer's files, so they write there
freely, and the gate moves the files into place and records them. tests/test_outputs.py checks that no other
module writes, renames or deletes anything elsewhere.
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
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from trainer.errors import TrainerError
from trainer.files import checksum_bytes, checksum_file, disk_error, fsync_dir

LEDGER = ".cnn-trainer-files.json"
LEDGER_LOCK = ".cnn-trainer-files.lock"
LEDGER_TEMP = ".cnn-trainer-files.json.tmp"
FORMAT = "cnn-trainer-files"
GATE_FILES = (LEDGER, LEDGER_LOCK, LEDGER_TEMP)  # the gate's own, in every folder it writes into
# A ledger is held for milliseconds, up to about a minute to place a million files; its holder refreshes the
# lock's time every LOCK_BEAT_S while it holds it, so a lock not refreshed for LOCK_WAIT_S has a holder that is
# stuck or gone. A waiter gives up after LOCK_WAIT_MAX_S however live the holder (never a hang).
LOCK_BEAT_S = 5.0
LOCK_WAIT_S = 60.0
LOCK_WAIT_MAX_S = 3600.0
STALE_TEMP_S = 3600.0  # a temporary of a process on another host, untouched this long, belongs to a dead one
BREAK_STALE_S = 10.0  # a lock's break file is held for microseconds: this old, its maker was killed holding it

# What each kind of folder owns by name alone: files its commands rewrite or append to constantly (a log, a
# lock refreshed by a heartbeat, the leases of tune workers on several nodes, files SLURM's shell scripts write),
# where recording every change would cost a ledger write each time. Only inside a folder the ledger says is of
# that kind, and only regular files (a link is never the trainer's).
LIVE = {
    # the lock (a heartbeat), the log (appended to), the pointer to the newest checkpoint (rewritten at every save;
    # a damaged one is only a hint, which the next save replaces: the checkpoints themselves are never touched)
    "run": (".lock", "metrics.jsonl", "checkpoints/latest.json"),
    "sweep": ("status/*.json",),
    "tune": ("study.journal", "study.journal.lock", "leases/*.json", "leases/*.pid", "stop/*", "logs/*.log",
             "trials/*.json"),
}
# Sub-trees another program writes for the trainer inside its folder (the loggers of tracking.log_with): wholly the
# trainer's. W&B's run folders; TensorBoard's event files (one per start); MLflow's file store: an experiment per
# numbered folder (0 is its default one) and its deleted runs' .trash; Comet's offline archives (one per start,
# <experiment key>-<random>.zip)
LIVE_TREES = {"run": ("wandb/run-*", "wandb/offline-run-*", "wandb/latest-run", "wandb/debug*.log",
                      "tensorboard/events.out.tfevents.*", "mlflow/[0-9]*", "mlflow/.trash", "comet_ml/*.zip")}


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    parts = rel.split("/")
    return any(len(p := pat.split("/")) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, p))
               for pat in patterns)


def _in_tree(rel: str, patterns: Iterable[str]) -> bool:
    parts = rel.split("/")
    return any(_matches("/".join(parts[:n]), patterns) for n in range(1, len(parts) + 1))


# ------------------------------------------------------------------------------------------ inputs (rule 1)

class Inputs:
    """What a command reads: nothing it writes may be one of them or lie inside one (compared by real path, so
    a link or a relative path to an input is the input)."""

    def __init__(self, named: Iterable[Tuple[str, Union[str, Path]]] = ()):
        self.items: List[Tuple[str, str, str]] = []  # (what, path as given, real path)
        self._by_real: Dict[str, Tuple[str, str]] = {}  # real path -> (what, given): a lookup per target, not a scan
        for what, path in named:
            self.add(what, path)

    def add(self, what: str, path: Union[str, Path, None]) -> "Inputs":
        if path is not None and str(path) != "":
            real = os.path.realpath(path)
            self.items.append((what, str(path), real))
            self._by_real.setdefault(real, (what, str(path)))
        return self

    def extend(self, other: "Inputs") -> "Inputs":
        for what, given, _ in other.items:
            self.add(what, given)
        return self

    def hit(self, target: Union[str, Path]) -> Optional[Tuple[str, str]]:
        """(what, path) of the input that `target` is or lies inside, else None: its real path and each folder
        above it looked up (predict may have a million input images)."""
        real = os.path.realpath(target)
        while True:
            found = self._by_real.get(real)
            if found is not None:
                return found
            parent = os.path.dirname(real)
            if parent == real:
                return None
            real = parent

    def check(self, target: Union[str, Path], option: str) -> None:
        hit = self.hit(target)
        if hit is not None:
            what, given = hit
            where = "is" if os.path.realpath(target) == os.path.realpath(given) else "lies inside"
            raise TrainerError(f"{option} {target} {where} {what} {given}, which this command reads; nothing is ever "
                               f"written into its inputs (no flag changes that): choose another place")


# ------------------------------------------------------------------------------------------ process identity

def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is not mistaken for it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid())}


def process_gone(holder: dict) -> Optional[bool]:
    """True if the process `holder` names (host, pid, proc_start) no longer runs; None if that cannot be told
    from here (another host)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return None
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists: another user's
        pass
    started = holder.get("proc_start")
    return started is not None and _proc_start(holder["pid"]) not in (None, started)


class LockFile:
    """An exclusive lock: a file created with O_EXCL (atomic on local file systems, NFSv3+ and Lustre, unlike
    flock on some of them) holding its holder's host, pid and start time. A lock whose holder is gone (this
    host: the process no longer runs; another host: not touched for `stale_after_s`) is taken over."""

    def __init__(self, path: Path, stale_after_s: float, busy: str = ""):
        self.path, self.stale_after_s, self.busy = Path(path), stale_after_s, busy
        self.token = secrets.token_hex(8)

    def try_acquire(self) -> Optional[dict]:
        """Take it and return None; or return the live holder's record."""
        deadline = time.time() + BREAK_STALE_S + 1  # past a break file a killed breaker left
        while time.time() < deadline:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder_if_alive()
                if holder is not None:
                    return holder
                continue
            except OSError as err:
                raise disk_error(err, self.path) from None
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(json.dumps({**me(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": self.token}))
            except OSError as err:  # a full disk: no empty lock left behind for the next taker to wait on
                self.path.unlink(missing_ok=True)
                raise disk_error(err, self.path) from None
            return None
        raise TrainerError(f"could not lock {self.path}: other processes keep taking it")

    def _holder_if_alive(self) -> Optional[dict]:
        try:
            st = os.stat(self.path)
            text = self.path.read_text()
        except FileNotFoundError:
            return None  # released meanwhile: try again
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}  # being written this instant, or cut by a crash: judged by its age
        gone = process_gone(holder) if isinstance(holder, dict) else None
        if gone is False or (gone is None and time.time() - st.st_mtime < self.stale_after_s):
            return holder if isinstance(holder, dict) else {}
        if not self._break(st, holder.get("token") if isinstance(holder, dict) else None):
            time.sleep(0.002)  # another taker is breaking it: look again in a moment
        return None

    def _break(self, judged: os.stat_result, token: Optional[str]) -> bool:
        """Remove the lock judged stale, and no other. Of several takers that judged it so, only the one that
        creates its break file (named for that lock: its holder's token, or its inode and time) may remove it,
        and only while the file at the path is still that lock: another taker may have removed it and a live
        holder taken the path since. Renaming it away instead let a second breaker move the new holder's lock
        (two holders at once). A break file is held for microseconds; one older than BREAK_STALE_S was left
        by a breaker killed in between and is removed. False if another taker is breaking it."""
        mark = token if isinstance(token, str) and token.isalnum() else f"{judged.st_ino}-{judged.st_mtime_ns}"
        breaker = self.path.with_name(f"{self.path.name}.break-{mark}")
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            try:
                if time.time() - os.stat(breaker).st_mtime > BREAK_STALE_S:
                    breaker.unlink()
            except FileNotFoundError:
                pass
            return False
        except OSError as err:
            raise disk_error(err, breaker) from None
        try:
            st = os.stat(self.path)
            same = (st.st_ino, st.st_mtime_ns) == (judged.st_ino, judged.st_mtime_ns)
            if token is not None and same:
                same = json.loads(self.path.read_text()).get("token") == token
            if same:
                self.path.unlink()
        except (FileNotFoundError, ValueError, AttributeError):
            pass  # gone or changed meanwhile: not the lock judged stale
        finally:
            breaker.unlink(missing_ok=True)
        return True

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass


class _Heartbeat:
    """One daemon thread per process that refreshes the time of every ledger lock the process holds, every
    LOCK_BEAT_S: a long hold stays fresh, so a writer on another host does not take it for a dead holder's
    and a writer here waits for it instead of giving up."""

    def __init__(self):
        self._held: set = set()
        self._guard = threading.Lock()
        self._pid: Optional[int] = None  # the process whose thread runs: a forked child starts its own

    def hold(self, path: Path) -> None:
        with self._guard:
            self._held.add(path)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._beat, name="ledger-lock-heartbeat", daemon=True).start()

    def release(self, path: Path) -> None:
        with self._guard:
            self._held.discard(path)

    def _beat(self) -> None:
        while True:
            time.sleep(LOCK_BEAT_S)
            with self._guard:
                held = list(self._held)
            for path in held:
                try:
                    os.utime(path)
                except OSError:
                    pass

    def forked(self) -> None:  # in a forked child: none of the parent's holds, no thread yet, a free guard
        self._held, self._guard, self._pid = set(), threading.Lock(), None


_HEARTBEAT = _Heartbeat()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_HEARTBEAT.forked)


def _lock_age(path: Path) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0


@contextmanager
def _ledger_locked(root: Path) -> Iterator[None]:
    """Hold the ledger of `root` while reading, changing and writing it: two commands writing into one folder
    at once (two predicts, tune workers on several nodes) keep each other's records."""
    lock = LockFile(root / LEDGER_LOCK, stale_after_s=LOCK_WAIT_S)
    deadline = time.time() + LOCK_WAIT_MAX_S
    while (holder := lock.try_acquire()) is not None:
        stuck = _lock_age(lock.path) > LOCK_WAIT_S  # a live holder refreshes it every LOCK_BEAT_S
        if stuck or time.time() > deadline:
            raise TrainerError(f"{lock.path} is held by process {holder.get('pid', '?')} on host "
                               f"{holder.get('host', '?')}, which still runs but "
                               + (f"has not refreshed it for over {LOCK_WAIT_S:.0f} s (stuck?)" if stuck else
                                  f"has held it for over {LOCK_WAIT_MAX_S:.0f} s")
                               + "; if none of the trainer's commands is writing there, delete it")
        time.sleep(0.01)
    _HEARTBEAT.hold(lock.path)
    try:
        yield
    finally:
        _HEARTBEAT.release(lock.path)
        lock.release()


# ------------------------------------------------------------------------------------------ the ledger

def identity(path: Path, by: str, data: Optional[bytes] = None) -> dict:
    """What a file the trainer just wrote is: its size, modification time and XXH3 (of `data` if given: the
    bytes just written, else read back)."""
    st = os.lstat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "xxh3": checksum_bytes(data) if data is not None else checksum_file(path), "by": by}


def unchanged(path: Path, entry: dict) -> bool:
    """`path` still holds what the trainer wrote there: a regular file with the recorded size and modification
    time, or (copied without its times, `cp -r`) the recorded bytes. An entry recorded while its file was being
    replaced (`placing`) also matches the version it replaces, which a kill before the rename leaves."""
    was = entry.get("was")
    return _holds(path, entry) or (isinstance(was, dict) and _holds(path, was))


def placing(new: dict, old: Optional[dict], path: Path) -> dict:
    """The entry recorded for a file about to be renamed over `path`, saved before the rename: the new file's
    identity, and the trainer's version it replaces (if `path` holds one), so that the file is the trainer's
    whichever side of the rename a kill falls on."""
    if old is None or old.get("live") or not _holds(path, old):
        return new
    return {**new, "was": {k: v for k, v in old.items() if k != "was"}}


def _holds(path: Path, entry: dict) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not os.path.isfile(path) or os.path.islink(path):
        return False
    if entry.get("live"):
        return True
    if st.st_size != entry.get("size"):
        return False
    if st.st_mtime_ns == entry.get("mtime_ns"):
        return True
    try:
        return checksum_file(path) == entry.get("xxh3")
    except OSError:
        return False


class Ledger:
    """The record of one folder: its owner (the kind of folder, when a command made it its own: rule 4), the
    files the trainer wrote below it (relative POSIX path -> identity), the folders it made, and its
    temporaries (recorded before they exist)."""

    def __init__(self, owner: Optional[str] = None):
        self.owner = owner
        self.files: Dict[str, dict] = {}
        self.dirs: set = set()
        self.pending: Dict[str, dict] = {}
        self.legacy = False  # adopted from a folder written before ledgers existed (not yet saved)

    @classmethod
    def read(cls, root: Path) -> Optional["Ledger"]:
        path = root / LEDGER
        if not os.path.lexists(path):
            return None
        try:
            if path.is_symlink():
                raise ValueError("it is a link")
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError("not a ledger of the trainer")
            ledger = cls(raw.get("owner"))
            ledger.files = {str(k): dict(v) for k, v in raw.get("files", {}).items()}
            ledger.dirs = {str(d) for d in raw.get("dirs", [])}
            ledger.pending = {str(k): dict(v) for k, v in raw.get("pending", {}).items()}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise TrainerError(f"cannot read {path} ({err}); it records which files the trainer wrote in {root}. "
                               f"Move it away (the files it listed are then treated as yours) or choose another "
                               f"folder") from None
        return ledger

    def save(self, root: Path) -> None:
        """Written whole and renamed into place, under the ledger's lock (so its temporary has one fixed name,
        which no kill can leave twice)."""
        self.legacy = False
        text = json.dumps({"format": FORMAT, "version": 1, "owner": self.owner, "files": dict(sorted(self.files.items())),
                           "dirs": sorted(self.dirs), "pending": self.pending}, indent=1) + "\n"
        tmp = root / LEDGER_TEMP
        try:
            tmp.write_text(text)
            os.replace(tmp, root / LEDGER)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise disk_error(err, root / LEDGER) from None

    def forget_below(self, rel: str) -> Dict[str, dict]:
        """Drop (and return) the entries of the files below the folder `rel`."""
        prefix = rel.rstrip("/") + "/"
        gone = {k: v for k, v in self.files.items() if k.startswith(prefix)}
        for k in gone:
            del self.files[k]
        self.dirs = {d for d in self.dirs if not d.startswith(prefix)}
        return gone


# Folders written before ledgers existed: how to recognise each kind, and which names were the trainer's then.
# Adopted once, by those names (the rule of that time), then recorded like any other.
LEGACY = {
    "run": {"markers": (".cnn-trainer-run",),
            "files": (".cnn-trainer-run", "config.yaml", "run.json", "summary.json", "eval.json", "config_history/*.yaml",
                      "plots/*.png", "model/model.safetensors", "model/model.json", "model/eval.json",
                      "model/plots/*.png", "best/model.safetensors", "best/model.json", "best/eval.json",
                      "best/plots/*.png", "checkpoints/latest.json", "checkpoints/step-*/*.safetensors",
                      "checkpoints/step-*/state.json", "checkpoints/step-*.corrupt*/*.safetensors",
                      "checkpoints/step-*.corrupt*/state.json"),
            "dirs": ("config_history", "plots", "model", "best", "model/plots", "best/plots", "checkpoints",
                     "checkpoints/step-*", "wandb")},
    "sweep": {"markers": ("tasks.json",), "files": ("tasks.json", "sweep.json", "results.csv", "results.md"),
              "dirs": ("status", "runs")},
    "tune": {"markers": ("tune.json",), "files": ("tune.json", "results.csv", "results.md", "gpu_hours.json",
                                                  "best.yaml", "plots/*.png"),
             "dirs": ("trials", "logs", "leases", "stop", "plots")},
    "pack": {"markers": ("index.json", ".plan.json"),
             "files": ("index.json", ".plan.json", "rows.arrow", "*-?????.arrow", "*-annotations.json")},
    "cache": {"markers": (), "files": ("????????????????????????????????.npz",)},
    "dataset": {"markers": ("dataset.json",), "files": ("dataset.json",)},
}
PREDICTION_RECORD = ".cnn-trainer-predictions.json"  # predict's own record before the ledger (adopted)


def _legacy_run(root: Path) -> bool:
    """A run written before the marker existed: run.json holding derived numbers."""
    try:
        return "derived" in json.loads((root / "run.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def adopt_legacy(root: Path, owner: str) -> Optional[Ledger]:
    """The ledger of a folder of kind `owner` written before ledgers existed, or None if it is not one."""
    rule = LEGACY.get(owner)
    if rule is None:
        return _adopt_predictions(root) if owner == "predictions" else None
    found = any((root / m).is_file() for m in rule["markers"]) or (owner == "run" and _legacy_run(root))
    if owner == "cache":  # a cache folder held nothing but manifests
        found = any(_matches(p.name, rule["files"]) for p in root.iterdir() if p.is_file())
    if not found:
        return None
    ledger = Ledger(owner)
    ledger.legacy = True
    for path, rel in _walk(root):
        if _matches(rel, rule["files"]) and path.is_file() and not path.is_symlink():
            ledger.files[rel] = identity(path, "adopted")
    for pattern in rule.get("dirs", ()):
        ledger.dirs |= {p.relative_to(root).as_posix() for p in root.glob(pattern)
                        if p.is_dir() and not p.is_symlink()}
    return ledger


def _adopt_predictions(root: Path) -> Optional[Ledger]:
    path = root / PREDICTION_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        files = dict(record["files"]) if record.get("format") == "cnn-trainer-predictions" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        files = None
    if files is None:
        raise TrainerError(f"cannot read {path}: it should say which files an earlier trainer predict wrote in "
                           f"{root}; move it away or choose another folder")
    ledger = Ledger("predictions")
    ledger.legacy = True
    for rel, stat in files.items():
        target = root / rel
        if target.is_file() and not target.is_symlink() and [target.stat().st_size, target.stat().st_mtime_ns] == stat:
            ledger.files[rel] = identity(target, "predict")
    ledger.files[PREDICTION_RECORD] = identity(path, "predict")
    return ledger


def _walk(root: Path, below: str = "") -> Iterator[Tuple[Path, str]]:
    """Every file and link under root/below (links not followed), as (path, relative POSIX path)."""
    start = root / below if below else root  # the root itself may be a link (the folder the user named)
    if not start.is_dir() or (below and start.is_symlink()):
        return
    for entry in sorted(os.scandir(start), key=lambda e: e.name):
        rel = f"{below}/{entry.name}" if below else entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(root, rel)
        else:
            yield Path(entry.path), rel


def _changed_within(path: Path, seconds: float) -> bool:
    """Whether `path` or, for a folder, anything below it (links not followed) was modified in the last
    `seconds`: a writer filling a staging folder's sub-folders changes no time of the folder itself. Stops at
    the first recent one."""
    since = time.time() - seconds
    try:
        if os.lstat(path).st_mtime > since:
            return True
    except OSError:
        return False
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                try:
                    if os.lstat(os.path.join(top, name)).st_mtime > since:
                        return True
                except OSError:
                    pass
    return False


def _delete(path: Path) -> None:
    """A file, a link (never what it points to) or a folder of the trainer's own."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ a folder written into

class Folder:
    """A folder the trainer writes into, with its ledger.

    `by` names the command writing (recorded with each file); `owner` the kind of folder when it is the
    command's own (rule 4, see `open_folder`); `inputs` what the command reads (never written into); `option`
    how messages name the folder (e.g. "run.dir runs/a"); `granted` files the user allowed to be replaced
    (`--overwrite`)."""

    def __init__(self, root: Union[str, Path], by: str, inputs: Optional[Inputs] = None, option: str = "",
                 owner: Optional[str] = None, granted: Sequence[str] = ()):
        self.root = Path(root)
        self.by, self.inputs, self.option, self.owner = by, inputs or Inputs(), option or str(root), owner
        self.granted = set(granted)
        self.created: List[Path] = []  # folders this command made to hold the root (removed by `abandon` if empty)
        self.had_ledger = (self.root / LEDGER).is_file()
        self.ledger = self._read()

    # ---- the record ----

    def _read(self) -> Ledger:
        ledger = Ledger.read(self.root) if self.root.is_dir() else None
        if ledger is None and self.owner is not None and self.root.is_dir():
            ledger = adopt_legacy(self.root, self.owner)
        return ledger or Ledger()  # the owner is recorded with the first write

    @contextmanager
    def _changing(self) -> Iterator[Ledger]:
        """The ledger, read again under its lock, to change; written back at the end (also after a failure
        part-way: what was done is recorded)."""
        self._ensure_root()
        with _ledger_locked(self.root):
            fresh = Ledger.read(self.root)
            if fresh is None:  # first write here (or the adopted legacy record)
                fresh = self.ledger if self.ledger.legacy else Ledger(self.ledger.owner)
            if fresh.owner is None and self.owner is not None:
                fresh.owner = self.owner
            self.ledger = fresh
            try:
                yield fresh
            finally:
                fresh.save(self.root)

    def claim(self) -> None:
        """Record that this folder is the command's own (its `owner`), before its first file is written."""
        with self._changing() as ledger:
            ledger.owner = self.owner

    def make(self) -> None:
        """The folder itself (and its missing parents), as a first write would make it; `abandon` removes them."""
        self._ensure_root()

    def _ensure_root(self) -> None:
        if not self.root.is_dir():
            missing = [p for p in [self.root, *self.root.parents] if not os.path.lexists(p)][::-1]
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise disk_error(err, self.root) from None
            self.created += missing

    def owns(self, rel: str) -> bool:
        """The file at `rel` is the trainer's: one of the folder kind's live files, or recorded and unchanged
        since."""
        path = self.root / rel
        if self.live(rel):
            if _in_tree(rel, LIVE_TREES.get(self.ledger.owner, ())):
                return os.path.lexists(path)  # written for the trainer by another program (W&B), links included
            return os.path.isfile(path) and not os.path.islink(path)
        entry = self.ledger.files.get(rel)
        return entry is not None and unchanged(path, entry)

    def live(self, rel: str) -> bool:
        """One of the files (or trees) the folder's kind owns by name (LIVE, LIVE_TREES)."""
        owner = self.ledger.owner
        return bool(owner) and (_matches(rel, LIVE.get(owner, ())) or _in_tree(rel, LIVE_TREES.get(owner, ())))

    def live_tree(self, rel: str) -> Optional[str]:
        """The top of the live tree (see LIVE_TREES) holding `rel`, if any."""
        parts = rel.split("/")
        for n in range(1, len(parts) + 1):
            top = "/".join(parts[:n])
            if self.ledger.owner and _matches(top, LIVE_TREES.get(self.ledger.owner, ())):
                return top
        return None

    def may_replace(self, rel: str) -> bool:
        """This command may write over `rel`: a file it wrote itself (unchanged since), one of the folder kind's
        live files, one recorded before ledgers said who wrote what, or one the user said to replace
        (--overwrite). Not another command's: `trainer eval --output RUN/config.yaml` is not a rerun of eval."""
        if rel in self.granted or (self.live(rel) and self.owns(rel)):
            return True
        entry = self.ledger.files.get(rel)
        return self.owns(rel) and entry is not None and (entry.get("live") or entry.get("by") in (self.by, "adopted"))

    def problem(self, rel: str, folder: bool = False) -> Optional[str]:
        """Why the trainer may not write (a file, or with `folder` a sub-folder) at `rel`, in a few words; None
        if it may."""
        target = self.root / rel
        hit = self.inputs.hit(target)
        if hit is not None:
            return f"{target} {'is' if os.path.realpath(target) == os.path.realpath(hit[1]) else 'lies inside'} " \
                   f"{hit[0]} {hit[1]}, which this command reads"
        parts = rel.split("/")
        for n in range(1, len(parts)):
            between = self.root.joinpath(*parts[:n])
            if between.is_symlink():
                return f"{between} is a link; the trainer never writes through one"
            if os.path.lexists(between) and not between.is_dir():
                return f"{between} is a file where the trainer needs a folder"
        if target.is_symlink():
            return None if rel in self.granted and not folder else f"{target} is a link; the trainer never replaces one"
        if folder:
            return None if not target.exists() or target.is_dir() else f"{target} is a file where a folder goes"
        if target.is_dir():
            return f"{target} is a folder"
        if target.exists() and not self.may_replace(rel):
            entry = self.ledger.files.get(rel)
            if self.owns(rel) and entry is not None:
                return f"{target} was written by trainer {entry.get('by')}, not by this command"
            return f"{target} was not written by the trainer (or changed since it was)"
        return None

    def check(self, rels: Iterable[str], folders: Iterable[str] = (), advice: str = "") -> None:
        """Refuse, before any work, targets the trainer may not write: one line naming the first and the count."""
        found = [p for rel in rels if (p := self.problem(rel))] + [p for rel in folders if (p := self.problem(rel, True))]
        if found:
            more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
            raise TrainerError(f"{self.option}: {found[0]}{more}; nothing was written. "
                               f"{advice or 'Move it away or choose another place'}")

    # ---- writing ----

    def _forget(self, *names: str) -> None:
        """After a failure, the records of temporaries now gone. On a full disk even the ledger may not be
        writable: the records then stay, and the next writer's clean-up drops them (their files are gone), so
        the failure itself is what the user sees, not the ledger's."""
        try:
            with self._changing() as ledger:
                for name in names:
                    if not os.path.lexists(self.root / name):
                        ledger.pending.pop(name, None)
        except TrainerError:
            pass

    def _tidy(self) -> None:
        """Before writing: what commands killed while writing here left (rule 6), if the ledger lists any."""
        if self.ledger.pending:
            self.clean_leftovers()

    def _temp(self, rel: str, kind: str = "tmp") -> str:
        parent, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
        temp = f".{name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
        return f"{parent}/{temp}" if parent else temp

    def _make_parents(self, rel: str, ledger: Ledger) -> None:
        """The folders above `rel`, made where missing and recorded as the trainer's."""
        parts = rel.split("/")[:-1]
        for n in range(1, len(parts) + 1):
            sub = "/".join(parts[:n])
            path = self.root / sub
            if not os.path.lexists(path):
                try:
                    path.mkdir()
                except OSError as err:
                    raise disk_error(err, path) from None
                ledger.dirs.add(sub)

    def write(self, rel: str, data: Union[str, bytes], fsync: bool = False) -> Path:
        """Write the file `rel` whole: into a recorded temporary beside it, then renamed over it in one step (on
        failure nothing is left and the old file is as it was); `fsync` for what a resume depends on."""
        data = data.encode() if isinstance(data, str) else data
        problem = self.problem(rel)
        if problem is not None:
            raise TrainerError(f"{self.option}: {problem}; it is left as it is")
        target = self.root / rel
        self._tidy()
        with self._changing() as ledger:
            self._make_parents(rel, ledger)
            temp = self._temp(rel)
            ledger.pending[temp] = me()
        try:
            with open(self.root / temp, "wb") as fh:
                fh.write(data)
                if fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            new = identity(self.root / temp, self.by, data)  # a rename keeps the size and modification time
            # Checked again, recorded and placed under one hold of the ledger's lock: another process writing
            # the same file meanwhile is then either not yet placed or already recorded, never taken for a user's.
            # Recorded before the rename: a kill right after it leaves the file recorded, not a user's.
            with self._changing() as ledger:
                problem = self.problem(rel)
                if problem is not None:
                    raise TrainerError(f"{self.option}: {problem}; it is left as it is")
                old = ledger.files.get(rel)
                ledger.files[rel] = placing(new, old, target)
                ledger.save(self.root)
                try:
                    os.replace(self.root / temp, target)
                except OSError:  # not placed: the record as it was
                    if old is None:
                        del ledger.files[rel]
                    else:
                        ledger.files[rel] = old
                    raise
                if fsync:
                    fsync_dir(target.parent)
                ledger.pending.pop(temp, None)
                ledger.files[rel] = new
        except BaseException as err:  # also a stop request raised mid-write: never leave the temporary
            (self.root / temp).unlink(missing_ok=True)
            self._forget(temp)
            self.abandon()
            if isinstance(err, OSError):
                raise disk_error(err, target) from None
            raise
        return target

    def write_json(self, rel: str, obj, fsync: bool = False) -> Path:
        return self.write(rel, json.dumps(obj, indent=1, default=str) + "\n", fsync=fsync)

    def mkdir(self, rel: str) -> Path:
        """The sub-folder `rel` (and those above it), made where missing and recorded as the trainer's."""
        problem = self.problem(rel, folder=True)
        if problem is not None:
            raise TrainerError(f"{self.option}: {problem}; it is left as it is")
        with self._changing() as ledger:
            self._make_parents(rel + "/.", ledger)
        return self.root / rel

    def touch(self, rel: str) -> None:
        """Create the empty file `rel`, or refresh its modification time (a heartbeat): only a file of the folder
        kind's live ones (see LIVE), whose contents never matter."""
        owner = self.ledger.owner or self.owner
        if not (owner and _matches(rel, LIVE.get(owner, ()))) or self.problem(rel) is not None:
            raise TrainerError(f"{self.option}: {self.root / rel} is not a file the trainer may touch")
        try:
            if not (self.root / rel).exists():
                with self._changing() as ledger:
                    self._make_parents(rel, ledger)
            (self.root / rel).touch()
        except OSError as err:
            raise disk_error(err, self.root / rel) from None

    def append(self, rel: str):
        """A file the command appends to (a log): opened for appending, line-buffered, recorded as live."""
        problem = self.problem(rel)
        if problem is not None:
            raise TrainerError(f"{self.option}: {problem}; it is left as it is")
        with self._changing() as ledger:
            self._make_parents(rel, ledger)
            if rel not in ledger.files or not ledger.files[rel].get("live"):
                ledger.files[rel] = {"live": True, "by": self.by}
        try:
            return open(self.root / rel, "a", buffering=1)
        except OSError as err:
            raise disk_error(err, self.root / rel) from None

    @contextmanager
    def staged(self, stale: Iterable[str] = (), fsync: bool = False) -> Iterator[Path]:
        """A staging folder (hidden, inside this one) to write files into; at the end each is moved to the same
        relative place here, after every target was checked, and recorded; then the files in `stale` that the
        trainer wrote before and this time did not are removed. On failure the folder stays as it was."""
        self._tidy()
        with self._changing() as ledger:
            stage = self._temp("stage", "cnn-trainer-stage")
            ledger.pending[stage] = me()
        failed = False
        try:
            (self.root / stage).mkdir()
            yield self.root / stage
            placed = sorted(rel for _, rel in _walk(self.root / stage))
            self.ledger = Ledger.read(self.root) or self.ledger  # another command may have written meanwhile
            self.check(placed)
            if fsync:
                for rel in placed:
                    with open(self.root / stage / rel, "rb") as fh:
                        os.fsync(fh.fileno())
            # hashed before the lock is taken (a rename keeps each file's size and time): the hold is only the
            # renames, however many files and however large
            new = {rel: identity(self.root / stage / rel, self.by) for rel in placed}
            with self._changing() as ledger:
                self.check(placed)  # again under the lock, which every placing holds: none is half-recorded now
                for rel in placed:  # recorded before they land: a kill part-way leaves every one the trainer's
                    self._make_parents(rel, ledger)
                    ledger.files[rel] = placing(new[rel], ledger.files.get(rel), self.root / rel)
                ledger.save(self.root)
                for rel in placed:
                    os.replace(self.root / stage / rel, self.root / rel)
                    ledger.files[rel] = new[rel]
                for rel in set(stale) - set(placed):
                    entry = ledger.files.get(rel)
                    if entry is not None and unchanged(self.root / rel, entry):
                        (self.root / rel).unlink()
                        del ledger.files[rel]
            if fsync:
                for folder in {(self.root / rel).parent for rel in placed}:
                    fsync_dir(folder)
        except OSError as err:
            failed = True
            raise disk_error(err, self.root) from None
        except BaseException:
            failed = True
            raise
        finally:
            shutil.rmtree(self.root / stage, ignore_errors=True)
            if failed:
                self._forget(stage)
                self.abandon()
            else:
                with self._changing() as ledger:
                    ledger.pending.pop(stage, None)

    @contextmanager
    def replacing(self, rel: str, fsync: bool = False) -> Iterator[Path]:
        """Yield a temporary folder to fill; at the end it replaces the sub-folder `rel` in one rename (a reader
        never sees half of it), the old version's files of the trainer are removed and the user's carried into
        the new one. On failure before the swap, nothing changed."""
        target = self.root / rel
        problem = self.problem(rel, folder=True)
        if problem is not None:
            raise TrainerError(f"{self.option}: {problem}; it is left as it is")
        self._tidy()
        with self._changing() as ledger:
            self._make_parents(rel, ledger)
            tmp, old = self._temp(rel), self._temp(rel, "old")
            ledger.pending[tmp] = me()
        swapped = False
        try:
            (self.root / tmp).mkdir()
            yield self.root / tmp
            if fsync:
                for path, _ in _walk(self.root / tmp):
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
                fsync_dir(self.root / tmp)
            new = {r: identity(path, self.by) for path, r in _walk(self.root / tmp)}
            new_dirs = {p.relative_to(self.root / tmp).as_posix() for p in (self.root / tmp).rglob("*") if p.is_dir()}
            # Check, swap and record under one hold of the ledger's lock: a second process replacing the same
            # folder at once (sweep tasks drawing one generated dataset) must see either the folder before this
            # swap or the swap recorded, never the new files in place but not yet in the ledger.
            with self._changing() as ledger:
                problem = self.problem(rel, folder=True)  # again: it may have become a link or a file meanwhile
                if problem is not None:
                    raise TrainerError(f"{self.option}: {problem}; it is left as it is")
                ours = {r[len(rel) + 1:]: e for r, e in ledger.files.items()
                        if r.startswith(rel + "/") and unchanged(self.root / r, e)}
                clash = [f"{rel}/{r}" for r in new if os.path.lexists(target / r) and r not in ours] + \
                        [f"{rel}/{d}" for d in new_dirs if os.path.lexists(target / d) and not (target / d).is_dir()]
                if clash:
                    raise TrainerError(f"{self.option}: {self.root / clash[0]} was not written by the trainer (or "
                                       f"changed since), and replacing {target} would replace it; it is left as it "
                                       f"is: move it away")
                ledger.pending[old] = {**me(), "replaces": rel, "from": tmp, "ours": ours, "new": new,
                                       "new_dirs": sorted(new_dirs)}
                ledger.save(self.root)  # the swap's record on disk before the renames: a kill is finished later
                if os.path.lexists(target):
                    os.rename(target, self.root / old)
                os.rename(self.root / tmp, target)
                if fsync:
                    fsync_dir(target.parent)
                swapped = True
                ledger.pending.pop(tmp, None)
                self._finish_swap(ledger, old)
        except BaseException as err:
            if swapped:  # carrying the user's files cut short: no roll-back, the next writer here finishes it
                if isinstance(err, OSError):
                    raise disk_error(err, target) from None
                raise
            shutil.rmtree(self.root / tmp, ignore_errors=True)
            if os.path.lexists(self.root / old) and not os.path.lexists(target):  # cut between the two renames
                os.rename(self.root / old, target)
            self._forget(tmp, old)
            self.abandon()
            if isinstance(err, OSError):
                raise disk_error(err, target) from None
            raise

    def _finish_swap(self, ledger: Ledger, old: str) -> None:
        """After `replacing` renamed the new version into place (also after a kill, from the pending record):
        record the new files, carry the user's files of the old version into it, remove the trainer's."""
        record = ledger.pending[old]
        rel, ours = record["replaces"], record["ours"]
        target, old_path = self.root / rel, self.root / old
        if not target.is_dir() or target.is_symlink():
            raise TrainerError(f"{old_path} holds the old version of {target}, which is no longer a folder; move what "
                               f"you need out of it, then start again")
        if old_path.is_symlink():  # a link is never emptied (rule 5): the swap never moves one there
            raise TrainerError(f"{old_path} is a link where the old version of {target} should be; the trainer "
                               f"leaves it as it is: remove it, then start again")
        ledger.forget_below(rel)
        for r, entry in record["new"].items():
            if unchanged(target / r, entry):
                ledger.files[f"{rel}/{r}"] = entry
        ledger.dirs |= {rel} | {f"{rel}/{d}" for d in record.get("new_dirs", [])}
        stuck = []
        for path, r in list(_walk(old_path)):
            if r in ours and unchanged(path, ours[r]):
                path.unlink()
                continue
            dest = target / r
            if os.path.lexists(dest):
                stuck.append(r)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, dest)
        for folder in sorted((p for p in old_path.rglob("*") if p.is_dir() and not p.is_symlink()),
                             key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:
                pass
        if stuck:
            raise TrainerError(f"{target} was replaced, but {len(stuck)} file(s) of its old version could not be "
                               f"moved into it (e.g. {stuck[0]}); they are kept in {old_path}")
        if os.path.lexists(old_path):
            if old_path.is_dir() and not old_path.is_symlink():
                old_path.rmdir()
        ledger.pending.pop(old, None)

    # ---- removing ----

    def remove(self, rel: str) -> bool:
        """Delete the file `rel` if it is the trainer's (recorded, unchanged); else leave it. True if deleted."""
        with self._changing() as ledger:
            return self._remove(ledger, rel)

    def _remove(self, ledger: Ledger, rel: str) -> bool:
        path = self.root / rel
        if not self.owns(rel) or self.inputs.hit(path) is not None:
            return False
        _delete(path)
        ledger.files.pop(rel, None)
        return True

    def remove_tree(self, rel: str = "", spare: Iterable[str] = ()) -> Tuple[int, List[str]]:
        """Delete the trainer's files below the folder `rel` (the whole folder with ""), except those in
        `spare`, then the folders it made that are empty now; returns (files deleted, files kept: the user's).
        Temporaries in use are left to `clean_leftovers`."""
        spare = set(spare) | set(GATE_FILES)
        deleted, kept = 0, []
        with self._changing() as ledger:
            for path, r in list(_walk(self.root, rel)):
                if r in spare or any(r == p or r.startswith(p + "/") for p in ledger.pending):
                    continue
                top = self.live_tree(r)
                if top is not None:  # a whole tree another program wrote for the trainer
                    if os.path.lexists(self.root / top):
                        _delete(self.root / top)
                        deleted += 1
                elif self._remove(ledger, r):
                    deleted += 1
                else:
                    kept.append(r)
            for d in sorted((d for d in ledger.dirs if not rel or d == rel or d.startswith(rel + "/")),
                            key=lambda d: d.count("/"), reverse=True):
                path = self.root / d
                if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                    path.rmdir()
                    ledger.dirs.discard(d)
            for r in [r for r in ledger.files if (not rel or r.startswith(rel + "/"))
                      and not os.path.lexists(self.root / r)]:
                del ledger.files[r]
        return deleted, kept

    def move(self, src: str, dst: str) -> None:
        """Rename the trainer's sub-folder (or file) `src` to `dst` (absent), its records with it."""
        problem = self.problem(dst, folder=True)
        if problem is not None or os.path.lexists(self.root / dst):
            raise TrainerError(f"{self.option}: cannot move {src} to {dst}: {problem or 'it exists'}")
        with self._changing() as ledger:
            os.rename(self.root / src, self.root / dst)
            for r in [r for r in ledger.files if r == src or r.startswith(src + "/")]:
                ledger.files[dst + r[len(src):]] = ledger.files.pop(r)
            for d in [d for d in ledger.dirs if d == src or d.startswith(src + "/")]:
                ledger.dirs.discard(d)
                ledger.dirs.add(dst + d[len(src):])

    # ---- what killed commands left ----

    def clean_leftovers(self) -> List[str]:
        """Temporaries of commands killed while writing here, once their process is gone (only what the ledger
        says they made); a sub-folder replacement cut part-way is finished or undone. Returns lines to print."""
        if not (self.root / LEDGER).is_file():
            return []
        lines = []
        with self._changing() as ledger:
            for name, holder in sorted(ledger.pending.items()):
                path = self.root / name
                gone = process_gone(holder)
                if gone is None:  # another host: gone once nothing in its temporary has changed for an hour
                    gone = not _changed_within(path, STALE_TEMP_S)
                if not gone:
                    continue
                target = self.root / holder["replaces"] if "replaces" in holder else None
                if target is not None and os.path.lexists(path):
                    if not os.path.lexists(target):
                        os.rename(path, target)  # the swap was cut between its two renames: put the old one back
                        lines.append(f"restored {target} from an interrupted replacement")
                        ledger.pending.pop(name)
                    else:
                        self._finish_swap(ledger, name)
                        lines.append(f"finished an interrupted replacement of {target}")
                    continue
                new_from = holder.get("from")  # the new version's temporary name (records of older versions: none)
                if target is not None and new_from and not os.path.lexists(self.root / new_from) and \
                        target.is_dir() and not target.is_symlink():
                    # no old version, and the new one was renamed into place before the kill: its files recorded
                    self._finish_swap(ledger, name)
                    lines.append(f"finished an interrupted replacement of {target}")
                    continue
                if os.path.lexists(path):
                    _delete(path)
                ledger.pending.pop(name)
        return lines

    def abandon(self) -> None:
        """A command that failed before it placed any file: the folder as it was before it. The ledger goes if
        this command made it and it records nothing, then the folders the command made to hold the root, if
        empty."""
        if not self.had_ledger and (self.root / LEDGER).is_file():
            try:
                with _ledger_locked(self.root):
                    ledger = Ledger.read(self.root)
                    if ledger is not None and not ledger.files and not ledger.pending and \
                            (ledger.owner is None or self.root in self.created):
                        (self.root / LEDGER).unlink()
            except TrainerError:
                pass
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:
                break


# ------------------------------------------------------------------------------------------ opening outputs

def open_folder(root: Union[str, Path], owner: str, by: str, option: str, inputs: Optional[Inputs] = None,
                what: str = "") -> Folder:
    """A folder a command writes as its own (rule 4): new, empty, or of the same kind (its ledger, or a folder
    of that kind written before ledgers). Checks only; nothing is written until the first write."""
    root = Path(root)
    (inputs or Inputs()).check(root, option)
    if os.path.lexists(root) and not root.is_dir():
        raise TrainerError(f"{option} {root} exists and is not a folder")
    folder = Folder(root, by, inputs, option, owner)
    if root.is_dir() and folder.ledger.owner != owner:
        others = [p.name for p in root.iterdir() if p.name not in GATE_FILES]
        if others:
            said = f" (it holds {folder.ledger.owner} outputs)" if folder.ledger.owner else ""
            raise TrainerError(f"{option} {root} already exists and is not {what or 'a ' + owner + ' folder of the trainer'}"
                               f"{said}: nothing in it is touched. Choose a new or empty folder")
    return folder


def output_file(path: Union[str, Path], by: str, option: str, inputs: Optional[Inputs] = None,
                overwrite: bool = False, companions: Sequence[str] = ()) -> Tuple[Folder, str]:
    """A single output file (and files written beside it, `companions`, relative to its folder): its folder and
    its name there. Refused: an input or a place inside one (always), a folder, a link on the way, an existing
    file the trainer did not write (unless `overwrite`, the flag `--overwrite`)."""
    path = Path(path)
    if path.is_dir():
        raise TrainerError(f"{option} {path} is a folder; give a file path, e.g. {path / 'out'}")
    for parent in path.parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise TrainerError(f"{option} {path}: {parent} is a file, not a folder")
            break
    name = path.name
    names = [name, *companions]
    folder = Folder(path.parent, by, inputs, option, granted=names if overwrite else ())
    for rel in names:
        problem = folder.problem(rel)
        if problem is None:
            continue
        if "was not written by the trainer" in problem and not overwrite:
            raise TrainerError(f"{option}: {problem}; pass --overwrite to replace it, or choose another path")
        raise TrainerError(f"{option}: {problem}; nothing was written")
    return folder, name
