"""Trainer overhead: the same model, data, batch, optimizer and precision through `trainer.loop.train` and
through a minimal hand-written PyTorch loop, alternating in one process, several repeats; prints the median
training throughput of each and their ratio (also the median of each repeat's own ratio and the ratio of
the best repeats), and writes JSON + a Markdown row.

    .venv/bin/python bench/overhead.py --model small_cnn --repeats 3 --out bench/results
    .venv/bin/python bench/overhead.py --smoke          # tiny sizes: checks that it runs (CI)

Throughput is measured over the training steps only (the trainer's evaluation and exports are excluded):
each side times its own steps between the end of warm-up and the last step, with the same DataLoader
settings (in-process, 0 workers by default, so the comparison is of the loops, not of worker scheduling).
With --loader device both sides take their batches from the trainer's device-resident loader instead.

    .venv/bin/python bench/overhead.py --model linear --loader device --repeats 6   # the loop's own cost per step
    python bench/overhead.py --device cuda --model resnet50 --image-size 224 --batch 256 --per-class 384 \
        --epochs 5 --loader device --precision bf16 --channels-last [--compile]        # on a GPU (gpu_check.py)

Both sides run on --device (auto: the GPU when there is one) with the same memory format, compile setting,
optimizer kernel (fused on CUDA, as the trainer's optim.fused default) and cudnn.benchmark (on for CUDA, as the
trainer's train.cudnn_benchmark default); on CUDA each side's clock is read after a device sync.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, result_files, write_results  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data import build_data  # noqa: E402
from trainer.data.device import to_device_loader  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402


def overrides(args, data_root: Path, run_dir: Path) -> list:
    return [f"data.root={data_root}", "data.format=generated", "data.generated.variant=multiclass",
            f"data.image_size={args.image_size}", f"model.channels_last={str(args.channels_last).lower()}",
            f"model.compile={str(args.compile).lower()}", f"train.device={'cpu' if args.device == 'cpu' else 'auto'}",
            f"data.generated.train_per_class={args.per_class}", "data.generated.val_per_class=10",
            "data.generated.test_per_class=0", f"data.num_workers={args.workers}", f"data.loader={args.loader}",
            f"model.name={args.model}",
            f"train.batch_size={args.batch}", f"train.epochs={args.epochs}", f"train.mixed_precision={args.precision}",
            "train.progress_bar=false", "train.log_every_steps=1000000", "optim.name=sgd", "optim.lr=0.01",
            "optim.schedule=constant", "checkpoint.every_epochs=0", "eval.every_epochs=0", f"run.dir={run_dir}",
            "run.overwrite=true"]


def trainer_side(args, data_root: Path, tmp: Path) -> float:
    """img/s of the trainer's training steps: from its own metrics.jsonl rows (one per epoch end)."""
    run_dir = tmp / "trainer-run"
    train(load_config(None, overrides(args, data_root, run_dir) + args.trainer_set))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["throughput"] for r in rows if r["type"] == "train"]
    return statistics.median(per_epoch[1:] or per_epoch)  # epoch 1 includes warm-up


