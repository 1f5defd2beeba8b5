"""Multi-label classification through the trainer: metrics equal to scikit-learn on 1, 2 and 3 processes, the
loss and the per-class thresholds, the CSV reader's checks (one line naming the culprit), a whole run whose
`trainer predict` CSV reproduces `trainer eval`'s eval.json, and a killed run resuming bit for bit."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import debug_launcher
from sklearn import metrics as skm
from torch import nn

from tests.conftest import PYTHONPATH, ROOT, assert_same_run, run_cli, tiny_overrides, write_image
from trainer.config import load_config
from trainer.errors import ConfigError, DataError

C, N = 5, 53  # classes (the last with no positive in the split), images (odd: uneven shares)
THRESHOLDS = [0.5, 0.3, 0.7, 0.45, 0.5]


def make_split(seed: int = 0):
    """Fixed logits per image index (better than chance) and multi-hot targets; class 4 never present, and some
    images have no label at all."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((N, C)) < [0.5, 0.2, 0.05, 0.6, 0.0]).astype(np.float32)
    logits = rng.normal(0, 1.5, (N, C)).astype(np.float32) + 1.5 * targets
    return torch.from_numpy(logits), targets


class IndexImages(torch.utils.data.Dataset):
    def __init__(self, targets):
        self.labels = targets

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.full((1,), float(i)), torch.from_numpy(self.labels[i])


class LookupNet(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x):
        return self.table[x.view(-1).long()]


def _evaluate(out_path: str, tuning=None) -> None:
    from trainer.distributed import make_accelerator
    from trainer.evaluation import evaluate
    from trainer.tasks import Multilabel

    acc = make_accelerator("cpu", "no")
    logits, targets = make_split()
    task = Multilabel([f"c{k}" for k in range(C)], list(THRESHOLDS), threshold_tuning=tuning)
    metrics, _ = evaluate(LookupNet(logits), IndexImages(targets), task, acc, batch_size=4)
    if acc.is_main_process:
        with open(out_path, "w") as fh:
            json.dump({"metrics": metrics, "processes": acc.num_processes}, fh)


def sklearn_reference() -> dict:
    logits, y = make_split()
    probs = torch.sigmoid(logits).numpy().astype(np.float64)
    y = y.astype(int)
    pred = (probs >= np.array(THRESHOLDS)).astype(int)
    present = y.sum(0) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {"num_samples": N,
               "map": skm.average_precision_score(y[:, present], probs[:, present], average="macro"),
               "subset_accuracy": skm.accuracy_score(y, pred), "hamming_loss": skm.hamming_loss(y, pred),
               "loss": F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).float()).item()}
        for avg in ("micro", "macro"):
            ref[f"f1_{avg}"] = skm.f1_score(y, pred, average=avg, zero_division=0)
            ref[f"precision_{avg}"] = skm.precision_score(y, pred, average=avg, zero_division=0)
            ref[f"recall_{avg}"] = skm.recall_score(y, pred, average=avg, zero_division=0)
        ref["roc_auc"] = np.mean([skm.roc_auc_score(y[:, c], probs[:, c]) for c in range(C) if present[c]])
        ref["per_class_ap"] = [skm.average_precision_score(y[:, c], probs[:, c]) if present[c] else None
                               for c in range(C)]
        ref["per_class_f1"] = skm.f1_score(y, pred, average=None, zero_division=0).tolist()
    return ref


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_multilabel_metrics_equal_scikit_learn_on_any_process_count(processes, tmp_path):
    out = str(tmp_path / "out.json")
    if processes == 1:
        _evaluate(out)
    else:
        debug_launcher(lambda: _evaluate(out), num_processes=processes)
    result = json.loads(Path(out).read_text())
    assert result["processes"] == processes
    got, ref = result["metrics"], sklearn_reference()
    for key in ("num_samples", "map", "subset_accuracy", "hamming_loss", "f1_micro", "f1_macro", "precision_micro",
                "precision_macro", "recall_micro", "recall_macro", "roc_auc", "loss"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key
    assert [row["ap"] for row in got["per_class"]][:-1] == pytest.approx(ref["per_class_ap"][:-1], abs=1e-9)
    assert got["per_class"][-1]["ap"] is None and got["map_absent_classes"] == ["c4"]
    assert [row["f1"] for row in got["per_class"]] == pytest.approx(ref["per_class_f1"], abs=1e-9)
    assert got["thresholds"] == THRESHOLDS


def test_tuned_thresholds_give_each_class_its_best_f1_and_agree_on_two_processes(tmp_path):
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    _evaluate(one, "max_f1")
    debug_launcher(lambda: _evaluate(two, "max_f1"), num_processes=2)
    a, b = (json.loads(Path(p).read_text())["metrics"] for p in (one, two))
    assert a["thresholds"] == b["thresholds"] and a["map"] == b["map"] and a["f1_macro"] == b["f1_macro"]
    logits, y = make_split()
    probs = torch.sigmoid(logits).numpy().astype(np.float64)
    for c in range(C - 1):  # no threshold does better on this split; the absent class keeps its default
        best = max(skm.f1_score(y[:, c], probs[:, c] >= t, zero_division=0) for t in probs[:, c])
        assert a["per_class"][c]["f1"] == pytest.approx(best, abs=1e-12)
    assert a["thresholds"][-1] == THRESHOLDS[-1]


def test_the_loss_is_bce_per_class_with_pos_weight_from_the_training_counts():
    from trainer.tasks import build_task

    cfg = load_config(None, ["data.format=multilabel", "data.root=/nowhere", "loss.class_weighted=true"])
    task = build_task("auto", ["a", "b", "c"], [10, 2, 5], cfg.loss, cfg.eval, cfg.data, num_images=20)
    assert task.name == "multilabel" and task.pos_weight == [1.0, 9.0, 3.0]  # negatives / positives
    assert task.default_monitor == "map" and task.higher_is_better("map") and not task.higher_is_better("hamming_loss")
    logits, y = torch.randn(4, 3), torch.tensor([[1., 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 0]])
    loss, n, _ = task.train_loss(lambda x: logits, (torch.zeros(4, 3, 2, 2), y))
    want = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 9.0, 3.0]))(logits, y)
    assert n == 4 and torch.allclose(loss, want)


