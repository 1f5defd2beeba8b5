"""Whole runs through the CLI, as a user runs them: train, then eval and predict from the exported model."""
import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import pytest

from tests.conftest import ROOT, run_cli, tiny_overrides
from trainer.config import load_config
from trainer.data.folders import imagefolder_splits
from trainer.loop import train


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """One short binary run (in-process) shared by the checks below."""
    tmp = tmp_path_factory.mktemp("binary")
    overrides = tiny_overrides(tmp, "binary", **{
        "data.generated.train_per_class": 400, "data.generated.val_per_class": 31, "train.epochs": 6,
        "train.batch_size": 32, "optim.lr": 0.005, "train.log_every_steps": 5})
    summary = train(load_config(str(ROOT / "configs/quickstart_binary.yaml"), overrides))
    return tmp, Path(summary["run_dir"]), summary


def test_training_beats_chance_and_run_dir_describes_itself(binary_run):
    _, run_dir, summary = binary_run
    assert summary["final"]["accuracy"] >= 0.8, summary  # chance is 0.5
    assert summary["final"]["num_samples"] == 62
    for name in ("config.yaml", "metrics.jsonl", "run.json", "summary.json", "model/model.safetensors",
                 "model/model.json", "best/model.safetensors", "best/model.json"):
        assert (run_dir / name).is_file(), name
    assert load_config(None, base=__import__("omegaconf").OmegaConf.to_container(
        __import__("omegaconf").OmegaConf.load(run_dir / "config.yaml"))).train.epochs == 6
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["type"] == "train"]
    eval_rows = [r for r in rows if r["type"] == "eval"]
    assert len(eval_rows) == 6 and all(r["num_samples"] == 62 for r in eval_rows)
    steps = [r["step"] for r in train_rows]
    assert steps == sorted(set(steps)) and steps[-1] == summary["updates"]
    for r in train_rows:
        assert {"step", "epoch", "samples_seen", "lr", "loss", "throughput"} <= set(r)
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert meta["task"] == "binary" and meta["num_outputs"] == 1 and meta["classes"] == ["cross", "square"]
    assert meta["threshold"] == 0.5 and len(meta["mean"]) == 3 and meta["image_size"] == 32


