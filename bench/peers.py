"""Peers: training throughput of the same model, data, batch and precision through our trainer, timm's
train.py and accelerate's examples/complete_cv_example.py, alternating in one run, several repeats; writes the
median img/s of each side and its ratio to ours as JSON + a Markdown table.

The peers are run from checkouts the user names (nothing of them lives in this repo):

    git clone https://github.com/huggingface/pytorch-image-models /tmp/peers/timm
    git clone https://github.com/huggingface/accelerate /tmp/peers/accelerate
    .venv/bin/python bench/peers.py --timm /tmp/peers/timm --accelerate /tmp/peers/accelerate \\
        --model resnet18 --image-size 64 --batch 32 --precision no --repeats 3
    .venv/bin/python bench/peers.py --smoke                       # tiny sizes, our side only (CI)

Interpreter of the peers: --peer-python (default: this one) with PYTHONPATH=<timm checkout>:<accelerate
checkout>/src and HF_HUB_OFFLINE=1 (nothing is downloaded), so each peer runs its own checkout's library (timm's
train.py imports the timm package next to it, the example imports accelerate and timm) and the project's venv
gets nothing installed. Their dependencies (torch, torchvision, pyyaml, huggingface_hub, safetensors, numpy,
psutil) are all ours already.

Data: --data DIR is an ImageFolder with DIR/train/<class>/<image>; without it a synthetic one is written
(--classes x --per-class JPEGs of --image-size px). Every side trains on the same files: ours and timm on
train/ (ours gets a tiny val/ of symlinks so none of train/ is held out, and evaluates it once at the end, not
timed); the accelerate example wants one flat folder with the label in the file name (<label>_<n>.jpg), so
it gets symlinks named that way, and it trains on its own random 80% of them (the rest is its eval split).

What is measured, the same on every side: img/s of the epochs after the first (the first has the start-up,
the allocator and cache warm-up) = images trained in them / the time of their training steps, from the
start of the epoch's data iteration to the end of its last optimizer step, data loading included;
evaluation, checkpointing and process start-up are not in it. How each side's time is read:
  ours        metrics.jsonl rows of type train, one per epoch (train.log_every_steps is set above the
              epoch length): each row's throughput covers the epoch since the previous row.
  timm        its own log: the last "Train: <epoch> [...]" line of an epoch carries the epoch's average
              update time and rate, "(0.123s, 260.12/s)", where an update's time runs from the end of the
              previous update (the first from the start of the epoch) to the end of this one. Its training
              loader drops the last partial batch, so every update is one full batch.
  accelerate  the example prints no timing, so it runs inside a small shim (written next to the data at run
              time) that loads the example file as a module and calls its own main() with its own command
              line, and times each epoch from the model.train() call at the epoch's start to the
              model.eval() call after its last step; images are counted in a forward pre-hook.
The reported number is the median over --repeats of the steady img/s, with min-max; ratio = side / ours.
Each epoch's first step carries that side's per-epoch start cost (the accelerate example forks its loader
workers again every epoch), so short epochs magnify it: give each epoch enough steps (--per-class, or a real
--data) for the number to mean what a long run sees. On a shared machine the spread between repeats
shows how much of a difference is noise.

Settings that make the sides do the same work, and what cannot be made equal (also in the table's notes):
  model       --model on our side (torchvision's implementation) and --peer-model (default the same name) in
              timm's registry: resnet18/34/50 are the same architecture in both. Our small-input stem
              (3x3 stride-1 conv, no max-pool, automatic at <= 64 px) is switched off
              (model.small_input_stem=false) so every side runs the ImageNet stem; the default image size is
              64 px, where that stem leaves a 2x2 final map (use --image-size 224 for ImageNet-like work).
  augment     random-resized-crop (scale 0.08-1, bilinear) + horizontal flip on ours and timm (ours:
              data.augment.random_resized_crop=true; timm: --color-jitter 0 --reprob 0, no label smoothing;
              timm runs no evaluation (--val-split '') and saves a checkpoint per epoch, untimed).
              The example's transforms are fixed: RandomResizedCrop(scale 0.5-1) + ToTensor, no flip, with
              the normalisation done on the device.
  optimizer   SGD momentum 0.9, weight decay 5e-4, cosine schedule on ours and timm; the example's Adam +
              OneCycleLR are fixed.
  accelerate  its batch size, image size, epoch count, lr and seed live in a dict inside its main() and its
              model is hard-coded to a pretrained resnet50d with the backbone frozen, trained with 4 loader
              workers; the shim replaces the dict (batch, image size, epochs), swaps the model for
              --peer-model without pretrained weights, unfreezes the backbone (so backward runs through the
              whole network, as on the other sides) and sets the workers to --workers. The example's own
              loop, data set class, transforms, optimizer and evaluation are run unchanged.
  loaders     --workers on every side; ours and timm keep their workers across epochs (persistent_workers),
              the example starts them again every epoch.
              timm needs at least 1 worker (its loader always asks for persistent workers).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from gate import bench_folder, check_results, fresh_log, result_files, write_file, write_results

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "timm", "accelerate")

# Runs accelerate's complete_cv_example.py with the benchmark's settings and times its epochs. Written to the
# work folder at run time and run with the peer interpreter; the example file itself is loaded from the
# user's checkout, unmodified. argv: example path, JSON options, then the example's own command line.
ACCELERATE_SHIM = '''\
import importlib.util, json, sys, time
import torch
import timm

example, opts = sys.argv[1], json.loads(sys.argv[2])
sys.argv = [example] + sys.argv[3:]
spec = importlib.util.spec_from_file_location("complete_cv_example", example)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
marks, seen = [], [0]  # marks: [start|end, perf_counter seconds, training images seen so far]


def mark(kind, model):
    if torch.cuda.is_available() and not opts["cpu"]:
        torch.cuda.synchronize()  # the epoch ends when its last step has run, not when it was queued
    marks.append([kind, time.perf_counter(), seen[0]])
    if len(marks) == 1:  # the example has set requires_grad by now: show what trains
        params = list(model.parameters())
        print(f"[shim] {opts['model']}: {sum(p.numel() for p in params if p.requires_grad)} of "
              f"{sum(p.numel() for p in params)} parameters train", flush=True)


def create_model(name, pretrained=False, **kwargs):
    model = timm.create_model(opts["model"], pretrained=False, **kwargs)  # the benchmark's model, no download
    if opts["unfreeze"]:
        model.get_classifier = lambda: model  # the example re-enables grads on get_classifier(): the whole net
    plain_train = model.train

    def train(mode=True):  # model.train() opens an epoch, model.eval() (= train(False)) closes it
        mark("start" if mode else "end", model)
        return plain_train(mode)

    model.train = train
    model.register_forward_pre_hook(lambda m, inputs: seen.__setitem__(0, seen[0] + inputs[0].shape[0])
                                    if m.training else None)
    return model


def data_loader(*args, **kwargs):
    kwargs["num_workers"] = opts["workers"]
    return torch.utils.data.DataLoader(*args, **kwargs)


plain_training_function = mod.training_function


def training_function(config, args):
    plain_training_function({**config, **opts["config"]}, args)
    with open(opts["marks"], "w") as f:
        json.dump(marks, f)


mod.create_model, mod.DataLoader, mod.training_function = create_model, data_loader, training_function
mod.main()
'''


class Failed(Exception):
    """A side's run failed or printed nothing measurable; the message says which and why."""


