"""Hyperparameter search with Optuna: workers pull trials from one study, each trial is an ordinary
`trainer train` run, and the pruner stops bad trials early.

Why Optuna, driven by ask-and-tell from here (../shared/docs/tuning-and-data-at-scale.md, A2): no server (the
study is a journal file in the tune folder, or a database the cluster has), asynchronous pruning fed by a
report after every evaluation, and, because our runs resume exactly, none of Optuna's retry machinery: a
preempted trial keeps its number and continues from its checkpoint.

A tune folder (tunes/<name>/ or --dir):
    tune.json            the tune file as resolved and frozen at the first `trainer tune` (a different one is refused)
    study.journal        Optuna's journal (unless --storage names a database)
    trials/NNNN/         each trial's run directory: checkpoints, metrics.jsonl, model/ as `trainer train` writes
    trials/NNNN.json     the trial's outcome for the run directory's reader: state, value, step it reached, why
    logs/NNNN.log        the trial's console output (beside, not inside, the run directory the trainer owns)
    leases/WORKER.json   which trial a worker holds; its mtime is the worker's heartbeat
    stop/                stop files: one per trial (pruning, preemption) that the trial's trainer watches

How a trial ends:
- the run completes: COMPLETE with the best value of the metric over its evaluations (summary.json);
- the pruner says stop after an evaluation: the worker asks the run to stop (its stop file), PRUNED;
- the worker is asked to stop (SIGTERM/SIGUSR1, or its own stop file from the SLURM script): the trial saves
  its checkpoint and stays RUNNING, held by the worker's lease; the worker exits 3 and, restarted (requeued)
  under the same worker id, re-attaches to the same trial, which resumes from its checkpoint;
- the run fails: FAIL with its last error line;
- its worker died and never came back: a RUNNING trial whose lease has not been renewed for `stale_after_s`
  is taken over by another worker (the lease is renamed to it, atomically) and resumes from its checkpoint.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from trainer import rundir
from trainer.config import load_config, load_spec_file
from trainer.errors import ConfigError, TrainerError
from trainer.data import data_inputs
from trainer.files import read_json
from trainer.outputs import Folder, Inputs, open_folder
from trainer.metrics import is_number
from trainer.slurm_submit import submit_array
from trainer.tasks import task_spec

TUNE_KEYS = {"name", "recipe", "overrides", "trials", "sampler", "pruner", "seed", "metric", "direction",
             "parameters", "launcher", "gpus_per_trial", "stale_after_s"}
PARAM_TYPES = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
               "categorical": {"type", "choices"}}
POLL_S = 1.0  # how often a worker reads its trial's new metrics rows and looks for a stop request
HEARTBEAT_S = 30.0  # how often a worker renews its lease (one metadata write on the shared file system)
EXIT_STOPPED = 3  # as `trainer train`: stopped on request, run the same command again to continue


# ---------------------------------------------------------------- the tune file

def _parameter(name: str, p) -> dict:
    """One search-space entry, checked; errors name the key."""
    if not isinstance(p, dict) or p.get("type") not in PARAM_TYPES:
        raise ConfigError(f"tune parameter {name}: needs type float, int or categorical, got {p!r}")
    unknown = sorted(set(p) - PARAM_TYPES[p["type"]])
    if unknown:
        raise ConfigError(f"tune parameter {name}: unknown field '{unknown[0]}'; valid: {sorted(PARAM_TYPES[p['type']])}")
    if p["type"] == "categorical":
        if not isinstance(p.get("choices"), list) or not p["choices"]:
            raise ConfigError(f"tune parameter {name}: categorical needs a non-empty list 'choices'")
        return p
    number = float if p["type"] == "float" else int
    for key in ("low", "high"):
        value = p.get(key)
        if not is_number(value) or (number is int and value != int(value)):
            raise ConfigError(f"tune parameter {name}: '{key}' must be a{'n integer' if number is int else ' number'}, "
                              f"got {value!r}")
    if not p["low"] < p["high"]:
        raise ConfigError(f"tune parameter {name}: needs low < high, got {p['low']} and {p['high']}")
    if p.get("log") and p["low"] <= 0:
        raise ConfigError(f"tune parameter {name}: log scale needs low > 0, got {p['low']}")
    if p.get("log") and p.get("step") is not None:
        raise ConfigError(f"tune parameter {name}: 'step' and 'log' cannot be combined (Optuna's rule)")
    return {**p, "low": number(p["low"]), "high": number(p["high"]), "log": bool(p.get("log", False))}


def load_tune(path: str, cli_overrides: Optional[List[str]] = None) -> dict:
    """The tune file, checked and completed with its defaults (metric and direction from the recipe)."""
    p = Path(path)
    spec = load_spec_file(p, "tune", TUNE_KEYS, ("recipe", "parameters", "trials"))
    if not isinstance(spec["parameters"], dict) or not spec["parameters"]:
        raise ConfigError(f"tune file {path}: 'parameters' must map config keys to search spaces")
    if not isinstance(spec.get("overrides", []), list):
        raise ConfigError(f"tune file {path}: 'overrides' must be a list of key=value")
    if isinstance(spec["trials"], bool) or not isinstance(spec["trials"], int) or spec["trials"] < 1:
        raise ConfigError(f"tune file {path}: 'trials' must be an integer >= 1, got {spec['trials']!r}")
    spec.setdefault("name", p.stem)
    spec["overrides"] = list(spec.get("overrides", [])) + list(cli_overrides or [])
    spec.setdefault("sampler", "tpe")
    spec.setdefault("pruner", "asha")
    spec.setdefault("seed", 0)
    spec.setdefault("gpus_per_trial", 1)
    spec.setdefault("stale_after_s", 600)
    gpus = spec["gpus_per_trial"]
    if not is_number(gpus) or gpus <= 0:
        raise ConfigError(f"tune gpus_per_trial must be a number > 0 (for the GPU-hour accounting), got {gpus!r}")
    stale = spec["stale_after_s"]
    if not is_number(stale) or stale < 2 * HEARTBEAT_S:
        raise ConfigError(f"tune stale_after_s must be a number of seconds >= {2 * HEARTBEAT_S:.0f} (two heartbeats), "
                          f"got {stale!r}")
    if spec["sampler"] not in SAMPLERS:
        raise ConfigError(f"tune sampler must be one of {sorted(SAMPLERS)}, got {spec['sampler']!r}")
    if spec["pruner"] not in PRUNERS:
        raise ConfigError(f"tune pruner must be one of {sorted(PRUNERS)}, got {spec['pruner']!r}")
    launcher = spec.get("launcher", "")
    if not isinstance(launcher, str):
        raise ConfigError(f"tune file {path}: 'launcher' must be a command line string, e.g. 'torchrun --nproc_per_node 2'")
    spec["launcher"] = launcher
    spec["parameters"] = {name: _parameter(name, value) for name, value in spec["parameters"].items()}
    if spec["sampler"] == "grid":
        ranged = [n for n, v in spec["parameters"].items() if v["type"] != "categorical"]
        if ranged:
            raise ConfigError(f"tune sampler grid needs every parameter categorical (a list of values); "
                              f"{ranged[0]} is a {spec['parameters'][ranged[0]]['type']} range")
        size = 1
        for p in spec["parameters"].values():
            size *= len(p["choices"])
        if spec["trials"] > size:
            print(f"[tune] the grid has {size} points: trials {spec['trials']} -> {size}", flush=True)
            spec["trials"] = size
    base = load_config(spec["recipe"], spec["overrides"])  # the recipe and the fixed overrides, before any value
    task = task_spec(base.task, base.data)  # its default eval.monitor, and which way each metric is better
    metric = spec.get("metric") or base.eval.monitor or task.default_monitor
    spec["metric"] = metric
    higher = task.higher_is_better(metric.removeprefix("raw_"))  # raw_<metric>: the raw weights' (ema.evaluate=both)
    direction = spec.get("direction") or ("maximize" if higher else "minimize")
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"tune direction must be maximize or minimize, got {direction!r}")
    spec["direction"] = direction
    return spec


def corners(parameters: Dict[str, dict]) -> List[dict]:
    """Value sets that between them give every parameter each extreme (low, high) and each choice: the configs
    checked before any trial starts, so that a value the search can reach and the config refuses fails now."""
    first = {n: (p["choices"][0] if p["type"] == "categorical" else p["low"]) for n, p in parameters.items()}
    sets = [first]
    for name, p in parameters.items():
        for value in (p["choices"][1:] if p["type"] == "categorical" else [p["high"]]):
            sets.append({**first, name: value})
    return sets


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else repr(v) if isinstance(v, float) else str(v)


def trial_overrides(spec: dict, values: dict, run_dir: Path) -> List[str]:
    return list(spec["overrides"]) + [f"{k}={_value(v)}" for k, v in values.items()] + [f"run.dir={run_dir}"]


def check_values(spec: dict, values: dict, run_dir: Path):
    """The config of a trial with these values (refused in one line naming them)."""
    try:
        return load_config(spec["recipe"], trial_overrides(spec, values, run_dir))
    except ConfigError as err:
        shown = ", ".join(f"{k}={_value(v)}" for k, v in values.items())
        raise ConfigError(f"tune values {shown}: {err}") from None


# ---------------------------------------------------------------- Optuna's parts, by name

def _optuna():
    try:
        import optuna
    except ImportError:
        raise TrainerError("trainer tune needs Optuna: pip install -e '.[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens, once per trial
    # "QMCSampler is experimental" and the like, at every worker start: the user chose it, knowing
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def trial_seed(seed: int, number: int) -> int:
    """The seed of trial `number`'s draws: a hash of both (numpy's SeedSequence), so that neighbouring trials
    and neighbouring tune seeds get unrelated streams."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def _seeded_per_trial(optuna, make, seed: int):
    """A sampler `make(trial_seed(seed, n))` made afresh for each trial n, for the samplers whose draws come
    from one RandomState seeded when made (TPE, random, CMA-ES). Seeded once per worker start instead, a
    restarted worker (preempted, SIGINT, kill -9) drew the values of the first trial of its previous start
    again. Per trial, they depend only on the seed, the trial number and the study's trials so far, which is
    what these samplers read from the study anyway (TPE its history, CMA-ES its optimizer stored in the
    trials' system attributes), so one made per trial samples as one kept over the whole tune: a tune of one
    worker draws the same values, stopped and restarted or not. Optuna's PartialFixedSampler wraps a sampler
    the same way."""
    class SeededPerTrial(optuna.samplers.BaseSampler):
        def __init__(self):
            self._of_trial = {}  # trial number -> its sampler, until it is told (a worker holds one at a time)

        def _of(self, trial):
            if trial.number not in self._of_trial:
                self._of_trial[trial.number] = make(trial_seed(seed, trial.number))
            return self._of_trial[trial.number]

        def reseed_rng(self) -> None:  # Optuna's optimize(n_jobs>1) only; the seeds here are made per trial
            pass

        def before_trial(self, study, trial):
            self._of(trial).before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._of(trial).infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._of(trial).sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self._of(trial).after_trial(study, trial, state, values)
            self._of_trial.pop(trial.number, None)

    return SeededPerTrial()


