"""Regularisation ablation at CPU scale: the same recipe trained once as it is and once with each technique on
top (EMA, mixup/CutMix, RandAugment, TrivialAugment, random erasing), scored on the held-out test split;
prints and writes a table of test accuracy and wall time per variant.

    .venv/bin/python bench/ablation.py --train-tar ../shared/data/cifar10-jpeg-train.tar.gz \\
        --test-tar ../shared/data/cifar10-jpeg-test.tar.gz --work /tmp/ablation --per-class 500 --epochs 15
    .venv/bin/python bench/ablation.py --smoke     # generated shapes, seconds per variant (what CI runs)

Data: the first --per-class training images of each class (a fixed subset of `train/`, copied, so a
small budget is an over-fitting regime where regularisers can show), and all of `test/`. The test split is
the run's "val" split with `data.val_fraction=0` and `eval.every_epochs=0`: it is scored once, at the end,
and never steers training. Wall time is the whole `trainer train` command, data decoding included.
One seed per variant: the 10,000-image test accuracy has a binomial standard error of about 0.5 points at
60-70%, so differences below ~1.5 points are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from gate import MARKER, check_results, made_once, result_files, write_results

ROOT = Path(__file__).resolve().parents[1]

# each variant = the baseline's overrides + its own; the values are timm's usual ones, scaled where the
# budget is short (EMA: ~600 updates, so a half-life of ~70 updates)
VARIANTS = {
    "baseline": [],
    "ema": ["ema.decay=0.99"],
    "mixup_cutmix": ["data.augment.mixup_alpha=0.8", "data.augment.cutmix_alpha=1.0"],
    "randaugment": ["data.augment.auto_augment=randaugment", "data.augment.randaugment_num_ops=2",
                    "data.augment.randaugment_magnitude=9"],
    "trivialaugment": ["data.augment.auto_augment=trivialaugment"],
    "random_erasing": ["data.augment.random_erasing=0.25"],
}


def extract(tar: Path, into: Path) -> Path:
    """The tarball's top folder (train/ or test/) as into/<top>, extracted once (made_once: reused while it is
    the same tarball)."""
    with tarfile.open(tar) as t:
        top = t.getmembers()[0].name.split("/")[0]

        def below_top(member: tarfile.TarInfo, dest: str):  # top/x -> x: the staging folder becomes into/<top>
            if not member.name.startswith(top + "/"):
                return None
            # "data": no absolute paths, links out or devices
            return tarfile.data_filter(member.replace(name=member.name[len(top) + 1:], deep=False), dest)

        return made_once(into / top, {"made_by": "bench/ablation.py", "tar": str(tar.resolve())},
                         lambda staging: t.extractall(staging, filter=below_top))


def subset(train: Path, test: Path, per_class: int, out: Path) -> Path:
    """out/train/<class>/ with the first `per_class` files of each class (sorted names) and out/test/, all of
    test; copies (the write gate records regular files, never links), made once."""
    def draw(staging: Path) -> None:  # the staging folder made_once renames to `out`
        for cls in sorted(p for p in train.iterdir() if p.is_dir()):
            (staging / "train" / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:per_class]:
                shutil.copyfile(f, staging / "train" / cls.name / f.name)
        shutil.copytree(test, staging / "test", ignore=shutil.ignore_patterns(MARKER))  # extract's, not data

    return made_once(out, {"made_by": "bench/ablation.py", "train": str(train.resolve()),
                           "test": str(test.resolve()), "per_class": per_class}, draw)


def run_variant(name: str, extra: list, base: list, work: Path, threads: int) -> dict:
    run_dir = work / "runs" / name
    cmd = [sys.executable, "-m", "trainer", "train", *base, f"run.dir={run_dir}", "run.overwrite=true",
           "train.progress_bar=false", *extra]
    start = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"})
    wall = time.time() - start
    if res.returncode != 0:
        raise SystemExit(f"variant {name} failed:\n{res.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"variant": name, "overrides": " ".join(extra) or "(the recipe)", "test_accuracy": summary["final"]["accuracy"],
            "test_loss": summary["final"]["loss"], "wall_s": round(wall, 1), "updates": summary["updates"]}


def table(rows: list) -> str:
    base = rows[0]["test_accuracy"]
    lines = ["| variant | overrides | test accuracy | vs baseline | wall |", "|---|---|---|---|---|"]
    for r in rows:
        delta = 100 * (r["test_accuracy"] - base)
        lines.append(f"| {r['variant']} | `{r['overrides']}` | {100 * r['test_accuracy']:.2f}% | "
                     f"{delta:+.2f} | {r['wall_s'] / 60:.1f} min |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-tar", type=Path)
    p.add_argument("--test-tar", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/ablation"))
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--recipe", default="configs/small_cnn_cifar10_cpu.yaml")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="generated shapes, tiny: checks the script, measures nothing")
    args = p.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    check_results(args.work, result_files("ablation"), option="--work")
    if args.smoke:
        base = [args.recipe, "data.format=generated", f"data.root={args.work / 'gen'}", "data.generated.train_per_class=24",
                "data.generated.val_per_class=6", "train.epochs=1", "train.batch_size=16", "data.num_workers=0",
                "train.mixed_precision=no"]
    else:
        if not (args.train_tar and args.test_tar):
            raise SystemExit("--train-tar and --test-tar are needed (or --smoke)")
        data = subset(extract(args.train_tar, args.work / "cifar"), extract(args.test_tar, args.work / "cifar"),
                      args.per_class, args.work / f"subset{args.per_class}")
        base = [args.recipe, "data.format=imagefolder", f"data.root={data}", "data.val_fraction=0",
                "eval.every_epochs=0", f"train.epochs={args.epochs}", "data.verify_images=false"]
    rows = []
    for name in names:
        rows.append(run_variant(name, VARIANTS[name], base, args.work, args.threads))
        print(f"[ablation] {name}: test accuracy {100 * rows[-1]['test_accuracy']:.2f}% in {rows[-1]['wall_s']} s",
              flush=True)
    md = table(rows)
    print(md)
    write_results(args.work, "ablation", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, md,
                  option="--work")


if __name__ == "__main__":
    main()
