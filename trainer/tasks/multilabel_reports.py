"""Multi-label reports: eval.json with two plots beside it (each class's average precision as a bar, and the
precision-recall curves of the weakest classes), and the printed summary. Predictions are classification's CSV
writer (classify_reports.CsvPredictions) with the task's own cells.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from trainer.reports import fmt, save_figure, short, start_report
from trainer.tasks.classify_reports import _curve_colors, _per_class_table, _pr

import matplotlib.pyplot as plt  # noqa: E402  (after trainer.reports, which sets the headless backend)

PLOT_FILES = {"ap": "ap_per_class.png", "pr_weakest": "pr_curve_weakest.png"}
WEAKEST_CURVES = 6  # PR curves drawn: the classes of lowest AP (more overlap into noise)
AP_BARS_MAX = 60  # above this many classes, the bar chart shows the lowest and highest 30
HEADLINE = ("num_samples", "map", "f1_micro", "f1_macro", "precision_micro", "recall_micro", "precision_macro",
            "recall_macro", "subset_accuracy", "hamming_loss", "roc_auc", "loss")
TABLE_COLUMNS = ("ap", "f1", "precision", "recall", "support", "roc_auc", "threshold")


def write_multilabel_report(out_dir, metrics: dict, probs: np.ndarray, targets: np.ndarray, classes: list,
                            name: str = "eval.json") -> None:
    """eval.json, then the plots into out_dir/plots (a staging folder of the write gate, which places them)."""
    plots = start_report(Path(out_dir), metrics, name)
    table = [row for row in metrics.get("per_class") or [] if row.get("ap") is not None]
    if not len(targets) or not table:
        return
    plot_ap_bars(table, metrics.get("map"), plots / PLOT_FILES["ap"])
    plot_weakest_pr(table, probs, targets, classes, plots / PLOT_FILES["pr_weakest"])


def plot_ap_bars(table: list, mean_ap, path: Path) -> None:
    """One horizontal bar per class (its AP), sorted, with the mAP as a line."""
    rows = sorted(table, key=lambda r: r["ap"])
    if len(rows) > AP_BARS_MAX:
        rows = rows[:AP_BARS_MAX // 2] + rows[-AP_BARS_MAX // 2:]
    fig, ax = plt.subplots(figsize=(6.5, max(2.5, 0.28 * len(rows) + 1.2)))
    ax.barh(range(len(rows)), [r["ap"] for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [short(r["class"], 30) for r in rows], fontsize=8)
    if mean_ap is not None:
        ax.axvline(mean_ap, color="grey", ls="--", lw=1, label=f"mAP = {mean_ap:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set(xlim=(0, 1.0), xlabel="average precision")
    shown = f" (lowest and highest {len(rows) // 2} of {len(table)})" if len(rows) < len(table) else ""
    ax.set_title(f"Average precision per class{shown}", fontsize=10)
    save_figure(fig, path)


def plot_weakest_pr(table: list, probs: np.ndarray, targets: np.ndarray, classes: list, path: Path) -> None:
    """Precision-recall curves of the classes of lowest AP (a class with no positive has none)."""
    weakest = sorted(table, key=lambda r: r["ap"])[:WEAKEST_CURVES]
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for row, color in zip(weakest, _curve_colors(len(weakest))):
        c = classes.index(row["class"])
        recall, precision, ap = _pr(np.asarray(targets[:, c]).round().astype(int), np.asarray(probs[:, c], float))
        ax.plot(recall, precision, color=color, lw=1.8, label=f"{short(row['class'])} (AP = {ap:.3f})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="Recall", ylabel="Precision")
    ax.grid(alpha=0.3)
    ax.set_title(f"Precision-recall, the {len(weakest)} classes of lowest AP", fontsize=10)
    ax.legend(loc="lower left", fontsize=9)
    save_figure(fig, path)


def format_summary(metrics: dict, classes: list) -> str:
    """Headline metrics (wrapped), the classes left out of mAP, then the per-class table."""
    pairs = [f"{key}={fmt(metrics[key])}" for key in HEADLINE if key in metrics]
    lines = textwrap.wrap("  ".join(pairs), width=100, break_on_hyphens=False) or ["(no metrics)"]
    if metrics.get("map_absent_classes"):
        lines.append("map leaves out classes with no positive in the split: "
                     + ", ".join(map(str, metrics["map_absent_classes"])))
    if metrics.get("per_class"):
        lines += ["", *_per_class_table(metrics["per_class"], classes, TABLE_COLUMNS)]
    return "\n".join(lines)
