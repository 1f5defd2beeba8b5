"""GPU check (issue 17): one command that runs every CUDA test of the trainer and measures its headline numbers
side by side on one GPU, within one short lease; prints a table and writes JSON + Markdown.

    python bench/gpu_check.py                                            # a GPU machine: < 9 min on one H100/H200
    python bench/gpu_check.py --cifar-train-tar train.tar --cifar-test-tar test.tar [--timm PATH] --out DIR
    python bench/gpu_check.py --dry-run --out /tmp/gpucheck              # CPU, tiny sizes (what CI runs), ~1-2 min
    python bench/gpu_check.py --parts correctness,overhead_eager         # again, only what a fix touched

Parts, in the order they run. A part that fails does not stop the next. A part is not started when less of
--budget-s is left than it needs (it is then "skipped" with that reason), and a running one is stopped when
the budget is spent ("timed out"); the table is written either way.
  environment        GPU name, driver, torch / CUDA / cuDNN versions, git revision
  matmul             bf16 8192^3 matrix products timed with CUDA events: the peak the MFU is measured against
  correctness        `pytest -m cuda tests/test_cuda.py`: passed / failed / skipped, with the skip reasons
  overhead_eager     bench/overhead.py: the trainer against a bare PyTorch loop, ResNet-50 at 224 px, bf16 +
                     channels_last, synthetic images held on the device (data.loader=device), alternating repeats
  cifar10_airbench   configs/airbench_cifar10.yaml on the CIFAR-10 JPEGs: the wall time of the whole command and
                     its final test accuracy (the time to 94% when it gets there)
  overhead_compiled  the same as overhead_eager with model.compile on both sides
                     (both need bench/overhead.py's --device --image-size --channels-last --compile --data; until
                     it has them these two parts are skipped with that reason)
  mfu                ResNet-50 img/s of both overhead parts x the GFLOP of a forward + backward per image
                     (torch.utils.flop_counter) / the matmul rate of the same call
  resnet18_cifar10   bench/step_throughput.py: ResNet-18 training steps on CIFAR-sized (32 px) batches
  gpu_decode         bench/input_pipeline.py --decode-device cuda: training batches (640x480 JPEGs, random
                     resized crop to 224, flip) ready on the GPU, decoded by the loader workers on the CPU against
                     data.decode_device=cuda's nvJPEG batches, with 2 and 8 workers
  timm               bench/peers.py --timm: our trainer and timm's train.py on ResNet-50 224 px bf16 + channels_last

--dry-run runs the same parts on the CPU with tiny sizes (small models, a few steps, generated JPEGs packed as
the CIFAR tarballs, peers.py on our side alone without --timm), so that no path of this script rots between
leases. The CUDA tests are skipped there (CUDA hidden from them, as on any CPU machine), and every number is
marked dry-run: it says that the code ran, not how fast anything is.

Output: <out>/gpu-check.{json,md,log} (dry run: gpu-check-dry-run.*), the pytest JUnit XML beside them; the
log holds every command's full output.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

STARTED = time.time()  # the budget counts from here: interpreter start-up and imports are part of a lease
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from gate import bench_folder, check_results, fresh_log, result_files, write_file, write_results  # noqa: E402

OVERHEAD_SCRIPT = BENCH / "overhead.py"
# what this check needs from bench/overhead.py besides its existing flags: both sides on the GPU at 224 px,
# channels_last and compiled (without --device its bare loop runs on the CPU whatever the trainer uses), and
# one folder of generated images for both overhead parts (drawing them costs ~25 ms each at 224 px)
OVERHEAD_FLAGS = ("--device", "--image-size", "--channels-last", "--compile", "--data")
RESERVE_S = 10  # of the budget, kept for writing the table after the last part
# What the parts import, as {module: the name pip installs it under}: the trainer's dependencies (pyproject.toml's
# `dependencies`; tests/test_bench_gpu_check.py keeps the two lists equal) and pytest for the CUDA tests. A GPU
# machine's image may hold torch and most of them but not all (the lent H200s have neither omegaconf nor
# pycocotools): every missing one is named at once, before any work, instead of each part failing in turn.
NEEDED = {"torch": "torch", "torchvision": "torchvision", "accelerate": "accelerate", "omegaconf": "omegaconf",
          "safetensors": "safetensors", "numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm",
          "matplotlib": "matplotlib", "sklearn": "scikit-learn", "xxhash": "xxhash", "pycocotools": "pycocotools",
          "timm": "timm", "pytest": "pytest"}


# ---- sizes: a lease (GPU) and the dry run (CPU) ----

@dataclass(frozen=True)
class Sizes:
    device: str
    matmul_n: int  # side of the square bf16 matrices
    matmul_reps: int  # timed products, after 3 untimed ones
    overhead: tuple  # bench/overhead.py arguments of both overhead parts
    overhead_repeats: tuple  # (eager, compiled): alternating (bare, trainer) pairs
    flops_model: tuple  # (model, image px) of the overhead parts, whose GFLOP per image the MFU uses
    airbench: tuple  # overrides added to configs/airbench_cifar10.yaml
    resnet18: tuple  # bench/step_throughput.py arguments
    decode: tuple  # bench/input_pipeline.py arguments
    peers: tuple  # bench/peers.py arguments
    budget_s: int
    needs_s: dict  # part -> seconds it needs to be worth starting
    cap_s: dict  # part -> longest it may run (a hung collective must not eat the other parts' time)


GPU = Sizes(
    device="cuda", matmul_n=8192, matmul_reps=10,
    # 4 classes x 384 images = 6 updates of 256 per epoch; epoch 1 (warm-up, cuDNN autotuning, compilation) is
    # not counted, epochs 2-5 are (24 updates)
    overhead=("--device", "cuda", "--model", "resnet50", "--image-size", "224", "--batch", "256", "--per-class", "384",
              "--epochs", "5", "--loader", "device", "--precision", "bf16", "--channels-last"),
    overhead_repeats=(3, 2), flops_model=("resnet50", 224),
    airbench=(),  # the recipe as written: it already holds the GPU path (device data, bf16, channels_last)
    resnet18=("--device", "cuda", "--batch", "512", "--steps", "30", "--warmup", "5", "--repeats", "3"),
    decode=("--decode-device", "cuda", "--workers", "2,8", "--photo-count", "1000", "--limit", "1000",
            "--repeats", "3"),
    peers=("--model", "resnet50", "--image-size", "224", "--batch", "256", "--precision", "bf16", "--channels-last",
           "--epochs", "3", "--repeats", "1", "--classes", "10", "--per-class", "256", "--workers", "12"),
    # 510 s: the whole command, pip install and interpreter start included, inside 9 minutes
    budget_s=510,
    needs_s={"matmul": 10, "correctness": 60, "overhead_eager": 60, "cifar10_airbench": 60, "overhead_compiled": 120,
             "resnet18_cifar10": 20, "gpu_decode": 40, "timm": 90},
    cap_s={"correctness": 270, "overhead_eager": 150, "cifar10_airbench": 180, "overhead_compiled": 240,
           "resnet18_cifar10": 90, "gpu_decode": 90, "timm": 180},
)

DRY = Sizes(
    device="cpu", matmul_n=512, matmul_reps=5,
    overhead=("--device", "cpu", "--model", "small_cnn", "--image-size", "32", "--batch", "16", "--per-class", "20",
              "--epochs", "2", "--loader", "device", "--precision", "bf16", "--channels-last"),
    overhead_repeats=(1, 1), flops_model=("small_cnn", 32),
    # 80 images: two updates of 32 and a smaller last one; the warm-up must fit in the one epoch
    airbench=("train.device=cpu", "train.epochs=1", "train.batch_size=32", "optim.warmup_epochs=0.3"),
    resnet18=("--device", "cpu", "--batch", "8", "--steps", "2", "--warmup", "1", "--repeats", "1"),
    decode=("--smoke", "--decode-device", "cpu"),  # the decoder's code on the CPU (libjpeg-turbo, not nvJPEG)
    peers=("--smoke", "--device", "cpu"),
    budget_s=300,
    needs_s={"matmul": 1, "correctness": 10, "overhead_eager": 10, "cifar10_airbench": 15, "overhead_compiled": 20,
             "resnet18_cifar10": 10, "gpu_decode": 10, "timm": 15},
    cap_s={},
)


# ---- running parts ----

class Skip(Exception):
    """The part cannot run here (an input not given, a part it depends on missing); the message says why."""


class Failed(Exception):
    """The part ran and failed; the message is one line."""


class TimedOut(Exception):
    """The part was stopped at its time limit."""


@dataclass
class Part:
    name: str
    status: str = "ok"  # ok | failed | timed out | skipped
    summary: str = ""
    seconds: float = 0.0
    result: dict = field(default_factory=dict)


class Context:
    """What every part shares: arguments, sizes, the clock of the budget, the work folder and the log. The
    files left in --out (the log, the tests' XML, the table) go through the write gate; the work folder is
    this run's alone (a temporary folder, or a --work that check_args found new or empty)."""

    def __init__(self, args, sizes: Sizes, out: Path, work: Path, tag: str):
        self.args, self.sizes, self.out, self.work, self.tag = args, sizes, out, work, tag
        self.dry = args.dry_run
        self.budget = args.budget_s if args.budget_s is not None else sizes.budget_s
        self.t0 = STARTED
        self.out_folder = bench_folder(out, "--out")
        self.log = out / f"{tag}.log"
        fresh_log(self.out_folder, self.log.name).close()  # this run's alone: an earlier run's is removed
        self.parts: dict = {}
        self.environment: dict = {}  # filled by the environment part
        self.selected = (set(args.parts.split(",")) | {"environment"}) if args.parts else {name for name, _ in PARTS}

    def left(self) -> float:
        return self.budget - (time.time() - self.t0)

    def run(self, cmd: list, part: str, env: Optional[dict] = None, check: bool = True) -> int:
        """Run cmd with its output appended to the log; at most until the part's cap or the budget's end."""
        cap, left = self.sizes.cap_s.get(part), self.left() - RESERVE_S
        timeout, limit = (cap, "its cap") if cap and cap < left else (max(left, 1.0), "the budget")
        with self.out_folder.append(self.log.name) as log:
            log.write(f"\n==== {part}: {shlex.join(str(c) for c in cmd)}\n")
            log.flush()
            start = log.tell()
            # its own process group: a stop ends its children too (torchrun's ranks, the tests' trainer runs,
            # loader workers), which would otherwise hold the GPU while the next part is measured
            proc = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, process_group=0)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TimedOut(f"stopped after {timeout:.0f} s ({limit}; output in {self.log.name})") from None
            finally:  # also after a normal exit: children it left behind (the group outlives its leader)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if check and rc != 0:
            with open(self.log) as log:
                log.seek(start)
                lines = [line.strip() for line in log.read().splitlines() if line.strip()]
            raise Failed(f"exit {rc}: {(lines or ['(no output)'])[-1][:300]} (output in {self.log.name})")
        return rc


