"""What one epoch's evaluation costs during training, segmentation and detection, three ways on the same model
and validation split (built by the trainer from a recipe), the sides alternating, medians of --repeats:

  reference  the work torchvision's reference scripts do at an epoch's end (references/segmentation/train.py
             `evaluate`, references/detection/engine.py `evaluate`): the split through the model in inference
             mode in batches of --reference-batch (their test loaders use 1); segmentation: a confusion matrix
             (bincount of true x predicted); detection: COCOeval of the split's detections. No loss, no export,
             no plot. Restated here as the same work, not their code; its COCOeval runs once for the split,
             which costs no more than the reference's per-batch CocoEvaluator updates (so this side is, if
             anything, cheaper than the reference itself).
  before     ours as it was: trainer.evaluation.score, then the export of a new best with every plot
             (eval.best_plots=every), and for detection the validation-loss pass (eval.detection_loss=true).
  now        ours by default: the same score and export, with the best's plots left to the end of the run
             (eval.best_plots=end) and no validation-loss pass.
  now + loss detection only: `now` with the validation-loss pass asked for (eval.detection_loss=true), what
             that key costs on its own.

Every epoch is assumed to bring a new best (the common case early in a run; later ones export nothing): an
evaluation epoch's cost is the score plus one export. The model is the recipe's, untrained (seed 0): the
timings do not depend on what it learned, except detection's COCOeval, which grows with the detections kept
(up to model.detection.detections_per_img per image; an untrained detector keeps many low-score ones).

    .venv/bin/python bench/eval_epoch.py --repeats 5
    .venv/bin/python bench/eval_epoch.py --smoke
"""
from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, result_files, write_results  # noqa: E402

RECIPES = {"segmentation": "configs/quickstart_segmentation.yaml", "detection": "configs/quickstart_detection.yaml"}


def build(task: str, work: Path, smoke: bool, val_per_class: int, model: str):
    """The recipe's session (data generated into `work`), untrained, on one CPU process."""
    import torch
    from accelerate.utils import set_seed

    from trainer.config import load_config
    from trainer.distributed import make_accelerator
    from trainer.session import build_session

    overrides = [f"data.root={work / task}", "data.num_workers=0", "train.device=cpu", "train.progress_bar=false",
                 f"data.generated.val_per_class={2 if smoke else val_per_class}", "data.generated.test_per_class=0",
                 f"data.generated.train_per_class={4 if smoke else 16}"]  # training images are not used here
    if model:
        overrides.append(f"model.name={model}")
    if smoke:
        overrides.append("data.image_size=32")
        if task == "detection":
            overrides.append("model.detection.max_size=32")
    cfg = load_config(str(ROOT / RECIPES[task]), overrides)
    acc = make_accelerator("cpu", "no")
    set_seed(cfg.seed)
    with contextlib.redirect_stdout(io.StringIO()):
        s = build_session(cfg, acc, lambda *_: None)
    torch.set_num_threads(1)
    return cfg, acc, s


def reference_side(s, batch_size: int) -> float:
    """The references' epoch-end evaluation (see the module docstring): seconds."""
    import torch
    from torch.utils.data import DataLoader

    from trainer.tasks.detect_metrics import evaluate_coco

    net, task = s.core, s.task
    net.eval()
    loader = DataLoader(s.val_set, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=task.collate)
    start = time.perf_counter()
    with torch.inference_mode():
        if task.name == "segmentation":
            n = len(task.classes)
            cm = torch.zeros(n, n, dtype=torch.int64)
            for images, masks in loader:
                masks = masks if torch.is_tensor(masks) else torch.stack(list(masks))
                pred = net(images)["out"].argmax(1)
                keep = (masks >= 0) & (masks < n)
                cm += torch.bincount(n * masks[keep] + pred[keep], minlength=n * n).reshape(n, n)
        else:
            detections = []
            for images, targets in loader:
                for out, target in zip(net(list(images)), targets):
                    detections += task.records(int(target["image_id"]), out)
            evaluate_coco(s.val_set.split.to_coco_gt(), detections)
    return time.perf_counter() - start


def ours_side(cfg, acc, s, out, old: bool, loss: bool) -> float:
    """trainer.evaluation.score and the export of a new best, as the loop runs them (`old`: with every plot;
    `loss`: detection's validation-loss pass): seconds."""
    from trainer.evaluation import export_scored, score

    s.task.validation_loss = loss  # eval.detection_loss
    start = time.perf_counter()
    scores = score(s.model, s.core, s.val_set, s.task, s.extensions, acc, s.eval_batch, 0, s.memory_format, "none")
    export_scored(out, "best", s.core, s.extensions, s.task, scores, s.card, 1, plots=old)  # eval.best_plots
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="segmentation,detection")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--val-per-class", type=int, default=25, help="the recipes' own: 25 x 4 classes = 100 images")
    p.add_argument("--reference-batch", type=int, default=1, help="the reference scripts' test loaders use 1")
    p.add_argument("--det-model", default="", help="a detector other than the recipe's")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    repeats = 1 if args.smoke else args.repeats
    name = "eval-epoch" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(name))
    from trainer.outputs import Folder

    lines = ["| task | model | val images | reference s | before s (plots + val loss) | now s | before / reference | "
             "now / reference | now / before | now + val loss s |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="eval-epoch-") as tmp:
        work = Path(tmp)
        for task in args.tasks.split(","):
            cfg, acc, s = build(task, work, args.smoke, args.val_per_class,
                                args.det_model if task == "detection" else "")
            out = Folder(work / f"{task}-run", "train")
            out.make()
            sides = ["reference", "before", "now"] + (["now + loss"] if task == "detection" else [])
            times = {side: [] for side in sides}
            for r in range(repeats + 1):  # the first round warms up (allocator, caches) and is not kept
                order = sides[r % len(sides):] + sides[:r % len(sides)]  # each side takes its turn at going first
                for side in order:
                    t = reference_side(s, args.reference_batch) if side == "reference" else \
                        ours_side(cfg, acc, s, out, old=side == "before",
                                  loss=task == "detection" and side in ("before", "now + loss"))
                    if r:
                        times[side].append(t)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"task": task, "model": cfg.model.name, "val_images": len(s.val_set), "seconds": times,
                         "median": med})
            lines.append(f"| {task} | {cfg.model.name} | {len(s.val_set)} | {med['reference']:.3f} "
                         f"({min(times['reference']):.3f}-{max(times['reference']):.3f}) | {med['before']:.3f} "
                         f"({min(times['before']):.3f}-{max(times['before']):.3f}) | {med['now']:.3f} "
                         f"({min(times['now']):.3f}-{max(times['now']):.3f}) | {med['before'] / med['reference']:.2f}x | "
                         f"{med['now'] / med['reference']:.2f}x | {med['now'] / med['before']:.2f}x | "
                         + (f"{med['now + loss']:.3f} ({min(times['now + loss']):.3f}-{max(times['now + loss']):.3f}) |"
                            if "now + loss" in med else "n/a |"))
            print(lines[-1], flush=True)
            acc.end_training()
    write_results(args.out, name, {"benchmark": "eval_epoch", "repeats": repeats, "rows": rows,
                                   "reference_batch": args.reference_batch,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
