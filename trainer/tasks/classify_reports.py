"""Classification reports: the ROC and precision-recall curves beside eval.json (with the shared confusion
matrix, trainer/reports.py), the printed summary of a metrics dict, and `trainer predict`'s CSV of labels and
probabilities.
"""
from __future__ import annotations

import csv
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np
import torch

from trainer.outputs import Folder
from trainer.reports import fmt, plot_confusion_matrix, save_figure, short, start_report

import matplotlib.pyplot as plt  # noqa: E402  (after trainer.reports, which sets the headless backend)
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

CURVE_LEGEND_MAX_CLASSES = 20  # above this, one legend entry per class is noise
SUMMARY_MAX_ROWS = 50
PLOT_FILES = {"confusion_matrix": "confusion_matrix.png", "roc_curve": "roc_curve.png", "pr_curve": "pr_curve.png"}


# ------------------------------------------------------------------------------------------ ROC and PR curves

@dataclass(frozen=True)
class _CurveStyle:
    title: str
    xlabel: str
    ylabel: str
    score_name: str  # what the legend calls the one-number summary of a curve
    curve: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, float]]
    legend_loc: str


def _roc(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    fpr, tpr, _ = roc_curve(y, score)
    return fpr, tpr, float(roc_auc_score(y, score))


def _pr(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    precision, recall, _ = precision_recall_curve(y, score)
    return recall, precision, float(average_precision_score(y, score))


_ROC = _CurveStyle("ROC curve", "False positive rate", "True positive rate", "AUC", _roc, "lower right")
_PR = _CurveStyle("Precision-recall curve", "Recall", "Precision", "AP", _pr, "lower left")


def plot_roc(probs: np.ndarray, labels: np.ndarray, classes: list[str], kind: str, path: Path,
             positive_index: int = 1) -> None:
    """ROC curve of the positive class (binary) or one-vs-rest per class (multiclass), with AUC in the legend."""
    _plot_curves(_ROC, probs, labels, classes, kind, path, positive_index)


def plot_pr(probs: np.ndarray, labels: np.ndarray, classes: list[str], kind: str, path: Path,
            positive_index: int = 1) -> None:
    """Precision-recall curve(s), same conventions as plot_roc, with average precision in the legend."""
    _plot_curves(_PR, probs, labels, classes, kind, path, positive_index)


def _one_vs_rest(probs: np.ndarray, labels: np.ndarray, classes: list[str], kind: str,
                 positive_index: int) -> tuple[list[tuple[str, np.ndarray, np.ndarray]], list[str]]:
    """(name, y_true, score) for each curve that can be drawn, and notes on the classes that cannot: a curve
    needs both positives and negatives, or sklearn warns and returns NaN."""
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels).astype(int)
    if kind == "binary":
        pos, neg = classes[positive_index], classes[1 - positive_index]
        y = labels == positive_index
        if not y.any():
            return [], [f"{pos} not in split"]
        if y.all():
            return [], [f"{neg} not in split"]
        return [(pos, y, probs[:, positive_index])], []
    curves, skipped = [], []
    for c, name in enumerate(classes):
        y = labels == c
        if not y.any():
            skipped.append(f"{name} not in split")
        elif y.all():
            skipped.append(f"{name} (only class in split)")
        else:
            curves.append((name, y, probs[:, c]))
    return curves, skipped


def _plot_curves(style: _CurveStyle, probs, labels, classes: list[str], kind: str, path: Path,
                 positive_index: int) -> None:
    curves, skipped = _one_vs_rest(probs, labels, classes, kind, positive_index)
    many = len(curves) > CURVE_LEGEND_MAX_CLASSES
    legend_outside = not many and len(curves) > 8
    fig, ax = plt.subplots(figsize=(6.5, 5.5))  # an outside legend widens the saved image (bbox_inches="tight")
    colors = _curve_colors(len(curves))
    scores = []
    for (name, y, score), color in zip(curves, colors):
        x, yv, value = style.curve(y, score)
        scores.append(value)
        label = None if many else f"{short(name)} ({style.score_name} = {value:.3f})"
        ax.plot(x, yv, color=color, lw=0.8 if many else 1.8, alpha=0.6 if many else 1.0, label=label)
    if many:  # an invisible line carries the one legend entry that stays meaningful
        ax.plot([], [], color="grey", label=f"{len(curves)} classes, mean {style.score_name} = "
                                             f"{np.mean(scores):.3f}")
    _draw_chance(ax, style, kind, curves)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel=style.xlabel, ylabel=style.ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(_curve_title(style, kind, classes, positive_index, skipped), fontsize=10)
    legend = (dict(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False) if legend_outside
              else dict(loc=style.legend_loc, fontsize=9))
    if ax.get_legend_handles_labels()[1]:  # a degenerate binary PR plot has nothing to list; matplotlib would warn
        ax.legend(**legend)
    save_figure(fig, path)


def _curve_colors(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20" if n <= 20 else "viridis")
    return [cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)) for i in range(n)]