def run_parts(ctx: Context, parts: list) -> list:
    done = []
    for name, fn in parts:
        part, started = Part(name), time.time()
        needs = ctx.sizes.needs_s.get(name)  # None: no subprocess, a second or less (always run)
        if name not in ctx.selected:
            part.status, part.summary = "skipped", "not selected (--parts)"
        elif needs is not None and ctx.left() - RESERVE_S < needs:
            part.status = "skipped"
            part.summary = (f"not started: {max(ctx.left(), 0):.0f} s of the {ctx.budget:.0f} s budget left, "
                            f"it needs about {needs} s")
        else:
            try:
                part.summary, part.result = fn(ctx)
            except Skip as why:
                part.status, part.summary = "skipped", str(why)
            except TimedOut as why:
                part.status, part.summary = "timed out", str(why)
            except Failed as why:
                part.status, part.summary = "failed", str(why)
            except Exception as err:  # a bug here must not cost the table of the parts that did run
                first = (str(err).strip().splitlines() or [""])[0]
                part.status, part.summary = "failed", f"{type(err).__name__}: {first}"[:300]
        part.seconds = round(time.time() - started, 1)
        ctx.parts[name] = part
        done.append(part)
        print(f"[gpu_check] {name}: {part.status} ({part.seconds:.0f} s) {part.summary}", flush=True)
    return done


