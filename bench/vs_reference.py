"""End to end against torchvision's own reference scripts: the same images, model and recipe through
references/segmentation/train.py (lraspp_mobilenet_v3_large on a VOC layout) and references/detection/train.py
(fasterrcnn_mobilenet_v3_large_320_fpn on a COCO layout), run unmodified from a checkout the user names, and
through `trainer train`, alternating, several repeats. Per run: wall time from process start to exit, CPU time
of the process tree (wait4's rusage of the run: its own, its loader workers' and any other child's it waited
for), of it the system time, the minor page faults and the largest resident set, and the final accuracy each
side prints or writes. Writes the medians and the ratios ours / reference as JSON + a Markdown table.
--reference-env NAME=VALUE sets an environment variable for the reference's runs only: glibc's malloc tunables
give it what train.keep_freed_memory gives ours (trainer/host_memory.py), to see how much of a difference is
that setting.

    .venv/bin/python bench/vs_reference.py --reference-dir /path/to/vision/references --repeats 3
    .venv/bin/python bench/vs_reference.py --smoke            # tiny sizes, our side only (CI)

Results, the reference files used and the reading: BENCHMARKS.md, "End to end against torchvision's reference
scripts".

--reference-dir holds segmentation/train.py and detection/train.py (a checkout of pytorch/vision's
references/ folder); nothing of it lives in this repo. The reference runs with this interpreter through a small
shim written into the work folder at run time, which changes no file of the checkout and only:
  - seeds python's, numpy's and torch's generators with --seed (the scripts take no seed);
  - makes every torchvision detection and segmentation builder default to weights_backbone=None, so nothing
    downloads: recent references pass `--weights-backbone` (default None) themselves, older ones call
    builder(pretrained=False), whose ImageNet backbone default would download;
  - provides torch._six.string_classes when torch has no torch._six (removed in torch 2.x), which older
    coco_eval.py imports.
Then it runs train.py as __main__ with the reference's own command line:
  segmentation  --dataset voc --model lraspp_mobilenet_v3_large --device cpu -b B --epochs E -j W --lr LR
                --data-path DATA --output-dir OUT  (SGD momentum 0.9, wd 1e-4, poly 0.9 per update: defaults)
  detection     --dataset coco --model fasterrcnn_mobilenet_v3_large_320_fpn --device cpu -b B --epochs E -j W
                --lr LR --data-path DATA --output-dir OUT  (SGD 0.9, wd 1e-4, lr steps at 16 and 22, warm-up
                from lr/1000 over the first epoch's updates, aspect-ratio groups of factor 3: defaults)

Data: generated once into the work folder, in the layouts the references read natively, from the project's
own scene generator (trainer/data/generated.py: 1-4 shapes on a noisy gradient with distractor lines), and
both sides read the very same files:
  segmentation  VOCdevkit/VOC2012/{JPEGImages/<id>.jpg, SegmentationClass/<id>.png (class indices 0-4 of
                background, circle, cross, square, triangle), ImageSets/Segmentation/{train,val}.txt}; ours
                reads it with data.format=voc.
  detection     train2017/, val2017/, annotations/instances_{train,val}2017.json (the generated detection
                variant, category ids 2, 3, 5, 7; each box also given as a 4-corner polygon in
                "segmentation", which the reference's reader requires); ours reads it with data.format=coco.

Accuracy, the same definition on both sides: segmentation, mIoU over the 5 classes the scenes hold (per-class
IoU from the reference's last printed confusion matrix, from our eval.json), as the reference also counts the
16 VOC classes no pixel has (IoU nan) in its printed mean; detection, COCO mAP@[.5:.95] (the reference's last
printed COCOeval summary, our eval.json's map), both pycocotools.

What stays different (the recipes are as close as the two command lines can say; also in BENCHMARKS.md):
  both      the reference saves a full checkpoint (model, optimizer, scheduler) every epoch, model_N.pth and
            checkpoint.pth; ours writes its checkpoint every epoch, the exported model, its best/ and the
            report (eval.json and plots) at the end, as a user's run does. Weights start from different random
            draws on each side (the same seed, different construction order). Ours runs its start-up checks
            (image headers, the config) and measures nothing it is told (mean/std given).
  segmentation  the reference resizes the short side to 260-1040 px (0.5-2 x its base 520), crops 480 (pads
                0 / 255) and evaluates at a short side of 520 in batches of 1; ours scales by 0.5-2 x 480
                around the 480 frame (data.augment.scale_range, the image squashed to a square first: these
                are square), crops 480, evaluates at 480 x 480 in batches of eval.batch_size. The reference
                has 21 outputs (VOC), ours too (data.format=voc). The reference's poly runs to 0 at its last
                update; ours the same (optim.schedule=poly, optim.min_lr_ratio 0).
  detection     the reference's head has 91 outputs (COCO ids used as labels), ours 5 (4 kinds + background,
                ids mapped to labels); the reference drops images without boxes from training (none here);
                ours groups aspect ratios per global batch (one process here, so the same), and applies no
                weight decay to norm and bias parameters (the reference decays all).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gate import bench_folder, check_results, fresh_log, made_once, write_file, write_results

ROOT = Path(__file__).resolve().parents[1]

from trainer.data.generated import CLASSES, draw_scene, scene_rng, write_generated_coco  # noqa: E402
from trainer.data.masks import VOC_CLASSES  # noqa: E402

TASKS = ("segmentation", "detection")
MODELS = {"segmentation": "lraspp_mobilenet_v3_large", "detection": "fasterrcnn_mobilenet_v3_large_320_fpn"}
SCENE_CLASSES = len(CLASSES["segmentation"])  # background + 4 shapes: the classes the generated masks hold
IMAGENET_MEAN, IMAGENET_STD = "[0.485,0.456,0.406]", "[0.229,0.224,0.225]"  # the segmentation reference's

# Runs a reference train.py unmodified (see the module docstring for what it adapts, and why). Written into the
# work folder at run time. argv: seed, train.py, then train.py's own command line.
SHIM = '''\
import functools, inspect, random, runpy, sys, types
import numpy as np
import torch
import torchvision.models.detection as detection
import torchvision.models.segmentation as segmentation

seed, script = int(sys.argv[1]), sys.argv[2]
random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
if not hasattr(torch, "_six"):  # removed in torch 2.x; older coco_eval.py imports it
    torch._six = sys.modules["torch._six"] = types.SimpleNamespace(string_classes=(str, bytes))


def no_download(builder):
    @functools.wraps(builder)
    def build(*args, **kwargs):
        kwargs.setdefault("weights_backbone", None)
        return builder(*args, **kwargs)
    return build


for module in (detection, segmentation):
    for name, obj in list(vars(module).items()):
        if inspect.isfunction(obj) and "weights_backbone" in inspect.signature(obj).parameters:
            setattr(module, name, no_download(obj))
sys.path.insert(0, str(__import__("pathlib").Path(script).resolve().parent))
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
'''


class Failed(Exception):
    pass


def fail(message: str) -> None:
    raise SystemExit(f"error: {message}")


# ---- the data, in the references' own layouts ----

def draw_voc(root: Path, counts: dict, size: int, seed: int) -> None:
    """root/VOCdevkit/VOC2012 of the generated segmentation scenes (torchvision's VOCSegmentation layout)."""
    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    for split, n in counts.items():
        ids = [f"{split}_{i:05d}" for i in range(n)]
        for i, name in enumerate(ids):
            img, mask = draw_scene(size, scene_rng(seed, split, i))
            img.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            mask.save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))