def plain_side(args, data_root: Path) -> float:
    """The same steps in a bare loop: forward, cross-entropy, backward, SGD step."""
    cfg = load_config(None, overrides(args, data_root, Path("unused")))
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the trainer's train.cudnn_benchmark default
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    data = build_data(cfg.data, 0, ("train",), log=lambda *a: None)
    if args.loader == "device":  # the trainer's own device-resident batches, so the data cost is identical
        aug = cfg.data.augment
        device_loader = to_device_loader(data.datasets["train"], cfg.data.image_size, device,
                                         args.batch, data.mean, data.std, cfg.seed, 0, 1, aug.crop_padding,
                                         aug.flip_mode, aug.hflip, args.channels_last)
    else:
        loader = torch.utils.data.DataLoader(data.datasets["train"], batch_size=args.batch, shuffle=True,
                                             num_workers=args.workers, generator=torch.Generator().manual_seed(0),
                                             pin_memory=device.type == "cuda")  # as the trainer's loader on GPU
    model = build_model(args.model, len(data.classes), image_size=cfg.data.image_size).to(device,
                                                                                         memory_format=memory_format)
    if args.compile:
        model.compile()  # in place, as the trainer's model.compile
    # fused on CUDA: the trainer's optim.fused default there
    opt = build_optimizer(model, "sgd", 0.01, cfg.optim.weight_decay, cfg.optim.momentum,
                          fused=device.type == "cuda")
    rates = []
    for epoch in range(args.epochs):
        data.datasets["train"].set_epoch(epoch)
        if args.loader == "device":
            device_loader.set_epoch(epoch)
            loader = device_loader.batches()
        sync(device)
        seen, start = 0, time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True, memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += x.shape[0]
        sync(device)  # kernels run asynchronously: the epoch ends when the device is done
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates[1:] or rates)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--per-class", type=int, default=400)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--loader", default="workers", choices=["workers", "device"],
                   help="device: both sides take batches from the trainer's device-resident loader, which takes "
                        "the per-sample data cost (and its noise) out, so that a cheap model shows the loop's own cost")
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="both sides on this device; auto: the GPU when there is one")
    p.add_argument("--image-size", type=int, default=32, help="side of the generated images, px")
    p.add_argument("--channels-last", action="store_true", help="model and batches channels_last, both sides")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in place, both sides")
    p.add_argument("--data", help="folder for the generated images (default: a temporary one); a folder used "
                                  "before is reused as it is, so the images are drawn once (~25 ms each at 224 px)")
    p.add_argument("--trainer-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra overrides for the trainer side only, e.g. a recipe's optimizer features "
                        "(lookahead, bias lr groups, label smoothing): the bare loop does none of them, so the "
                        "ratio then includes their cost")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: a check that it runs")
    args = p.parse_args()
    if args.smoke:
        args.per_class, args.epochs, args.repeats, args.batch = 20, 2, 1, 16
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    # the original name for the original settings (CI's smoke test reads it); new settings add their own part
    name = (f"overhead-{args.model}-{args.precision}{'-device' if args.loader == 'device' else ''}"
            f"{'-cuda' if args.device == 'cuda' else ''}{f'-{args.image_size}px' if args.image_size != 32 else ''}"
            f"{'-cl' if args.channels_last else ''}{'-compile' if args.compile else ''}"
            f"{'-set' if args.trainer_set else ''}{'-smoke' if args.smoke else ''}")
    check_results(args.out, result_files(name))
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_root = Path(args.data) if args.data else tmp / "data"
        plain, ours = [], []
        for i in range(args.repeats):
            # alternate which side goes first (plain, trainer | trainer, plain | ...): when the VM's speed
            # drifts during the run, a fixed order would always hand the slower half to the same side
            if i % 2 == 0:
                plain.append(plain_side(args, data_root))
                ours.append(trainer_side(args, data_root, tmp))
            else:
                ours.append(trainer_side(args, data_root, tmp))
                plain.append(plain_side(args, data_root))
            print(f"repeat {i + 1}: plain {plain[-1]:.1f} img/s, trainer {ours[-1]:.1f} img/s", flush=True)
    result = {
        "benchmark": "trainer_overhead", "model": args.model, "batch": args.batch, "precision": args.precision,
        "device": args.device, "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "image_size": args.image_size, "channels_last": args.channels_last, "compile": args.compile,
        "workers": args.workers, "loader": args.loader, "trainer_set": args.trainer_set,
        "images_per_epoch": args.per_class * 4, "epochs": args.epochs,
        "repeats": args.repeats, "order": "plain first in odd repeats, trainer first in even ones",
        "plain_img_s": plain, "trainer_img_s": ours,
        "plain_median": statistics.median(plain), "trainer_median": statistics.median(ours),
        "overhead_pct": 100 * (statistics.median(plain) / statistics.median(ours) - 1),
        # each repeat's two sides ran back to back, so their ratio cancels the machine's slow drift
        "overhead_pct_paired_median": 100 * (statistics.median(a / b for a, b in zip(plain, ours)) - 1),
        # interference from other tenants of a VM only ever slows a repeat down: the fastest repeat of each
        # side is the closest to its undisturbed speed
        "overhead_pct_best": 100 * (max(plain) / max(ours) - 1),
        # the same as time per step: what the trainer's loop adds to every step, whatever the model costs
        "extra_ms_per_step": 1000 * args.batch * (1 / statistics.median(ours) - 1 / statistics.median(plain)),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    row = (f"| {args.model} | {args.batch} | {args.precision} | {result['plain_median']:.1f} | "
           f"{result['trainer_median']:.1f} | {result['overhead_pct']:+.1f}% | "
           f"{result['overhead_pct_paired_median']:+.1f}% | {result['overhead_pct_best']:+.1f}% | "
           f"{result['extra_ms_per_step']:+.2f} |")
    write_results(args.out, name, result, "| model | batch | precision | plain img/s | trainer img/s | overhead (medians) "
                  "| overhead (median of paired repeats) | overhead (best repeats) | extra ms per step (medians) |\n"
                  "|---|---|---|---|---|---|---|---|---|\n" + row + "\n")
    print(row)


if __name__ == "__main__":
    main()