def test_predict_and_eval_reproduce_the_in_memory_model(binary_run, tmp_path):
    tmp, run_dir, summary = binary_run
    data_root = tmp / "gen-binary"
    _, splits = imagefolder_splits(data_root, 0.1, 0)
    val_paths = {p: label for p, label in splits["val"]}
    out = tmp_path / "preds.csv"
    res = run_cli("predict", "--model", str(run_dir), str(data_root / "val"), "--output", str(out))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader(out.open()))
    assert list(rows[0]) == ["path", "label", "prob_cross", "prob_square"]
    assert len(rows) == 62 and {r["path"] for r in rows} == set(val_paths)
    p1 = np.array([float(r["prob_square"]) for r in rows])
    labels = np.array([val_paths[r["path"]] for r in rows])
    assert np.allclose(p1 + np.array([float(r["prob_cross"]) for r in rows]), 1.0)
    assert [r["label"] for r in rows] == [["cross", "square"][int(p >= 0.5)] for p in p1]
    accuracy = float(((p1 >= 0.5) == labels).mean())
    log_loss = float(-np.mean(np.log(np.where(labels == 1, p1, 1 - p1))))
    final = summary["final"]  # measured on the in-memory model at the end of training
    assert accuracy == final["accuracy"]
    assert log_loss == pytest.approx(final["loss"], abs=1e-5)
    res = run_cli("eval", "--model", str(run_dir))
    assert res.returncode == 0, res.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["num_samples"] == 62 and report["accuracy"] == final["accuracy"]
    assert report["loss"] == pytest.approx(final["loss"], abs=1e-5)
    # every metric of eval.json equals scikit-learn computed from predict's probabilities
    from sklearn import metrics as skm

    pred = (p1 >= 0.5).astype(int)
    expected = {"accuracy": skm.accuracy_score(labels, pred), "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
                "precision": skm.precision_score(labels, pred, zero_division=0),
                "recall": skm.recall_score(labels, pred, zero_division=0),
                "specificity": skm.recall_score(labels, pred, pos_label=0, zero_division=0),
                "f1": skm.f1_score(labels, pred, zero_division=0), "roc_auc": skm.roc_auc_score(labels, p1),
                "pr_auc": skm.average_precision_score(labels, p1), "log_loss": skm.log_loss(labels, p1)}
    for key, value in expected.items():
        assert report[key] == pytest.approx(value, abs=1e-6), key
    assert report["confusion_matrix"] == skm.confusion_matrix(labels, pred).tolist()
    for plot in ("confusion_matrix", "roc_curve", "pr_curve"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 5000
    for model_dir in ("model", "best"):
        assert json.loads((run_dir / model_dir / "eval.json").read_text())["num_samples"] == 62
        assert (run_dir / model_dir / "plots" / "roc_curve.png").is_file()
    assert (run_dir / "plots" / "training_curves.png").is_file()


def test_linear_baseline_does_clearly_worse_on_the_generated_data(binary_run):
    """The generated set is meant to need a CNN: a linear model on pixels, same data and budget, stays near chance."""
    tmp, _, summary = binary_run
    overrides = tiny_overrides(tmp, "binary", **{
        "data.generated.train_per_class": 400, "data.generated.val_per_class": 31, "train.epochs": 6,
        "train.batch_size": 32, "optim.lr": 0.005, "model.name": "linear", "run.dir": str(tmp / "linear")})
    linear = train(load_config(str(ROOT / "configs/quickstart_binary.yaml"), overrides))
    assert linear["best"]["accuracy"] <= 0.7 < summary["final"]["accuracy"] - 0.1


def test_non_finite_loss_stops_with_a_clear_message(tiny):
    res = run_cli("train", "-", *tiny(**{"optim.name": "sgd", "optim.lr": 1e12, "train.log_every_steps": 2}))
    assert res.returncode == 2
    assert "non-finite training loss" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_wandb_offline_logs_through_accelerate(tiny, tmp_path):
    res = run_cli("train", "-", *tiny(**{"wandb.enabled": "true", "train.max_steps": 2}),
                  env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wb"), "WANDB_CACHE_DIR": str(tmp_path / "wbc"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wbcfg")})
    assert res.returncode == 0, res.stderr[-2000:]
    assert list((tmp_path / "run").rglob("*.wandb")), "no offline W&B run file"


def test_tuned_threshold_is_stored_and_used_by_eval_and_predict(tiny, tmp_path):
    overrides = tiny("binary", **{"eval.threshold_tuning": "max_f1", "train.max_steps": 6})
    summary = train(load_config(None, overrides))
    run_dir = Path(summary["run_dir"])
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    tuned = meta["threshold"]
    assert tuned != 0.5 and json.loads((run_dir / "model" / "eval.json").read_text())["threshold"] == tuned
    res = run_cli("eval", "--model", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert json.loads((run_dir / "eval.json").read_text())["threshold"] == tuned
    out = tmp_path / "p.csv"
    assert run_cli("predict", "--model", str(run_dir), str(tmp_path / "gen-binary" / "val"), "--output", str(out)).returncode == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == [meta["classes"][int(float(r["prob_square"]) >= tuned)] for r in rows]


def test_same_command_on_a_finished_run_changes_nothing(binary_run):
    tmp, run_dir, _ = binary_run
    before = (run_dir / "model" / "model.safetensors").stat().st_mtime_ns
    res = run_cli("train", "configs/quickstart_binary.yaml", *tiny_overrides(tmp, "binary", **{
        "data.generated.train_per_class": 400, "data.generated.val_per_class": 31}), f"run.dir={run_dir}")
    assert res.returncode == 0 and "already complete" in res.stdout, res.stdout + res.stderr
    assert (run_dir / "model" / "model.safetensors").stat().st_mtime_ns == before


def test_a_finished_run_whose_model_was_deleted_exports_it_again(tiny, tmp_path):
    """A user who deleted model/ runs the same command and gets the same final model back (from the final
    checkpoint, through the write gate), instead of "nothing to do"."""
    command = ["train", "-", *tiny(**{"train.max_steps": 3, "eval.every_epochs": 0})]
    assert run_cli(*command).returncode == 0
    model = tmp_path / "run" / "model"
    first = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file() and p.suffix != ".png"}
    shutil.rmtree(model)
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert "exported again from the final checkpoint" in again.stdout and "already complete" in again.stdout
    assert "nothing to do" not in again.stdout, again.stdout
    redone = {p.relative_to(model): p.read_bytes() for p in model.rglob("*") if p.is_file() and p.suffix != ".png"}
    assert redone == first  # the weights, model.json (metrics included) and eval.json, byte for byte
    assert (model / "plots" / "confusion_matrix.png").is_file()
    third = run_cli(*command)  # now whole again: nothing to do
    assert "nothing to do" in third.stdout and "exported again" not in third.stdout, third.stdout