def draw_coco(root: Path, counts: dict, size: int, seed: int) -> None:
    """root/{train2017,val2017,annotations/instances_*2017.json}: the generated detection variant, each box also
    given as a polygon (the reference's ConvertCocoPolysToMask reads "segmentation" from every annotation)."""
    write_generated_coco(root, size, seed, counts)
    (root / "annotations").mkdir()
    for split in counts:
        coco = json.loads((root / split / "annotations.json").read_text())
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
        (root / f"annotations/instances_{split}2017.json").write_text(json.dumps(coco, separators=(",", ":")))
        (root / split / "annotations.json").unlink()
        (root / split).rename(root / f"{split}2017")


def make_data(task: str, work: Path, args) -> Path:
    counts = {"train": args.train_images, "val": args.val_images}
    params = {"task": task, "counts": counts, "image_size": args.image_size, "seed": args.seed, "version": 1}
    draw = draw_voc if task == "segmentation" else draw_coco
    return made_once(work / f"data-{task}", params, lambda staging: draw(staging, counts, args.image_size, args.seed))


# ---- the two sides ----

def reference_command(task: str, args, ref: Path, data: Path, out: Path) -> list:
    common = ["--model", MODELS[task], "--device", "cpu", "-b", str(args.batch_size), "--epochs", str(args.epochs),
              "-j", str(args.workers), "--data-path", str(data), "--output-dir", str(out)]
    if task == "segmentation":
        return [sys.executable, str(out.parent / "reference_shim.py"), str(args.seed),
                str(ref / "segmentation" / "train.py"), "--dataset", "voc", "--lr", str(args.seg_lr), *common]
    return [sys.executable, str(out.parent / "reference_shim.py"), str(args.seed),
            str(ref / "detection" / "train.py"), "--dataset", "coco", "--lr", str(args.det_lr), *common]


