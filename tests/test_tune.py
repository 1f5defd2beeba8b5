"""`trainer tune`: Optuna workers sharing one study, pruning, and trials that survive their worker.

Every trial is a real `trainer train` process; what is checked is what a user of a tune relies on: the study
ends with every trial complete or pruned (none lost, none doubled), the pruned ones say where, the best
config trains as is to the best trial's result, and a trial whose worker was stopped or killed continues as
the same trial from its checkpoint, ending bitwise where an uninterrupted run ends.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import PYTHONPATH, ROOT, assert_same_run, run_cli, tiny_overrides

pytest.importorskip("optuna", reason="the tune extra (pip install -e '.[tune]') is not installed")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH}


def tune_file(tmp: Path, trials: int, pruner: str = "asha", parameters=None, **overrides) -> Path:
    """A tune of the tiny generated multi-class set: seconds per trial."""
    fixed = [o for o in tiny_overrides(tmp, "multiclass", **overrides) if not o.startswith("run.dir=")]
    spec = {"name": "t", "recipe": str(ROOT / "configs" / "quickstart_multiclass.yaml"), "overrides": fixed,
            "trials": trials, "sampler": "tpe", "pruner": pruner, "seed": 0,
            "parameters": parameters or {"optim.lr": {"type": "float", "low": 1.0e-5, "high": 0.3, "log": True},
                                         "optim.weight_decay": {"type": "float", "low": 1.0e-6, "high": 1.0e-2,
                                                                "log": True}}}
    path = tmp / "tune.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def trials_of(folder: Path) -> list:
    with open(folder / "results.csv") as fh:
        return list(csv.DictReader(fh))


def wait_for(condition, what: str, timeout: float = 120) -> None:
    """Until `condition()` holds (a file the run writes), or fail naming what never happened."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


def checkpointed(run_dir: Path):
    return lambda: any((run_dir / "checkpoints").glob("step-*"))


@pytest.mark.slow  # real training processes
def test_two_local_workers_share_one_study_prune_and_the_best_config_trains_as_is(tmp_path):
    folder = tmp_path / "tunes" / "t"
    res = run_cli("tune", str(tune_file(tmp_path, trials=8, **{"train.epochs": 4})), "--local", "--workers", "2",
                  "--dir", str(folder), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = trials_of(folder)
    assert sorted(int(r["trial"]) for r in rows) == list(range(8))  # none lost, none doubled
    states = [r["state"] for r in rows]
    assert set(states) <= {"complete", "pruned"} and "pruned" in states and "complete" in states, states
    for r in rows:
        outcome = json.loads((folder / "trials" / f"{int(r['trial']):04d}.json").read_text())
        assert outcome["state"] == r["state"]
        if r["state"] == "pruned":  # the run directory's neighbour says where it was stopped
            assert outcome["pruned_at_step"] >= 1 and int(r["pruned_at_step"]) == outcome["pruned_at_step"]
            assert not (folder / "trials" / f"{int(r['trial']):04d}" / "summary.json").exists()
        else:
            assert (folder / "trials" / f"{int(r['trial']):04d}" / "summary.json").is_file()
    assert {"optim.lr", "optim.weight_decay", "value", "wall_s"} <= set(rows[0])
    for plot in ("history", "intermediate_values", "parallel_coordinate", "importances"):
        assert (folder / "plots" / f"{plot}.png").stat().st_size > 0, plot
    hours = json.loads((folder / "gpu_hours.json").read_text())
    assert hours["spent"] > 0 and hours["saved"] > 0
    assert rows[0]["state"] == "complete"  # best first
    best = float(rows[0]["value"])
    # best.yaml is the best trial's whole resolved config: it trains as is, to the same result
    again = run_cli("train", str(folder / "best.yaml"), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "t-best" / "summary.json").read_text())
    assert summary["best"]["accuracy"] == best
    assert_same_run(folder / "trials" / f"{int(rows[0]['trial']):04d}", tmp_path / "runs" / "t-best")


