"""Training-step throughput and peak memory of every registered model, per precision x memory format x compile.

For each model in `trainer.models.MODELS`, `trainer.tasks.segment_models.SEGMENTATION_MODELS` (whose loss is
pixel cross-entropy over the whole input, plus 0.5 x the auxiliary head's) and
`trainer.tasks.detect_models.DETECTION_MODELS` (a list of --batch images with 3 random boxes each; the loss is the
sum of the detector's own loss dict; the detector resizes to --image-size itself where it takes a size: SSDlite
is fixed at 320) and each combination of
  precision      fp32 | bf16 (torch.autocast, dtype bfloat16, on the device type)
  memory format  nchw | channels_last (model and input)
  compile        off | on (torch.compile(model); the optimizer step stays eager)
it times training steps on one synthetic batch (fixed seed): forward, cross-entropy against random labels,
backward, SGD(momentum 0.9) step, zero_grad(set_to_none=True). Warm-up steps come first and are not timed
(compilation happens there; their seconds are reported on their own), then --repeats runs of --steps steps:
the table gives the median img/s with min-max. Eval img/s is the forward alone, eval mode, no grad.

Each (model, combination) runs in a fresh subprocess (this script with --one) so peak memory is its own:
  cuda  torch.cuda.max_memory_allocated(): tensors only, not the CUDA context or the allocator's cache
  cpu   peak resident set size of that process (VmHWM): includes Python + torch (~0.3-0.5 GiB) and,
        with compile, the compiled code. Not ru_maxrss: on Linux a child's ru_maxrss starts at the
        parent's peak RSS (it is carried across fork/exec), so it would report this script's own size.
A combination that fails (compile unsupported, out of memory, ...) is an error in its row.

    .venv/bin/python bench/step_throughput.py                       # all models, all combinations, auto device
    .venv/bin/python bench/step_throughput.py --device cuda --image-size 224 --batch 64 --models resnet50
    .venv/bin/python bench/step_throughput.py --models small_cnn,resnet18 --compile off --threads 2
    .venv/bin/python bench/step_throughput.py --smoke               # tiny sizes: checks that it runs (CI)

Writes <out>/step-throughput-<tag>.json (all rows + machine info) and .md (the table); tag is `smoke` or
`<device>-<image_size>px`.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, result_files, write_results  # noqa: E402
from trainer.models import MODELS, build_model  # noqa: E402
from trainer.tasks.detect_models import DETECTION_MODELS, build_detection_model, model_kwargs  # noqa: E402
from trainer.tasks.segment_models import SEGMENTATION_MODELS, build_segmentation_model  # noqa: E402

ALL_MODELS = {**MODELS, **SEGMENTATION_MODELS, **DETECTION_MODELS}


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)


def timed(fn, n: int, device: torch.device) -> float:
    """Seconds for n calls of fn."""
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return time.perf_counter() - start


def status_mib(field: str):
    """A size field of /proc/self/status (kB) in MiB; None where there is no /proc (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory(device: torch.device):
    """(MiB, what it is) for this process."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    hwm = status_mib("VmHWM")
    if hwm is not None:
        return hwm, "process peak RSS (VmHWM)"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return (kib / 2**20 if sys.platform == "darwin" else kib / 1024), "ru_maxrss"


def rates(img_s: list, prefix: str) -> dict:
    return {f"{prefix}_img_s": img_s, f"{prefix}_img_s_median": statistics.median(img_s),
            f"{prefix}_img_s_min": min(img_s), f"{prefix}_img_s_max": max(img_s)}


def time_steps(args, row: dict, model, train_step, eval_step, device) -> None:
    """Warm-up, then --repeats timings of --steps training steps, then the same for the eval forward."""
    images = args.batch * args.steps
    model.train()
    row["warmup_s"] = timed(train_step, args.warmup, device)  # includes compilation (and first-call costs)
    row.update(rates([images / timed(train_step, args.steps, device) for _ in range(args.repeats)], "train"))
    model.eval()  # a new graph for compile (BatchNorm, dropout change): its own warm-up
    row["eval_warmup_s"] = timed(eval_step, args.warmup, device)
    row.update(rates([images / timed(eval_step, args.steps, device) for _ in range(args.repeats)], "eval"))


def measure_one(args, row: dict) -> None:
    """One (model, precision, format, compile) combination in this process; fills row as it goes."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # as the trainer does on GPU (train.cudnn_benchmark)
    row["baseline_rss_mib"] = status_mib("VmRSS")  # the process before the model: interpreter + torch
    torch.manual_seed(0)
    segmentation = row["model"] in SEGMENTATION_MODELS
    detection = row["model"] in DETECTION_MODELS
    if detection:
        return measure_detector(args, row, device)
    if segmentation:  # pixel cross-entropy on every pixel (+ 0.5 x the auxiliary head's, as trained)
        model = build_segmentation_model(row["model"], args.num_classes, log=lambda *a: None).to(device)
    else:
        model = build_model(row["model"], args.num_classes, image_size=args.image_size, small_input_stem=None,
                            log=lambda *a: None).to(device)
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, args.num_classes, (args.batch,) + ((args.image_size,) * 2 if segmentation else ()),
                      device=device)
    if row["format"] == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = torch.compile(model) if row["compile"] == "on" else model
    bf16 = row["precision"] == "bf16"

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
            if segmentation:
                loss = F.cross_entropy(out["out"], y) + (0.5 * F.cross_entropy(out["aux"], y) if "aux" in out else 0)
            else:
                loss = F.cross_entropy(out, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(x)

    time_steps(args, row, model, train_step, eval_step, device)


def measure_detector(args, row: dict, device) -> None:
    """A detector's training step (its loss dict summed) and eval forward on a list of --batch images."""
    size = {"min_size": args.image_size, "max_size": args.image_size}
    try:
        model_kwargs(row["model"], size)
    except Exception:  # a fixed input size (SSDlite 320)
        size = {}
    model = build_detection_model(row["model"], args.num_classes + 1, size, log=lambda *a: None).to(device)
    row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    g = torch.Generator().manual_seed(0)
    s = args.image_size
    x = [torch.rand(3, s, s, generator=g).to(device) for _ in range(args.batch)]
    targets = []
    for _ in x:
        xy = torch.rand(3, 2, generator=g) * s * 0.6
        wh = (torch.rand(3, 2, generator=g) * 0.3 + 0.1) * s
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, args.num_classes + 1, (3,), generator=g).to(device)})
    if row["format"] == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = torch.compile(model) if row["compile"] == "on" else model
    bf16 = row["precision"] == "bf16"

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = sum(net(x, targets).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def eval_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(x)

    time_steps(args, row, model, train_step, eval_step, device)


def child(args) -> None:
    """--one: measure one combination and print it as one JSON line, errors included."""
    if args.threads:
        torch.set_num_threads(args.threads)
    row = {"model": args.one, "precision": args.precisions, "format": args.formats, "compile": args.compile,
           "threads": torch.get_num_threads()}
    try:
        measure_one(args, row)
    except Exception as err:  # compile unsupported, out of memory, ...: a result, not a crash
        first = (str(err).strip().splitlines() or [""])[0]  # compile errors run to pages: keep the first line
        row["error"] = f"{type(err).__name__}: {first}"[:300]
    row["peak_mem_mib"], row["peak_mem_kind"] = peak_memory(torch.device(args.device))
    print(json.dumps(row), flush=True)


def run_combination(args, model: str, precision: str, fmt: str, comp: str) -> dict:
    cmd = [sys.executable, __file__, "--one", model, "--precision", precision, "--format", fmt, "--compile", comp,
           "--device", args.device, "--image-size", str(args.image_size), "--batch", str(args.batch),
           "--num-classes", str(args.num_classes), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])
    row = {"model": model, "precision": precision, "format": fmt, "compile": comp}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {args.timeout} s"}
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (res.stderr.strip().splitlines() or ["no output"])[-1]  # killed (e.g. out of memory) or crashed
    return {**row, "error": f"exit {res.returncode}: {tail}"[:300]}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list, device: str) -> str:
    mem = "peak MiB (cuda max allocated)" if device == "cuda" else "peak MiB (process peak RSS)"
    out = [f"| model | params (M) | precision | format | compile | train img/s median (min-max) | eval img/s | "
           f"warm-up/compile s | {mem} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = f"{r['params_m']:.2f}" if "params_m" in r else "-"
        train = (f"{r['train_img_s_median']:.1f} ({r['train_img_s_min']:.1f}-{r['train_img_s_max']:.1f})"
                 if "train_img_s_median" in r else "-")
        if "error" in r:
            train += " error: " + r["error"].replace("|", "/")
        evl = f"{r['eval_img_s_median']:.1f}" if "eval_img_s_median" in r else "-"
        warm = f"{r['warmup_s']:.1f}" if "warmup_s" in r else "-"
        peak = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else "-"
        out.append(f"| {r['model']} | {params} | {r['precision']} | {r['format']} | {r['compile']} | {train} | "
                   f"{evl} | {warm} | {peak} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--models", default=",".join(ALL_MODELS),
                   help="comma list (default: every classification and segmentation model)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="timed training steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=3)
    # singular spellings are what the parent passes to a --one child (one value each)
    p.add_argument("--precisions", "--precision", default="fp32,bf16")
    p.add_argument("--formats", "--format", default="nchw,channels_last")
    p.add_argument("--compile", default="off,on", help="comma list of off,on")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per combination before it is an error")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, two small models, eager: checks that it runs")
    p.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)  # internal: one combination, JSON line
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.warmup = max(1, args.warmup)  # the first step always pays one-off costs (and compiles)
    if args.one:
        return child(args)
    if args.smoke:
        args.models, args.image_size, args.batch, args.steps, args.warmup, args.repeats, args.compile = (
            "small_cnn,linear", 16, 8, 2, 1, 1, "off")
    tag = "smoke" if args.smoke else f"{args.device}-{args.image_size}px"
    check_results(args.out, result_files(f"step-throughput-{tag}"))
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    models, precisions, formats, compiles = (split(args.models), split(args.precisions), split(args.formats),
                                             split(args.compile))
    for values, valid in ((models, ALL_MODELS), (precisions, ("fp32", "bf16")),
                          (formats, ("nchw", "channels_last")), (compiles, ("off", "on"))):
        if not values or set(values) - set(valid):
            p.error(f"expected a comma list of {', '.join(valid)}; got {','.join(values) or 'nothing'}")
    rows = []
    for combo in itertools.product(models, precisions, formats, compiles):
        rows.append(run_combination(args, *combo))
        r = rows[-1]
        done = f"{r['train_img_s_median']:.1f} img/s" if "train_img_s_median" in r else "-"
        print(f"{' '.join(combo)}: {done}{'  error: ' + r['error'] if 'error' in r else ''}", flush=True)
    info = {"device": args.device, "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "threads": args.threads or torch.get_num_threads(), "torch": torch.__version__,
            "torchvision": importlib.metadata.version("torchvision"), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cudnn_benchmark": True}  # set in each child, as the trainer does on GPU
    info["device_name"] = torch.cuda.get_device_name(0) if args.device == "cuda" else info["cpu_model"]
    if args.device == "cuda":
        info["cuda"] = torch.version.cuda
    settings = {k: getattr(args, k) for k in ("image_size", "batch", "num_classes", "steps", "warmup", "repeats",
                                              "timeout", "smoke")}
    settings.update(models=models, precisions=precisions, formats=formats, compile=compiles,
                    optimizer="SGD lr 0.01 momentum 0.9", data="synthetic: one randn batch, random labels, seed 0")
    md = table(rows, args.device)
    result = {"benchmark": "step_throughput", "machine": info, "settings": settings, "rows": rows,
              "peak_memory": rows[0].get("peak_mem_kind") if rows else None}
    write_results(args.out, f"step-throughput-{tag}", result, md)
    print(f"\n{info['device_name']}, torch {torch.__version__}, {info['threads']} threads, batch {args.batch}, "
          f"{args.image_size}px\n\n{md}")


if __name__ == "__main__":
    main()