def test_exporting_again_keeps_a_users_file_and_never_writes_through_a_link(tiny, tmp_path):
    """The re-export goes through the write gate: a file of the user's in model/ stays, and a model/ that is a link
    to a folder of the user's is refused in one line, that folder left as it was."""
    command = ["train", "-", *tiny(**{"train.max_steps": 2, "eval.every_epochs": 0})]
    assert run_cli(*command).returncode == 0
    model = tmp_path / "run" / "model"
    shutil.rmtree(model)
    model.mkdir()
    (model / "notes.txt").write_text("mine")
    again = run_cli(*command)
    assert again.returncode == 0 and "exported again" in again.stdout, again.stdout + again.stderr
    assert (model / "notes.txt").read_text() == "mine" and (model / "model.safetensors").is_file()
    shutil.rmtree(model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("the user's")
    model.symlink_to(elsewhere)
    linked = run_cli(*command)
    assert linked.returncode == 2 and len(linked.stderr.strip().splitlines()) == 1, linked.stdout + linked.stderr
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"] and model.is_symlink()


def test_eval_of_a_folder_of_class_folders_scores_every_image(binary_run, tmp_path):
    """`trainer eval --model RUN data.root=FOLDER` on class folders without train/val/test scores every image of
    it (not the seeded 10% hold-out), and says which split and how many images it scored."""
    tmp, run_dir, _ = binary_run
    flat = tmp_path / "flat"
    shutil.copytree(tmp / "gen-binary" / "val", flat)  # cross/ and square/, 62 images
    n = sum(1 for p in flat.rglob("*.png"))
    res = run_cli("eval", "--model", str(run_dir), "data.format=imagefolder", f"data.root={flat}",
                  "--output", str(tmp_path / "all.json"))
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "all.json").read_text())["num_samples"] == n == 62
    assert f"scoring the all split of imagefolder at {flat}: {n} images" in res.stdout, res.stdout
    held_out = run_cli("eval", "--model", str(run_dir), "data.format=imagefolder", f"data.root={flat}",
                       "eval.split=val", "--output", str(tmp_path / "val.json"))
    assert held_out.returncode == 0, held_out.stderr
    scored = json.loads((tmp_path / "val.json").read_text())["num_samples"]
    assert scored < n and f"scoring the val split of imagefolder at {flat}: {scored} images" in held_out.stdout