def _tpe(optuna, spec, seed, worker_index):
    return _seeded_per_trial(optuna, lambda s: optuna.samplers.TPESampler(seed=s), seed)


def _random(optuna, spec, seed, worker_index):
    return _seeded_per_trial(optuna, lambda s: optuna.samplers.RandomSampler(seed=s), seed)


def _grid(optuna, spec, seed, worker_index):
    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values):
            """GridSampler stops optimize() when the grid is done, by study.stop(), which raises under
            ask-and-tell; our workers count trials themselves (the budget is capped at the grid's size)."""

    # The same seed in every worker: a grid point is named by its place in the list the seed shuffles (trial
    # n takes point n while n < the grid's size), so with a seed per worker two workers' points n and m could
    # be one value set, run twice, and another never.
    return Grid({n: p["choices"] for n, p in spec["parameters"].items()}, seed=seed)


def _cmaes(optuna, spec, seed, worker_index):
    return _seeded_per_trial(optuna, lambda s: optuna.samplers.CmaEsSampler(seed=s), seed)


def _qmc(optuna, spec, seed, worker_index):
    # Each worker its own scrambled sequence (the seed scrambles it), walked by a counter the study keeps per
    # sequence: a restarted worker goes on where it stopped. Not one sequence shared by all workers: Optuna
    # reads and writes that counter in two steps, so two workers could take the same point. Not seeded per
    # trial: the points must come from one sequence to cover the space evenly.
    return optuna.samplers.QMCSampler(seed=seed + worker_index, scramble=True)