def ours_command(task: str, args, data: Path, run_dir: Path) -> list:
    over = [f"data.root={data}", f"data.num_workers={args.workers}", f"model.name={MODELS[task]}",
            f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", "train.device=cpu",
            "train.progress_bar=false", "optim.name=sgd", "optim.momentum=0.9", "optim.weight_decay=1e-4",
            f"seed={args.seed}", f"run.dir={run_dir}", "run.overwrite=true"]
    if task == "segmentation":
        over += ["task=segmentation", "data.format=voc", "data.image_size=480", "data.augment.scale_range=[0.5,2.0]",
                 "data.augment.hflip=true", f"data.mean={IMAGENET_MEAN}", f"data.std={IMAGENET_STD}",
                 f"optim.lr={args.seg_lr}", "optim.schedule=poly", "optim.poly_power=0.9", "loss.name=ce"]
    else:
        # the reference's warm-up: from lr/1000 over min(1000, updates in epoch 0 - 1) updates, in epochs here
        per_epoch = args.train_images // args.batch_size
        warmup = min(1000, per_epoch - 1) / per_epoch
        over += ["task=detection", "data.format=coco", "data.image_size=320", "data.aspect_ratio_group_factor=3",
                 "data.augment.hflip=true", f"optim.lr={args.det_lr}", "optim.schedule=step",
                 "optim.step_milestones=[16,22]", f"optim.warmup_epochs={warmup:.6f}", "optim.warmup_start_ratio=0.001"]
    return [sys.executable, "-m", "trainer", "train", "-", *over]


def run_measured(cmd: list, log: Path, env: dict, cwd: Path, timeout: float) -> tuple:
    """(wall seconds, the process tree's rusage, output) of one run; Failed if it did not exit 0. The rusage is
    wait4's for this run alone (the run and the loader workers it waited for): CPU, system time, minor page
    faults, the largest resident set of any of them."""
    with fresh_log(bench_folder(log.parent, "--work"), log.name) as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if wall >= timeout and rc < 0:
            rc = "timeout"
    text = log.read_text(errors="replace")
    if rc != 0:
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise Failed(f"exit {rc}: {tail[0][:300]} (log: {log})")
    return wall, usage, text


def defined_mean(ious: list) -> float:
    """The mean of the IoUs that are defined: a class with no pixel in the labels or the predictions has none
    (the reference prints nan, our eval.json null) on both sides alike."""
    values = [x for x in ious if x is not None and x == x]
    return statistics.fmean(values) if values else float("nan")