def shown(cmd: list, ctx: Context) -> str:
    """A command as a user would type it in the repo root (work folder and interpreter named)."""
    text = shlex.join(str(c) for c in cmd)
    return text.replace(str(ctx.work), "$WORK").replace(sys.executable, "python").replace(str(ROOT) + "/", "")


# ---- environment and the matmul peak ----

def nvidia_smi() -> dict:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as err:
        return {"driver": f"unknown (nvidia-smi: {type(err).__name__})"}
    first = (res.stdout.strip().splitlines() or [""])[0].split(", ")
    if res.returncode != 0 or len(first) < 3:
        return {"driver": f"unknown (nvidia-smi exit {res.returncode})"}
    return {"gpu_name": first[0], "driver": first[1], "gpu_memory": first[2]}


def environment_part(ctx: Context):
    import accelerate
    import torch
    import torchvision

    from step_throughput import cpu_model
    from trainer.rundir import git_revision

    env = {"mode": "dry-run" if ctx.dry else "gpu", "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "accelerate": accelerate.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           # a copied tree (a lent GPU's) may have no .git: then --git-revision, or say so rather than guess
           "git_revision": ctx.args.git_revision or git_revision() or "unknown (no git checkout here)",
           "host": platform.node(),
           "cpu": cpu_model(), "cpu_count": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        env.update(gpus=[torch.cuda.get_device_name(i) for i in range(gpus)], **nvidia_smi())
    ctx.environment = env
    rev = env["git_revision"]
    short = rev if rev.startswith("unknown") else rev[:12] + ("-dirty" if rev.endswith("-dirty") else "")
    versions = f"torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), git {short}"
    if gpus and not ctx.dry:
        return (f"{env['gpus'][0]} x{gpus}, driver {env.get('driver')}, {env.get('gpu_memory', '?')}; {versions}",
                env)
    return f"CPU {env['cpu']} ({env['cpu_count']} cores); {versions}", env


def matmul_part(ctx: Context):
    import torch

    n, reps, device = ctx.sizes.matmul_n, ctx.sizes.matmul_reps, torch.device(ctx.sizes.device)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):  # untimed: the library picks its kernel, the GPU clocks up
        a @ b
    if device.type == "cuda":  # events time the kernels on the device, not the host's launch loop
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - started
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tflops = 2 * n ** 3 * reps / seconds / 1e12
    how = "CUDA events" if device.type == "cuda" else "wall clock"
    return (f"bf16 {n}x{n}x{n}: {tflops:.4g} TFLOP/s (mean of {reps} products after 3 untimed, {how})",
            {"n": n, "reps": reps, "dtype": "bfloat16", "seconds": seconds, "tflops": tflops, "timer": how})