SAMPLERS = {"tpe": _tpe, "random": _random, "grid": _grid, "cmaes": _cmaes, "qmc": _qmc}


def _asha(optuna):
    # reduction factor 3 (Hyperband's and the ASHA paper's); rungs from the first reported step on
    return optuna.pruners.SuccessiveHalvingPruner(min_resource="auto", reduction_factor=3)


def _hyperband(optuna):
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)


def _median(optuna):
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def _none(optuna):
    return optuna.pruners.NopPruner()


PRUNERS = {"asha": _asha, "hyperband": _hyperband, "median": _median, "none": _none}


def journal_problem(path: Path) -> Optional[str]:
    """What makes Optuna's journal unreadable, as one line naming its line, or None. Each line Optuna writes is
    one JSON record with an op_code, ended by a newline. Optuna replays every line at each read; on a line
    that is not one it stops with a bare JSONDecodeError (or a ValueError, a KeyError), and a bad last line it
    skips until the next append (which every command makes) lands after it. A last line without its newline
    is let through only while it may still be an append in progress (Optuna writes each under its lock)."""
    for attempt in range(2):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:
            return f"cannot read the tune's journal {path}: {err.strerror or err}"
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with its newline
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not (isinstance(record, dict) and "op_code" in record):
                return _journal_line(path, number, line, "is not a record of Optuna's")
        if not tail:
            return None
        if attempt == 0:
            time.sleep(1.0)  # an append in progress ends within this; one that does not was cut
    return _journal_line(path, len(lines) + 1, tail, "is cut short (no end of line) or not Optuna's")


