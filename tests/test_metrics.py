"""Evaluation is exact on any number of processes: every metric equals scikit-learn on the full split.

A lookup-table "model" returns a fixed, seeded logit row per sample index, so the full-split reference can
be computed in this process with scikit-learn and compared with what 1, 2 or 3 processes (gloo, forked by
accelerate's debug_launcher) gather and compute.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from accelerate import debug_launcher
from sklearn import metrics as skm
from torch import nn
from torch.utils.data import Dataset

from trainer.distributed import shard_bounds
from trainer.errors import TrainerError
from trainer.tasks import Task
from trainer.tasks.classify_metrics import compute_metrics, tune_threshold

CASES = {
    # name: (kind, num_classes, n, label sampler)
    "binary_balanced": ("binary", 2, 101, lambda rng, n: rng.integers(0, 2, n)),
    "binary_imbalanced": ("binary", 2, 101, lambda rng, n: (rng.random(n) < 0.06).astype(int)),
    "multiclass_balanced": ("multiclass", 5, 101, lambda rng, n: rng.integers(0, 5, n)),
    "multiclass_imbalanced": ("multiclass", 4, 101, lambda rng, n: rng.choice(4, n, p=[0.85, 0.1, 0.04, 0.01])),
    "multiclass_absent_class": ("multiclass", 4, 101, lambda rng, n: rng.choice([0, 1, 3], n)),
    "tiny_split": ("multiclass", 3, 2, lambda rng, n: np.array([0, 2])),  # fewer samples than processes
}


def collect_outputs(model, dataset, task: Task, accelerator, batch_size: int, num_workers: int = 0,
                    memory_format=torch.contiguous_format, tta: str = "none"):
    """Per-sample probabilities (N, C), labels (N,) and losses (N,) of the whole split, on the main process
    (None on the others): the rows the classification evaluator gathers, through the one evaluation
    (trainer.evaluation)."""
    from trainer.evaluation import evaluate
    from trainer.tasks.classify import Classification

    classify = Classification(task.kind, [str(i) for i in range(task.num_classes)], task)
    return evaluate(model, dataset, classify, accelerator, batch_size, num_workers, memory_format, tta)[1]


class IndexDataset(Dataset):
    def __init__(self, labels):
        self.labels = [int(v) for v in labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor([float(i)]), self.labels[i]


class LookupModel(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.table[x.view(-1).long()] * self.scale


def make_case(name: str, seed: int = 0):
    kind, c, n, sample = CASES[name]
    rng = np.random.default_rng(seed)
    labels = np.asarray(sample(rng, n))
    outputs = 1 if kind == "binary" else c
    logits = torch.from_numpy(rng.normal(0, 2, (n, outputs)).astype(np.float32))
    logits[np.arange(n), 0 if kind == "binary" else labels] += 1.0  # a model better than chance
    return Task(kind, c), [f"class{i}" for i in range(c)], labels, logits


def _evaluate_case(name: str, out_path: str):
    from trainer.loop import make_accelerator

    acc = make_accelerator("cpu", "no")
    task, classes, labels, logits = make_case(name)
    out = collect_outputs(LookupModel(logits), IndexDataset(labels), task, acc, batch_size=8)
    if acc.is_main_process:
        metrics = compute_metrics(out["probs"], out["labels"], out["losses"], task, classes, 0.5, (2, 3, 10))
        with open(out_path, "w") as fh:
            json.dump({"metrics": metrics, "probs": out["probs"].tolist(), "labels": out["labels"].tolist(),
                       "processes": acc.num_processes}, fh)
    else:
        assert out is None  # only the main process holds the gathered split


def sklearn_reference(name: str) -> dict:
    """The expected metrics, computed directly with scikit-learn on the full split in one process."""
    task, classes, labels, logits = make_case(name)
    probs = task.probabilities(logits).numpy().astype(np.float64)
    c = len(classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task.kind == "binary":
            pred = (probs[:, 1] >= 0.5).astype(int)
            ref = {"accuracy": skm.accuracy_score(labels, pred),
                   "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
                   "precision": skm.precision_score(labels, pred, zero_division=0),
                   "recall": skm.recall_score(labels, pred, zero_division=0),
                   "specificity": skm.recall_score(labels, pred, pos_label=0, zero_division=0),
                   "f1": skm.f1_score(labels, pred, zero_division=0),
                   "roc_auc": skm.roc_auc_score(labels, probs[:, 1]),
                   "pr_auc": skm.average_precision_score(labels, probs[:, 1]),
                   "log_loss": skm.log_loss(labels, probs[:, 1], labels=[0, 1]),
                   "confusion_matrix": skm.confusion_matrix(labels, pred, labels=[0, 1]).tolist()}
        else:
            pred = probs.argmax(1)
            ref = {"accuracy": skm.accuracy_score(labels, pred),
                   "balanced_accuracy": skm.balanced_accuracy_score(labels, pred),
                   "log_loss": skm.log_loss(labels, probs, labels=list(range(c))),
                   "confusion_matrix": skm.confusion_matrix(labels, pred, labels=list(range(c))).tolist()}
            for k in (2, 3):
                if k < c:
                    ref[f"top{k}_accuracy"] = skm.top_k_accuracy_score(labels, probs, k=k, labels=list(range(c)))
            ref[f"top{c}_accuracy"] = 1.0  # k=10 clamped to the class count
            for avg in ("macro", "weighted"):
                p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, average=avg, zero_division=0)
                ref.update({f"precision_{avg}": p, f"recall_{avg}": r, f"f1_{avg}": f})
            present = sorted(set(labels.tolist()))
            if len(present) == c:
                ref["roc_auc"] = skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro")
            elif len(present) > 1:  # our documented definition: macro over the classes present in the split
                ref["roc_auc"] = np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in present])
            else:
                ref["roc_auc"] = None
            p, r, f, s = skm.precision_recall_fscore_support(labels, pred, labels=list(range(c)), zero_division=0)
            ref["per_class"] = [{"class": classes[i], "precision": p[i], "recall": r[i], "f1": f[i],
                                 "support": int(s[i])} for i in range(c)]
    ref["num_samples"] = len(labels)
    return ref


def assert_matches(got: dict, ref: dict):
    for key, want in ref.items():
        assert key in got, key
        if key == "per_class":
            for g, w in zip(got[key], want):
                for k, v in w.items():
                    assert g[k] == pytest.approx(v, abs=1e-6) if isinstance(v, float) else g[k] == v, (key, k)
        elif want is None:
            assert got[key] is None, key
        elif isinstance(want, (list, int)) and not isinstance(want, bool):
            assert got[key] == want, key  # counts: exact
        else:
            assert got[key] == pytest.approx(float(want), abs=1e-6), key


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("processes", [1, 2, 3])
def test_metrics_equal_sklearn_on_the_full_split(name, processes, tmp_path):
    out_path = str(tmp_path / "out.json")
    if processes == 1:
        _evaluate_case(name, out_path)
    else:
        debug_launcher(lambda: _evaluate_case(name, out_path), num_processes=processes)
    result = json.loads(open(out_path).read())
    assert result["processes"] == processes
    ref = sklearn_reference(name)
    assert result["metrics"]["num_samples"] == ref["num_samples"] == len(result["labels"])
    task, _, labels, _ = make_case(name)
    assert result["labels"] == labels.tolist()  # every sample exactly once, in split order
    assert_matches(result["metrics"], ref)


def test_absent_class_is_reported_not_a_crash():
    task, classes, labels, logits = make_case("multiclass_absent_class")
    probs = task.probabilities(logits).numpy()
    m = compute_metrics(probs, labels, np.zeros(len(labels)), task, classes)
    assert m["roc_auc_absent_classes"] == ["class2"]
    assert m["per_class"][2]["support"] == 0 and m["per_class"][2]["roc_auc"] is None


def test_binary_single_class_split_has_undefined_auc():
    task = Task("binary", 2)
    probs = task.probabilities(torch.randn(7, 1)).numpy()
    m = compute_metrics(probs, np.zeros(7, int), np.zeros(7), task, ["neg", "pos"])
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["num_samples"] == 7
    assert m["confusion_matrix"][1] == [0, 0]


def test_positive_class_can_be_index_0():
    task, classes, labels, logits = make_case("binary_imbalanced")
    probs = task.probabilities(logits).numpy()
    m = compute_metrics(probs, labels, np.zeros(len(labels)), task, classes, threshold=0.5, positive_index=0)
    y = (labels == 0).astype(int)
    pred = (probs[:, 0] >= 0.5).astype(int)
    assert m["positive_class"] == "class0"
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 0]))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=[0, 1]).tolist()


def test_shards_cover_the_split_exactly_once():
    for n in (0, 1, 2, 7, 101):
        for world in (1, 2, 3, 8):
            parts = [list(shard_bounds(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))


def test_threshold_tuning_criteria():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    score = np.clip(0.35 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    t_f1 = tune_threshold(score, y, "max_f1")
    f1s = {t: skm.f1_score(y, score >= t) for t in np.unique(score)}
    assert skm.f1_score(y, score >= t_f1) == pytest.approx(max(f1s.values()))
    t_j = tune_threshold(score, y, "youden")
    j = lambda t: skm.recall_score(y, score >= t) - (1 - skm.recall_score(y, score >= t, pos_label=0))
    assert j(t_j) == pytest.approx(max(j(t) for t in np.unique(score)))
    t_r = tune_threshold(score, y, "target_recall", 0.9)
    assert skm.recall_score(y, score >= t_r) >= 0.9
    above = [t for t in np.unique(score) if t > t_r]  # above[0] classifies like t_r; every higher one loses recall
    assert all(skm.recall_score(y, score >= t) < 0.9 for t in above[1:])
    for t in (t_f1, t_j, t_r):  # no sample sits on a tuned threshold, and it is exact in float32
        assert t not in set(score.tolist()) and float(np.float32(t)) == t
    with pytest.raises(TrainerError):
        tune_threshold(score, np.ones(400, int), "max_f1")
