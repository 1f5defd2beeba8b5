"""Detection reports: eval.json, per-class precision-recall curves (IoU 0.5, COCOeval's own accumulated
arrays), a grid of validation images with ground-truth and predicted boxes (labels and scores), and the
printed summary; what `trainer predict` writes for a detector (`BoxPredictions`: the JSON of boxes, and with
--draw the pictures, `draw_boxes`). The JSON writer and figure saving are the shared ones of trainer.reports.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from trainer.outputs import Folder
from trainer.prediction_files import PredictionFolder
from trainer.reports import fmt, panel_grid, save_figure, save_pixels, start_report

import matplotlib.pyplot as plt  # noqa: E402  (after trainer.reports, which sets the headless backend)

PLOTS = ("pr_curves.png", "boxes.png")  # what write_detection_report may draw into plots/
DRAW_MIN_SCORE = 0.3  # boxes drawn in pictures (not scored): the model keeps low scores for mAP, too many to see
GT_COLOUR, PRED_COLOUR = (0, 200, 0), (230, 30, 30)
BOXES_CELL_PX = 380  # each panel of the boxes grid: two to a row


def plot_pr_curves(curves: dict, path: Path, per_class: Optional[dict] = None) -> None:
    """One curve per class at IoU 0.5; `per_class` (eval.json's table) adds each class's AP50 to its label."""
    fig, ax = plt.subplots(figsize=(6, 5), layout="constrained")
    for name, curve in curves.items():
        if curve is not None:
            ap50 = (per_class or {}).get(name, {}).get("ap50")
            ax.plot(curve["recall"], curve["precision"], label=name if ap50 is None else f"{name} (AP50 {ap50:.3f})")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title="precision-recall per class (IoU 0.5, COCOeval)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _draw(image_rgb: np.ndarray, boxes, colour, labels=None) -> Image.Image:
    img = Image.fromarray(image_rgb)
    draw = ImageDraw.Draw(img)
    for k, box in enumerate(boxes):
        draw.rectangle([float(v) for v in box], outline=colour, width=max(1, min(img.size) // 150))
        if labels is not None:
            draw.text((float(box[0]) + 2, float(box[1]) + 1), labels[k], fill=colour)
    return img


def _rgb(image) -> np.ndarray:
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)  # float [0, 1] -> uint8


def _predicted(det: dict, classes: list):
    keep = det["scores"] >= DRAW_MIN_SCORE
    labels = [f"{classes[int(k) - 1]} {float(s):.2f}" for k, s in zip(det["labels"][keep], det["scores"][keep])]
    return det["boxes"][keep], labels


def plot_boxes(samples: list, split, classes: list, path: Path) -> None:
    """One row per image: ground truth (green; crowd/difficult boxes too), predictions scoring >= 0.3 (red)."""
    rows = []
    for index, image, det in samples:
        rgb = _rgb(image)
        ann = split.annotations(index)
        truth = _draw(rgb, ann.boxes, GT_COLOUR, [classes[int(k) - 1] for k in ann.labels])
        boxes, labels = _predicted(det, classes)
        rows.append([("ground truth", np.asarray(truth)),
                     ("prediction (score >= 0.3)", np.asarray(_draw(rgb, boxes, PRED_COLOUR, labels)))])
    save_pixels(panel_grid(rows, BOXES_CELL_PX), path)


def draw_boxes(image, det: dict, classes: list, path: Path) -> None:
    """`trainer predict --draw`: the image (uint8 [3, H, W]) with its predicted boxes, as a JPEG."""
    rgb = image.permute(1, 2, 0).numpy() if image.dtype != np.uint8 else image
    boxes, labels = _predicted({k: v.cpu() for k, v in det.items()}, classes)
    out = io.BytesIO()
    _draw(np.ascontiguousarray(rgb), boxes, PRED_COLOUR, labels).save(out, format="JPEG", quality=90)
    path.write_bytes(out.getvalue())  # into the staging folder of a PredictionFolder, which places it whole


def write_detection_report(out_dir, metrics: dict, outputs: dict, classes: list, name: str = "eval.json") -> None:
    """eval.json first (the numbers survive a failing plot), then the plots, replacing older ones."""
    plots = start_report(out_dir, metrics, name)
    if not outputs:
        return
    plots.mkdir(exist_ok=True)
    plot_pr_curves(outputs["curves"], plots / "pr_curves.png", metrics.get("per_class"))
    if outputs.get("samples"):
        plot_boxes(outputs["samples"], outputs["split"], list(classes), plots / "boxes.png")


def format_detection_summary(metrics: dict) -> str:
    head = "  ".join(f"{k}={fmt(metrics.get(k))}" for k in
                     ("num_images", "num_detections", "map", "map_50", "map_75", "mar_100"))
    columns = ("ap", "ap50", "ap75", "recall")  # per class: COCO's map, map_50, map_75 and mar_100 for it alone
    lines = [head, "", f"{'class':<20} " + " ".join(f"{c:>8}" for c in columns)]
    for name, row in metrics.get("per_class", {}).items():
        lines.append(f"{name[:20]:<20} " + " ".join(f"{fmt(row.get(c)):>8}" for c in columns))
    if metrics.get("absent_classes"):
        lines.append(f"absent from the split (AP undefined): {', '.join(metrics['absent_classes'])}")
    return "\n".join(lines)


# ---- predictions ----

class BoxPredictions:
    """`trainer predict` for a detector: one JSON list of {"file", "category", "category_id", "bbox" [x, y, w, h]
    in the input image's pixels, "score"}, written atomically when every image is done (a failure part-way
    leaves --output as it was); with --draw DIR, each image with its boxes as DIR/<path below the folder
    given>.jpg, through a PredictionFolder (moved into place at the end, never over an input or a file predict
    did not write). `task`: the Detection whose category ids the records carry."""

    def __init__(self, task, out: Tuple[Folder, str], drawn: Optional[PredictionFolder]):
        self.task, self.out, self.drawn, self.rows, self.count = task, out, drawn, [], 0

    def add(self, inputs: Sequence[Tuple[str, str]], detections, sizes, images) -> None:
        names = dict(zip(self.task.category_ids, self.task.classes))
        for (path, _), det, image in zip(inputs, detections, images):
            self.count += 1
            for r in self.task.records(0, det):
                self.rows.append({"file": path, "category": names[r["category_id"]], "category_id": r["category_id"],
                                  "bbox": r["bbox"], "score": r["score"]})
            if self.drawn is not None:
                draw_boxes(image, det, self.task.classes, self.drawn.path(path, ".jpg"))

    def abort(self) -> None:
        if self.drawn is not None:
            self.drawn.abort()

    def close(self) -> int:
        if self.drawn is not None:  # first: its last check may still refuse, and then --output stays as it was
            self.drawn.close()
        folder, name = self.out
        folder.write(name, json.dumps(self.rows))
        return self.count
