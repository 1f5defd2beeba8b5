"""Evaluation reports: eval.json, the plots that go beside it (confusion matrix, ROC and precision-recall
curves), training curves from metrics.jsonl, and a short terminal summary of a metrics dict.

Everything here only reads what it is given and writes files; computing metrics is trainer.metrics' job.
"""
from __future__ import annotations

import io
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")  # reports are written on headless nodes; never try to open a window

import matplotlib.pyplot as plt  # noqa: E402  (must come after matplotlib.use)
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from sklearn.metrics import (average_precision_score, precision_recall_curve, roc_auc_score,  # noqa: E402
                             roc_curve)

DPI = 100
CM_NUMBERS_MAX_CLASSES = 30  # above this, per-cell numbers become unreadable
CURVE_LEGEND_MAX_CLASSES = 20  # above this, one legend entry per class is noise
SUMMARY_MAX_ROWS = 50
LABEL_MAX_CHARS = 20  # long class names would squeeze the plot area to nothing
PLOT_FILES = {"confusion_matrix": "confusion_matrix.png", "roc_curve": "roc_curve.png", "pr_curve": "pr_curve.png"}


# ---------------------------------------------------------------------------------------------- confusion matrix

def row_normalise(cm) -> np.ndarray:
    """Each row divided by its sum, so a cell reads "fraction of this true class"; an all-zero row (a class
    absent from the split) stays zeros instead of becoming NaN."""
    counts = np.asarray(cm, dtype=float)
    sums = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros_like(counts), where=sums > 0)


def plot_confusion_matrix(cm: list[list[int]], classes: list[str], path: Path) -> None:
    """Counts and row-normalised confusion matrix side by side; rows are the true class, columns the prediction."""
    counts = np.asarray(cm, dtype=float).reshape(len(classes), len(classes))
    n = len(classes)
    side = min(max(4.5, 0.28 * n + 2.5), 16.0)  # inches per panel: grows with the class count, then caps
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2, side + 1), layout="constrained")
    _draw_matrix(axes[0], counts, classes, side, "Counts", "{:.0f}")
    _draw_matrix(axes[1], row_normalise(counts), classes, side, "Row-normalised (fraction of true class)", "{:.2f}",
                 vmax=1.0)
    _save(fig, path)


def _draw_matrix(ax, values: np.ndarray, classes: list[str], side: float, title: str, fmt: str,
                 vmax: Optional[float] = None) -> None:
    n = len(classes)
    top = vmax if vmax is not None else max(float(values.max(initial=0)), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=top, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    _set_class_ticks(ax, classes, side)
    if n <= CM_NUMBERS_MAX_CLASSES:
        size = 10 if n <= 10 else 7
        for (i, j), v in np.ndenumerate(values):
            # dark cells get white text so the number stays legible on either end of the colour map
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=size,
                    color="white" if v > top / 2 else "black")


def _set_class_ticks(ax, classes: list[str], side: float) -> None:
    n = len(classes)
    step = max(1, math.ceil(n / 80))  # past ~80 labels they overlap even at the smallest font: label every k-th
    ticks = np.arange(0, n, step)
    names = [_short(classes[i]) for i in ticks]
    size = float(np.clip(0.4 * side * 72 / len(ticks), 5, 10))  # a fraction of the row height, in points
    longest = max((len(s) for s in names), default=0)
    rotation = 0 if n <= 4 and longest <= 8 else 90 if n > 30 else 45
    ax.set_xticks(ticks, names, rotation=rotation, ha="right" if rotation == 45 else "center",
                  rotation_mode="anchor" if rotation == 45 else "default", fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)