def test_tune_and_sweep_monitor_map_through_the_task():
    from trainer.tasks import task_spec

    cfg = load_config(None, ["data.generated.variant=multilabel"])
    assert task_spec(cfg.task, cfg.data).default_monitor == "map"


@pytest.mark.parametrize("overrides, expected", [
    (["data.sampler=weighted"], "data.sampler=weighted"),
    (["eval.threshold_tuning=youden"], "eval.threshold_tuning=max_f1"),
    (["loss.pos_weight=3"], "loss.class_weighted=true"),
    (["data.csv.separator="], "data.csv.separator"),
    (["task=multiclass"], "task=multilabel"),
])
def test_what_multilabel_cannot_serve_is_refused_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, ["data.generated.variant=multilabel", *overrides])


def test_mixup_and_cutmix_mix_the_multi_hot_targets_as_the_images():
    from trainer.data.mixing import BatchMixer

    cfg = load_config(None, ["data.generated.variant=multilabel", "data.augment.mixup_alpha=0.4",
                             "data.augment.cutmix_alpha=1.0", "model.dropout=0.1"])  # accepted: image-level targets
    assert cfg.data.augment.mixup_alpha == 0.4
    mixer = BatchMixer(3, 0.4, 1.0, seed=0)
    y = torch.tensor([[1., 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 0]])
    for batch in range(6):  # both kinds drawn over these batches
        x = torch.rand(4, 3, 8, 8)
        lam, box = mixer.plan(0, batch, 8, 8)
        mixed_x, targets = mixer(x.clone(), y.clone(), 0, batch)
        assert torch.allclose(targets, lam * y + (1 - lam) * y.flip(0))
        if box is None:  # mixup: the pixels by the same lam
            assert torch.allclose(mixed_x, lam * x + (1 - lam) * x.flip(0))


def test_csv_keys_are_refused_while_another_task_trains():
    with pytest.raises(ConfigError, match=r"data\.csv\.labels_column is for data\.format=multilabel"):
        load_config(None, ["data.csv.labels_column=tags"])


# ---- the CSV reader ----