@pytest.mark.slow  # real training processes
def test_a_stopped_tune_continues_the_same_trial_from_its_checkpoint(tmp_path):
    """SIGTERM to `trainer tune --local` mid-trial: the trial saves and stays the worker's; the same command
    again re-attaches to trial 0 (not a new number, not from scratch) and ends bitwise like an uninterrupted run."""
    spec = tune_file(tmp_path, trials=1, pruner="none", **{"train.epochs": 3, "checkpoint.every_steps": 2})
    folder = tmp_path / "tunes" / "t"
    cmd = [sys.executable, "-m", "trainer", "tune", str(spec), "--local", "--dir", str(folder)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(checkpointed(folder / "trials" / "0000"), "a first checkpoint of trial 0")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 3, out[-3000:]
    assert not (folder / "trials" / "0000" / "summary.json").exists()
    assert json.loads((folder / "leases" / "local-0.json").read_text())["trial"] == 0
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "trial 0 resumes" in res.stdout
    log = (folder / "logs" / "0000.log").read_text()
    assert "resuming from" in log
    rows = trials_of(folder)
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "complete")]
    assert not list((folder / "leases").glob("*.json"))  # the finished trial's lease is gone
    # what Optuna holds: one value per evaluation, the ones before the stop not doubled by the resume
    import optuna

    stored = optuna.load_study(study_name="t", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))).trials[0]
    evals = [json.loads(line) for line in (folder / "trials" / "0000" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert sorted(stored.intermediate_values) == sorted({e["step"] for e in evals})
    assert all(stored.intermediate_values[e["step"]] == e["accuracy"] for e in evals)
    again = run_cli("train", str(folder / "best.yaml"), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(folder / "trials" / "0000", tmp_path / "runs" / "t-best")


@pytest.mark.slow  # real training processes
def test_a_trial_whose_worker_was_killed_is_taken_over_and_resumed_not_lost(tmp_path):
    """Worker a is SIGKILLed mid-trial and never comes back: its trial's process is told (parent-death
    signal) and saves; once a's lease is older than stale_after_s, worker b takes the same trial over and
    finishes it from the checkpoint."""
    spec = tune_file(tmp_path, trials=1, pruner="none", **{"train.epochs": 3, "checkpoint.every_steps": 2})
    folder = tmp_path / "tunes" / "t"
    prepared = subprocess.run([sys.executable, "-c", "import sys; from trainer import tune; "
                               "tune.prepare(sys.argv[1], sys.argv[2], [], None)", str(spec), str(folder)],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    worker = [sys.executable, "-m", "trainer", "tune-worker", str(folder), "--worker-id"]
    a = subprocess.Popen(worker + ["a"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(checkpointed(folder / "trials" / "0000"), "a first checkpoint of trial 0")
        a.kill()
        a.wait(timeout=60)
        # the orphaned trial saw its worker die: it saves and leaves, which frees its run directory's lock
        wait_for(lambda: not (folder / "trials" / "0000" / ".lock").exists(), "the trial leaving")
    finally:
        a.kill()
    lease = folder / "leases" / "a.json"
    assert json.loads(lease.read_text())["trial"] == 0
    # a fresh lease is not taken: b finds the study's one trial held, and leaves without a new one
    quick = subprocess.run(worker + ["b"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert quick.returncode == 0 and "taking over" not in quick.stdout, quick.stdout + quick.stderr
    past = time.time() - 700  # older than stale_after_s (600): as if a's job had been gone for 12 minutes
    os.utime(lease, (past, past))
    b = subprocess.run(worker + ["b"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stdout[-3000:] + b.stderr[-3000:]
    assert "taking over trial 0 from worker a" in b.stdout and "trial 0 resumes" in b.stdout
    res = run_cli("collect", str(folder), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(r["trial"], r["state"]) for r in trials_of(folder)] == [("0", "complete")]
    again = run_cli("train", str(folder / "best.yaml"), cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_run(folder / "trials" / "0000", tmp_path / "runs" / "t-best")


@pytest.mark.slow  # real training processes
def test_a_value_the_search_can_reach_and_the_config_refuses_stops_before_any_trial(tmp_path):
    spec = tune_file(tmp_path, trials=4, parameters={
        "optim.lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True},
        "optim.warmup_start_ratio": {"type": "float", "low": 0.1, "high": 2.0}})
    res = run_cli("tune", str(spec), "--local", "--dir", str(tmp_path / "tunes" / "t"))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.warmup_start_ratio=2.0" in lines[0], res.stderr
    assert not (tmp_path / "tunes").exists()


def test_a_tune_whose_every_trial_failed_exits_1_with_one_line(tmp_path):
    """The issue's case: every trial failing (here its data is a file, which each trial's start refuses) used to
    leave `trainer tune` with exit 0; the table still says why each failed."""
    (tmp_path / "not_a_folder").write_text("x")
    spec = tune_file(tmp_path, trials=2, pruner="none", **{"data.format": "imagefolder",
                                                          "data.root": tmp_path / "not_a_folder"})
    res = run_cli("tune", str(spec), "--local", "--dir", str(tmp_path / "t"), timeout=600)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    assert "every trial of" in res.stderr.strip().splitlines()[-1] and "failed" in res.stderr
    rows = trials_of(tmp_path / "t")
    assert [r["state"] for r in rows] == ["fail", "fail"] and all("not_a_folder" in r["reason"] for r in rows)


@pytest.mark.parametrize("sampler", ["tpe", "random", "grid", "cmaes", "qmc"])
@pytest.mark.parametrize("pruner", ["asha", "hyperband", "median", "none"])
def test_every_sampler_and_pruner_drives_a_study_in_the_journal(tmp_path, sampler, pruner):
    """The names a tune file may give, each building a working Optuna part over the file journal."""
    from trainer import tune

    parameters = ({"optim.lr": {"type": "categorical", "choices": [0.1, 0.01]}} if sampler == "grid" else
                  {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True, "step": None},
                   "train.batch_size": {"type": "int", "low": 8, "high": 32, "log": False, "step": 8}})
    spec = {"name": "t", "direction": "maximize", "sampler": sampler, "pruner": pruner, "storage": None,
            "parameters": parameters}
    study = tune.open_study(tmp_path, spec, seed=0)
    for _ in range(4):
        trial = study.ask()
        values = tune._suggest(trial, parameters)
        assert set(values) == set(parameters)
        if "train.batch_size" in values:
            assert values["train.batch_size"] in (8, 16, 24, 32)
        for step in (10, 20):
            trial.report(values["optim.lr"] * step, step)
            trial.should_prune()
        study.tell(trial, values["optim.lr"])
    again = tune.open_study(tmp_path, spec, seed=1)  # a second worker sees the same study
    assert len(again.get_trials()) == 4


def test_the_checked_corners_reach_every_extreme_and_choice():
    from trainer import tune

    params = {"a": {"type": "float", "low": 0.1, "high": 1.0}, "b": {"type": "categorical", "choices": [1, 2, 3]}}
    sets = tune.corners(params)
    assert {s["a"] for s in sets} == {0.1, 1.0} and {s["b"] for s in sets} == {1, 2, 3}


def test_metrics_rows_are_read_as_they_come_and_again_after_a_rewind(tmp_path):
    from trainer import tune

    log = tmp_path / "metrics.jsonl"
    rows = tune._Rows(log)
    assert rows.new() == []
    log.write_text('{"type": "train", "step": 1}\n{"type": "eval", "step": 2, "accuracy": 0.5}\n{"type": "ev')
    assert [r["step"] for r in rows.new()] == [2]  # the half-written line waits for its end
    with open(log, "a") as fh:
        fh.write('al", "step": 4, "accuracy": 0.6}\n')
    assert [r["step"] for r in rows.new()] == [4]
    log.write_text('{"type": "eval", "step": 2, "accuracy": 0.5}\n')  # a resume cut the log back
    assert [r["step"] for r in rows.new()] == [2]


@pytest.mark.parametrize("name", ["quickstart.yaml", "resnet18_cifar10.yaml"])
def test_the_example_tune_files_load_and_every_extreme_is_a_valid_config(name, tmp_path):
    from trainer import tune

    spec = tune.load_tune(str(ROOT / "configs" / "tunes" / name), [f"data.root={tmp_path}"])
    for values in tune.corners(spec["parameters"]):
        tune.check_values(spec, values, tmp_path / "trials" / "0000")
    assert spec["metric"] == "accuracy" and spec["direction"] == "maximize"


def test_a_running_trial_that_no_worker_holds_is_failed_with_the_reason(tmp_path):
    """A worker that died between asking for a trial and writing its lease: nobody can resume that trial,
    so once it is older than stale_after_s it is failed, with the reason beside its run directory."""
    from trainer import tune

    spec = {"name": "t", "direction": "maximize", "sampler": "random", "pruner": "none", "storage": None,
            "parameters": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": False}}}
    (tmp_path / "leases").mkdir()
    (tmp_path / "trials").mkdir()
    study = tune.open_study(tmp_path, spec, seed=0)
    study.ask()
    from trainer.outputs import Folder

    out = Folder(tmp_path, "tune", owner="tune")
    out.claim()  # a tune's folder, as `trainer tune` makes it
    assert tune._take_over(tmp_path, out, study, "w", stale_after_s=3600) is None
    assert study.trials[0].state.name == "RUNNING"  # not yet stale
    assert tune._take_over(tmp_path, out, study, "w", stale_after_s=0) is None
    assert study.trials[0].state.name == "FAIL"
    assert "without a lease" in json.loads((tmp_path / "trials" / "0000.json").read_text())["reason"]


def test_a_database_url_is_used_instead_of_the_journal(tmp_path):
    """--storage URL goes to Optuna's RDB storage (PostgreSQL/MySQL on a cluster; SQLite here, one host)."""
    from trainer import tune

    spec = {"name": "t", "direction": "minimize", "sampler": "tpe", "pruner": "median",
            "storage": f"sqlite:///{tmp_path / 'study.db'}",
            "parameters": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": True}}}
    study = tune.open_study(tmp_path, spec, seed=0)
    trial = study.ask()
    study.tell(trial, tune._suggest(trial, spec["parameters"])["optim.lr"])
    assert (tmp_path / "study.db").is_file() and not (tmp_path / "study.journal").exists()
    assert len(tune.open_study(tmp_path, spec, seed=1).trials) == 1


@pytest.mark.slow  # real training processes
def test_a_trial_of_two_processes_through_a_launcher(tmp_path):
    """`launcher:` starts each trial the way a user would start several processes (torchrun here, gloo on
    CPU); pruning and stop requests reach every rank through the trial's stop file."""
    spec = tune_file(tmp_path, trials=2, pruner="none", **{"train.epochs": 2, "train.batch_size": 8})
    text = yaml.safe_load(spec.read_text())
    text["launcher"] = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    spec.write_text(yaml.safe_dump(text))
    folder = tmp_path / "tunes" / "t"
    res = run_cli("tune", str(spec), "--local", "--dir", str(folder), timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [r["state"] for r in trials_of(folder)] == ["complete", "complete"]
    for n in (0, 1):
        run = json.loads((folder / "trials" / f"{n:04d}" / "run.json").read_text())
        assert run["derived"]["processes"] == 2


def test_collect_says_who_holds_a_running_trial_and_what_to_do_when_its_worker_is_gone(tmp_path):
    from trainer import tune
    from trainer.outputs import Folder

    spec = {"name": "t", "direction": "maximize", "sampler": "random", "pruner": "none", "storage": None,
            "metric": "accuracy", "seed": 0, "gpus_per_trial": 1, "stale_after_s": 600,
            "parameters": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": False}}}
    out = Folder(tmp_path, "tune", owner="tune")  # as `trainer tune` and its workers write them
    for sub in ("leases", "trials"):
        out.mkdir(sub)
    out.write_json("tune.json", spec)
    study = tune.open_study(tmp_path, spec, seed=0)
    for _ in range(2):
        tune._suggest(study.ask(), spec["parameters"])
    out.write_json("leases/123_0.json", {"trial": 0, "worker": "123_0"})
    out.write_json("leases/123_1.json", {"trial": 1, "worker": "123_1"})
    past = time.time() - 3600
    os.utime(tmp_path / "leases" / "123_0.json", (past, past))
    rows = {r["trial"]: r for r in tune.collect(str(tmp_path))}
    assert rows[0]["state"] == rows[1]["state"] == "running"
    assert "123_0 has not been heard of" in rows[0]["reason"] and "takes the trial over" in rows[0]["reason"]
    assert rows[1]["reason"].startswith("worker 123_1, heartbeat")


def prepared_with_a_trial(tmp_path: Path) -> tuple:
    """A prepared tune folder whose journal holds one complete trial: (tune file, folder, the journal's bytes)."""
    from trainer import tune

    spec_file = tune_file(tmp_path, trials=2, pruner="none")
    folder = tmp_path / "tunes" / "t"
    tune.prepare(str(spec_file), str(folder), [], None)
    study = tune.open_study(folder, tune.load_prepared(folder), seed=0)
    trial = study.ask()
    study.tell(trial, tune._suggest(trial, tune.load_prepared(folder)["parameters"])["optim.lr"])
    journal = folder / "study.journal"
    return spec_file, folder, journal.read_bytes()


def test_a_line_that_is_not_optunas_in_the_journal_is_one_line_naming_it_and_the_journal_is_left_alone(tmp_path):
    """`echo ... >> study.journal`, a merge gone wrong: every command that opens the study says which line of
    which file and what to do (Optuna's own error is a JSONDecodeError traceback), and appends nothing after it."""
    spec_file, folder, good = prepared_with_a_trial(tmp_path)
    journal = folder / "study.journal"
    journal.write_bytes(good + b"a note of mine\n")
    lines = good.count(b"\n")
    for argv in (["collect", folder], ["tune-worker", folder, "--worker-id", "w"],
                 ["tune", spec_file, "--local", "--dir", folder]):
        res = run_cli(*argv, timeout=300)
        assert res.returncode == 2, (argv, res.stdout[-2000:], res.stderr[-3000:])
        err = res.stderr.strip().splitlines()
        assert len(err) == 1, res.stderr[-3000:]
        assert f"{journal} line {lines + 1} is not a record of Optuna's ('a note of mine')" in err[0]
        assert "Remove that line" in err[0]
        assert journal.read_bytes() == good + b"a note of mine\n"  # nothing appended, nothing rewritten
    assert not list((folder / "trials").iterdir())  # no trial was started
    journal.write_bytes(good)  # the line removed, as the message says: the tune works again
    assert run_cli("collect", folder, timeout=300).returncode == 0


def test_a_journal_that_goes_bad_while_it_is_read_is_the_same_one_line(tmp_path, monkeypatch):
    from trainer import tune
    from trainer.errors import TrainerError

    _, folder, good = prepared_with_a_trial(tmp_path)
    journal = folder / "study.journal"
    opened = tune.open_study

    def open_then_spoil(*a, **k):  # between the check at opening and Optuna's next read
        study = opened(*a, **k)
        with open(journal, "ab") as fh:  # a line of junk, then a record of Optuna's after it
            fh.write(b"\x00\x01 binary junk\n" + good.splitlines(keepends=True)[-1])
        return study

    monkeypatch.setattr(tune, "open_study", open_then_spoil)
    with pytest.raises(TrainerError, match=r"line \d+ is not a record of Optuna's"):
        tune.collect(str(folder))
    journal.write_bytes(good + b'{"op_code": 6, "cut')  # an append cut by a crash: no end of line
    with pytest.raises(TrainerError, match=r"line \d+ is cut short"):
        tune.open_study(folder, tune.load_prepared(folder), seed=0)


def worker_starts(folder: Path, monkeypatch, sampler: str, indexes: list, trials: int = 4) -> list:
    """Starts of run_worker on one study, one start per entry of `indexes` (its worker index), each stopped
    after one trial (a request between trials, as SIGINT gives), or all trials in one start when `indexes` has
    one entry. The trial itself is a stand-in (no training): its value is the lr drawn. Returns the values
    drawn, in trial order."""
    from trainer import tune
    from trainer.outputs import Folder

    parameters = ({"optim.lr": {"type": "categorical", "choices": [0.1, 0.01, 0.001]},
                   "optim.weight_decay": {"type": "categorical", "choices": [0.0, 0.05]}} if sampler == "grid" else
                  {"optim.lr": {"type": "float", "low": 1.0e-4, "high": 0.1, "log": True},
                   "optim.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "log": False}})
    spec = {"name": "t", "direction": "maximize", "sampler": sampler, "pruner": "none", "storage": None,
            "metric": "accuracy", "seed": 0, "gpus_per_trial": 1, "stale_after_s": 600, "trials": trials,
            "parameters": parameters}
    out = Folder(folder, "tune", owner="tune")  # a tune's folder, as `trainer tune` makes it
    for sub in ("leases", "trials"):
        out.mkdir(sub)
    out.write_json("tune.json", spec)
    stop = {"after_one": len(indexes) > 1, "now": False}

    class Stop:  # _StopAsked without the signal handlers (they would be pytest's process's)
        def __bool__(self):
            return stop["now"]

    def stand_in(root, out, spec, study, trial, asked, worker_id):
        values = tune._suggest(trial, spec["parameters"])
        study.tell(trial, float(values["optim.lr"]))
        stop["now"] = stop["after_one"]
        return 0

    monkeypatch.setattr(tune, "_StopAsked", Stop)
    monkeypatch.setattr(tune, "_run_trial", stand_in)
    for index in indexes:
        stop["now"] = False
        tune.run_worker(folder, f"local-{index}", index)
    study = tune.open_study(folder, spec, seed=0)
    return [t.params for t in sorted(study.get_trials(), key=lambda t: t.number)]


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "qmc", "grid"])
def test_a_restarted_worker_draws_new_values_the_same_as_a_worker_never_stopped(tmp_path, monkeypatch, sampler):
    """A worker restarted after each trial (preempted, SIGINT, kill -9) must not draw an earlier trial's values
    again (its sampler restarted from the same seed did), and a tune of one worker is reproducible: for a given
    seed, the same values per trial number, restarted or not."""
    restarted = worker_starts(tmp_path / "restarted", monkeypatch, sampler, [0, 0, 0, 0])
    assert len(restarted) == 4
    assert len({tuple(sorted(p.items())) for p in restarted}) == 4, restarted
    assert worker_starts(tmp_path / "straight", monkeypatch, sampler, [0]) == restarted


def test_the_workers_of_a_grid_share_its_numbering_and_cover_it_once(tmp_path, monkeypatch):
    """Optuna's grid sampler names a point by its place in a list shuffled by the seed: every worker needs the
    same seed, or worker 1's point 1 may be worker 0's point 0 (one value set twice, another never)."""
    drawn = worker_starts(tmp_path, monkeypatch, "grid", [0, 1, 2, 1, 0, 3], trials=6)
    assert sorted(tuple(sorted(p.items())) for p in drawn) == sorted(
        (("optim.lr", lr), ("optim.weight_decay", wd)) for lr in (0.1, 0.01, 0.001) for wd in (0.0, 0.05))


def test_a_trial_another_worker_takes_over_while_it_is_listed_is_not_failed(tmp_path, monkeypatch):
    """Workers started together after all died race for the stale leases. One that read a lease just as another
    renamed it to itself (gone under its old name, not yet listed under the new one) saw its trial without a
    lease and failed it, though it had just been taken over (19 of 20 rounds of 6 takers, in a review)."""
    from trainer import tune
    from trainer.outputs import Folder

    spec = {"name": "t", "direction": "maximize", "sampler": "random", "pruner": "none", "storage": None,
            "parameters": {"optim.lr": {"type": "float", "low": 0.001, "high": 0.1, "log": False}}}
    (tmp_path / "trials").mkdir()
    study = tune.open_study(tmp_path, spec, seed=0)
    trial = study.ask()
    out = Folder(tmp_path, "tune", owner="tune")
    out.claim()
    out.write_json("leases/dead.json", {"trial": trial.number, "trial_id": trial._trial_id, "worker": "dead"})
    read = tune.read_json

    def racing(path, *args, **kwargs):  # worker B takes the lease over just as worker C reads it
        if Path(path).name == "dead.json" and Path(path).exists():
            out.move("leases/dead.json", "leases/B.json")
        return read(path, *args, **kwargs)

    monkeypatch.setattr(tune, "read_json", racing)
    assert tune._take_over(tmp_path, out, study, "C", stale_after_s=0) is None
    assert study.trials[0].state.name == "RUNNING"
    assert not (tmp_path / "trials" / "0000.json").exists()


def test_collect_reads_a_sweeps_cut_status_file_as_no_status(tmp_path):
    """A task's status file cut by a kill (written by slurm/lib.sh before it wrote it whole) no longer stops
    `trainer collect` with a JSON traceback: that task's status is unknown, the others are listed."""
    from trainer.sweep import collect

    root = tmp_path / "sweep"
    (root / "status").mkdir(parents=True)
    tasks = [{"index": i, "run_dir": str(root / "runs" / f"{i:03d}"), "values": {"optim.lr": lr}}
             for i, lr in enumerate((0.1, 0.01))]
    (root / "tasks.json").write_text(json.dumps(tasks))
    (root / "status" / "0.json").write_text("")
    (root / "status" / "1.json").write_text('{"exit_code": 1, "job": "7_1", "restart": 0, "stop_requested": 0}\n')
    rows = {row["task"]: row["status"] for row in collect(str(root))}
    assert rows == {0: "not started", 1: "failed (exit 1)"}


def test_a_lease_from_another_host_waits_for_its_trainers_run_lock_to_go_stale(tmp_path):
    """A trial taken over from a dead node before its trainer's run lock counts as stale there (another host's:
    rundir.STALE_AFTER_S without a heartbeat) found the run directory in use and was failed for good, with
    stale_after_s below that; a lease of this host's worker is judged by stale_after_s alone."""
    from trainer import rundir, tune

    (tmp_path / "leases").mkdir()
    (tmp_path / "leases" / "far.pid").write_text(json.dumps({"pid": 4242, "host": "node7"}))
    (tmp_path / "leases" / "near.pid").write_text(json.dumps({"pid": 4242, "host": os.uname().nodename}))
    assert tune._stale_after(tmp_path, "far", 60) == rundir.STALE_AFTER_S + rundir.HEARTBEAT_S
    assert tune._stale_after(tmp_path, "unknown", 60) == rundir.STALE_AFTER_S + rundir.HEARTBEAT_S
    assert tune._stale_after(tmp_path, "far", 3600) == 3600
    assert tune._stale_after(tmp_path, "near", 60) == 60