def _draw_chance(ax, style: _CurveStyle, kind: str, curves: list) -> None:
    if style is _ROC:
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    elif kind == "binary" and curves:
        # a random scorer's precision is the positive rate; per-class rates differ, so multiclass gets none
        prevalence = float(np.mean(curves[0][1]))
        ax.axhline(prevalence, ls="--", color="grey", lw=1, label=f"chance (positive rate {prevalence:.3f})")


def _curve_title(style: _CurveStyle, kind: str, classes: list[str], positive_index: int,
                 skipped: list[str]) -> str:
    head = (f"{style.title} (positive class: {classes[positive_index]})" if kind == "binary"
            else f"{style.title}, one-vs-rest")
    if not skipped:
        return head
    shown = ", ".join(skipped[:4]) + (f", +{len(skipped) - 4} more" if len(skipped) > 4 else "")
    return head + "\n" + textwrap.shorten("no curve: " + shown, width=90, placeholder=" …")


# ------------------------------------------------------------------------------------------ eval.json and plots

def write_eval_report(out_dir: Path, metrics: dict, probs: np.ndarray, labels: np.ndarray, classes: list[str],
                      kind: str, positive_index: int = 1, name: str = "eval.json") -> dict[str, Path]:
    """Write metrics as JSON and the plots into out_dir/plots; returns the paths written, by kind. `out_dir` is
    a staging folder of the write gate (it places the files, and removes plots of an earlier report there that
    this one does not draw: they would contradict the new eval.json)."""
    out_dir = Path(out_dir)
    written = {"eval": start_report(out_dir, metrics, name).parent / name}
    plots = out_dir / "plots"
    if len(labels) == 0 or metrics.get("num_samples") == 0:
        return written
    plots.mkdir(exist_ok=True)
    if metrics.get("confusion_matrix") is not None:
        written["confusion_matrix"] = plots / PLOT_FILES["confusion_matrix"]
        plot_confusion_matrix(metrics["confusion_matrix"], _matrix_classes(classes, kind, positive_index),
                              written["confusion_matrix"])
    written["roc_curve"] = plots / PLOT_FILES["roc_curve"]
    plot_roc(probs, labels, classes, kind, written["roc_curve"], positive_index)
    written["pr_curve"] = plots / PLOT_FILES["pr_curve"]
    plot_pr(probs, labels, classes, kind, written["pr_curve"], positive_index)
    return written


def _matrix_classes(classes: list[str], kind: str, positive_index: int) -> list[str]:
    # the binary matrix is [[tn, fp], [fn, tp]]: negative first, whatever the index of the positive class
    return [classes[1 - positive_index], classes[positive_index]] if kind == "binary" else list(classes)


# ------------------------------------------------------------------------------------------ terminal summary

BINARY_HEADLINE = ("num_samples", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1",
                   "roc_auc", "pr_auc", "log_loss", "threshold")