def csv_folder(root: Path, train=None, val=None, classes=None, header=("image", "labels"), sep=" ") -> Path:
    """A tiny multi-label folder: images under root/img, train.csv and val.csv (rows: (name, [labels]))."""
    train = train or [(f"t{i}.png", lab) for i, lab in enumerate([["cat"], ["dog"], ["cat", "dog"], [], ["bird"],
                                                                   ["bird", "cat"]])]
    val = val or [("v0.png", ["cat"]), ("v1.png", ["dog", "bird"]), ("v2.png", [])]
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("val", val)):
        with (root / f"{split}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for name, labels in rows:
                if not (root / "img" / name).exists():
                    write_image(root / "img" / name, seed=len(name) + sum(map(ord, name)))
                writer.writerow([f"img/{name}", sep.join(labels)])
    if classes is not None:
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return root


def build(root: Path, *extra):
    from trainer.data import build_data

    cfg = load_config(None, ["data.format=multilabel", f"data.root={root}", "data.image_size=16", *extra])
    return build_data(cfg.data, 0, ("train", "val"), log=lambda *_: None)


def test_a_csv_folder_reads_its_label_sets_with_classes_from_the_union_of_train(tmp_path):
    data = build(csv_folder(tmp_path / "d"))
    assert data.classes == ["bird", "cat", "dog"] and data.train_counts == [2, 3, 2]
    train = data.datasets["train"]
    assert train.labels[3].tolist() == [0, 0, 0] and train.labels[5].tolist() == [1, 1, 0]  # none; bird cat
    image, target = train[2]
    assert image.shape == (3, 16, 16) and target.tolist() == [0, 1, 1]


def test_csv_columns_and_separator_are_configurable(tmp_path):
    root = csv_folder(tmp_path / "d", header=("file", "tags"), sep=";")
    data = build(root, "data.csv.image_column=file", "data.csv.labels_column=tags", "data.csv.separator=;")
    assert data.classes == ["bird", "cat", "dog"] and data.datasets["val"].labels[1].tolist() == [1, 0, 1]


def test_an_image_folder_holding_train_csv_is_read_as_a_multilabel_folder(tmp_path):
    from trainer.data import build_data
    from trainer.tasks import task_spec

    root = csv_folder(tmp_path / "d")
    cfg = load_config(None, ["data.format=imagefolder", f"data.root={root}", "data.image_size=16"])
    assert task_spec(cfg.task, cfg.data).title == "multilabel"
    assert build_data(cfg.data, 0, ("train", "val"), log=lambda *_: None).classes == ["bird", "cat", "dog"]


def test_predicted_labels_are_the_classes_at_their_thresholds_and_one_threshold_sets_all():
    from trainer.tasks import task_from_meta

    task = task_from_meta({"task": "multilabel", "classes": ["a", "b", "c"], "thresholds": [0.5, 0.2, 0.9]})
    logits = torch.logit(torch.tensor([[0.6, 0.3, 0.95], [0.4, 0.1, 0.5]]))
    probs, cells = task.csv_predictions(logits)
    assert cells == ["a b c", ""] and torch.allclose(probs, torch.sigmoid(logits))
    task.threshold = 0.45  # `trainer predict --threshold 0.45`: b is no longer in, 0.5 of c is
    assert task.thresholds == [0.45] * 3 and task.csv_predictions(logits)[1] == ["a c", "c"]


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("damage, expected", [
    ("missing_image", "val.csv line 3: image"),
    ("unknown_label", "val.csv line 2: label 'zebra' is not a class"),
    ("empty_class", "class 'fish' has no positive image"),
    ("unreadable", "cannot read image"),
    ("no_column", "has no column 'labels'"),
    ("no_val", "val.csv not found"),
])
def test_each_bad_input_is_one_line_naming_the_culprit(tmp_path, damage, expected):
    root = tmp_path / "d"
    if damage == "unknown_label":
        csv_folder(root, val=[("v0.png", ["zebra"])])
    elif damage == "empty_class":
        csv_folder(root, classes=["bird", "cat", "dog", "fish"])
    elif damage == "no_column":
        csv_folder(root, header=("image", "tags"))
    else:
        csv_folder(root)
    if damage == "missing_image":
        (root / "img" / "v1.png").unlink()
    elif damage == "unreadable":
        (root / "img" / "v1.png").write_text("not an image")
    elif damage == "no_val":
        (root / "val.csv").unlink()
    with pytest.raises(DataError) as err:
        build(root)
    assert expected in one_line(err)


# ---- whole runs ----

def ml_args(tmp: Path, run: str, **extra) -> list:
    return tiny_overrides(tmp, "multilabel", **{"data.generated.train_per_class": 16, "data.generated.val_per_class": 6,
                                                "data.generated.test_per_class": 0, "train.epochs": 2,
                                                "eval.threshold_tuning": "max_f1", "loss.class_weighted": True,
                                                "run.dir": str(tmp / run), **extra})


def test_a_multilabel_run_reports_map_and_predict_reproduces_eval(tmp_path):
    res = run_cli("train", "-", *ml_args(tmp_path, "run"))
    assert res.returncode == 0, res.stderr[-2000:]
    run = tmp_path / "run"
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["task"] == "multilabel" and len(meta["thresholds"]) == 4
    for plot in ("ap_per_class", "pr_curve_weakest"):
        assert (run / "model" / "plots" / f"{plot}.png").stat().st_size > 2000, plot
    assert json.loads((run / "summary.json").read_text())["monitor"] == "map"
    res = run_cli("eval", "--model", str(run), "--output", str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["thresholds"] == meta["thresholds"]  # the model's own, tuned in training
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "trainer", "eval", "--model", str(run), "--output", str(tmp_path / "two" / "eval.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH})
    assert two.returncode == 0, two.stderr[-2000:]
    on_two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert (on_two.pop("processes"), report.get("processes")) == (2, 1)
    assert on_two == {k: v for k, v in report.items() if k != "processes"}  # exactly, every float
    res = run_cli("predict", "--model", str(run), str(tmp_path / "gen-multilabel" / "val"), "--output",
                  str(tmp_path / "p.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    with (tmp_path / "p.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    classes = meta["classes"]
    with (tmp_path / "gen-multilabel" / "val.csv").open() as fh:
        truth = {str(tmp_path / "gen-multilabel" / r["image"]): r["labels"].split() for r in csv.DictReader(fh)}
    assert sorted(r["path"] for r in rows) == sorted(truth)
    probs = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    y = np.array([[c in truth[r["path"]] for c in classes] for r in rows]).astype(int)
    pred = probs >= np.array(meta["thresholds"])
    assert [r["labels"].split() for r in rows] == [[c for c, on in zip(classes, p) if on] for p in pred]
    assert skm.average_precision_score(y, probs, average="macro") == pytest.approx(report["map"], abs=1e-12)
    assert skm.f1_score(y, pred, average="micro") == pytest.approx(report["f1_micro"], abs=1e-12)
    assert skm.hamming_loss(y, pred) == pytest.approx(report["hamming_loss"], abs=1e-12)
    assert skm.accuracy_score(y, pred) == pytest.approx(report["subset_accuracy"], abs=1e-12)


@pytest.mark.slow
def test_sigkill_in_a_multilabel_run_then_the_same_command_is_bitwise_identical(tmp_path):
    ref = run_cli("train", "-", *ml_args(tmp_path, "ref", **{"checkpoint.every_steps": 2}))
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = ml_args(tmp_path, "run", **{"checkpoint.every_steps": 2})
    killed = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_driver.py"), "train", "-", *args],
                            capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT": "kill_at_update", "FAULT_AT": "5",
                                 "PYTHONPATH": PYTHONPATH})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("train", "-", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")


@pytest.mark.slow
def test_the_quick_start_recipe_learns_well_above_chance(tmp_path):
    """configs/quickstart_multilabel.yaml shortened to 6 of its 30 epochs (~50 s on one thread) must reach a val
    mAP well above what scores without information reach: each class's AP is then its positive rate (0.48 on
    average here). Measured 2026-12-05: mAP 0.635 after 6 epochs (0.891 after 30)."""
    res = run_cli("train", str(ROOT / "configs" / "quickstart_multilabel.yaml"), f"data.root={tmp_path / 'gen'}",
                  f"run.dir={tmp_path / 'run'}", "train.epochs=6", "eval.every_epochs=0", "train.progress_bar=false",
                  timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    with open(tmp_path / "gen" / "val.csv", newline="") as fh:
        label_sets = [set(row["labels"].split()) for row in csv.DictReader(fh)]
    classes = (tmp_path / "gen" / "classes.txt").read_text().split()
    chance = float(np.mean([sum(c in s for s in label_sets) / len(label_sets) for c in classes]))
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    assert final["map"] > chance + 0.1, (final["map"], chance)
