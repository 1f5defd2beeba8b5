"""trainer.reports: eval.json round-trips, every plot is a real, readable PNG, training curves from
metrics.jsonl, and the terminal summary. Metrics dicts are built by hand so these tests do not depend on
trainer.metrics."""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainer.outputs import Folder
from trainer.reports import plot_confusion_matrix, plot_training_curves, row_normalise
from trainer.tasks.classify_reports import PLOT_FILES, format_summary, plot_pr, plot_roc, write_eval_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert 5_000 <= len(data) <= 2_000_000, (path, len(data))
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:  # verify() leaves the image unusable; reopen for the size
        assert img.format == "PNG"
        assert img.width >= 200 and img.height >= 200, img.size


def random_probs(rng: np.random.Generator, n: int, c: int) -> np.ndarray:
    raw = rng.random((n, c)) + 1e-3
    return raw / raw.sum(axis=1, keepdims=True)


def per_class_rows(classes, roc_auc=True):
    rows = []
    for i, name in enumerate(classes):
        row = {"class": name, "precision": 0.5 + i / 100, "recall": 0.25, "f1": 1 / 3, "support": 10 + i}
        if roc_auc:
            row["roc_auc"] = None if i == 0 else 0.75
        rows.append(row)
    return rows


@pytest.fixture
def binary_case():
    rng = np.random.default_rng(0)
    classes = ["cat", "dog"]
    labels = rng.integers(0, 2, 60)
    probs = random_probs(rng, 60, 2)
    metrics = {
        "num_samples": np.int64(60), "loss": 0.69, "log_loss": np.float64(0.6931), "accuracy": 0.5,
        "balanced_accuracy": 0.51, "precision": 0.48, "recall": 0.52, "specificity": 0.49, "f1": 0.5,
        "roc_auc": np.float32(0.5), "pr_auc": None, "threshold": 0.5, "positive_class": "dog",
        "confusion_matrix": np.array([[15, 14], [16, 15]]), "per_class": per_class_rows(classes, roc_auc=False),
    }
    return metrics, probs, labels, classes


@pytest.fixture
def multiclass_case():
    rng = np.random.default_rng(1)
    classes = ["apple", "banana", "cherry", "durian"]
    labels = rng.choice([0, 1, 3], 80)  # cherry never occurs
    probs = random_probs(rng, 80, 4)
    cm = np.zeros((4, 4), dtype=int)
    np.add.at(cm, (labels, probs.argmax(axis=1)), 1)
    metrics = {
        "num_samples": 80, "loss": 1.4, "log_loss": 1.39, "accuracy": 0.25, "top5_accuracy": 1.0,
        "top2_accuracy": 0.5, "balanced_accuracy": 0.26, "precision_macro": 0.2, "recall_macro": 0.2,
        "f1_macro": 0.2, "precision_weighted": 0.24, "recall_weighted": 0.25, "f1_weighted": 0.24,
        "roc_auc": None, "roc_auc_absent_classes": ["cherry"], "confusion_matrix": cm.tolist(),
        "per_class": per_class_rows(classes),
    }
    return metrics, probs, labels, classes


