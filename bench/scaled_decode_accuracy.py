"""Does data.scaled_decode cost accuracy? The same short recipe trained on a photo-size copy of a real dataset
with JPEGs decoded whole (data.scaled_decode=false) and at the reduced DCT scale (true), seeds side by side;
prints and writes a table of test accuracy and wall time per run.

    .venv/bin/python bench/scaled_decode_accuracy.py --train-tar ../shared/data/cifar10-jpeg-train.tar.gz \\
        --test-tar ../shared/data/cifar10-jpeg-test.tar.gz --work /tmp/scaled-acc --per-class 500 \\
        --test-per-class 100 --epochs 6 --seeds 0,1
    .venv/bin/python bench/scaled_decode_accuracy.py --smoke    # a few generated JPEGs: checks the script only

With --max-side N it asks the same of `trainer pack --max-side N` (issue 34, images stored pre-shrunk): the
folder (`folder`) against a pack of it whose images are stored with their longer side N (`packedN`, train and
test splits alike, as a pack is used), both with data.scaled_decode=true (the default).

Data: the first --per-class training images of each CIFAR-10 class and the first --test-per-class of each test
class, upsampled (bicubic) from 32 to --side px and written as JPEGs (quality 90) under --work: never into the
source, and never committed. Recipe: configs/small_cnn_cifar10_cpu.yaml with RandomResizedCrop (scale 0.35-1)
to --image-size px; evaluation resizes the whole image to --image-size. At 256 -> 64 px the scaled path decodes
a training crop at 1/2 (a crop of 128-255 px) or 1/4 (the whole image), evaluation at 1/4. The test split is
scored once, at the end (`data.val_fraction=0 eval.every_epochs=0`). Differences of test accuracy below about
two binomial standard errors (sqrt(p(1-p)/n): ~1.5 points at 60% on 1,000 images) are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ablation import extract
from gate import check_results, made_once, result_files, write_results

ROOT = Path(__file__).resolve().parents[1]


def upsampled(train: Path, test: Path, per_class: int, test_per_class: int, side: int, out: Path) -> Path:
    """out/train/<class>/ and out/test/<class>/: the first files of each class, upsampled to `side` px JPEGs."""
    from PIL import Image

    def draw(staging: Path) -> None:  # the staging folder made_once renames to `out`
        for split, source, count in (("train", train, per_class), ("test", test, test_per_class)):
            for cls in sorted(p for p in source.iterdir() if p.is_dir()):
                (staging / split / cls.name).mkdir(parents=True)
                for f in sorted(cls.iterdir())[:count]:
                    with Image.open(f) as img:
                        big = img.convert("RGB").resize((side, side), Image.BICUBIC)
                    big.save(staging / split / cls.name / (f.stem + ".jpg"), "JPEG", quality=90)

    return made_once(out, {"made_by": "bench/scaled_decode_accuracy.py", "train": str(train.resolve()),
                           "test": str(test.resolve()), "per_class": per_class, "test_per_class": test_per_class,
                           "side": side}, draw)


def generated_jpegs(out: Path) -> Path:
    """--smoke: a few smooth random 128-px JPEGs in three classes."""
    import numpy as np
    from PIL import Image

    def draw(staging: Path) -> None:
        rng = np.random.default_rng(0)
        for split, n in (("train", 16), ("test", 6)):
            for cls in ("a", "b", "c"):  # three: the recipe's label smoothing is for multi-class
                (staging / split / cls).mkdir(parents=True)
                for i in range(n):
                    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                    Image.fromarray(base).resize((128, 128), Image.BICUBIC).save(
                        staging / split / cls / f"{i}.jpg", "JPEG", quality=90)

    return made_once(out, {"made_by": "bench/scaled_decode_accuracy.py", "smoke": True}, draw)


def run_one(variant: str, overrides: list, seed: int, base: list, work: Path, threads: int) -> dict:
    name = f"{variant}-seed{seed}"
    run_dir = work / "runs" / name
    cmd = [sys.executable, "-m", "trainer", "train", *base, *overrides, f"run.dir={run_dir}", "run.overwrite=true",
           "train.progress_bar=false", f"seed={seed}"]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"})
    wall = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"run": name, "variant": variant, "seed": seed, "test_accuracy": summary["final"]["accuracy"],
            "test_loss": summary["final"]["loss"], "wall_s": round(wall, 1), "updates": summary["updates"]}


def table(rows: list, n_test: int, variants) -> str:
    lines = ["| variant | seed | test accuracy | test loss | wall |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {100 * r['test_accuracy']:.2f}% | "
                     f"{r['test_loss']:.4f} | {r['wall_s'] / 60:.1f} min |")
    for variant in variants:
        accs = [r["test_accuracy"] for r in rows if r["variant"] == variant]
        if accs:
            mean = sum(accs) / len(accs)
            se = (mean * (1 - mean) / n_test) ** 0.5
            lines.append(f"| {variant} | mean | {100 * mean:.2f}% | (binomial s.e. of one run "
                         f"{100 * se:.2f} points) | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-tar", type=Path)
    p.add_argument("--test-tar", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/scaled-acc"))
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--side", type=int, default=256, help="the photo-size copy's side, px")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size: the crop's output side, px")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--workers", type=int, default=2, help="data.num_workers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipe", default="configs/small_cnn_cifar10_cpu.yaml")
    p.add_argument("--max-side", type=int, help="compare the folder with its trainer pack --max-side N instead of "
                   "whole with scaled decoding")
    p.add_argument("--smoke", action="store_true", help="generated JPEGs, one epoch: checks the script only")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    name = ("scaled-decode-accuracy" + (f"-max-side{args.max_side}" if args.max_side else "")
            + ("-smoke" if args.smoke else ""))
    check_results(args.work, result_files(name), option="--work")
    if args.smoke:
        data, n_test, epochs, seeds, workers = generated_jpegs(args.work / "smoke-jpegs"), 18, 1, seeds[:1], 0
    else:
        if not (args.train_tar and args.test_tar):
            raise SystemExit("--train-tar and --test-tar are needed (or --smoke)")
        cifar = args.work / "cifar"
        data = upsampled(extract(args.train_tar, cifar), extract(args.test_tar, cifar), args.per_class,
                         args.test_per_class, args.side, args.work / f"photo{args.side}-{args.per_class}")
        n_test, epochs, workers = 10 * args.test_per_class, args.epochs, args.workers
    base = [args.recipe, "data.format=imagefolder", f"data.root={data}", "data.val_fraction=0", "eval.every_epochs=0",
            f"train.epochs={epochs}", "data.verify_images=false", f"data.image_size={args.image_size}",
            "data.augment.random_resized_crop=true", f"data.num_workers={workers}", "checkpoint.every_epochs=0"]
    if args.smoke:
        base.append("train.batch_size=16")
    variants = {"whole": ["data.scaled_decode=false"], "scaled": ["data.scaled_decode=true"]}
    if args.max_side:
        from trainer.data.shards import pack

        packed = args.work / f"{data.name}-packed{args.max_side}"  # resumes, or does nothing, when run again
        pack(data, packed, max_side=args.max_side)
        variants = {"folder": ["data.scaled_decode=true"],
                    f"packed{args.max_side}": ["data.format=shards", f"data.root={packed}", "data.scaled_decode=true"]}
    rows = []
    for seed in seeds:
        for variant, overrides in variants.items():  # interleaved: the VM's load drifts over the runs alike
            rows.append(run_one(variant, overrides, seed, base, args.work, args.threads))
            print(f"[scaled-decode-accuracy] {rows[-1]['run']}: test accuracy {100 * rows[-1]['test_accuracy']:.2f}% "
                  f"in {rows[-1]['wall_s']} s", flush=True)
    md = table(rows, n_test, variants)
    print(md)
    write_results(args.work, name, {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, md,
                  option="--work")


if __name__ == "__main__":
    main()