# ---- correctness: the CUDA tests ----

def junit_cases(path: Path) -> list:
    """[{name, outcome (passed/failed/skipped), message}] of a pytest JUnit XML file."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message") or ""
            elif child.tag == "skipped" and outcome == "passed":
                outcome, message = "skipped", child.get("message") or ""
        cases.append({"name": case.get("name"), "outcome": outcome, "message": message.strip()[:300]})
    return cases


def correctness_part(ctx: Context):
    # pytest writes it into the work folder (this run's alone), from where it is copied into --out
    xml = ctx.work / f"{ctx.tag}-cuda-tests.xml"
    ctx.out_folder.remove(xml.name)  # an earlier run's copy must not pass for this one's
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-rs", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    if importlib.util.find_spec("pytest_timeout"):
        cmd.append("--timeout=200")  # per test: a hung collective fails its test, not the whole part
    if not ctx.dry and importlib.util.find_spec("xdist"):
        cmd += ["-n", str(max(1, min(4, (os.cpu_count() or 4) // 4)))]  # tiny runs: a GPU holds several at once
    # dry run: CUDA hidden from the tests, so they skip with their reason as on any CPU machine
    env = {"CUDA_VISIBLE_DEVICES": ""} if ctx.dry else {}
    rc = ctx.run(cmd, "correctness", env=env, check=False)
    if not xml.is_file():
        raise Failed(f"pytest exit {rc} and no {xml.name} (output in {ctx.log.name})")
    write_file(ctx.out, xml.name, xml.read_bytes())
    cases = junit_cases(xml)
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    reasons = sorted({c["message"].removeprefix("Skipped: ") for c in cases if c["outcome"] == "skipped"})
    failed = [c["name"] for c in cases if c["outcome"] == "failed"]
    summary = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
    if failed:
        summary += f" (failed: {', '.join(failed)})"
    if reasons:
        summary += f" (skipped: {'; '.join(reasons)})"
    result = {"command": shown(cmd, ctx), "exit": rc, **counts, "cases": cases, "skip_reasons": reasons}
    if rc != 0 or counts["failed"] or not cases:
        raise Failed(summary if cases else f"pytest exit {rc}, no test ran (output in {ctx.log.name})")
    return summary, result


# ---- speed: the trainer against a bare loop, and MFU ----

def overhead_part(ctx: Context, compiled: bool):
    text = OVERHEAD_SCRIPT.read_text()
    missing = [flag for flag in OVERHEAD_FLAGS if f'"{flag}"' not in text]
    if missing:
        raise Skip(f"{OVERHEAD_SCRIPT.name} has no {', '.join(missing)} yet: without them it cannot run both sides "
                   f"on the GPU at 224 px, channels_last, compiled (its bare loop stays on the CPU)")
    out = ctx.work / ("overhead-compiled" if compiled else "overhead-eager")
    repeats = ctx.sizes.overhead_repeats[compiled]
    cmd = [sys.executable, OVERHEAD_SCRIPT, *ctx.sizes.overhead, "--repeats", str(repeats), "--out", out,
           "--data", ctx.work / "overhead-data"]
    cmd += ["--compile"] if compiled else []
    ctx.run(cmd, "overhead_compiled" if compiled else "overhead_eager")
    found = sorted(out.glob("overhead-*.json"))
    if not found:
        raise Failed(f"{OVERHEAD_SCRIPT.name} wrote no overhead-*.json into {out}")
    r = json.loads(found[0].read_text())
    keys = ("model", "batch", "precision", "image_size", "channels_last", "compile", "device", "repeats",
            "plain_img_s", "trainer_img_s", "plain_median", "trainer_median", "overhead_pct",
            "overhead_pct_paired_median", "overhead_pct_best", "extra_ms_per_step")
    result = {"command": shown(cmd, ctx), **{k: r.get(k) for k in keys}}
    ratio = r["trainer_median"] / r["plain_median"]
    result["trainer_over_plain"] = ratio
    summary = (f"{r['model']} {r.get('image_size', '?')} px, batch {r['batch']}, {r['precision']}, channels_last"
               f"{', compiled' if compiled else ', eager'}: trainer {r['trainer_median']:.1f} img/s, bare loop "
               f"{r['plain_median']:.1f} img/s = {ratio:.3f}x; overhead {r['overhead_pct_paired_median']:+.1f}% "
               f"(median of {repeats} paired repeats)")
    return summary, result


def flops_per_image(model_name: str, image_size: int, classes: int = 4) -> float:
    """Forward + backward FLOPs of one training image, counted by torch.utils.flop_counter (a multiply-add = 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.models import build_model

    model = build_model(model_name, classes, image_size=image_size, log=lambda *a: None)
    x = torch.randn(2, 3, image_size, image_size)  # 2 images: BatchNorm in training mode, as when training
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


def mfu_part(ctx: Context):
    matmul = ctx.parts.get("matmul")
    if matmul is None or matmul.status != "ok":
        raise Skip("needs the matmul part")
    runs = {k: ctx.parts[f"overhead_{k}"] for k in ("eager", "compiled")
            if ctx.parts.get(f"overhead_{k}") and ctx.parts[f"overhead_{k}"].status == "ok"}
    if not runs:
        raise Skip("needs an overhead part (eager or compiled)")
    model, size = ctx.sizes.flops_model
    gflop = flops_per_image(model, size) / 1e9
    peak = matmul.result["tflops"]
    result, texts = {"model": model, "image_size": size, "gflop_per_image": gflop, "peak_tflops": peak}, []
    for kind, part in runs.items():
        for side, key in (("trainer", "trainer_median"), ("bare", "plain_median")):
            img_s = part.result[key]
            result[f"{kind}_{side}_img_s"] = img_s
            result[f"{kind}_{side}_mfu"] = img_s * gflop / 1e3 / peak
        texts.append(f"{kind} {result[f'{kind}_trainer_img_s']:.1f} img/s = {result[f'{kind}_trainer_mfu']:.1%} "
                     f"(bare loop {result[f'{kind}_bare_mfu']:.1%})")
    summary = (f"{model} {size} px, {gflop:.2f} GFLOP per image (fwd + bwd) against {peak:.4g} TFLOP/s: "
               + "; ".join(texts))
    return summary, result


# ---- CIFAR-10: the speed recipe from the JPEGs, ResNet-18 steps ----

def class_root(folder: Path, split: str) -> Path:
    """The folder whose subfolders are the classes, below wrappers such as cifar10/ or cifar10/<split>/."""
    while True:
        if (folder / split).is_dir():
            folder = folder / split
            continue
        entries = list(folder.iterdir())
        dirs = [e for e in entries if e.is_dir()]
        if len(dirs) == 1 and len(entries) == 1:
            folder = dirs[0]
            continue
        return folder


def fake_cifar_tars(folder: Path) -> tuple:
    """Dry run: 10 classes of small generated JPEGs packed as cifar10/train and cifar10/test tarballs, in
    `folder`, inside the run's own work folder (see Context)."""
    from peers import make_synthetic

    source = make_synthetic(folder / "source", 10, 8, 32)
    tars = []
    for split in ("train", "test"):  # the same images in both: a dry run checks the path, not the accuracy
        path = folder / f"cifar10-{split}.tar"
        with tarfile.open(path, "w") as tar:
            tar.add(source / "train", arcname=f"cifar10/{split}")
        tars.append(path)
    return tuple(tars)


def cifar_root(ctx: Context) -> tuple:
    """(folder with train/ and test/ of class folders, seconds spent unpacking). Unpacked and linked in the
    run's own work folder (see Context): the links are why not through the write gate, which makes none."""
    args = ctx.args
    if args.cifar:
        return Path(args.cifar).resolve(), 0.0
    if ctx.dry and not args.cifar_train_tar:
        train_tar, test_tar = fake_cifar_tars(ctx.work / "fake-cifar")
    elif args.cifar_train_tar:
        train_tar, test_tar = Path(args.cifar_train_tar), Path(args.cifar_test_tar)
    else:
        raise Skip("no CIFAR-10 JPEGs given (--cifar DIR with train/ and test/, or --cifar-train-tar and "
                   "--cifar-test-tar)")
    started, root = time.time(), ctx.work / "cifar10"
    root.mkdir()
    for split, path in (("train", train_tar), ("test", test_tar)):
        unpacked = ctx.work / f"unpacked-{split}"
        with tarfile.open(path) as tar:
            tar.extractall(unpacked, filter="data")  # "data": no absolute paths, links out or devices
        (root / split).symlink_to(class_root(unpacked, split), target_is_directory=True)
    return root, time.time() - started


def airbench_part(ctx: Context):
    root, unpack_s = cifar_root(ctx)
    run_dir = ctx.work / "airbench-run"
    cmd = [sys.executable, "-m", "trainer", "train", ROOT / "configs" / "airbench_cifar10.yaml", f"data.root={root}",
           f"run.dir={run_dir}", "train.progress_bar=false", *ctx.sizes.airbench, *ctx.args.airbench_override]
    started = time.time()
    ctx.run(cmd, "cifar10_airbench")
    wall = time.time() - started  # the whole command: start-up, JPEG decode, training, test eval, export
    summary = json.loads((run_dir / "summary.json").read_text())
    accuracy = summary["final"]["accuracy"]  # data.val_fraction=0: "val" is test/, scored once at the end
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["type"] == "train"]
    steps_s, before = 0.0, 0
    for r in train:  # each row's throughput covers the images since the previous row
        steps_s += (r["samples_seen"] - before) / r["throughput"]
        before = r["samples_seen"]
    img_s = statistics.median(r["throughput"] for r in train) if train else None
    result = {"command": shown(cmd, ctx), "test_accuracy": accuracy, "wall_s": wall, "trainer_seconds":
              summary.get("seconds"), "training_steps_s": steps_s, "train_img_s_median": img_s,
              "updates": summary.get("updates"), "unpack_s": unpack_s, "reached_94": accuracy >= 0.94}
    head = (f"time to 94%: {wall:.1f} s wall, test acc {accuracy:.2%}" if accuracy >= 0.94
            else f"94% not reached: test acc {accuracy:.2%} after {wall:.1f} s wall")
    return (f"{head} (training steps {steps_s:.1f} s, median {img_s:.0f} img/s; tarballs unpacked in "
            f"{unpack_s:.1f} s, not counted)"), result