def plain(obj):
    """What a JSON round-trip of obj should give: numpy values as Python values."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else o.item()))


@pytest.mark.parametrize("case, kind", [("binary_case", "binary"), ("multiclass_case", "multiclass")])
def test_write_eval_report_writes_json_and_valid_plots(case, kind, tmp_path, request):
    metrics, probs, labels, classes = request.getfixturevalue(case)
    out = tmp_path / "report" / "nested"  # the folder does not exist yet
    paths = write_eval_report(out, metrics, probs, labels, classes, kind)
    assert set(paths) == {"eval", "confusion_matrix", "roc_curve", "pr_curve"}
    assert paths["eval"] == out / "eval.json"
    loaded = json.loads(paths["eval"].read_text())
    assert loaded == plain(metrics)
    assert isinstance(loaded["num_samples"], int)
    assert loaded["confusion_matrix"] == np.asarray(metrics["confusion_matrix"]).tolist()
    for key in ("confusion_matrix", "roc_curve", "pr_curve"):
        assert paths[key].parent == out / "plots"
        assert_valid_png(paths[key])
    assert not list(out.glob(".*tmp*")), "temporary file left behind"


def test_custom_name_and_positive_index_zero(binary_case, tmp_path):
    metrics, probs, labels, classes = binary_case
    paths = write_eval_report(tmp_path, metrics, probs, labels, classes, "binary", positive_index=0,
                              name="test.json")
    assert paths["eval"] == tmp_path / "test.json"
    assert json.loads(paths["eval"].read_text())["accuracy"] == 0.5
    assert_valid_png(paths["roc_curve"])


def test_empty_split_writes_only_json(multiclass_case, tmp_path):
    metrics, _, _, classes = multiclass_case
    empty = {**metrics, "num_samples": 0, "confusion_matrix": [[0] * 4 for _ in range(4)]}
    paths = write_eval_report(tmp_path, empty, np.zeros((0, 4)), np.zeros(0, dtype=int), classes, "multiclass")
    assert paths == {"eval": tmp_path / "eval.json"}
    assert json.loads(paths["eval"].read_text())["num_samples"] == 0
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["eval.json"]


def test_empty_split_removes_plots_of_an_earlier_eval(multiclass_case, tmp_path):
    """Through the write gate, as `trainer eval` writes: the earlier report's plots (the trainer's) would
    contradict the new eval.json; a plot of the user's beside them stays."""
    metrics, probs, labels, classes = multiclass_case
    out = Folder(tmp_path, "eval")
    stale = [f"plots/{p}" for p in PLOT_FILES.values()]
    with out.staged(stale=stale) as stage:
        write_eval_report(stage, metrics, probs, labels, classes, "multiclass")
    assert (tmp_path / "plots" / "roc_curve.png").is_file()
    (tmp_path / "plots" / "mine.png").write_bytes(b"the user's")
    with out.staged(stale=stale) as stage:
        write_eval_report(stage, {**metrics, "num_samples": 0}, probs[:0], labels[:0], classes, "multiclass")
    assert [p.name for p in (tmp_path / "plots").glob("*.png")] == ["mine.png"]


def test_curves_skip_absent_class_without_warnings(multiclass_case, tmp_path):
    _, probs, labels, classes = multiclass_case
    # sklearn warns (and returns NaN) when a one-vs-rest target has no positives: the absent class must be skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_roc(probs, labels, classes, "multiclass", tmp_path / "roc.png")
        plot_pr(probs, labels, classes, "multiclass", tmp_path / "pr.png")
    assert_valid_png(tmp_path / "roc.png")
    assert_valid_png(tmp_path / "pr.png")