def reference_accuracy(task: str, text: str) -> float:
    """The last evaluation the reference printed: mIoU over the scenes' classes, or COCO mAP@[.5:.95]."""
    if task == "segmentation":
        rows = re.findall(r"^IoU: (\[.*\])$", text, flags=re.M)
        if not rows:
            raise Failed("no 'IoU: [...]' line in the reference's output")
        ious = [float(x) / 100 for x in json.loads(rows[-1].replace("'", '"'))]
        return defined_mean(ious[:SCENE_CLASSES])
    maps = re.findall(r"Average Precision\s+\(AP\) @\[ IoU=0\.50:0\.95 \| area=\s+all \| maxDets=100 \] = (-?[\d.]+)",
                      text)
    if not maps:
        raise Failed("no COCOeval summary in the reference's output")
    return float(maps[-1])


def ours_accuracy(task: str, run_dir: Path) -> float:
    metrics = json.loads((run_dir / "model" / "eval.json").read_text())  # the final model's
    if task == "segmentation":  # data.format=voc names the classes VOC's; the scenes' masks hold indices 0-4
        return defined_mean([metrics["per_class"][name]["iou"] for name in VOC_CLASSES[:SCENE_CLASSES]])
    return float(metrics["map"])


def shown(cmd: list, subs: dict) -> str:
    text = " ".join(cmd)
    for old, new in sorted(subs.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(old, new)
    return text


def median_range(values: list, digits: int) -> str:
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", help="a checkout of pytorch/vision's references/ (segmentation/, detection/)")
    p.add_argument("--tasks", default="segmentation,detection")
    p.add_argument("--train-images", type=int, default=64)
    p.add_argument("--val-images", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128, help="side of the generated square images, px")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seg-lr", type=float, default=0.01, help="the segmentation reference's default")
    p.add_argument("--det-lr", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers on both sides")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both sides")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the reference's runs only (repeatable), e.g. glibc's malloc "
                        "tunables (MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_=...) to give it what "
                        "train.keep_freed_memory gives ours")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (reference, ours), the first side alternating")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", help="keep data, run folders and logs here (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, our side only unless a reference")
    args = p.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    if set(tasks) - set(TASKS) or not tasks:
        fail(f"--tasks {args.tasks}: choose from {','.join(TASKS)}")
    if args.smoke:
        args.train_images, args.val_images, args.image_size, args.epochs, args.repeats = 8, 4, 64, 1, 1
        args.batch_size, args.workers = 2, 0
    ref = None
    if args.reference_dir:
        ref = Path(args.reference_dir).expanduser().resolve()
        for t in tasks:
            if not (ref / t / "train.py").is_file():
                fail(f"--reference-dir {args.reference_dir}: no {t}/train.py there (expected a checkout of "
                     f"pytorch/vision's references/ folder)")
    bad = [e for e in args.reference_env if "=" not in e or not e.split("=", 1)[0]]
    if bad:
        fail(f"--reference-env {bad[0]}: give NAME=VALUE")
    reference_env = dict(e.split("=", 1) for e in args.reference_env)
    if args.train_images < 2 * args.batch_size:
        fail(f"--train-images {args.train_images}: need at least 2 batches of --batch-size {args.batch_size}")
    name = "vs-reference" + ("-smoke" if args.smoke else "")
    check_results(args.out, [f"{name}.json", f"{name}.md"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TORCH_HOME": "/nonexistent-torch-home"}  # nothing downloads

    with tempfile.TemporaryDirectory(prefix="vs-reference-") as tmp_name:
        work = Path(args.work).resolve() if args.work else Path(tmp_name)
        bench_folder(work, "--work")  # refused in one line if it is not a folder the bench may write
        write_file(work, "reference_shim.py", SHIM, option="--work")
        results = {}
        for task in tasks:
            data = make_data(task, work, args)
            sides = ["reference", "ours"] if ref else ["ours"]
            runs = {s: {"wall_s": [], "cpu_s": [], "sys_s": [], "faults_m": [], "peak_rss_mb": [], "accuracy": [],
                        "error": None} for s in sides}
            for i in range(args.repeats):
                order = sides if i % 2 == 0 else sides[::-1]  # alternate who goes first: drift hits both alike
                for side in order:
                    r = runs[side]
                    if r["error"]:
                        continue
                    out = work / f"{task}-{side}-r{i + 1}"
                    try:
                        if side == "reference":
                            wall, usage, text = run_measured(reference_command(task, args, ref, data, out),
                                                             work / f"{out.name}.log", {**env, **reference_env},
                                                             work, args.timeout)
                            acc = reference_accuracy(task, text)
                        else:
                            wall, usage, _ = run_measured(ours_command(task, args, data, out),
                                                          work / f"{out.name}.log", env, ROOT, args.timeout)
                            acc = ours_accuracy(task, out)
                    except Failed as err:
                        r["error"] = str(err)
                        print(f"{task} repeat {i + 1}: {side} FAILED: {err}", flush=True)
                        continue
                    cpu = usage.ru_utime + usage.ru_stime
                    r["wall_s"].append(round(wall, 3))
                    r["cpu_s"].append(round(cpu, 3))
                    r["sys_s"].append(round(usage.ru_stime, 3))
                    r["faults_m"].append(round(usage.ru_minflt / 1e6, 3))
                    r["peak_rss_mb"].append(round(usage.ru_maxrss / 1024))  # KiB on Linux
                    r["accuracy"].append(round(acc, 5))
                    print(f"{task} repeat {i + 1}: {side:9s} wall {wall:7.1f} s  cpu {cpu:7.1f} s  "
                          f"system {usage.ru_stime:6.1f} s  faults {usage.ru_minflt / 1e6:5.2f} M  "
                          f"peak RSS {usage.ru_maxrss / 1024:6.0f} MB  accuracy {acc:.4f}", flush=True)
            subs = {str(data): "$DATA", str(work): "$WORK", sys.executable: "python", str(ROOT): "$REPO"}
            if ref:
                subs[str(ref)] = "$REFERENCES"
            results[task] = {
                "model": MODELS[task], "metric": "mIoU (5 scene classes)" if task == "segmentation" else "COCO mAP",
                "runs": runs,
                "commands": {"ours": shown(ours_command(task, args, data, work / f"{task}-ours-rN"), subs),
                             "reference": shown(reference_command(task, args, ref, data,
                                                                  work / f"{task}-reference-rN"), subs)
                             if ref else None}}

    rows = ["| task | model | side | wall s median (min-max) | CPU s median (min-max) | system s median | "
            "page faults M median | peak RSS MB median | accuracy median (min-max) | wall ours/ref | CPU ours/ref |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task, res in results.items():
        runs = res["runs"]
        ratio = {}
        for key in ("wall_s", "cpu_s"):
            if "reference" in runs and runs["reference"][key] and runs["ours"][key]:
                ratio[key] = statistics.median(runs["ours"][key]) / statistics.median(runs["reference"][key])
                res[f"{key}_ratio"] = round(ratio[key], 3)
        for side, r in runs.items():
            cells = [task, res["model"], side, median_range(r["wall_s"], 1), median_range(r["cpu_s"], 1),
                     *[f"{statistics.median(r[k]):.{d}f}" if r[k] else "" for k, d in
                       (("sys_s", 1), ("faults_m", 2), ("peak_rss_mb", 0))],
                     median_range(r["accuracy"], 4)]
            if r["error"]:
                cells[3] = f"failed: {r['error'][:80]}"
            cells += [f"{ratio['wall_s']:.2f}x" if side == "ours" and "wall_s" in ratio else "",
                      f"{ratio['cpu_s']:.2f}x" if side == "ours" and "cpu_s" in ratio else ""]
            rows.append("| " + " | ".join(cells) + " |")
    settings = {k: getattr(args, k) for k in ("train_images", "val_images", "image_size", "epochs", "batch_size",
                                              "seg_lr", "det_lr", "workers", "threads", "seed", "repeats",
                                              "reference_env")}
    path = write_results(args.out, name, {"settings": settings, "tasks": results}, "\n".join(rows))
    print("\n".join(rows))
    print(f"wrote {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