def resnet18_part(ctx: Context):
    out = ctx.work / "resnet18"
    cmd = [sys.executable, BENCH / "step_throughput.py", "--models", "resnet18", "--image-size", "32",
           "--num-classes", "10", "--precisions", "bf16", "--formats", "channels_last", "--compile", "off",
           *ctx.sizes.resnet18, "--timeout", str(int(max(ctx.left() - RESERVE_S, 1))), "--out", out]
    ctx.run(cmd, "resnet18_cifar10")
    found = sorted(out.glob("step-throughput-*.json"))
    if not found:
        raise Failed(f"step_throughput.py wrote no step-throughput-*.json into {out}")
    row = json.loads(found[0].read_text())["rows"][0]
    if "error" in row:
        raise Failed(f"resnet18: {row['error']}")
    batch = ctx.sizes.resnet18[ctx.sizes.resnet18.index("--batch") + 1]
    result = {"command": shown(cmd, ctx), **{k: row.get(k) for k in (
        "train_img_s_median", "train_img_s_min", "train_img_s_max", "eval_img_s_median", "warmup_s", "peak_mem_mib",
        "peak_mem_kind")}}
    return (f"bare training step, batch {batch}, 32 px, bf16 + channels_last, eager, synthetic batch: "
            f"{row['train_img_s_median']:.0f} img/s ({row['train_img_s_min']:.0f}-{row['train_img_s_max']:.0f}); "
            f"eval forward {row['eval_img_s_median']:.0f} img/s"), result