def _journal_line(path: Path, number: int, line: bytes, what: str) -> str:
    shown = line.decode("utf-8", errors="replace")
    shown = repr(shown if len(shown) <= 60 else shown[:60] + "...")
    return (f"{path} line {number} {what} ({shown}): Optuna writes one JSON record per line and cannot read past "
            f"it. Remove that line (or restore the file from a backup) and run the command again; the trainer "
            f"never rewrites the journal itself")


def _journal_read_back(fn):
    """For what reads the study over and over (a worker, collect): a line that goes bad in the journal while it
    runs (open_study checked it at the start) is the same one line, not Optuna's traceback."""
    @functools.wraps(fn)
    def wrapper(root, *args, **kwargs):
        try:
            return fn(root, *args, **kwargs)
        except (ValueError, KeyError):
            problem = journal_problem(Path(root) / "study.journal")
            if problem:
                raise TrainerError(problem) from None
            raise

    return wrapper


def open_study(root: Path, spec: dict, seed: int, worker_index: int = 0):
    """The tune's study, its sampler seeded from `seed` (the tune's) per trial, or per worker where the
    sampler needs it (see SAMPLERS)."""
    optuna = _optuna()
    if spec.get("storage"):
        storage = spec["storage"]
    else:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = str(root / "study.journal")
        problem = journal_problem(root / "study.journal")  # before Optuna appends anything after a bad line
        if problem:
            raise TrainerError(problem)
        # O_EXCL lock files: the lock that suits NFSv3+ and Lustre (the symlink lock is for NFSv2)
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    sampler = SAMPLERS[spec["sampler"]](optuna, spec, seed, worker_index)
    return optuna.create_study(study_name=spec["name"], storage=storage, load_if_exists=True,
                               direction=spec["direction"], sampler=sampler, pruner=PRUNERS[spec["pruner"]](optuna))


def tune_folder(root: Path, inputs: Optional[Inputs] = None) -> Folder:
    """A tune's folder to write into: new, empty, or a tune's own; never inside what its trials read. Everything
    in it is written as the tune's (its workers' and `trainer collect`'s files included)."""
    return open_folder(root, "tune", "tune", "tune folder", inputs, what="a tune folder of the trainer")


def prepare(tune_file: str, out_dir: Optional[str], cli_overrides: List[str], storage: Optional[str]) -> Path:
    """Check the tune file and every extreme of its search space, freeze it in tune.json, create the study."""
    spec = load_tune(tune_file, cli_overrides)
    root = Path(out_dir or Path("tunes") / spec["name"])
    spec["storage"] = storage
    inputs = Inputs([("the tune file", tune_file), ("the recipe", spec["recipe"])])
    for values in corners(spec["parameters"]):
        inputs.extend(data_inputs(check_values(spec, values, root / "trials" / "0000").data))
    out = tune_folder(root, inputs)
    frozen = read_json(root / "tune.json") or None
    if frozen is not None and frozen != spec:
        changed = sorted(k for k in set(frozen) | set(spec) if frozen.get(k) != spec.get(k))
        raise TrainerError(f"{root} holds a different tune (its {', '.join(changed)} differ); choose another --dir "
                           f"or delete it")
    # everything the tune writes at a fixed name, checked before the first: a refusal changes nothing
    out.check(["tune.json", "results.csv", "results.md", "gpu_hours.json", "best.yaml"],
              folders=["trials", "logs", "leases", "stop", "plots"])
    for sub in ("trials", "logs", "leases", "stop"):
        out.mkdir(sub)
    out.write_json("tune.json", spec)
    open_study(root, spec, spec["seed"])
    return root


def load_prepared(root: Path) -> dict:
    spec = read_json(root / "tune.json") or None
    if spec is None:
        raise TrainerError(f"{root} is not a tune folder (no tune.json)")
    return spec


# ---------------------------------------------------------------- a worker

class _StopAsked:
    """SIGTERM/SIGUSR1 to the worker, or its stop file (the SLURM script's trap touches it): stop after saving."""

    def __init__(self):
        self.signalled = False
        self.stop_file = os.environ.get("TRAINER_STOP_FILE")
        # Ctrl-C reaches the trial's trainer too (one process group), which leaves at once without saving:
        # the trial stays this worker's and resumes from its last checkpoint
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signalled = True

    def __bool__(self) -> bool:
        return self.signalled or bool(self.stop_file and os.path.exists(self.stop_file))