def fail(message: str) -> None:
    print(f"peers.py: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- data ----

def make_synthetic(root: Path, classes: int, per_class: int, size: int) -> Path:
    """classes x per_class JPEGs (quality 90) of smooth random content with a per-class tint, in train/<class>/.
    `root` lies in a work folder of this run alone (a temporary folder, or a --work that was new or empty)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        class_dir = root / "train" / f"class{c:02d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        tint = rng.integers(0, 255, 3)
        for i in range(per_class):
            base = rng.integers(0, 255, (max(size // 8, 2), max(size // 8, 2), 3)).astype(np.float32)
            pixels = (0.6 * base + 0.4 * tint).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.BICUBIC).save(class_dir / f"{i:05d}.jpg", quality=90)
    return root


def train_files(data: Path) -> dict:
    """{class: [image paths]} of data/train, sorted (the ImageFolder order every side uses)."""
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
    found = {}
    for folder in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts)
        if files:
            found[folder.name] = files
    if len(found) < 2:
        fail(f"--data {data}: need at least 2 class folders with images under {data / 'train'}")
    return found


def build_views(data: Path, files: dict, work: Path) -> tuple:
    """Symlink views of the same files: ImageFolder (train/ + a 2-per-class val/) and the example's flat folder,
    in `work`, a folder of this run alone (a temporary folder, or a --work that was new or empty): the write gate
    makes no links."""
    folder_view, flat_view = work / "view-imagefolder", work / "view-flat"
    folder_view.mkdir(parents=True)
    (folder_view / "train").symlink_to((data / "train").resolve(), target_is_directory=True)
    flat_view.mkdir()
    for name, paths in files.items():
        (folder_view / "val" / name).mkdir(parents=True)
        for i, path in enumerate(paths[:2]):
            (folder_view / "val" / name / f"{i}{path.suffix}").symlink_to(path.resolve())
        for i, path in enumerate(paths):
            # the example reads *.jpg only and takes the label from "<label>_<n>.jpg"; PIL goes by content
            (flat_view / f"{name}_{i}.jpg").symlink_to(path.resolve())
    return folder_view, flat_view


# ---- sides ----

def run_logged(cmd: list, log: Path, env: dict, cwd: Path, timeout: float) -> str:
    with fresh_log(bench_folder(log.parent, "--work"), log.name) as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    if rc != 0:
        tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
        raise Failed(f"exit {rc}: {tail[0][:300]} (log: {log})")
    return text


def steady(epochs: list) -> tuple:
    """(img/s over epochs 2.., per-epoch rows) from [(images, seconds)] per epoch; epoch 1 is warm-up."""
    if len(epochs) < 2:
        raise Failed(f"only {len(epochs)} epoch(s) measured; need 2 or more (the first is warm-up)")
    rest = epochs[1:]
    rows = [{"images": n, "seconds": round(s, 4), "img_s": round(n / s, 2)} for n, s in epochs]
    return sum(n for n, _ in rest) / sum(s for _, s in rest), rows


def ours_command(args, view: Path, run_dir: Path) -> list:
    over = [f"data.root={view}", "data.format=imagefolder", f"data.image_size={args.image_size}",
            f"data.num_workers={args.workers}", "data.verify_images=false",  # start-up only; not timed anyway
            "data.mean=[0.485,0.456,0.406]", "data.std=[0.229,0.224,0.225]",  # timm's defaults; skips measuring
            "data.augment.random_resized_crop=true", "data.augment.rrc_min_scale=0.08", "data.augment.hflip=true",
            f"model.name={args.model}", "model.small_input_stem=false",  # the ImageNet stem, as in timm
            f"model.channels_last={str(args.channels_last).lower()}",
            f"train.batch_size={args.batch}", f"train.epochs={args.epochs}", f"train.mixed_precision={args.precision}",
            f"train.device={'cpu' if args.device == 'cpu' else 'auto'}", "train.progress_bar=false",
            "train.log_every_steps=1000000",  # one metrics row per epoch, written at its end
            "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4",
            "optim.schedule=cosine", "eval.every_epochs=0", "checkpoint.every_epochs=0",
            f"run.dir={run_dir}", "run.overwrite=true"]
    return [sys.executable, "-m", "trainer", "train", "-", *over]


def ours_side(args, view: Path, work: Path, tag: str, env: dict) -> tuple:
    run_dir = work / f"ours-{tag}"
    cmd = ours_command(args, view, run_dir)
    run_logged(cmd, work / f"ours-{tag}.log", env, ROOT, args.timeout)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if r["type"] == "train"]
    epochs, before = [], 0
    for r in train_rows:  # samples_seen is cumulative; throughput = the row's images / its seconds
        n = r["samples_seen"] - before
        before = r["samples_seen"]
        epochs.append((n, n / r["throughput"]))
    return steady(epochs)


def timm_command(args, timm: Path, view: Path, out: Path, classes: int) -> list:
    cmd = [args.peer_python, str(timm / "train.py"), str(view), "--train-split", "train", "--val-split", "",
           "--model", args.peer_model, "--num-classes", str(classes), "--img-size", str(args.image_size),
           "-b", str(args.batch), "--epochs", str(args.epochs), "--device", args.device_name,
           "--workers", str(args.workers), "--opt", "sgd", "--lr", "0.05", "--momentum", "0.9",
           "--weight-decay", "5e-4", "--sched", "cosine", "--warmup-epochs", "0", "--smoothing", "0",
           "--color-jitter", "0", "--reprob", "0", "--hflip", "0.5", "--scale", "0.08", "1.0",
           "--train-interpolation", "bilinear", "--log-interval", "1000000", "--seed", "0",
           "--output", str(out), "--experiment", "run", "--checkpoint-hist", "1"]
    if args.precision == "bf16":
        cmd += ["--amp", "--amp-dtype", "bfloat16"]
    if args.channels_last:
        cmd += ["--channels-last"]
    return cmd


# "Train: 1 [   9/10 (100%)]  Loss: ...  Time: 0.412s,   77.67/s  (0.398s,   80.40/s)  LR: ..."
TIMM_LINE = re.compile(r"Train: (\d+) \[\s*(\d+)/(\d+) .*?Time: [\d.]+s,\s*[\d.]+/s\s+\(([\d.]+)s,\s*([\d.]+)/s\)")


def timm_side(args, timm: Path, view: Path, work: Path, tag: str, env: dict, classes: int) -> tuple:
    cmd = timm_command(args, timm, view, work / f"timm-{tag}", classes)
    text = run_logged(cmd, work / f"timm-{tag}.log", env, work, args.timeout)
    epochs = []
    for m in TIMM_LINE.finditer(text):
        idx, per_epoch, avg_rate = int(m[2]), int(m[3]), float(m[5])
        if idx == per_epoch - 1:  # the epoch's last update: the averages cover the whole epoch
            # avg rate = batch / mean update time (printed to 0.01 img/s, finer than the 1 ms of the time)
            epochs.append((args.batch * per_epoch, args.batch * per_epoch / avg_rate))
    if not epochs:
        raise Failed(f"no 'Train: ...' epoch-end lines in timm's output (log: {work / f'timm-{tag}.log'})")
    return steady(epochs)


def accelerate_command(args, accelerate: Path, flat: Path, work: Path, tag: str) -> list:
    opts = {"model": args.peer_model, "unfreeze": True, "workers": args.workers, "cpu": args.device == "cpu",
            "marks": str(work / f"accelerate-{tag}.marks.json"),
            "config": {"batch_size": args.batch, "image_size": args.image_size, "num_epochs": args.epochs}}
    cmd = [args.peer_python, str(work / "accelerate_shim.py"), str(accelerate / "examples" / "complete_cv_example.py"),
           json.dumps(opts), "--data_dir", str(flat), "--mixed_precision", args.precision,
           "--output_dir", str(work / f"accelerate-{tag}")]
    return cmd + (["--cpu"] if args.device == "cpu" else [])


def accelerate_side(args, accelerate: Path, flat: Path, work: Path, tag: str, env: dict) -> tuple:
    cmd = accelerate_command(args, accelerate, flat, work, tag)
    run_logged(cmd, work / f"accelerate-{tag}.log", env, work, args.timeout)
    marks = json.loads((work / f"accelerate-{tag}.marks.json").read_text())
    epochs, start = [], None
    for kind, t, seen in marks:
        if kind == "start":
            start = (t, seen)
        elif start is not None:  # the example calls model.eval() once per epoch, after its last step
            epochs.append((seen - start[1], t - start[0]))
            start = None
    return steady(epochs)


# ---- report ----

def shown(cmd: list, subs: dict) -> str:
    """The command with the long temporary paths named (the JSON keeps them in full)."""
    text = shlex.join(str(c) for c in cmd)
    for path, name in sorted(subs.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


def notes_for(side: str, args, flat_count: int) -> str:
    gpu = {"timm": "; on CUDA it also turns on cudnn.benchmark and TF32 matmul",
           "accelerate": "; on CUDA it leaves cudnn.benchmark off"}.get(side, "") if args.device == "cuda" else ""
    return _notes(side, args, flat_count) + gpu


def _notes(side: str, args, flat_count: int) -> str:
    if side == "ours":
        return (f"torchvision {args.model}, small_input_stem=false; RRC(0.08-1)+flip; SGD+cosine; "
                f"persistent workers")
    if side == "timm":
        return (f"timm {args.peer_model}; RRC(0.08-1)+flip, prefetcher normalises on device; SGD+cosine; "
                f"persistent workers; drops the last partial batch")
    return (f"the example's loop run through a shim: timm {args.peer_model} instead of its hard-coded pretrained "
            f"resnet50d, backbone unfrozen, batch/size/epochs/workers set by the shim; RRC(0.5-1), no flip; "
            f"Adam+OneCycle; trains on its random 80% ({int(0.8 * flat_count)} of {flat_count}) images; "
            f"timed by model.train()/eval() hooks, not by its output")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--timm", help="a checkout of huggingface/pytorch-image-models (with train.py)")
    p.add_argument("--accelerate", help="a checkout of huggingface/accelerate (with examples/complete_cv_example.py)")
    p.add_argument("--peer-python", default=sys.executable, help="interpreter for the peers (default: this one)")
    p.add_argument("--data", help="ImageFolder with train/<class>/<image>; default: synthetic JPEGs")
    p.add_argument("--classes", type=int, default=10, help="synthetic data: classes")
    p.add_argument("--per-class", type=int, default=32, help="synthetic data: training images per class")
    p.add_argument("--model", default="resnet18", help="our model name (trainer.models)")
    p.add_argument("--peer-model", help="the same architecture's name in timm (default: --model)")
    p.add_argument("--image-size", type=int, default=64, help="network input side, px")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="per run; the first is warm-up and not counted")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--channels-last", action="store_true", help="ours and timm only (the example has no switch)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers on every side (timm needs >= 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto: the GPU when there is one")
    p.add_argument("--repeats", type=int, default=3, help="rounds of (ours, timm, accelerate), alternating")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per side per repeat")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", help="keep data, run folders and logs here (default: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: a check that it runs")
    args = p.parse_args()
    if args.smoke:
        args.classes, args.per_class, args.image_size, args.batch, args.epochs, args.repeats = 4, 10, 32, 8, 2, 1
        args.workers = 1 if args.timm else 0  # timm needs >= 1; 0 avoids worker start-up in the check
    args.peer_model = args.peer_model or args.model
    if args.epochs < 2:
        fail(f"--epochs {args.epochs}: need 2 or more (the first epoch is warm-up and not counted)")
    # every path problem is found before any work, each as one line naming the path
    checkouts = {}
    for side, rel in (("timm", "train.py"), ("accelerate", "examples/complete_cv_example.py")):
        given = getattr(args, side)
        if given is None:
            continue
        path = Path(given).expanduser()
        if not (path / rel).is_file():
            fail(f"--{side} {given}: no {rel} there (expected a checkout of "
                 f"{'huggingface/pytorch-image-models' if side == 'timm' else 'huggingface/accelerate'})")
        checkouts[side] = path.resolve()
    if args.timm and args.workers < 1:
        fail(f"--workers {args.workers}: timm's train.py needs at least 1 (its loader asks for persistent workers)")
    if checkouts and not (Path(args.peer_python).is_file() and os.access(args.peer_python, os.X_OK)):
        fail(f"--peer-python {args.peer_python}: not an executable file")
    if args.data and not (Path(args.data) / "train").is_dir():
        fail(f"--data {args.data}: no train/ folder there (expected train/<class>/<image>)")

    import torch  # after the argument checks: a wrong path fails in a fraction of a second

    args.device_name = "cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu"
    args.device = args.device_name
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    peer_path = [str(checkouts["timm"])] if "timm" in checkouts else []
    peer_path += [str(checkouts["accelerate"] / "src")] if "accelerate" in checkouts else []
    peer_env = {**env, "PYTHONPATH": os.pathsep.join(peer_path + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    tag = (f"{args.model}-{args.image_size}px-b{args.batch}-{args.precision}-{args.device}"
           f"{'-smoke' if args.smoke else ''}")
    check_results(args.out, result_files(f"peers-{tag}"))

    with tempfile.TemporaryDirectory(prefix="peers-") as tmp_name:
        work = Path(args.work).resolve() if args.work else Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            fail(f"--work {work}: not empty")
        data = Path(args.data).resolve() if args.data else make_synthetic(work / "data", args.classes,
                                                                           args.per_class, args.image_size)
        files = train_files(data)
        classes, images = len(files), sum(len(v) for v in files.values())
        if images < 2 * args.batch:
            fail(f"{images} training images: need at least 2 batches of --batch {args.batch}")
        view, flat = build_views(data, files, work)
        write_file(work, "accelerate_shim.py", ACCELERATE_SHIM, option="--work")
        versions = {"torch": torch.__version__}
        if checkouts:
            probe = ("import json, torch; v = {'peer_torch': torch.__version__}\n"
                     "for m in ('timm', 'accelerate'):\n"
                     "    try: v[m] = __import__(m).__version__\n"
                     "    except Exception as e: v[m] = 'not importable: ' + str(e)[:100]\n"
                     "print(json.dumps(v))")
            res = subprocess.run([args.peer_python, "-c", probe], capture_output=True, text=True, env=peer_env)
            versions.update(json.loads(res.stdout) if res.returncode == 0 else {"peer": res.stderr[-300:]})

        results = {s: {"img_s": [], "epochs": [], "error": None} for s in SIDES}
        for i in range(args.repeats):  # alternate, so drift in machine speed hits every side alike
            for side in SIDES:
                if side != "ours" and side not in checkouts:
                    continue
                if results[side]["error"]:
                    continue
                r_tag = f"r{i + 1}"
                started = time.time()
                try:
                    if side == "ours":
                        rate, rows = ours_side(args, view, work, r_tag, env)
                    elif side == "timm":
                        rate, rows = timm_side(args, checkouts["timm"], view, work, r_tag, peer_env, classes)
                    else:
                        rate, rows = accelerate_side(args, checkouts["accelerate"], flat, work, r_tag, peer_env)
                except Failed as err:
                    results[side]["error"] = str(err)
                    print(f"repeat {i + 1}: {side} FAILED: {err}", flush=True)
                    continue
                results[side]["img_s"].append(rate)
                results[side]["epochs"].append(rows)
                print(f"repeat {i + 1}: {side:10s} {rate:8.1f} img/s (run {time.time() - started:.0f} s)", flush=True)

        subs = {str(view): "$DATA", str(flat): "$FLAT", str(work): "$WORK", sys.executable: "python",
                str(ROOT): "$REPO"}
        subs.update({str(v): f"${k.upper()}" for k, v in checkouts.items()})
        if args.peer_python != sys.executable:
            subs[args.peer_python] = "$PEER_PYTHON"
        commands = {"ours": ours_command(args, view, work / "ours-rN"),
                    "timm": timm_command(args, checkouts["timm"], view, work / "timm-rN", classes)
                    if "timm" in checkouts else None,
                    "accelerate": accelerate_command(args, checkouts["accelerate"], flat, work, "rN")
                    if "accelerate" in checkouts else None}
        ours_median = statistics.median(results["ours"]["img_s"]) if results["ours"]["img_s"] else None
        sides = {}
        for side in SIDES:
            r = results[side]
            run = side == "ours" or side in checkouts
            med = statistics.median(r["img_s"]) if r["img_s"] and not r["error"] else None
            sides[side] = {
                "status": "ok" if med is not None else ("failed" if run else "not run"),
                "error": r["error"], "command": [str(c) for c in commands[side]] if commands[side] else None,
                "command_shown": shown(commands[side], subs) if commands[side] else None,
                "img_s": r["img_s"], "median": med, "min": min(r["img_s"]) if med else None,
                "max": max(r["img_s"]) if med else None,
                "ratio_vs_ours": med / ours_median if med is not None and ours_median else None,
                "epochs_per_repeat": r["epochs"],
                "notes": notes_for(side, args, images) if run else "no checkout given",
            }
        if not args.work:
            for s in sides.values():  # the temporary folder is gone after this run
                s["error"] = s["error"] and s["error"].split(" (log: ")[0]

    result = {
        "benchmark": "peers", "model": args.model, "peer_model": args.peer_model, "image_size": args.image_size,
        "batch": args.batch, "precision": args.precision, "channels_last": args.channels_last,
        "workers": args.workers, "device": args.device, "epochs": args.epochs, "measured_epochs": args.epochs - 1,
        "repeats": args.repeats, "data": str(data) if args.data else "synthetic", "classes": classes,
        "train_images": images, "sides": sides, "versions": versions,
        "paths": {k: str(v) for k, v in checkouts.items()},
        "peer_python": args.peer_python if checkouts else None, "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.platform(),
        "cpu_count": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    lines = [f"{args.model} ({args.peer_model} in timm), {args.image_size} px, batch {args.batch}, precision "
             f"{args.precision}, {args.device}, {args.workers} workers, {classes} classes x "
             f"{images // classes} images, {args.epochs} epochs (first not counted), {args.repeats} repeats; "
             f"img/s over the training steps of the counted epochs.", "",
             "| side | command | img/s median (min-max) | ratio vs ours | notes |", "|---|---|---|---|---|"]
    for side, s in sides.items():
        if s["status"] == "ok":
            value = f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"
            ratio = f"{s['ratio_vs_ours']:.2f}x" if s["ratio_vs_ours"] is not None else "-"
        else:
            value, ratio = s["status"], "-"
        note = s["notes"] + (f"; error: {s['error']}" if s["error"] else "")
        cmd = f"`{s['command_shown']}`" if s["command_shown"] else "-"
        lines.append(f"| {side} | {cmd} | {value} | {ratio} | {note.replace('|', '/')} |")
    write_results(args.out, f"peers-{tag}", result, "\n".join(lines))
    print("\n".join(lines[2:]))
    if any(s["status"] == "failed" for s in sides.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