def _short(name: str, limit: int = LABEL_MAX_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


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
        label = None if many else f"{_short(name)} ({style.score_name} = {value:.3f})"
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
    _save(fig, path)


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


# ------------------------------------------------------------------------------------------- training curves

# keys of a train row that are not the loss or one of its parts
_TRAIN_BOOKKEEPING = {"type", "step", "epoch", "samples_seen", "lr", "throughput", "loss"}
# the eval metric drawn in the middle panel: the first a row has (classification, segmentation, detection)
_HEADLINE = ("accuracy", "miou", "map")


def plot_training_curves(metrics_jsonl: Path) -> Optional[bytes]:
    """Loss (and every logged part of it), the eval headline metric and the learning rate against samples seen,
    as a PNG; None if there is no data."""
    rows = _read_jsonl(Path(metrics_jsonl))
    train = [r for r in rows if r.get("type") == "train"]
    evals = [r for r in rows if r.get("type") == "eval"]
    if not train and not evals:
        return None
    splits = sorted({str(r.get("split", "eval")) for r in evals})
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.2), sharex=True, layout="constrained")
    _plot_series(ax_loss, train, "loss", "train loss", lw=1.0)
    parts = sorted({k for r in train for k, v in r.items() if k not in _TRAIN_BOOKKEEPING and isinstance(v, float)})
    for part in parts:  # e.g. a detector's loss_classifier, loss_box_reg, ...
        _plot_series(ax_loss, train, part, part, lw=0.8)
    headline = next((m for m in _HEADLINE if any(m in r for r in evals)), "accuracy")
    for split in splits:
        split_rows = [r for r in evals if str(r.get("split", "eval")) == split]
        _plot_series(ax_loss, split_rows, "loss", f"{split} loss", marker="o")
        _plot_series(ax_acc, split_rows, headline, f"{split} {headline}", marker="o")
    _plot_series(ax_lr, train, "lr", "learning rate", lw=1.0)
    for ax, title in ((ax_loss, "Loss"), (ax_acc, f"Eval {headline}"), (ax_lr, "Learning rate")):
        _finish_axis(ax, title)
    return figure_png(fig)


def _read_jsonl(path: Path) -> list[dict]:
    """The parseable JSON objects in the file; a torn last line (a run killed mid-write) is just skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _latest_history(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """A resumed run appends rows starting from its checkpoint again; when samples_seen goes back, the newer
    rows replace the older ones from that point on, so the line does not zigzag."""
    kept: list[tuple[float, float]] = []
    for x, y in points:
        while kept and kept[-1][0] >= x:
            kept.pop()
        kept.append((x, y))
    return kept


def _plot_series(ax, rows: list[dict], key: str, label: str, **style) -> None:
    points = _latest_history([(r["samples_seen"], r[key]) for r in rows
                              if _is_number(r.get("samples_seen")) and _is_number(r.get(key))])
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=label, **style)


def _finish_axis(ax, title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("Samples seen")
    ax.xaxis.set_major_formatter(EngFormatter())  # 1.2M rather than 1200000 or an offset label
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=9)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")


# ------------------------------------------------------------------------------------------ eval report files

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


def start_report(out_dir, metrics: dict, name: str) -> Path:
    """A report's first step, into a staging folder of the write gate: eval.json (before any plot: the numbers,
    which took the whole evaluation, are there even if a plot fails); returns the plots folder (not yet made)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / name).write_text(json.dumps(_to_plain(metrics), indent=1, default=str) + "\n")
    return out_dir / "plots"


def _to_plain(obj):
    """numpy scalars and arrays (and tuples) as plain Python, so json writes numbers rather than strings."""
    if isinstance(obj, dict):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _to_plain(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def figure_png(fig) -> bytes:
    """The figure as PNG bytes, and closed (pyplot keeps every open figure alive: long eval loops would leak)."""
    png = io.BytesIO()
    try:
        fig.savefig(png, dpi=DPI, format="png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return png.getvalue()


def _save(fig, path: Path) -> None:
    """A plot into a staging folder of the write gate, which places it whole (never half a PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig))


# ------------------------------------------------------------------------------------------ terminal summary

BINARY_HEADLINE = ("num_samples", "accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1",
                   "roc_auc", "pr_auc", "log_loss", "threshold")


def format_summary(metrics: dict, classes: list[str], kind: str) -> str:
    """Headline metrics (wrapped to terminal width), then an aligned per-class table."""
    pairs = [f"{key}={_fmt(metrics[key])}" for key in _headline_keys(metrics, kind) if key in metrics]
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


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4f}"
    return str(value)


def _per_class_table(rows: list[dict], classes: list[str]) -> list[str]:
    columns = ["precision", "recall", "f1", "support"] + (["roc_auc"] if any("roc_auc" in r for r in rows) else [])
    shown = rows[:SUMMARY_MAX_ROWS]
    names = [_short(str(r.get("class", classes[i] if i < len(classes) else i)), 30) for i, r in enumerate(shown)]
    name_width = max(len("class"), *(len(n) for n in names))
    widths = [max(len(c), 9) for c in columns]
    out = ["class".ljust(name_width) + "".join("  " + c.rjust(w) for c, w in zip(columns, widths))]
    for name, row in zip(names, shown):
        cells = (_fmt(row.get(c)) for c in columns)
        out.append(name.ljust(name_width) + "".join("  " + v.rjust(w) for v, w in zip(cells, widths)))
    if len(rows) > len(shown):
        out.append(f"... {len(rows) - len(shown)} more classes omitted")
    return out