def _trial_name(number: int) -> str:
    return f"{number:04d}"


def _counts(study) -> Tuple[int, int]:
    """(trials finished, trials running) in the study, whoever runs them."""
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states), states.count("RUNNING")


def _take_over(root: Path, out: Folder, study, worker_id: str, stale_after_s: float) -> Optional[dict]:
    """A RUNNING trial whose worker's lease went stale: rename that lease to ours (atomic: of two workers
    trying, one wins) and continue the trial. A RUNNING trial without any lease that old is failed."""
    optuna = _optuna()
    now = time.time()
    for lease in sorted((root / "leases").glob("*.json")):
        held = read_json(lease) or {}
        try:
            age = now - lease.stat().st_mtime
        except FileNotFoundError:
            continue
        if lease.stem == worker_id or age < _stale_after(root, lease.stem, stale_after_s):
            continue
        try:
            out.move(f"leases/{lease.name}", f"leases/{worker_id}.json")
        except FileNotFoundError:  # another worker took it first
            continue
        out.touch(f"leases/{worker_id}.json")
        print(f"[tune] worker {worker_id}: taking over trial {held.get('trial')} from worker {lease.stem} "
              f"(no heartbeat for {age:.0f} s)", flush=True)
        return held
    leased = _leased_trials(root)  # listed again now: a lease renamed by another taker since is under its new name
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        started = t.datetime_start.timestamp() if t.datetime_start else now
        if t.number not in leased and now - started > stale_after_s:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            _record(out, t.number, {"state": "failed", "reason": "its worker left without a lease and did not "
                                    f"come back within stale_after_s={stale_after_s}"})
    return None


def _stale_after(root: Path, worker: str, stale_after_s: float) -> float:
    """How old `worker`'s lease must be to be taken over. From another host, also long enough for the run lock
    its trainer left (rundir.STALE_AFTER_S, judged by its age there too): a takeover before it would find the
    run directory in use and fail the trial it came to resume. A worker whose host is not known counts as
    another host's."""
    if (read_json(root / "leases" / f"{worker}.pid") or {}).get("host") == os.uname().nodename:
        return stale_after_s
    return max(stale_after_s, rundir.STALE_AFTER_S + rundir.HEARTBEAT_S)


def _leased_trials(root: Path) -> set:
    """The trials the leases name, from one listing in which every lease could be read: a lease renamed by a
    takeover while it was listed (gone under its old name, not yet seen under its new one) lists them again,
    so that its trial is not taken for one without a worker."""
    trials: set = set()
    for _ in range(20):
        trials, vanished = set(), False
        for lease in sorted((root / "leases").glob("*.json")):
            try:
                text = lease.read_text()
            except FileNotFoundError:
                vanished = True
                continue
            except OSError:
                text = ""
            try:
                held = json.loads(text)
            except ValueError:  # being written, or emptied: names no trial
                held = {}
            trials.add(held.get("trial") if isinstance(held, dict) else None)
        if not vanished:
            break
        time.sleep(0.05)
    return trials


def _record(out: Folder, number: int, outcome: dict) -> None:
    out.write_json(f"trials/{_trial_name(number)}.json", outcome)


def _suggest(trial, parameters: Dict[str, dict]) -> dict:
    values = {}
    for name, p in parameters.items():
        if p["type"] == "categorical":
            values[name] = trial.suggest_categorical(name, p["choices"])
        elif p["type"] == "float":
            values[name] = trial.suggest_float(name, p["low"], p["high"], log=p["log"], step=p.get("step"))
        else:
            values[name] = trial.suggest_int(name, p["low"], p["high"], log=p["log"], step=p.get("step") or 1)
    return values