def test_binary_curves_with_one_class_only_do_not_fail(tmp_path):
    probs = random_probs(np.random.default_rng(2), 20, 2)
    labels = np.zeros(20, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_roc(probs, labels, ["cat", "dog"], "binary", tmp_path / "roc.png")
        plot_pr(probs, labels, ["cat", "dog"], "binary", tmp_path / "pr.png")
    assert_valid_png(tmp_path / "roc.png")
    assert (tmp_path / "pr.png").read_bytes().startswith(PNG_SIGNATURE)


def test_row_normalise_keeps_zero_row_zero_without_warnings(tmp_path):
    cm = [[3, 1, 0], [0, 0, 0], [2, 2, 4]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm = row_normalise(cm)
        plot_confusion_matrix(cm, ["a", "b", "c"], tmp_path / "cm.png")
    np.testing.assert_allclose(norm, [[0.75, 0.25, 0], [0, 0, 0], [0.25, 0.25, 0.5]])
    assert np.isfinite(norm).all()
    assert_valid_png(tmp_path / "cm.png")


def test_many_classes_report_and_summary(tmp_path):
    rng = np.random.default_rng(3)
    classes = [f"class_{i:02d}_with_a_rather_long_name" for i in range(60)]
    labels = rng.integers(0, 59, 600)  # the last class is absent
    probs = random_probs(rng, 600, 60)
    cm = np.zeros((60, 60), dtype=int)
    np.add.at(cm, (labels, probs.argmax(axis=1)), 1)
    metrics = {"num_samples": 600, "accuracy": 0.02, "confusion_matrix": cm, "per_class": per_class_rows(classes)}
    paths = write_eval_report(tmp_path, metrics, probs, labels, classes, "multiclass")
    for key in ("confusion_matrix", "roc_curve", "pr_curve"):
        assert_valid_png(paths[key])
    text = format_summary(metrics, classes, "multiclass")
    assert "class_49_with_a_rather_long_name"[:29] in text
    assert "class_50" not in text
    assert "10 more classes omitted" in text


def write_metrics_jsonl(path: Path) -> None:
    lines = []
    for step in range(1, 21):
        lines.append(json.dumps({"type": "train", "step": step, "epoch": step / 10, "samples_seen": step * 32,
                                 "lr": 0.001 * min(1.0, step / 5), "loss": 2.0 / step, "throughput": 500.0}))
        if step % 10 == 0:
            lines.append(json.dumps({"type": "eval", "split": "val", "step": step, "epoch": step / 10,
                                     "samples_seen": step * 32, "num_samples": 50, "loss": 1.5 / step,
                                     "accuracy": step / 25, "per_class": []}))
    lines.insert(3, "{not json")  # malformed lines are ignored
    lines.append('{"type": "train", "step": 21, "loss"')  # a torn last line
    path.write_text("\n".join(lines) + "\n")


def test_plot_training_curves(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    write_metrics_jsonl(jsonl)
    out = tmp_path / "plots" / "training_curves.png"
    out.parent.mkdir()
    out.write_bytes(plot_training_curves(jsonl))
    assert_valid_png(out)


def test_plot_training_curves_without_data_draws_nothing(tmp_path):
    assert plot_training_curves(tmp_path / "missing.jsonl") is None
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_training_curves(tmp_path / "empty.jsonl") is None
    (tmp_path / "junk.jsonl").write_text("not json\n[1, 2]\n")
    assert plot_training_curves(tmp_path / "junk.jsonl") is None


def test_format_summary_binary(binary_case):
    metrics, _, _, classes = binary_case
    text = format_summary(metrics, classes, "binary")
    headline = text.split("\npositive class")[0]
    for key in ("num_samples=60", "accuracy=0.5000", "specificity=0.4900", "roc_auc=0.5000", "pr_auc=n/a",
                "log_loss=0.6931", "threshold=0.5000"):
        assert key in headline
    assert "positive class: dog" in text
    for name in classes:
        assert name in text
    header = next(line for line in text.splitlines() if line.startswith("class"))
    assert header.split() == ["class", "precision", "recall", "f1", "support"]


def test_format_summary_multiclass(multiclass_case):
    metrics, _, _, classes = multiclass_case
    text = format_summary(metrics, classes, "multiclass")
    assert "roc_auc=n/a" in text
    assert text.index("top2_accuracy") < text.index("top5_accuracy") < text.index("balanced_accuracy")
    assert "precision_macro" not in text  # not a headline metric
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("class"))
    table = lines[header:header + 1 + len(classes)]
    assert [line.split()[0] for line in table[1:]] == classes
    assert table[1].split()[-1] == "n/a"  # apple's per-class roc_auc is None
    assert table[2].split()[1:] == ["0.5100", "0.2500", "0.3333", "11", "0.7500"]
    assert len({len(line) for line in table}) == 1, "columns are not aligned"


def test_format_summary_tolerates_missing_keys():
    assert format_summary({}, ["a", "b"], "multiclass")
    text = format_summary({"accuracy": 0.9}, ["a", "b"], "binary")
    assert "accuracy=0.9000" in text and "roc_auc" not in text


# ---- best/ during a run: usable at once, its plots once at the end (eval.best_plots) ----

def test_a_killed_run_leaves_a_usable_best_and_the_resumed_end_draws_the_final_bests_plots(tmp_path):
    """A new best writes weights, model.json and eval.json at once (no plots): a run killed afterwards leaves
    a best/ that loads. The same command then finishes the run, and best/'s plots are drawn at its end for the
    final best: the same bytes as `trainer eval` of best/ draws. Here best/ is from epoch 1 (accuracy 0.27,
    then 0.19 and 0.21 at this seed), written before the kill, so its plots come from its weights scored again."""
    from tests.conftest import ROOT, run_cli, run_forked, tiny_overrides
    from trainer.export import load_exported

    args = ["train", "-", *tiny_overrides(tmp_path, **{"train.epochs": 3})]
    killed = run_forked(args, env={"FAULT": "kill_at_update", "FAULT_AT": "21"},  # the first update of epoch 3
                        script=ROOT / "tests" / "fault_driver.py")
    assert killed.returncode == -9, killed.stderr[-2000:]
    best = tmp_path / "run" / "best"
    assert sorted(p.name for p in best.iterdir() if not p.name.startswith(".")) == \
        ["eval.json", "model.json", "model.safetensors"]
    model, meta = load_exported(str(best))  # usable as it is
    assert meta["step"] == 10 and json.loads((best / "eval.json").read_text())["accuracy"] == meta["metrics"]["accuracy"]
    weights_before, eval_before = (best / "model.safetensors").read_bytes(), (best / "eval.json").read_text()

    done = run_cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (best / "model.safetensors").read_bytes() == weights_before and (best / "eval.json").read_text() == eval_before
    ref = run_cli("eval", "--model", str(best), "--output", str(tmp_path / "ref" / "eval.json"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    drawn = sorted(p.name for p in (best / "plots").iterdir())
    assert drawn == ["confusion_matrix.png", "pr_curve.png", "roc_curve.png"]
    for name in drawn:
        assert (best / "plots" / name).read_bytes() == (tmp_path / "ref" / "plots" / name).read_bytes(), name


def test_the_final_scorings_report_is_copied_into_best_not_drawn_again(tmp_path):
    """When the final evaluation was also the best (eval.best_plots=end), best/ gets model/'s report byte for
    byte (a report is a pure function of the scores) instead of a second drawing of every plot, which was most
    of the end of a run (BENCHMARKS.md, bench/vs_reference.py); best/'s own weights and model.json stay, and
    only the report's files are copied: a user's file in model/ does not turn up in best/."""
    from trainer.evaluation import Scores, write_best_report

    out = Folder(tmp_path / "run", "train")
    with out.replacing("model") as tmp:
        (tmp / "plots").mkdir()
        for rel, data in {"model.safetensors": b"final", "model.json": b"{}", "eval.json": b'{"miou": 0.5}',
                          "plots/confusion_matrix.png": b"png bytes"}.items():
            (tmp / rel).write_bytes(data)
    (tmp_path / "run" / "model" / "my_notes.txt").write_bytes(b"a user's file")  # not the report's: stays put
    with out.replacing("best") as tmp:
        best_files = {"model.safetensors": b"best", "model.json": b'{"step": 4}', "eval.json": b'{"miou": 0.5}'}
        for rel, data in best_files.items():
            (tmp / rel).write_bytes(data)

    class NoDrawing:
        report_plots = ("confusion_matrix.png", "per_class_iou.png")  # the second not drawn in model/

        def write_report(self, *args):
            raise AssertionError("best/'s report drawn again")

    write_best_report(out, "best", NoDrawing(), Scores({"miou": 0.5}, None, {}), report_of="model")
    best = tmp_path / "run" / "best"
    assert sorted(str(p.relative_to(best)) for p in best.rglob("*") if not p.name.startswith(".")) == \
        ["eval.json", "model.json", "model.safetensors", "plots", "plots/confusion_matrix.png"]
    assert (best / "plots" / "confusion_matrix.png").read_bytes() == b"png bytes"
    assert (tmp_path / "run" / "model" / "my_notes.txt").read_bytes() == b"a user's file"
    assert (best / "model.safetensors").read_bytes() == b"best" and (best / "model.json").read_bytes() == b'{"step": 4}'


def test_a_plot_is_cropped_to_its_artists_and_a_legend_beyond_the_figure_grows_the_image(tmp_path):
    import matplotlib.pyplot as plt

    from trainer.reports import DPI, CellText, figure_png
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_aspect("equal")  # a square axes in a 4 x 3 figure: white bands left and right, cropped away
    ax.imshow(np.zeros((2, 2)), cmap="Blues", vmin=0, vmax=1)
    plain = np.asarray(Image.open(io.BytesIO(figure_png(fig))))
    assert plain.shape[0] <= 3 * DPI + 2 and plain.shape[1] < 4 * DPI - 20, plain.shape
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_aspect("equal")
    ax.imshow(np.zeros((2, 2)), cmap="Blues", vmin=0, vmax=1)
    numbered = np.asarray(Image.open(io.BytesIO(figure_png(fig, [CellText(ax, 0, 0, "42", "black", 10)]))))
    assert numbered.shape == plain.shape and (numbered != plain).any()  # the number drawn, the layout unchanged
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="a line with a long legend entry")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    with Image.open(io.BytesIO(figure_png(fig, [CellText(ax, 0.5, 0.5, "0.50", "black", 7)]))) as img:
        assert img.width > 4 * DPI, img.size
    assert not plt.get_fignums()  # both closed


def test_the_picture_grids_hold_every_panel_at_the_cell_size(tmp_path):
    import torch

    from trainer.reports import panel_grid
    from trainer.tasks.segment_reports import plot_overlays
    tall, wide = np.full((40, 20, 3), 200, np.uint8), np.zeros((10, 30, 3), np.uint8)
    grid = panel_grid([[("tall", tall), ("wide", wide)], [("one", wide)]], cell_px=60)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[1] == 2 * (60 + 16)
    assert grid.shape[0] == 2 * (grid.shape[0] // 2)  # two rows of the same height
    assert (grid[: grid.shape[0] // 2, :76] == 200).sum() >= 30 * 60 * 3  # the tall picture, scaled to 60 px high
    g = torch.Generator().manual_seed(0)
    samples = [(torch.randn(3, 64, 48, generator=g), torch.randint(0, 3, (64, 48), generator=g),
                torch.randint(0, 3, (64, 48), generator=g)) for _ in range(2)]
    plot_overlays(samples, ["bg", "a", "b"], tmp_path / "overlays.png")
    assert_valid_png(tmp_path / "overlays.png")
