"""COCO box metrics, computed by pycocotools' COCOeval itself (the reference implementation), and the evaluator
that gathers a split's detections and scores them (`DetectionEvaluator`).

Why pycocotools and not a re-implementation or torchmetrics: the acceptance check re-scores our predictions with
pycocotools, and only the same code gives the same numbers to the last bit (torchmetrics' float32 recall
thresholds drift by up to 8e-4; see docs/anchors-dense.md 4.2). COCOeval runs with its default parameters, on
purpose: IoU thresholds .50:.05:.95, 101 recall points, maxDets (1, 10, 100) and the area ranges small < 32^2 <=
medium < 96^2 <= large (px^2). `summarize()` is only valid with those, and a model's detections beyond the 100
best-scored per image never count.

Inputs, both plain JSON-able Python (what a COCO annotation file and a results file hold):
- `gt`: a COCO ground-truth dict: `images` [{id, width, height, ...}], `annotations` [{id >= 1, image_id,
  category_id (the file's own ids: need not be contiguous), bbox [x, y, w, h] px, area, iscrowd}], `categories`
  [{id, name}]. Crowd boxes (iscrowd 1) are "ignore" regions: a detection on one is neither right nor wrong.
- `detections`: result records [{image_id, category_id, bbox [x, y, w, h] px, score}] (see `to_coco_records`).

Areas: for ground truth, COCOeval files a box under small/medium/large by its annotation's `area` field, not by
w x h (in COCO proper, `area` is the mask area); a detection's area is always w x h, computed by `loadRes`. A
box-only data set should write area = w x h. Metrics with no ground truth in their range come out of COCOeval
as -1 and are None here (JSON null), never -1 or NaN: e.g. map_large on 64 px images.
"""
from __future__ import annotations

import contextlib
import copy
import io
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from trainer.distributed import agree, gather_objects_to_main
from trainer.errors import TrainerError
from trainer.evaluation import split_order

# COCOeval.stats, in the order summarize() fills it (default params only)
SAMPLE_IMAGES = 8  # validation images kept (main rank: the first of its share) for the boxes grid
_STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
          "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]

# ---- conversions ----


def to_xywh(boxes_xyxy):
    """[N, 4] boxes (x1, y1, x2, y2) -> (x, y, w, h), the COCO layout; a torch tensor or numpy array in, the
    same type out (a list or tuple comes back as a numpy array)."""
    if not torch.is_tensor(boxes_xyxy):
        boxes_xyxy = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    out = boxes_xyxy.clone() if torch.is_tensor(boxes_xyxy) else boxes_xyxy.copy()
    out[:, 2:] = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
    return out


def to_coco_records(image_id: int, boxes_xyxy, scores, labels, category_ids: Sequence[int]) -> List[dict]:
    """One image's detections (a torchvision detector's eval output: boxes xyxy in the original image's pixels,
    scores, labels 1..K) as COCO result records; label k is the file's category `category_ids[k - 1]`. Plain
    Python numbers at full float precision: score exactly the records you store, and a re-score matches."""
    boxes = to_xywh(torch.as_tensor(boxes_xyxy, dtype=torch.float64).reshape(-1, 4)).tolist()
    scores = torch.as_tensor(scores).reshape(-1).tolist()
    labels = torch.as_tensor(labels).reshape(-1).tolist()
    if any(not 1 <= k <= len(category_ids) for k in labels):
        raise TrainerError(f"detection labels must lie in 1..{len(category_ids)} (0 is background); "
                           f"got {sorted(set(labels))[:10]}")
    return [{"image_id": int(image_id), "category_id": int(category_ids[k - 1]), "bbox": box, "score": float(s)}
            for box, s, k in zip(boxes, scores, labels)]


# ---- evaluation ----


def _check_gt(gt: dict) -> None:
    """What pycocotools would get wrong silently or crash on with a KeyError deep inside."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise TrainerError(f"COCO ground truth needs a list under '{key}'")
    image_ids = {img["id"] for img in gt["images"]}
    names = Counter(c["name"] for c in gt["categories"])
    if [n for n, c in names.items() if c > 1]:
        raise TrainerError(f"category names repeat: {sorted(n for n, c in names.items() if c > 1)}")
    cat_ids = {c["id"] for c in gt["categories"]}
    ann_ids = Counter()
    for ann in gt["annotations"]:
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd") if k not in ann]
        if missing:
            raise TrainerError(f"COCO annotation {ann.get('id')} lacks {missing}")
        ann_ids[ann["id"]] += 1
        if ann["image_id"] not in image_ids or ann["category_id"] not in cat_ids:
            raise TrainerError(f"COCO annotation {ann['id']} names image {ann['image_id']} / category "
                               f"{ann['category_id']}, not both in the ground truth's images and categories")
    # an annotation id of 0 reads as "unmatched" inside COCOeval (pytorch/vision#1530): an extra miss
    bad = sorted(i for i, n in ann_ids.items() if n > 1 or not (isinstance(i, int) and i >= 1))
    if bad:
        raise TrainerError(f"COCO annotation ids must be unique ints >= 1; bad: {bad[:10]}")


COCO_BACKENDS = ("pycocotools", "faster_coco_eval")  # eval.coco_backend


def coco_classes(backend: str = "pycocotools"):
    """(COCO, COCOeval) of a scoring backend: pycocotools itself, or faster-coco-eval's C++ port of it
    (`pip install faster-coco-eval`: the same API and, measured, the same numbers up to the last bits of a float,
    2e-16; 2.7x faster on 5,000 images: bench/det_eval.py --backends). pycocotools stays the tests' oracle."""
    if backend == "pycocotools":
        return COCO, COCOeval
    if backend == "faster_coco_eval":
        try:
            from faster_coco_eval import COCO as FasterCOCO, COCOeval_faster
        except ImportError:
            raise TrainerError("eval.coco_backend=faster_coco_eval needs the faster-coco-eval package: pip install "
                               "faster-coco-eval (or this project's [fast-coco] extra)") from None
        return FasterCOCO, lambda gt, dt, iouType: COCOeval_faster(gt, dt, iouType=iouType, print_function=print)
    raise TrainerError(f"unknown COCO backend {backend!r}: one of {', '.join(COCO_BACKENDS)}")