class _Rows:
    """The evaluation rows a run appends to metrics.jsonl, read as they come (only the new bytes each time)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new(self) -> List[dict]:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:  # the run rewound its log to a checkpoint on resume: read it again
                    self.offset, self.partial = 0, b""
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("type") == "eval":
                rows.append(row)
        return rows


def _last_error(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except FileNotFoundError:
        return "no output"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:500]


def _stop_with_parent() -> None:
    """In the trial's process before it runs: SIGTERM it when its worker dies (Linux), so a worker killed
    outright leaves no orphan training on: the trial saves its checkpoint and stops, and the worker that takes
    it over resumes it from there instead of meeting a run directory still in use."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _run_trial(root: Path, out: Folder, spec: dict, study, trial, stop: _StopAsked, worker_id: str) -> int:
    """Train one trial to its end, its pruning, or a stop request. Returns the worker's exit code so far."""
    optuna = _optuna()
    number = trial.number
    name = _trial_name(number)
    run_dir = root / "trials" / name
    lease = f"leases/{worker_id}.json"
    # the storage's id, which re-attaching needs (Optuna's Trial takes it; the number is for people)
    out.write_json(lease, {"trial": number, "trial_id": trial._trial_id, "worker": worker_id})
    values = _suggest(trial, spec["parameters"])
    try:
        check_values(spec, values, run_dir)
    except ConfigError as err:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _record(out, number, {"state": "failed", "values": values, "reason": str(err)})
        out.remove(lease)
        print(f"[tune] trial {number}: failed: {err}", flush=True)
        return 0
    trial_stop = root / "stop" / name
    out.remove(f"stop/{name}")
    launcher = shlex.split(spec["launcher"]) if spec["launcher"] else [sys.executable]
    cmd = [*launcher, "-m", "trainer", "train", spec["recipe"], *trial_overrides(spec, values, run_dir)]
    env = {**os.environ, "TRAINER_STOP_FILE": str(trial_stop)}
    resumed = (run_dir / "checkpoints").is_dir()
    print(f"[tune] worker {worker_id}: trial {number} {'resumes' if resumed else 'starts'}: "
          + " ".join(f"{k}={_value(v)}" for k, v in values.items()), flush=True)
    rows = _Rows(run_dir / "metrics.jsonl")
    pruned_at = None

    def report_new_rows() -> None:
        nonlocal pruned_at
        for row in rows.new():
            value = row.get(spec["metric"])
            if value is None or pruned_at is not None:
                continue
            trial.report(float(value), int(row["step"]))  # a step reported before (a resume) is ignored
            if trial.should_prune():
                pruned_at = int(row["step"])
                out.touch(f"stop/{name}")  # the run saves and stops at its next step

    started = beat = time.time()
    with out.append(f"logs/{name}.log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_stop_with_parent)
        while proc.poll() is None:
            report_new_rows()
            if stop and not trial_stop.exists():
                out.touch(f"stop/{name}")  # preempted: the trial saves its checkpoint and stops; the lease stays ours
            if time.time() - beat > HEARTBEAT_S:
                out.touch(lease)
                beat = time.time()
            try:
                proc.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                pass
        report_new_rows()  # what it wrote between the last look and its exit
    rc = proc.returncode
    out.remove(f"stop/{name}")
    wall = time.time() - started
    spent = float(study.get_trials(deepcopy=False)[number].user_attrs.get("wall_s", 0.0)) + wall
    trial.set_user_attr("wall_s", spent)  # summed over the trial's attempts (preemptions, take-overs)
    summary = read_json(run_dir / "summary.json") or None
    reached = int(summary["updates"]) if summary else max((int(r["step"]) for r in _Rows(run_dir / "metrics.jsonl").new()),
                                                         default=0)
    if rc == 0 and summary is not None:  # finished (even if the pruner spoke after its last evaluation)
        best = (summary.get("best") or {}).get(spec["metric"])
        if best is None:
            best = (summary.get("final") or {}).get(spec["metric"])
        study.tell(trial, float(best))
        _record(out, number, {"state": "complete", "values": values, "value": best, "step": reached, "wall_s": spent})
        print(f"[tune] trial {number}: complete, best {spec['metric']} {best:.4f}", flush=True)
    elif pruned_at is not None and rc == EXIT_STOPPED:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        _record(out, number, {"state": "pruned", "values": values, "pruned_at_step": pruned_at, "step": reached,
                               "wall_s": spent})
        print(f"[tune] trial {number}: pruned after the evaluation at step {pruned_at}", flush=True)
    elif rc == EXIT_STOPPED or stop:
        print(f"[tune] worker {worker_id}: stopped on request; trial {number} saved its checkpoint and continues "
              f"when this worker starts again", flush=True)
        return EXIT_STOPPED  # the lease stays: the restarted worker re-attaches to this trial
    else:
        reason = f"trainer exited {rc}: {_last_error(root / 'logs' / f'{name}.log')}"
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        _record(out, number, {"state": "failed", "values": values, "reason": reason, "step": reached, "wall_s": spent})
        print(f"[tune] trial {number}: failed ({reason})", flush=True)
    out.remove(lease)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def worker_busy(root: Path, worker_id: str) -> Optional[int]:
    """The pid of a live worker of this id on this machine, else None (a dead one's pid file is stale)."""
    held = read_json(root / "leases" / f"{worker_id}.pid") or {}
    if held.get("host") == os.uname().nodename and isinstance(held.get("pid"), int) and _alive(held["pid"]):
        return held["pid"]
    return None


@_journal_read_back
def run_worker(root: Path, worker_id: str, index: int) -> int:
    """Ask for trials (or re-attach to the one this worker's lease names) until the study has its trials."""
    optuna = _optuna()
    spec = load_prepared(root)
    busy = worker_busy(root, worker_id)
    if busy is not None and busy != os.getpid():
        raise TrainerError(f"worker {worker_id} of {root} is already running (pid {busy})")
    out = tune_folder(root)
    out.write_json(f"leases/{worker_id}.pid", {"pid": os.getpid(), "host": os.uname().nodename})
    stop = _StopAsked()
    study = open_study(root, spec, spec["seed"], index)  # draws seeded per trial (see _seeded_per_trial)
    while not stop:
        lease = read_json(root / "leases" / f"{worker_id}.json") or None
        held = lease if lease is not None else _take_over(root, out, study, worker_id, float(spec["stale_after_s"]))
        trial = None
        if held is not None:
            frozen = study.get_trials(deepcopy=False)[held["trial"]]
            if frozen.state == optuna.trial.TrialState.RUNNING:
                trial = optuna.trial.Trial(study, held["trial_id"])  # suggest_* give back its stored values
            else:
                out.remove(f"leases/{worker_id}.json")
                continue
        else:
            finished, running = _counts(study)
            if finished + running >= spec["trials"]:
                break
            trial = study.ask()
        code = _run_trial(root, out, spec, study, trial, stop, worker_id)
        if code:
            return code
    if stop:
        print(f"[tune] worker {worker_id}: stopped on request between trials", flush=True)
        return EXIT_STOPPED
    return 0


# ---------------------------------------------------------------- launching workers

def run_local(root: Path, workers: int) -> int:
    """N workers as processes here; SIGTERM/SIGUSR1/SIGINT reach each of them (each saves its trial and stops).
    Worker ids local-0, local-1, ... not running now: a tune run again re-attaches to the trials its workers
    held, and a second `trainer tune --local` on the same folder adds workers instead of doubling them."""
    ids = [i for i in range(4 * workers + 64) if worker_busy(root, f"local-{i}") is None][:workers]
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", "tune-worker", str(root), "--worker-id", f"local-{i}",
                               "--worker-index", str(i)]) for i in ids]

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [p.wait() for p in procs]
    if any(c == EXIT_STOPPED for c in codes):
        return EXIT_STOPPED
    return next((c for c in codes if c), 0)


