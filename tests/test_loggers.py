"""tracking.log_with: TensorBoard and MLflow in their local modes inside the run directory, read back with their own
readers (tensorboard's EventAccumulator, mlflow's MlflowClient) against metrics.jsonl, across a SIGKILL and the
resume that follows it. W&B's own test is tests/test_checkpoint.py's SIGTERM one."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import ROOT, PYTHONPATH, run_cli, run_forked, tiny_overrides
from trainer.config import load_config
from trainer.errors import ConfigError


def test_an_unknown_logger_is_refused_naming_the_key_and_the_valid_names(tmp_path):
    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{"tracking.log_with": "[tensorboard,neptune]"}))
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0] == "error: tracking.log_with: unknown logger 'neptune'; valid: comet_ml, mlflow, tensorboard, wandb"
    assert not (tmp_path / "run").exists()


def test_a_logger_whose_package_is_missing_says_which_pip_command_installs_it(monkeypatch):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else found(name, *a))
    with pytest.raises(ConfigError, match=r"tracking.log_with logs with mlflow, whose package is not installed: "
                                          r"pip install mlflow-skinny"):
        load_config(None, ["data.root=x", "tracking.log_with=[mlflow]"])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else found(name, *a))
    with pytest.raises(ConfigError, match=r"^wandb.enabled=true logs with wandb, whose package is not installed"):
        load_config(None, ["data.root=x", "wandb.enabled=true"])


def test_wandb_enabled_is_wandb_in_the_list_once():
    from trainer.config import trackers

    cfg = load_config(None, ["data.root=x", "tracking.log_with=[tensorboard,wandb]", "wandb.enabled=true"])
    assert trackers(cfg) == ["tensorboard", "wandb"]


def tensorboard_scalars(folder: Path) -> dict:
    """{tag: {step: value}} as tensorboard itself reads the folder (its purge of a restart's orphans included)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag}: a step read back twice: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out, acc.Tags()["images"]


def jsonl_scalars(run_dir: Path, skip=()) -> dict:
    """metrics.jsonl's rows as the loggers get them: {tag: {step: value}}."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        prefix = f"{row['split']}/" if row["type"] == "eval" else "train/"
        for key, value in row.items():
            if key not in ("step", *skip) and isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(prefix + key, {})[row["step"]] = value
    return out


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_metrics_jsonl_across_a_sigkill_and_resume(tmp_path):
    # 10 updates per epoch, rows every 2, checkpoints every 3: killed during update 9, the row of update 8 was
    # logged after the checkpoint of update 6, and the resume logs it again
    args = tiny_overrides(tmp_path, **{"train.epochs": 2, "train.log_every_steps": 2, "checkpoint.every_steps": 3,
                                       "tracking.log_with": "[tensorboard,mlflow]"})
    killed = run_forked(["train", "-", *args], env={"FAULT": "kill_at_update", "FAULT_AT": "9",
                                                   "PYTHONPATH": PYTHONPATH}, script=ROOT / "tests" / "fault_driver.py")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("train", "-", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    run = tmp_path / "run"

    # TensorBoard: one folder, an event file per start; every row's every number, the resumed start's values
    # (throughput too) at the steps both starts logged
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    scalars, images = tensorboard_scalars(run / "tensorboard")
    expected = jsonl_scalars(run)
    assert scalars.keys() == expected.keys()
    for tag, by_step in expected.items():
        assert scalars[tag].keys() == by_step.keys(), tag
        for step, value in by_step.items():
            assert scalars[tag][step] == pytest.approx(value, rel=1e-6, abs=1e-6), (tag, step)  # stored as float32
    assert "plots/training_curves" in images

    # MLflow: one run across both starts, its id in the checkpoints; each step once. A step logged before the kill
    # is not sent again: its throughput (wall clock) is the first start's, every other number the same bitwise
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlflow").resolve().as_uri())
    experiment = client.get_experiment_by_name("cnn-trainer")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run_id = runs[0].info.run_id
    state = json.loads(sorted((run / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert state["run_ids"]["mlflow"] == run_id
    assert runs[0].data.params["train.epochs"] == "2"
    expected = jsonl_scalars(run, skip=("throughput",))
    assert set(runs[0].data.metrics) == set(expected) | {"train/throughput"}
    for tag, by_step in expected.items():
        history = client.get_metric_history(run_id, tag)
        steps = [m.step for m in history]
        assert sorted(steps) == sorted(by_step), (tag, steps)
        for m in history:
            assert m.value == by_step[m.step], (tag, m.step)
    assert "plots/training_curves.png" in [a.path for a in client.list_artifacts(run_id, "plots")]


def test_mlflow_logs_into_the_store_the_user_names_and_not_into_the_run(tmp_path, monkeypatch):
    """tracking.mlflow_uri: a file store of the user's own (MLflow 3 refused one without MLFLOW_ALLOW_FILE_STORE,
    a traceback after the run had started), shared by runs: it holds this run's rows, the run folder none."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    store = (tmp_path / "shared store").resolve().as_uri()  # a space: the URI is quoted, the folder is not
    args = tiny_overrides(tmp_path, **{"train.max_steps": 3, "train.log_every_steps": 1, "eval.every_epochs": 0,
                                       "tracking.log_with": "[mlflow]", "tracking.mlflow_uri": store,
                                       "tracking.mlflow_experiment": "mine"})
    done = run_cli("train", "-", *args)  # its environment is this one: without MLFLOW_ALLOW_FILE_STORE
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    assert (tmp_path / "shared store").is_dir() and not (run / "mlflow").exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # this reader's own opt-in
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert [r.info.run_name for r in runs] == ["run"]
    expected = jsonl_scalars(run, skip=("throughput",))
    assert expected["train/loss"].keys() == {1, 2, 3}
    for tag, by_step in expected.items():
        assert {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, tag)} == by_step, tag


