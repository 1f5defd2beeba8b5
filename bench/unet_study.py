"""The U-Net segmentation recipe (configs/quickstart_segmentation.yaml) against a plain PyTorch loop of the same
network, side by side on small-object scenes with a dominant background, with one change at a time on each
side (an ablation), --seeds seeds each; val mIoU and digit-vs-background IoU per row.

Data (drawn once into --work, through the write gate): 64 px scenes, a noisy two-colour gradient with 1-4 digits
(0-9, PIL's default font at 24-36 px, random colours) as a `masks` folder: 11 classes (background + 10 digits),
the background ~94% of the pixels (measured on 200 images). A mirrored digit is another shape (a flipped 2 is no 2).

Sides:
  recipe*   `trainer train configs/quickstart_segmentation.yaml` on that folder (data.format=masks), with the
            recipe's settings pinned as rows 0-9 measured them (PINNED) and the overrides the row names; its val
            metrics from run/model/eval.json.
  plain*    the loop in `plain_loop` (~40 lines): the trainer's own U-Net (trainer.tasks.segment_models, the same
            weights' shapes and init), AdamW at the recipe's lr and weight decay, plain cross-entropy, batch 16,
            inputs in [0, 1] (or normalised by the training split's mean/std), no augmentation, the schedule the
            row names (torch's OneCycleLR with its defaults, or cosine with the recipe's 0.5-epoch warm-up); its
            val metrics from the trainer's own confusion-matrix code, so both sides are scored alike.
Both train --epochs epochs on the same images with one thread each (--threads), seeds 0..--seeds-1.

    .venv/bin/python bench/unet_study.py --work /tmp/unet-study --epochs 12 --seeds 2
    .venv/bin/python bench/unet_study.py --smoke --work /tmp/unet-study-smoke
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, made_once, result_files, write_results  # noqa: E402

CLASSES = ["background"] + [f"digit{d}" for d in range(10)]
RECIPE = ROOT / "configs" / "quickstart_segmentation.yaml"
# (side, name, options), numbered in this order (--rows): a recipe row's options are overrides of the recipe, a
# plain row's the plain loop's arguments; each row one change from its side's first (rows 0 and 7), or from the
# row it names. New rows go at the end, so that the numbers in BENCHMARKS.md keep meaning the same rows.
# Every recipe row starts from the recipe as it was when rows 0-9 were measured (cosine, a half-epoch warm-up from
# ~0, CE + Dice with class weights, hflip), whatever configs/quickstart_segmentation.yaml says now, so that a row
# keeps measuring the same thing; the recipe as committed since is row 15.
PINNED = ["optim.schedule=cosine", "optim.warmup_epochs=0.5", "optim.warmup_start_ratio=0", "loss.name=ce+dice",
          "loss.class_weighted=true", "loss.dice_weight=1", "data.augment.hflip=true"]
ONE_CYCLE = ["optim.schedule=one_cycle", "optim.warmup_epochs=0"]  # torch's OneCycleLR defaults, as the plain loop
ROWS = [
    ("recipe", "recipe (ce+dice, class weights, hflip, cosine, 0.5-epoch warm-up)", []),
    ("recipe", "recipe, plain ce", ["loss.name=ce"]),
    ("recipe", "recipe, plain ce, no class weights", ["loss.name=ce", "loss.class_weighted=false"]),
    ("recipe", "recipe, no hflip", ["data.augment.hflip=false"]),
    ("recipe", "recipe, plain ce, no class weights, no hflip", ["loss.name=ce", "loss.class_weighted=false",
                                                                "data.augment.hflip=false"]),
    # one-cycle's shape as far as the trainer's cosine schedule can take it (torch's OneCycleLR defaults: 30% of
    # the updates warming up from lr / 25, then annealing to ~0); linear rather than cosine warm-up
    ("recipe", "recipe, warm-up 30% of the run from lr/25", ["optim.warmup_epochs={w30}",
                                                              "optim.warmup_start_ratio=0.04"]),
    ("recipe", "recipe, plain ce, no class weights, warm-up 30% from lr/25", [
        "loss.name=ce", "loss.class_weighted=false", "optim.warmup_epochs={w30}", "optim.warmup_start_ratio=0.04"]),
    ("plain", "plain (ce, one-cycle, [0, 1] inputs)", {"schedule": "one_cycle", "normalise": False}),
    ("plain", "plain, cosine + warm-up (the recipe's schedule)", {"schedule": "cosine", "normalise": False}),
    ("plain", "plain, inputs normalised by mean/std", {"schedule": "one_cycle", "normalise": True}),
    # the trainer's one_cycle (optim.schedule=one_cycle: OneCycleLR's defaults, the plain loop's schedule, beta1
    # cycled 0.95 -> 0.85 -> 0.95 as torch does for AdamW) in place of the recipe's cosine and warm-up
    ("recipe", "recipe, one-cycle", ONE_CYCLE),
    ("recipe", "recipe, one-cycle, no hflip", [*ONE_CYCLE, "data.augment.hflip=false"]),
    ("recipe", "recipe, ce + class weights (no dice), one-cycle", [*ONE_CYCLE, "loss.name=ce"]),
    # row 5 without hflip: separates the flip from the warm-up (rows 0 and 5 differ in the warm-up only)
    ("recipe", "recipe, warm-up 30% from lr/25, no hflip", [
        "optim.warmup_epochs={w30}", "optim.warmup_start_ratio=0.04", "data.augment.hflip=false"]),
    # the trainer set up as the plain loop (ce, no class weights, no hflip, one-cycle); its inputs stay normalised
    ("recipe", "recipe as the plain loop: ce, no class weights, no hflip, one-cycle", [
        *ONE_CYCLE, "loss.name=ce", "loss.class_weighted=false", "data.augment.hflip=false"]),
    # the class weights (a digit pixel weighs ~150 background pixels here) call background pixels digits; Dice
    # alone balances the classes per image without them
    ("recipe", "recipe, one-cycle, no class weights", [*ONE_CYCLE, "loss.class_weighted=false"]),
    ("recipe", "recipe, one-cycle, no class weights, no hflip", [
        *ONE_CYCLE, "loss.class_weighted=false", "data.augment.hflip=false"]),
    # more of Dice's balance without the weights' bias towards digits
    ("recipe", "recipe, one-cycle, no class weights, no hflip, dice_weight 3", [
        *ONE_CYCLE, "loss.class_weighted=false", "data.augment.hflip=false", "loss.dice_weight=3"]),
    ("recipe", "recipe, one-cycle, Dice alone (no ce, no class weights), no hflip", [
        *ONE_CYCLE, "loss.name=dice", "loss.class_weighted=false", "data.augment.hflip=false"]),
    ("recipe", "recipe, one-cycle, Dice alone (no ce, no class weights)", [
        *ONE_CYCLE, "loss.name=dice", "loss.class_weighted=false"]),
]


# ---- the data ----

def draw_digits(staging: Path, counts: dict, size: int, seed: int) -> None:
    """`counts` {split: images} scenes into the staging folder made_once places (a `masks` folder)."""
    from PIL import Image, ImageDraw, ImageFont

    (staging / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    for s, (split, n) in enumerate(counts.items()):
        (staging / split / "images").mkdir(parents=True)
        (staging / split / "masks").mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng([seed, s, i])
            c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            t = np.linspace(0, 1, size)[None, :, None] if rng.uniform() < 0.5 else np.linspace(0, 1, size)[:, None, None]
            background = c0 * (1 - t) + c1 * t + np.zeros((size, size, 3))
            img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
            mask = Image.new("L", (size, size), 0)
            draw, draw_mask = ImageDraw.Draw(img), ImageDraw.Draw(mask)
            draw_mask.fontmode = "1"  # no antialiasing: every mask pixel is one class
            for _ in range(int(rng.integers(1, 5))):
                digit = int(rng.integers(0, 10))
                font = ImageFont.load_default(size=int(rng.integers(24, 37)))
                x, y = rng.uniform(-6, size - 22, 2)
                colour = rng.uniform(0, 255, 3)
                for _ in range(50):  # stands out from the background's mean colour
                    if np.linalg.norm(colour - (c0 + c1) / 2) > 100:
                        break
                    colour = rng.uniform(0, 255, 3)
                draw.text((x, y), str(digit), fill=tuple(int(v) for v in colour), font=font)
                draw_mask.text((x, y), str(digit), fill=digit + 1, font=font)
            noisy = np.asarray(img, dtype=np.float64) + rng.normal(0, 10, (size, size, 3))
            Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8)).save(
                staging / split / "images" / f"{i:05d}.png")
            mask.save(staging / split / "masks" / f"{i:05d}.png")


# ---- the two sides ----

def foreground_iou(cm: np.ndarray) -> float:
    """Digit (any class) against background: the IoU of the pixels called a digit, whichever digit."""
    cm = np.asarray(cm)
    tp = cm[1:, 1:].sum()
    return float(tp / (tp + cm[1:, 0].sum() + cm[0, 1:].sum()))


def run_recipe(data: Path, work: Path, name: str, overrides: list, seed: int, epochs: int, threads: int) -> dict:
    run = work / "runs" / f"{name}-seed{seed}"
    cmd = [sys.executable, "-m", "trainer", "train", str(RECIPE), "data.format=masks", f"data.root={data}",
           f"train.epochs={epochs}", f"seed={seed}", f"run.dir={run}", "run.overwrite=true", "eval.every_epochs=0",
           "checkpoint.every_epochs=0", "data.num_workers=0", "train.progress_bar=false",
           *(o.format(w30=round(0.3 * epochs, 3)) for o in PINNED + overrides)]  # {w30}: 30% of the run, in epochs
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if res.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed: {res.stderr[-2000:]}")
    report = json.loads((run / "model" / "eval.json").read_text())
    return {"miou": report["miou"], "fg_iou": foreground_iou(report["confusion_matrix"]),
            "seconds": time.perf_counter() - start}


def plain_loop(data: Path, seed: int, epochs: int, schedule: str, normalise: bool, threads: int, lr: float = 3e-3,
               weight_decay: float = 1e-4, batch: int = 16) -> dict:
    """A plain PyTorch loop of the same U-Net: the comparison the recipe has to meet."""
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from trainer.tasks.segment_metrics import confusion_matrix, metrics_from_confusion
    from trainer.tasks.segment_models import build_segmentation_model

    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    def load(split):
        files = sorted((data / split / "images").glob("*.png"))
        x = torch.stack([pil_to_tensor(Image.open(f).convert("RGB")) for f in files]).float() / 255
        y = torch.stack([pil_to_tensor(Image.open(data / split / "masks" / f.name))[0].long() for f in files])
        return x, y

    start = time.perf_counter()
    (xt, yt), (xv, yv) = load("train"), load("val")
    if normalise:
        mean, std = xt.mean((0, 2, 3), keepdim=True), xt.std((0, 2, 3), keepdim=True)
        xt, xv = (xt - mean) / std, (xv - mean) / std
    model = build_segmentation_model("unet", len(CLASSES))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(xt) / batch)
    total, warmup = epochs * steps_per_epoch, steps_per_epoch // 2
    if schedule == "one_cycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    else:  # the recipe's: linear warm-up over half an epoch, then cosine to 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: (u + 1) / warmup if u < warmup else
                                                  0.5 * (1 + math.cos(math.pi * (u - warmup) / (total - warmup))))
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt), generator=order).split(batch):
            loss = F.cross_entropy(model(xt[idx])["out"], yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xv[i:i + 64])["out"].argmax(1) for i in range(0, len(xv), 64)])
    cm = confusion_matrix(pred, yv, len(CLASSES), ignore_index=255)
    return {"miou": metrics_from_confusion(cm, CLASSES)["miou"], "fg_iou": foreground_iou(cm.numpy()),
            "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, type=Path, help="the data and the runs (made here)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, default=2, help="how many seeds: --first-seed, --first-seed + 1, ...")
    p.add_argument("--first-seed", type=int, default=0, help="e.g. 2 with --seeds 1: a third seed for rows run before")
    p.add_argument("--train", type=int, default=480)
    p.add_argument("--val", type=int, default=120)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", default="", help="comma-separated row numbers (0-based, recipe rows first) to run")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.seeds, args.train, args.val = 1, 1, 16, 8
    name = "unet-study" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(name))
    params = {"train": args.train, "val": args.val, "size": 64, "seed": 0, "classes": CLASSES}
    data = made_once(args.work.resolve() / "digits", params,
                     lambda staging: draw_digits(staging, {"train": args.train, "val": args.val}, 64, 0))
    chosen = [int(r) for r in args.rows.split(",")] if args.rows else range(len(ROWS))
    lines = ["| row | side | mIoU (mean of seeds) | digit-vs-background IoU | per seed (mIoU / fg IoU) | s per run |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []
    for k in chosen:
        side, label, opts = ROWS[k]
        runs = [run_recipe(data, args.work.resolve(), f"row{k}", opts, seed, args.epochs, args.threads)
                if side == "recipe" else plain_loop(data, seed, args.epochs, threads=args.threads, **opts)
                for seed in range(args.first_seed, args.first_seed + args.seeds)]
        rows.append({"row": k, "side": side, "name": label, "options": opts, "runs": runs})
        lines.append(f"| {label} | {side} | {statistics.mean(r['miou'] for r in runs):.3f} | "
                     f"{statistics.mean(r['fg_iou'] for r in runs):.3f} | "
                     + ", ".join(f"{r['miou']:.3f} / {r['fg_iou']:.3f}" for r in runs)
                     + f" | {statistics.mean(r['seconds'] for r in runs):.0f} |")
        print(lines[-1], flush=True)
    write_results(args.out, name, {"benchmark": "unet_study", "epochs": args.epochs,
                                   "seeds": list(range(args.first_seed, args.first_seed + args.seeds)),
                                   "data": params, "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