def submit_slurm(root: Path, script: str, workers: int, sbatch_args: List[str]) -> str:
    job = submit_array(script, workers, root, f"TRAINER_TUNE={root}", sbatch_args)
    print(f"[tune] submitted {workers} workers as array job {job}; watch: squeue -j {job}; "
          f"results: trainer collect {root}", flush=True)
    return job


# ---------------------------------------------------------------- results

def _cell(v) -> str:
    return "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


@_journal_read_back
def collect(tune_dir: str) -> List[dict]:
    """results.csv and results.md (every trial, best first), best.yaml (the best trial's resolved config,
    runnable as is), plots/ (Optuna's matplotlib figures) and the GPU-hours spent and saved by pruning."""
    root = Path(tune_dir)
    spec = load_prepared(root)
    optuna = _optuna()
    study = open_study(root, spec, spec["seed"])
    trials = study.get_trials(deepcopy=False)
    sign = -1 if spec["direction"] == "maximize" else 1
    holders = {}  # trial -> (worker, seconds since its last heartbeat)
    for lease in (root / "leases").glob("*.json"):
        held = read_json(lease) or {}
        try:
            holders[held.get("trial")] = (lease.stem, time.time() - lease.stat().st_mtime)
        except FileNotFoundError:
            continue
    rows = []
    for t in trials:
        outcome = read_json(root / "trials" / f"{_trial_name(t.number)}.json") or {}
        if t.state == optuna.trial.TrialState.RUNNING:
            outcome["reason"] = _running_note(holders.get(t.number), float(spec["stale_after_s"]))
        steps = sorted(t.intermediate_values)
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "best_reported": (max if sign < 0 else min)(t.intermediate_values.values())
                     if t.intermediate_values else None,
                     "step": outcome.get("step", steps[-1] if steps else None),
                     "pruned_at_step": outcome.get("pruned_at_step"), **t.params,
                     "wall_s": round(float(t.user_attrs.get("wall_s", 0.0)), 1), "reason": outcome.get("reason"),
                     "run_dir": str(root / "trials" / _trial_name(t.number))})
    order = {"complete": 0, "pruned": 1, "running": 2}
    rows.sort(key=lambda r: (order.get(r["state"], 3), r["value"] is None,
                             sign * (r["value"] if r["value"] is not None else 0), r["trial"]))
    columns = ["trial", "state", "value", "best_reported", "step", "pruned_at_step", *spec["parameters"], "wall_s",
               "reason", "run_dir"]
    out = tune_folder(root)
    out.check(["results.csv", "results.md", "gpu_hours.json", "best.yaml"])  # before any is written
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    out.write("results.csv", table.getvalue())
    lines = ["| " + " | ".join(columns[:-1]) + " |", "|" + "---|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns[:-1]) + " |" for r in rows]
    hours = _gpu_hours(rows, float(spec["gpus_per_trial"]))
    lines += ["", f"GPU-hours spent: {hours['spent']:.3f}; saved by pruning (estimated): {hours['saved']:.3f}"]
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if complete:
        best = min(complete, key=lambda t: sign * t.value)
        _write_best(root, out, spec, best.number)
        lines.append(f"best: trial {best.number}, {spec['metric']} {best.value:.4f}; trainer train {root / 'best.yaml'}")
    out.write("results.md", "\n".join(lines) + "\n")
    out.write_json("gpu_hours.json", hours)
    _plots(out, study, complete)
    print("\n".join(lines), flush=True)
    print(f"[tune] {len(complete)} complete of {len(trials)}; written {root / 'results.csv'}", flush=True)
    return rows


def _running_note(holder: Optional[Tuple[str, float]], stale_after_s: float) -> str:
    """Who runs a RUNNING trial, and what to do when nobody will finish it."""
    again = "start a worker (trainer tune ... again, --local or --slurm) and it takes the trial over"
    if holder is None:
        return f"no worker holds it; once it is older than stale_after_s={stale_after_s:.0f} s it is failed"
    worker, age = holder
    if age > stale_after_s:
        return f"its worker {worker} has not been heard of for {age:.0f} s: {again} from its checkpoint"
    return f"worker {worker}, heartbeat {age:.0f} s ago"


def _gpu_hours(rows: List[dict], gpus: float) -> dict:
    """Spent: each trial's wall time x GPUs per trial. Saved: for each pruned trial, the time it would have
    needed to reach the steps of a complete trial at its own pace, less what it spent."""
    spent = sum(r["wall_s"] for r in rows) * gpus / 3600
    full = max((r["step"] or 0 for r in rows if r["state"] == "complete"), default=0)
    saved = 0.0
    for r in rows:
        if r["state"] == "pruned" and full and r["step"]:
            saved += r["wall_s"] * max(full / r["step"] - 1, 0.0) * gpus / 3600
    return {"spent": spent, "saved": saved, "gpus_per_trial": gpus,
            "method": "saved = sum over pruned trials of wall_s x (steps of a complete trial / steps reached - 1)"}


def _write_best(root: Path, out: Folder, spec: dict, number: int) -> None:
    """The best trial's own resolved config (config.yaml of its run), with a fresh run directory."""
    saved = root / "trials" / _trial_name(number) / "config.yaml"
    cfg = OmegaConf.load(saved) if saved.is_file() else OmegaConf.create({})
    OmegaConf.update(cfg, "run.dir", str(Path("runs") / f"{spec['name']}-best"), force_add=True)
    OmegaConf.update(cfg, "run.resume", None, force_add=True)
    header = (f"# The best trial ({number}) of tune {spec['name']}: its resolved config, as it trained.\n"
              f"# Run it as is: trainer train {root / 'best.yaml'}\n")
    out.write("best.yaml", header + OmegaConf.to_yaml(cfg))


def _plots(out: Folder, study, complete: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as vis

    figures = {"history": lambda: vis.plot_optimization_history(study),
               "intermediate_values": lambda: vis.plot_intermediate_values(study),
               "parallel_coordinate": lambda: vis.plot_parallel_coordinate(study)}
    if len(complete) >= 2:  # fANOVA fits a random forest on the complete trials
        figures["importances"] = lambda: vis.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    with out.staged(stale=[f"plots/{name}.png" for name in (*figures, "importances")]) as stage:
        (stage / "plots").mkdir()
        for name, draw in figures.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental, every call
                try:
                    ax = draw()
                except (ValueError, RuntimeError) as err:  # e.g. no trial reported anything yet
                    print(f"[tune] plot {name} skipped: {err}", flush=True)
                    continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(stage / "plots" / f"{name}.png", dpi=100, bbox_inches="tight")
            plt.close(fig)


def is_tune_dir(path: str) -> bool:
    return (Path(path) / "tune.json").is_file()