def test_which_split_eval_scores_by_default(tmp_path):
    """Whole: a folder of class folders named on the command line. Its hold-out: the folder the run trained on (else
    training images would be scored), a folder with train/ (it has splits), or eval.split given."""
    from trainer.config import DataCfg
    from trainer.evaluate import eval_split

    flat, split = tmp_path / "flat", tmp_path / "split"
    for folder in (flat / "cat", flat / "dog", split / "train" / "cat"):
        folder.mkdir(parents=True)
    as_given = DataCfg(format="imagefolder", root=str(flat))
    assert eval_split(as_given, "val", False, None)[0] == "all"
    assert eval_split(as_given, "val", False, str(tmp_path / "elsewhere"))[0] == "all"
    assert eval_split(as_given, "val", False, str(flat))[0] == "val"  # the run's own training folder
    assert eval_split(as_given, "test", True, None)[0] == "test"  # eval.split=test said
    assert eval_split(DataCfg(format="imagefolder", root=str(split)), "val", False, None)[0] == "val"
    assert eval_split(DataCfg(format="masks", root=str(flat)), "val", False, None)[0] == "val"


def test_refuses_a_non_empty_folder_that_is_not_a_run(tiny, tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    res = run_cli("train", "-", *tiny(**{"run.dir": str(other)}))
    assert res.returncode == 2 and "already exists" in res.stderr
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_multiclass_run_with_accumulation_and_bf16(tmp_path):
    overrides = tiny_overrides(tmp_path, "multiclass", **{"train.grad_accum_steps": 2, "train.mixed_precision": "bf16",
                                                          "train.clip_grad_norm": 1.0, "optim.name": "sgd",
                                                          "optim.nesterov": "true", "eval.topk": "[2,5]",
                                                          "loss.label_smoothing": 0.1, "data.sampler": "weighted",
                                                          "loss.class_weighted": "true"})
    summary = train(load_config(None, overrides))
    final = summary["final"]
    assert final["num_samples"] == 52 and "top2_accuracy" in final and "top4_accuracy" in final
    assert final["top4_accuracy"] == 1.0  # k=5 clamped to the 4 classes
    assert summary["updates"] == 5  # 160 images / 16 per step = 10 micro-steps, 2 per update


def test_fp16_on_cpu_is_refused(tiny):
    res = run_cli("train", "-", *tiny(**{"train.mixed_precision": "fp16"}))
    assert res.returncode == 2 and "fp16" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    ({"model.name": "resnet19"}, "resnet19"),
    ({"train.batch_size": 1000}, "larger than the training split"),
    ({"data.format": "imagefolder", "data.root": "/nonexistent/images"}, "does not exist"),
    ({"eval.monitor": "f1"}, "eval.monitor"),
])
def test_bad_input_one_line_nothing_written(tiny, tmp_path, extra, message):
    overrides = tiny(**extra)
    res = run_cli("train", "-", *overrides)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_cpu_processes_really_run_and_evaluate_every_sample_once(tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, "binary", **{"data.generated.val_per_class": 13, "eval.batch_size": 4})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trainer",
           "train", "-", *overrides]
    import os
    import subprocess

    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "processes=2" in res.stdout
    assert res.stdout.count("[trainer] done") == 1  # one main process prints
    run = json.loads((run_dir / "run.json").read_text())
    assert run["derived"]["processes"] == 2 and run["derived"]["global_batch"] == 32
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "eval"]
    assert evals and all(r["num_samples"] == 26 for r in evals)  # 26 = len(val), not a multiple of 2 x 4
    # the same exported model scored on 1 and on 2 processes gives the same numbers
    one = run_cli("eval", "--model", str(run_dir), "--output", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "trainer", "eval", "--model", str(run_dir), "--output", str(tmp_path / "two.json"),
                          "eval.batch_size=3"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert b["processes"] == 2 and a["num_samples"] == b["num_samples"] == 26
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_accelerate_launch_multi_gpu_flag_runs_two_cpu_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU box: two real processes (not one, as --cpu gives)."""
    import os
    import subprocess

    overrides = tiny_overrides(tmp_path, "binary", **{"train.max_steps": 2})
    accelerate = Path(sys.executable).with_name("accelerate")
    res = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trainer", "train", "-",
                          *overrides], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "processes=2" in res.stdout
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["derived"]["processes"] == 2
    evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["num_samples"] == 26  # stopped mid-epoch, then every val sample once


def test_device_loader_with_accumulation_syncs_on_the_last_batch_of_each_epoch(tmp_path):
    # 160 images / 32 per step = 5 micro-steps per epoch; with 2 per update that is 3 updates (2 + 2 + the last 1)
    overrides = tiny_overrides(tmp_path, "multiclass", **{"data.loader": "device", "train.batch_size": 32,
                                                          "train.grad_accum_steps": 2, "train.epochs": 2})
    summary = train(load_config(None, overrides))
    assert summary["updates"] == 6 and summary["samples_seen"] == 320
    assert summary["final"]["num_samples"] == 52


@pytest.mark.slow
def test_two_processes_on_the_device_loader_train_like_one_with_twice_the_batch(tmp_path):
    """Each rank takes its half of every global batch, so (no batch norm, fp32) the weights match the
    1-process run up to float summation order."""
    import os
    import subprocess

    from safetensors.torch import load_file

    common = {"data.loader": "device", "model.name": "tutorial_cnn", "optim.name": "sgd", "optim.lr": 0.05,
              "train.epochs": 2, "eval.every_epochs": 0, "checkpoint.every_epochs": 0}
    one = train(load_config(None, tiny_overrides(tmp_path, "multiclass", **common, **{
        "train.batch_size": 32, "run.dir": str(tmp_path / "one")})))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "trainer", "train", "-", *tiny_overrides(tmp_path, "multiclass", **common, **{
                              "train.batch_size": 16, "run.dir": str(tmp_path / "two")})],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("one", "two"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["updates"] == one["updates"] == 10 and two["samples_seen"] == one["samples_seen"]


def test_flip_tta_is_recorded_and_applied_by_eval_and_predict(tmp_path):
    from trainer.export import load_exported
    from trainer.models import forward_tta
    from trainer.tasks import Task

    summary = train(load_config(None, tiny_overrides(tmp_path, "multiclass", **{"eval.tta": "flip"})))
    run_dir = Path(summary["run_dir"])
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    assert meta["tta"] == "flip"
    res = run_cli("eval", "--model", str(run_dir))
    assert res.returncode == 0, res.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["tta"] == "flip" and report["accuracy"] == summary["final"]["accuracy"]
    assert report["loss"] == pytest.approx(summary["final"]["loss"], abs=1e-5)
    plain = run_cli("eval", "--model", str(run_dir), "eval.tta=none", "--output", str(tmp_path / "plain.json"))
    assert plain.returncode == 0, plain.stderr
    assert json.loads((tmp_path / "plain.json").read_text())["loss"] != pytest.approx(report["loss"], abs=1e-7)
    # predict: the probabilities of the mean of the image's and its mirror's logits
    image = sorted((tmp_path / "gen-multiclass" / "val" / "circle").iterdir())[0]
    out = tmp_path / "pred.csv"
    assert run_cli("predict", "--model", str(run_dir), str(image), "--output", str(out)).returncode == 0
    row = next(csv.DictReader(out.open()))
    model, _ = load_exported(str(run_dir))
    from trainer.data.datasets import eval_transform
    from trainer.data.folders import load_rgb

    x = eval_transform(32, meta["mean"], meta["std"])(load_rgb(str(image)))[None]
    with torch.no_grad():
        expected = Task("multiclass", 4).probabilities(forward_tta(model, x, "flip"))[0]
    got = torch.tensor([float(row[f"prob_{c}"]) for c in meta["classes"]])
    assert torch.allclose(got, expected, atol=1e-6)


def test_a_finished_run_exports_its_model_again_under_another_global_batch(tiny, tmp_path):
    """Re-exporting a complete run's deleted model/ only reads its final weights: a command with another batch
    size (the run is complete, so nothing is trained) exports it again instead of refusing the batch change."""
    assert run_cli("train", "-", *tiny(**{"train.max_steps": 3, "eval.every_epochs": 0})).returncode == 0
    shutil.rmtree(tmp_path / "run" / "model")
    again = run_cli("train", "-", *tiny(**{"train.max_steps": 3, "eval.every_epochs": 0, "train.batch_size": 8}))
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "exported again from the final checkpoint" in again.stdout
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
