"""What scoring a detection split costs: pycocotools' COCOeval (evaluate + accumulate + summarize, as
trainer/tasks/detect_metrics.py runs it, on the main rank) for --images images with ~3 ground-truth boxes each
and --detections detections per image (the detectors' default keeps up to 100), synthetic with a fixed seed:
detections are jittered copies of the ground truth plus random boxes, scores uniform. Medians of --repeats.
--backends names the scoring backends (eval.coco_backend) to time side by side, alternating within each repeat;
each row's map and its ratio to the first backend's time.

    .venv/bin/python bench/det_eval.py --images 500,5000 --detections 100 --repeats 3
    .venv/bin/python bench/det_eval.py --images 5000 --backends pycocotools,faster_coco_eval --repeats 3
    .venv/bin/python bench/det_eval.py --smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, result_files, write_results  # noqa: E402
from trainer.tasks.detect_metrics import evaluate_coco, metrics_from_cocoeval  # noqa: E402

SIDE, CATEGORIES = 640, [1, 3, 7, 9]  # COCO-like image side (px) and non-contiguous category ids


def synthetic(images: int, per_image: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = {"images": [{"id": i, "width": SIDE, "height": SIDE} for i in range(images)], "annotations": [],
          "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORIES]}
    dets = []
    for i in range(images):
        for _ in range(int(rng.integers(1, 6))):
            x, y = rng.uniform(0, SIDE * 0.7, 2)
            w, h = rng.uniform(16, SIDE * 0.3, 2)
            cat = int(rng.choice(CATEGORIES))
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i, "category_id": cat,
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
            if len(dets) < (i + 1) * per_image:  # a near hit
                dets.append({"image_id": i, "category_id": cat, "score": float(rng.uniform()),
                             "bbox": [x + rng.normal(0, 4), y + rng.normal(0, 4), w * rng.uniform(0.9, 1.1),
                                      h * rng.uniform(0.9, 1.1)]})
        while len(dets) < (i + 1) * per_image:  # the rest: background guesses
            x, y = rng.uniform(0, SIDE * 0.8, 2)
            dets.append({"image_id": i, "category_id": int(rng.choice(CATEGORIES)), "score": float(rng.uniform()),
                         "bbox": [x, y, *rng.uniform(8, SIDE * 0.2, 2)]})
    return gt, dets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="500,5000")
    p.add_argument("--detections", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", default="pycocotools", help="comma-separated: pycocotools, faster_coco_eval")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    sizes = [20] if args.smoke else [int(v) for v in args.images.split(",")]
    per_image, repeats = (5, 1) if args.smoke else (args.detections, args.repeats)
    tag = "det-eval-smoke" if args.smoke else "det-eval"
    check_results(args.out, result_files(tag))
    backends = args.backends.split(",")
    lines = ["| images | detections | backend | COCOeval s (median) | min-max | map | time / first backend's |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines))
    rows = []
    for n in sizes:
        gt, dets = synthetic(n, per_image)
        times, maps = {b: [] for b in backends}, {}
        for r in range(repeats):
            for backend in backends[r % len(backends):] + backends[:r % len(backends)]:  # each goes first in turn
                start = time.perf_counter()
                maps[backend] = metrics_from_cocoeval(evaluate_coco(gt, dets, backend))["map"]
                times[backend].append(time.perf_counter() - start)
        for backend in backends:
            t = times[backend]
            rows.append({"images": n, "detections": len(dets), "backend": backend, "seconds": t,
                         "map": maps[backend]})
            lines.append(f"| {n} | {len(dets)} | {backend} | {statistics.median(t):.2f} | {min(t):.2f}-{max(t):.2f} | "
                         f"{maps[backend]:.6f} | {statistics.median(t) / statistics.median(times[backends[0]]):.2f}x |")
            print(lines[-1], flush=True)
    write_results(args.out, tag, {"benchmark": "det_eval", "rows": rows}, "\n".join(lines))


if __name__ == "__main__":
    main()