def gpu_decode_part(ctx: Context):
    out = ctx.work / "decode"
    cmd = [sys.executable, BENCH / "input_pipeline.py", *ctx.sizes.decode, "--out", out]
    ctx.run(cmd, "gpu_decode")
    found = sorted(out.glob("input-pipeline*.json"))
    if not found:
        raise Failed(f"input_pipeline.py wrote no input-pipeline*.json into {out}")
    report = json.loads(found[0].read_text())
    row, device = report["photo_640x480_to_224"], report["decode_device"]
    workers = sorted(int(k.rsplit("_w", 1)[1]) for k in row if k.startswith(f"{device}_decode_w"))
    ratios = {w: row[f"{device}_decode_w{w}"] / row[f"loader_w{w}"] for w in workers}
    result = {"command": shown(cmd, ctx), "files": row["files"], "gpu": report.get("gpu"),
              **{f"{side}_w{w}_img_s": row[f"{key}_w{w}"] for w in workers
                 for side, key in (("cpu_decode", "loader"), (f"{device}_decode", f"{device}_decode"))},
              **{f"ratio_w{w}": ratios[w] for w in workers}}
    return ("640x480 JPEGs -> 224 px batches on the device: " + "; ".join(
        f"{w} workers: CPU decode {row[f'loader_w{w}']:.0f} img/s, {device} decode {row[f'{device}_decode_w{w}']:.0f} "
        f"img/s ({ratios[w]:.2f}x)" for w in workers)), result