def format_summary(metrics: dict, classes: list[str], kind: str) -> str:
    """Headline metrics (wrapped to terminal width), then an aligned per-class table."""
    pairs = [f"{key}={fmt(metrics[key])}" for key in _headline_keys(metrics, kind) if key in metrics]
    # key=value pairs hold no spaces, so wrapping only ever breaks between pairs
    lines = textwrap.wrap("  ".join(pairs), width=100, break_on_hyphens=False) or ["(no metrics)"]
    if kind == "binary" and metrics.get("positive_class") is not None:
        lines.append(f"positive class: {metrics['positive_class']}")
    if metrics.get("roc_auc_absent_classes"):
        absent = ", ".join(map(str, metrics["roc_auc_absent_classes"]))
        lines.append(f"roc_auc leaves out classes not in split: {absent}")
    per_class = metrics.get("per_class") or []
    if per_class:
        lines += ["", *_per_class_table(per_class, classes)]
    return "\n".join(lines)


def _headline_keys(metrics: dict, kind: str) -> list[str]:
    if kind == "binary":
        return list(BINARY_HEADLINE)
    topk = sorted((k for k in metrics if _is_topk(k)), key=lambda k: int(k[3:-len("_accuracy")]))
    return ["num_samples", "accuracy", *topk, "balanced_accuracy", "f1_macro", "f1_weighted", "roc_auc", "log_loss"]


def _is_topk(key: str) -> bool:
    middle = key[3:-len("_accuracy")]
    return key.startswith("top") and key.endswith("_accuracy") and middle.isdigit()


def _per_class_table(rows: list[dict], classes: list[str], columns: Sequence[str] = ()) -> list[str]:
    """The aligned per-class table of a summary (`columns`: the row keys shown; by default classification's)."""
    columns = list(columns) or (["precision", "recall", "f1", "support"]
                                + (["roc_auc"] if any("roc_auc" in r for r in rows) else []))
    shown = rows[:SUMMARY_MAX_ROWS]
    names = [short(str(r.get("class", classes[i] if i < len(classes) else i)), 30) for i, r in enumerate(shown)]
    name_width = max(len("class"), *(len(n) for n in names))
    widths = [max(len(c), 9) for c in columns]
    out = ["class".ljust(name_width) + "".join("  " + c.rjust(w) for c, w in zip(columns, widths))]
    for name, row in zip(names, shown):
        cells = (fmt(row.get(c)) for c in columns)
        out.append(name.ljust(name_width) + "".join("  " + v.rjust(w) for v, w in zip(cells, widths)))
    if len(rows) > len(shown):
        out.append(f"... {len(rows) - len(shown)} more classes omitted")
    return out


# ------------------------------------------------------------------------------------------ predictions

class CsvPredictions:
    """`trainer predict`: one row per image (path, what was predicted, every class's probability), written whole
    at the end. `task` turns logits into both (`csv_predictions`: (N, C) probabilities and a cell per image)
    and names the column of what it predicts (`csv_label_column`: classification's "label", multi-label's
    "labels")."""

    def __init__(self, task, out: Tuple[Folder, str]):
        self.task, self.out, self.rows = task, out, []

    def add(self, inputs: Sequence[Tuple[str, str]], logits: torch.Tensor, sizes, images=None) -> None:
        """`inputs`: (image path, the folder it was found under) per image of the batch."""
        paths = [path for path, _ in inputs]
        probs, predicted = self.task.csv_predictions(logits)
        self.rows += [[path, cell] + [repr(v) for v in p]  # repr: parses back exactly
                      for path, p, cell in zip(paths, probs.tolist(), predicted)]

    def abort(self) -> None:
        """Nothing was written yet: the CSV is written whole in `close`."""

    def close(self) -> int:
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(["path", self.task.csv_label_column] + [f"prob_{c}" for c in self.task.classes])
        writer.writerows(self.rows)
        folder, name = self.out
        folder.write(name, text.getvalue())  # written whole, then renamed: never half a CSV
        return len(self.rows)