def comet_archive(run_dir: Path) -> tuple:
    """The metrics ({tag: {step: value}}), parameters and image names of the run's Comet offline archives (one zip
    per start in <run>/comet_ml/: experiment.json and messages.json, a JSON message per line), and their
    experiment ids."""
    import zipfile

    metrics, params, images, ids = {}, {}, [], set()
    for archive in sorted((run_dir / "comet_ml").glob("*.zip")):
        with zipfile.ZipFile(archive) as zf:
            if not zf.namelist():  # a start killed by SIGKILL: Comet zips its messages only when it ends
                continue
            ids.add(json.loads(zf.read("experiment.json"))["offline_id"])
            for line in zf.read("messages.json").decode().splitlines():
                message = json.loads(line)
                payload = message["payload"]
                if message["type"] == "metric_msg":
                    metric = payload["metric"]
                    by_step = metrics.setdefault(metric["metricName"], {})
                    assert metric["step"] not in by_step, f"{metric['metricName']}: step {metric['step']} twice"
                    by_step[metric["step"]] = metric["metricValue"]
                elif message["type"] == "parameter_msg":  # "params" for a list value, "param" otherwise
                    param = payload.get("param") or payload["params"]
                    params[param["paramName"]] = param["paramValue"]
                elif message["type"] == "file_upload" and payload.get("upload_type") == "visualization":
                    images.append(payload["additional_params"]["figName"])
    return metrics, params, images, ids


def test_comet_offline_holds_metrics_jsonl_inside_the_run(tmp_path, monkeypatch):
    """tracking.log_with=[comet_ml]: Comet's offline archive in <run>/comet_ml/ (nothing sent, nothing written
    outside the run: its automatic logging off) holds every number of every metrics.jsonl row, the config and
    the plots."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where Comet would keep a config of its own
    args = tiny_overrides(tmp_path, **{"train.epochs": 2, "train.log_every_steps": 2,
                                       "tracking.log_with": "[comet_ml]"})
    done = run_cli("train", "-", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    metrics, params, images, ids = comet_archive(run)
    assert len(ids) == 1
    assert metrics.pop("process duration")  # Comet's own, at the end (seconds), whatever the settings
    assert metrics == jsonl_scalars(run)  # JSON both sides: the same floats, throughput included
    assert params["train.epochs"] == 2 and params["tracking.log_with"] == ["comet_ml"]
    assert "plots/training_curves" in images
    assert not [p for p in (tmp_path / "home").rglob("*") if "comet" in p.name.lower()]  # (matplotlib's cache is)