# ---- timm's train.py ----

def timm_part(ctx: Context):
    if not ctx.args.timm and not ctx.dry:
        raise Skip("no --timm checkout given (a clone of huggingface/pytorch-image-models, with train.py)")
    out = ctx.work / "peers"
    cmd = [sys.executable, BENCH / "peers.py", *ctx.sizes.peers, "--timeout", str(int(max(ctx.left() - RESERVE_S, 1))),
           "--out", out] + (["--timm", ctx.args.timm] if ctx.args.timm else [])
    rc = ctx.run(cmd, "timm", check=False)
    found = sorted(out.glob("peers-*.json"))
    if not found:
        raise Failed(f"peers.py exit {rc} and no peers-*.json (output in {ctx.log.name})")
    r = json.loads(found[0].read_text())
    sides = {k: {f: v.get(f) for f in ("status", "median", "min", "max", "ratio_vs_ours", "error")}
             for k, v in r["sides"].items()}
    result = {"command": shown(cmd, ctx), "model": r["model"], "image_size": r["image_size"], "batch": r["batch"],
              "precision": r["precision"], "channels_last": r["channels_last"], "sides": sides}
    ours, timm = sides["ours"], sides["timm"]
    precision = {"no": "fp32"}.get(r["precision"], r["precision"])
    setting = f"{r['model']} {r['image_size']} px, batch {r['batch']}, {precision}, JPEGs through workers"
    if ours["status"] != "ok":
        raise Failed(f"our side: {ours['error']}")
    if not ctx.args.timm:
        return f"{setting}: ours {ours['median']:.1f} img/s; timm not run (no --timm)", result
    if timm["status"] != "ok":
        raise Failed(f"timm's train.py: {timm['error']}")
    return (f"{setting}: ours {ours['median']:.1f} img/s, timm {timm['median']:.1f} img/s "
            f"(timm / ours = {timm['ratio_vs_ours']:.2f}x)"), result


PARTS = [
    ("environment", environment_part),
    ("matmul", matmul_part),
    ("correctness", correctness_part),
    ("overhead_eager", lambda ctx: overhead_part(ctx, compiled=False)),
    ("cifar10_airbench", airbench_part),
    ("overhead_compiled", lambda ctx: overhead_part(ctx, compiled=True)),
    ("mfu", mfu_part),
    ("resnet18_cifar10", resnet18_part),
    ("gpu_decode", gpu_decode_part),
    ("timm", timm_part),
]


# ---- report ----