def evaluate_coco(gt: dict, detections: List[dict], backend: str = "pycocotools") -> COCOeval:
    """pycocotools' COCOeval for boxes (or `backend`'s: coco_classes), run through evaluate(), accumulate() and
    summarize() with its default params and its prints silenced; the printed 12-line summary is kept as
    `.summary_text` for a report.

    No detections at all is legal (every AP is then 0 where there is ground truth): pycocotools' `loadRes([])`
    crashes (cocodataset/cocoapi#450), so an empty result set is built here with the same images and categories.
    Neither input is modified (`loadRes` writes id, area, iscrowd, segmentation into the records it gets, and
    COCOeval writes ignore flags into the ground truth: they get copies)."""
    _check_gt(gt)
    image_ids = {img["id"] for img in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    foreign = sorted({d["image_id"] for d in detections} - image_ids)
    if foreign:
        raise TrainerError(f"detections for image ids not in the ground truth: {foreign[:10]}")
    foreign = sorted({d["category_id"] for d in detections} - cat_ids)
    if foreign:  # COCOeval would skip them without a word
        raise TrainerError(f"detections with category ids not in the ground truth: {foreign[:10]}")
    COCO_, COCOeval_ = coco_classes(backend)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_gt = COCO_()
        # a copy: COCOeval writes "ignore" and "_ignore" into the ground truth's annotations;
        # 2.0.9/2.0.10 need an info key (pytorch/vision#9092)
        coco_gt.dataset = {"info": {}, **copy.deepcopy(gt)}
        coco_gt.createIndex()
        if detections:
            coco_dt = coco_gt.loadRes(copy.deepcopy(list(detections)))
        else:
            coco_dt = COCO_()
            coco_dt.dataset = {"info": {}, "images": list(gt["images"]), "categories": list(gt["categories"]),
                               "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval_(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            evaluator.summarize()
    evaluator.summary_text = summary.getvalue()
    return evaluator


def _opt(value: float) -> Optional[float]:
    """COCOeval's -1 ("no ground truth here") as None."""
    return None if value < 0 else float(value)


def _mean_defined(values: np.ndarray) -> Optional[float]:
    """The mean over entries > -1, as COCOeval.summarize averages; None when there are none."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def _absent_categories(gt: dict) -> List[int]:
    """Category ids with no non-crowd box in the ground truth: their AP is undefined (COCOeval: -1)."""
    present = {a["category_id"] for a in gt["annotations"] if not a["iscrowd"]}
    return [c["id"] for c in gt["categories"] if c["id"] not in present]


def metrics_from_cocoeval(evaluator: COCOeval) -> dict:
    """The summary numbers (COCOeval.stats as they are, -1 -> None) plus the per-class table: AP, AP50, AP75
    and recall (AR@100) of each class, COCO's map, map_50, map_75 and mar_100 restricted to it.

    Per class k: precision[T, R, k, area all, maxDets 100] averaged over the IoU thresholds and recall points
    whose entry is > -1 (how summarize() averages), the same at IoU 0.5 and at 0.75 only, and recall[T, k,
    area all, maxDets 100] averaged over the IoU thresholds. A class without non-crowd ground truth in this
    split has every entry None and is listed in `absent_classes`."""
    params = evaluator.params
    precision = evaluator.eval["precision"]  # [T iou, R recall, K class, A area, M maxDets], -1 = undefined
    recall = evaluator.eval["recall"]  # [T iou, K class, A area, M maxDets], -1 = undefined
    area_all = params.areaRngLbl.index("all")
    iou_50 = np.where(params.iouThrs == 0.5)[0]  # exact, as summarize() compares
    iou_75 = np.where(params.iouThrs == 0.75)[0]
    names = {c["id"]: c["name"] for c in evaluator.cocoGt.dataset["categories"]}
    absent = set(_absent_categories(evaluator.cocoGt.dataset))
    per_class = {}
    for k, cat_id in enumerate(params.catIds):
        p = precision[:, :, k, area_all, -1]
        row = {"ap": _mean_defined(p), "ap50": _mean_defined(p[iou_50]), "ap75": _mean_defined(p[iou_75]),
               "recall": _mean_defined(recall[:, k, area_all, -1])}
        per_class[names[cat_id]] = {key: None for key in row} if cat_id in absent else row
    out = {key: _opt(v) for key, v in zip(_STATS, evaluator.stats)}
    out.update(per_class=per_class, absent_classes=[names[c] for c in params.catIds if c in absent],
               num_images=len(params.imgIds), num_detections=len(evaluator.cocoDt.dataset["annotations"]))
    return out


def coco_metrics(gt: dict, detections: List[dict]) -> dict:
    """COCO box metrics of `detections` against `gt` (see the module docstring): map (AP@[.50:.95]), map_50,
    map_75, map_small/medium/large, mar_1/10/100, mar_small/medium/large, per_class {name: {ap, ap50, ap75,
    recall}},
    absent_classes, num_images, num_detections. Undefined numbers are None. For the printed summary or PR
    curves, call `evaluate_coco` and `metrics_from_cocoeval` yourself and keep the evaluator."""
    return metrics_from_cocoeval(evaluate_coco(gt, detections))


def precision_recall_curves(evaluator: COCOeval) -> Dict[str, Optional[dict]]:
    """Per class name: {"recall": the 101 recall points, "precision": interpolated precision there, "score":
    the detection score at which that recall is reached}, at IoU 0.5, area all, maxDets 100 (COCOeval's own
    accumulated arrays). Precision is 0 beyond the highest recall reached. None for a class without ground truth."""
    params = evaluator.params
    t = int(np.where(params.iouThrs == 0.5)[0][0])
    a = params.areaRngLbl.index("all")
    names = {c["id"]: c["name"] for c in evaluator.cocoGt.dataset["categories"]}
    absent = set(_absent_categories(evaluator.cocoGt.dataset))
    recall = params.recThrs.tolist()
    curves: Dict[str, Optional[dict]] = {}
    for k, cat_id in enumerate(params.catIds):
        if cat_id in absent:
            curves[names[cat_id]] = None
            continue
        curves[names[cat_id]] = {"recall": recall,
                                 "precision": evaluator.eval["precision"][t, :, k, a, -1].tolist(),
                                 "score": evaluator.eval["scores"][t, :, k, a, -1].tolist()}
    return curves


# ---- the evaluator ----

class DetectionEvaluator:
    """This rank's detections per image (COCO records, keyed by the image's split index); `finish` gathers them
    once to the main rank, checks every image came exactly once, scores them with COCOeval against the split's
    ground truth as the file states it, and shares the metrics with every rank. `task`: the Detection scored
    (`records`: one image's detections as COCO records in the file's category ids)."""

    def __init__(self, task, dataset, indices: torch.Tensor):
        self.task, self.dataset = task, dataset
        self.num_images = len(dataset)
        self.records: List[List[dict]] = []  # per image added, in the order added
        self.losses: List[Dict[str, float]] = []  # per image added: its validation loss parts
        self.samples: list = []  # (image, detection) for the boxes grid
        self.indices = indices  # the split index of each image this rank adds, in the order added
        self._seen = 0

    def add(self, batch, outputs: List[Dict[str, torch.Tensor]]) -> None:
        images, _ = batch
        for image, det in zip(images, outputs):
            index = int(self.indices[self._seen])
            self._seen += 1
            self.records.append(self.task.records(index, det))
            self.losses.append(det.get("losses", {}))
            if len(self.samples) < SAMPLE_IMAGES:
                kept = {k: v.cpu() for k, v in det.items() if k != "losses"}
                # a copy: on the CPU a view would keep its whole batch (a DetectionBatch's pixels) in memory
                self.samples.append((index, image.to("cpu", copy=True), kept))

    def finish(self, accelerator) -> Tuple[dict, Optional[dict]]:
        gathered = gather_objects_to_main(list(zip(self.records, self.losses)), accelerator)  # main rank only
        order = split_order(self.indices, self.num_images, accelerator)  # checks: each image exactly once
        outputs = None

        def score() -> dict:
            nonlocal outputs
            per_image = [gathered[int(i)] for i in order]
            detections = [r for records, _ in per_image for r in records]
            evaluator = evaluate_coco(self.dataset.split.to_coco_gt(), detections, self.task.coco_backend)
            metrics = metrics_from_cocoeval(evaluator)
            parts = sorted({name for _, losses in per_image for name in losses})
            if parts:  # means over the images, summed in split order (the same float on any process count)
                means = {name: float(np.mean([losses.get(name, 0.0) for _, losses in per_image])) for name in parts}
                metrics.update(loss=float(np.sum([means[name] for name in parts])), **means)
            outputs = {"samples": self.samples, "curves": precision_recall_curves(evaluator),
                       "split": self.dataset.split}
            return metrics

        metrics = agree(accelerator, score, main_only=True, share=True)
        return metrics, outputs
