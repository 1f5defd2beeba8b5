"""Segmentation reports: eval.json, the confusion matrix (counts and row-normalised), a per-class IoU bar
chart and a grid of validation images with their ground truth and prediction overlaid; the printed summary;
what `trainer predict` writes for a segmentation model (`MaskPredictions`: a PNG of class indices per image,
and with --overlay a colour overlay beside it).
The JSON writer, the confusion-matrix drawing and the training curves are the shared ones of trainer.reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from trainer.prediction_files import PredictionFolder
from trainer.reports import fmt, panel_grid, plot_confusion_matrix, save_figure, save_pixels, start_report

import matplotlib.pyplot as plt  # noqa: E402  (after trainer.reports, which sets the headless backend)

PLOTS = ("confusion_matrix.png", "iou_per_class.png", "overlays.png")
OVERLAY_ALPHA = 0.5
OVERLAY_CELL_PX = 280  # each panel of the overlay grid: three to a row


def palette(num_classes: int) -> np.ndarray:
    """(C + 1, 3) uint8 colours: the Pascal VOC colour map (bit-interleaved, distinct for hundreds of
    classes); the last row is for ignored pixels (white)."""
    colours = np.zeros((num_classes + 1, 3), dtype=np.uint8)
    for k in range(num_classes):
        c, r, g, b = k, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        colours[k] = (r, g, b)
    colours[num_classes] = (255, 255, 255)
    return colours


def colourise(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W) class indices (anything >= C, the ignore index, in white) as (H, W, 3) uint8 colours."""
    return palette(num_classes)[np.clip(mask, 0, num_classes)]


def overlay(image_rgb: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with the mask's colours blended over it (uint8 RGB)."""
    blended = (1 - alpha) * image_rgb.astype(np.float64) + alpha * colourise(mask, num_classes).astype(np.float64)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def plot_iou_per_class(metrics: dict, classes: list, path: Path) -> None:
    per = metrics.get("per_class", {})
    values = [per.get(c, {}).get("iou") for c in classes]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(classes) + 2), 4), layout="constrained")
    ax.bar(range(len(classes)), [v if v is not None else 0 for v in values],
           color=[("tab:blue" if v is not None else "lightgrey") for v in values])
    ax.set_xticks(range(len(classes)), [c[:20] for c in classes], rotation=90 if len(classes) > 8 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("IoU")
    miou = metrics.get("miou")
    ax.set_title(f"IoU per class (mIoU {fmt(miou)}; grey: absent from the split)")
    if miou is not None:
        ax.axhline(miou, color="tab:red", lw=1, ls="--")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_overlays(samples: list, classes: list, path: Path) -> None:
    """One row per image: the image, its ground truth over it, the prediction over it (original size)."""
    rows = []
    for image, target, pred in samples:
        rgb = image.permute(1, 2, 0).numpy()  # normalised: stretched back to [0, 255] for display
        rgb = ((rgb - rgb.min()) / max(float(rgb.max() - rgb.min()), 1e-6) * 255).astype(np.uint8)
        h, w = target.shape
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h)))
        rows.append([("image", rgb), ("ground truth", overlay(rgb, target.numpy(), len(classes))),
                     ("prediction", overlay(rgb, pred.numpy(), len(classes)))])
    save_pixels(panel_grid(rows, OVERLAY_CELL_PX), path)


def write_segmentation_report(out_dir, metrics: dict, outputs: dict, classes: list, name: str = "eval.json") -> None:
    """eval.json first (the numbers survive a failing plot), then the plots, replacing older ones."""
    plots = start_report(out_dir, metrics, name)
    if not metrics.get("num_pixels"):
        return
    plots.mkdir(exist_ok=True)
    plot_confusion_matrix(metrics["confusion_matrix"], list(classes), plots / "confusion_matrix.png")
    plot_iou_per_class(metrics, list(classes), plots / "iou_per_class.png")
    if outputs and outputs.get("samples"):
        plot_overlays(outputs["samples"], list(classes), plots / "overlays.png")


def format_segmentation_summary(metrics: dict, classes: list) -> str:
    head = "  ".join(f"{k}={fmt(metrics.get(k))}" for k in
                     ("num_images", "num_pixels", "miou", "pixel_accuracy", "mean_class_accuracy", "mean_dice",
                      "fwiou", "loss"))
    lines = [head, "", f"{'class':<20} {'iou':>8} {'dice':>8} {'acc':>8} {'pixels':>12}"]
    for c in classes:
        row = metrics.get("per_class", {}).get(c, {})
        lines.append(f"{c[:20]:<20} {fmt(row.get('iou')):>8} {fmt(row.get('dice')):>8} "
                     f"{fmt(row.get('accuracy')):>8} {row.get('pixels', 0):>12}")
    if metrics.get("absent_classes"):
        lines.append(f"absent from the split (not in the means): {', '.join(metrics['absent_classes'])}")
    return "\n".join(lines)


# ---- predictions ----

class MaskPredictions:
    """One single-channel PNG of class indices per image, at the image's own size, named after its path below
    the folder it was given in (suffix .png); with `overlay`, a colour overlay beside it (NAME.overlay.jpg: not
    a .png, so a glob of the masks never picks it up). The files go through a PredictionFolder: moved into
    --output only when every image is done, never over an input or a file predict did not write."""

    def __init__(self, task, files: PredictionFolder, overlay: bool):
        self.task, self.files, self.overlay = task, files, overlay

    def add(self, inputs: Sequence[Tuple[str, str]], logits: torch.Tensor, sizes, images) -> None:
        for (path, _), mask, image in zip(inputs, self.task.masks_at(logits, sizes), images):
            indices = mask.to(torch.uint8).cpu().numpy()
            write_png(self.files.path(path, ".png"), Image.fromarray(indices, "L"))
            if self.overlay:
                blended = overlay(image.permute(1, 2, 0).numpy(), indices, len(self.task.classes))
                write_png(self.files.path(path, ".overlay.jpg"), Image.fromarray(blended), fmt="JPEG")

    def abort(self) -> None:
        self.files.abort()

    def close(self) -> int:
        return self.files.close()


def write_png(path: Path, image, fmt: str = "PNG") -> None:
    """Into the staging folder of a PredictionFolder, which places it whole."""
    image.save(path, format=fmt)