def table(parts: list, dry: bool) -> str:
    lines = ["| part | status | result | seconds |", "|---|---|---|---|"]
    for p in parts:
        status = f"{p.status} (dry-run)" if dry and p.status == "ok" else p.status
        lines.append(f"| {p.name} | {status} | {p.summary.replace('|', '/')} | {p.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def write_report(ctx: Context, parts: list) -> str:
    env = ctx.environment
    elapsed = time.time() - ctx.t0
    title = ("GPU check (issue 17): DRY RUN on the CPU, tiny sizes; the numbers show that each part ran, "
             "not how fast anything is" if ctx.dry else "GPU check (issue 17)")
    driver = f" (driver {env['driver']})" if "driver" in env else ""
    where = f"CPU {env.get('cpu', '?')}" if ctx.dry or not env.get("gpus") else f"{', '.join(env['gpus'])}{driver}"
    head = [f"# {title}", "",
            f"{where}; torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, torchvision "
            f"{env.get('torchvision')}, accelerate {env.get('accelerate')}; git {env.get('git_revision')}; "
            f"{env.get('time', time.strftime('%Y-%m-%dT%H:%M:%S%z'))}",
            f"`{shlex.join(['python', 'bench/gpu_check.py', *sys.argv[1:]])}`: {elapsed:.0f} s of a "
            f"{ctx.budget:.0f} s budget", ""]
    text = "\n".join(head) + "\n" + table(parts, ctx.dry)
    write_results(ctx.out, ctx.tag, {
        "benchmark": "gpu_check", "mode": "dry-run" if ctx.dry else "gpu", "dry_run": ctx.dry,
        "command": ["bench/gpu_check.py", *sys.argv[1:]], "budget_s": ctx.budget, "elapsed_s": elapsed,
        "environment": env, "parts": [asdict(p) for p in parts]}, text)
    return text


def fail(message: str) -> None:
    print(f"gpu_check.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_packages() -> None:
    """Every package the parts need, imported here: those that fail, in one line with pip's names for them."""
    missing = []
    for module, dist in NEEDED.items():
        try:
            importlib.import_module(module)
        except Exception as err:  # e.g. omegaconf present without its antlr4 runtime: the error names it
            missing.append((dist, f"{dist} ({type(err).__name__}: {err})"))
    if missing:
        fail(f"missing Python packages: {'; '.join(why for _, why in missing)}; install them first "
             f"(pip install {' '.join(dist for dist, _ in missing)}, or their wheels with their own dependencies "
             f"where the machine has no network)")


def check_args(args) -> None:
    """Every input problem as one line, before any work."""
    if bool(args.cifar_train_tar) != bool(args.cifar_test_tar):
        fail("--cifar-train-tar and --cifar-test-tar go together (the recipe trains on train/, scores test/)")
    if args.cifar and args.cifar_train_tar:
        fail("give --cifar DIR or the two tarballs, not both")
    for flag in ("cifar_train_tar", "cifar_test_tar"):
        path = getattr(args, flag)
        if path and not Path(path).is_file():
            fail(f"--{flag.replace('_', '-')} {path}: no such file")
    if args.cifar and not ((Path(args.cifar) / "train").is_dir() and (Path(args.cifar) / "test").is_dir()):
        fail(f"--cifar {args.cifar}: expected a folder with train/ and test/ (each of class folders)")
    if args.timm and not (Path(args.timm) / "train.py").is_file():
        fail(f"--timm {args.timm}: no train.py there (expected a checkout of huggingface/pytorch-image-models)")
    if args.work and Path(args.work).is_dir() and any(Path(args.work).iterdir()):
        fail(f"--work {args.work}: not empty")
    unknown = set(args.parts.split(",")) - {name for name, _ in PARTS} if args.parts else set()
    if unknown:
        fail(f"--parts: unknown {', '.join(sorted(unknown))}; the parts are {', '.join(name for name, _ in PARTS)}")
    if args.budget_s is not None and args.budget_s <= 0:
        fail(f"--budget-s {args.budget_s}: must be positive")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks that every part runs (CI)")
    p.add_argument("--cifar", metavar="DIR", help="CIFAR-10 as JPEG folders: DIR/train/<class>/, DIR/test/<class>/")
    p.add_argument("--cifar-train-tar", metavar="TAR", help="CIFAR-10 training JPEGs as a tarball of class folders")
    p.add_argument("--cifar-test-tar", metavar="TAR", help="CIFAR-10 test JPEGs as a tarball of class folders")
    p.add_argument("--timm", metavar="PATH", help="a checkout of huggingface/pytorch-image-models (with train.py)")
    p.add_argument("--airbench-override", action="append", default=[], metavar="KEY=VALUE",
                   help="added to the CIFAR-10 speed recipe's command (repeatable), e.g. model.compile=true")
    p.add_argument("--parts", help="comma list of parts to run (default all), e.g. correctness,overhead_eager to run "
                                   "again only what a fix touched; the environment is always recorded")
    p.add_argument("--git-revision", help="the revision to record where this tree has no .git (a copied checkout)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for the JSON, Markdown and log")
    p.add_argument("--work", help="keep data, runs and sub-benchmark files here (default: a temporary folder)")
    p.add_argument("--budget-s", type=float, help="seconds for all parts: none is started that would not fit, a "
                                                   "running one is stopped at the end (default: 510; dry run 300)")
    args = p.parse_args()
    check_args(args)
    check_packages()  # after the argument checks: a wrong path fails at once
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        fail("torch sees no CUDA GPU here; on a CPU machine run --dry-run")
    sizes = DRY if args.dry_run else GPU
    tag = "gpu-check-dry-run" if args.dry_run else "gpu-check"
    out = Path(args.out).resolve()
    check_results(out, [*result_files(tag), f"{tag}.log", f"{tag}-cuda-tests.xml"])  # before the lease is spent
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(args, sizes, out, work, tag)
        parts = run_parts(ctx, PARTS)
        text = write_report(ctx, parts)
    print("\n" + text)
    print(f"[gpu_check] written: {out / (tag + '.json')}, {out / (tag + '.md')}, {ctx.log}")
    raise SystemExit(1 if any(part.status in ("failed", "timed out") for part in parts) else 0)


if __name__ == "__main__":
    main()
