"""airbench94 and our CIFAR-10 speed recipe side by side: the same decoded JPEGs, the same machine, the same
number of epochs; test accuracy after every epoch for both, in one table.

    .venv/bin/python bench/airbench_side_by_side.py --airbench /tmp/cifar10-airbench --data /tmp/cifar \\
        --epochs 10 --seeds 0 1 --out /tmp/side
    .venv/bin/python bench/airbench_side_by_side.py --smoke      # generated data, our side only (CI)

The reference is airbench94's own training code (`legacy/airbench94.py` of a checkout of
github.com/KellerJordan/cifar10-airbench that --airbench names; nothing of it lives in this repository). It
runs in its own process inside a small shim that changes only what it needs to run here:
  data     its CifarLoader reads `cifar10/{train,test}.pt` (uint8 N x 32 x 32 x 3 arrays and labels) from the
           working directory; the shim writes those files from --data's JPEGs, decoded by our own decoder
           (torchvision's decode_jpeg, as `data.loader=device` does), so both sides see the same pixels. The
           training array is put in a fixed random order (seed 0), as the original CIFAR-10 arrays are in no
           class order: airbench computes its whitening filters from the first 5,000 rows.
  device   the CPU: `.cuda()` is a no-op, the loader is told `gpu="cpu"`, CUDA events become wall clocks.
  precision  airbench keeps its weights and activations in fp16 on the GPU; here `--reference-precision bf16`
           (the default) keeps its weights in fp32 and runs it under bf16 autocast with its first layer, the
           whitening conv, in fp32, which is our recipe's precision policy on the CPU (trainer.models:
           the whitening multiplies bf16's rounding of its input by up to 1/sqrt(5e-4) = 45); `fp32` runs it
           in fp32 throughout.
  epochs   its `train_epochs` set to --epochs (it publishes 9.9); everything else is its own (hyp, net,
           optimizer, lookahead, schedule, alternating flip, translate, multi-crop test-time augmentation).
Its per-epoch test accuracy is its own `val_acc` (no test-time augmentation) and the last row adds its
`tta_val_acc` (its tta_level 2: mirror + 1-pixel translations).

Ours: `trainer train configs/airbench_cifar10.yaml` on --data (all of train/; test/ is the "val" split),
with eval.every_epochs=1 and eval.tta=none so that every epoch is scored without test-time augmentation, then
`trainer eval` of the final model with the recipe's own eval.tta for the last row. Extra overrides for our
side: --ours key=value ... (ablations).

Both sides run with --threads torch threads each; --parallel runs them at the same time (accuracy does not
depend on it; the wall times then share the cores and are not speed measurements).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gate import bench_folder, check_results, fresh_log, made_once, result_files, write_file, write_results

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "airbench_cifar10.yaml"


def decode_folder(split_dir: Path):
    """(uint8 N x 32 x 32 x 3, int64 labels, class names) of an ImageFolder split, classes in sorted order."""
    from trainer.data.folders import decode_jpeg_rgb

    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        paths = sorted((split_dir / name).iterdir())
        raw = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]
        images += decode_jpeg_rgb(raw, False)
        labels += [label] * len(paths)
    return torch.stack(images).permute(0, 2, 3, 1).contiguous(), torch.tensor(labels), classes


def write_reference_data(data: Path, work: Path) -> None:
    """work/cifar10/train.pt and test.pt in airbench's own format, from the JPEG folders; made once (reused
    while --data is the same) through the write gate."""
    def draw(staging: Path) -> None:  # the staging folder made_once renames to work/cifar10
        for split in ("train", "test"):
            images, labels, classes = decode_folder(data / split)
            if split == "train":  # no class order, as in the original arrays (see the module docstring)
                order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
                images, labels = images[order], labels[order]
            torch.save({"images": images, "labels": labels, "classes": classes}, staging / f"{split}.pt")

    made_once(work / "cifar10", {"made_by": "bench/airbench_side_by_side.py", "data": str(data)}, draw,
              option="--out")


class _WallEvent:
    """torch.cuda.Event(enable_timing=True) on the CPU: elapsed_time in milliseconds."""

    def __init__(self, **_):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return 1000.0 * (end.t - self.t)


def run_reference(airbench: Path, work: Path, epochs: float, seed: int, precision: str, out: Path) -> None:
    """One airbench94 run in this process (the patches below are process-wide: it is a child process)."""
    source = airbench / "legacy" / "airbench94.py"
    if not source.is_file():
        sys.exit(f"--airbench {airbench}: no legacy/airbench94.py there (a checkout of KellerJordan/cifar10-airbench)")
    torch.cuda.Event = _WallEvent
    torch.cuda.synchronize = lambda *a, **k: None
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.nn.Module.half = lambda self: self  # fp32 weights; bf16 comes from autocast below
    spec = importlib.util.spec_from_file_location("airbench94_reference", source)
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)

    class CpuCifarLoader(ab.CifarLoader):
        def __init__(self, path, train=True, **kw):
            super().__init__(path, train=train, **{**kw, "gpu": "cpu"})
            # the file write_reference_data made (tensors and class names): no pickled objects needed
            raw = torch.load(os.path.join(path, "train.pt" if train else "test.pt"), weights_only=True)["images"]
            self.images = (raw.float() / 255).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    whiten, make_net = ab.init_whitening_conv, ab.make_net

    def make_net_fp32_whitening():  # bf16: the whitening conv in fp32, as ours (see the module docstring)
        net = make_net()
        plain = net[0].forward

        def forward(x):
            with torch.autocast("cpu", enabled=False):
                return plain(x.float())

        net[0].forward = forward
        return net

    def whiten_fp32(*a, **k):
        with torch.autocast("cpu", enabled=False):
            return whiten(*a, **k)

    rows = []

    def record(variables, is_final_entry):
        rows.append({k: variables.get(k) for k in ("epoch", "train_loss", "train_acc", "val_acc", "tta_val_acc",
                                                 "total_time_seconds")})
        print(json.dumps(rows[-1]), flush=True)

    ab.CifarLoader, ab.init_whitening_conv, ab.print_training_details = CpuCifarLoader, whiten_fp32, record
    if precision == "bf16":
        ab.make_net = make_net_fp32_whitening
    ab.hyp["opt"]["train_epochs"] = epochs
    os.chdir(work)
    torch.manual_seed(seed)
    start = time.perf_counter()
    # cache_enabled=False: autocast caches the bf16 copy of each weight until the outermost autocast region
    # ends, and this one spans the whole run: with the cache the forward would use the initial weights for
    # ever (measured: chance-level accuracy). Our trainer enters autocast once per forward.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=False):
        ab.main(seed)
    per_epoch = [r["val_acc"] for r in rows if isinstance(r["epoch"], int)]
    write_file(out.parent, out.name, json.dumps({"side": "airbench94", "seed": seed, "precision": precision,
                                                 "per_epoch": per_epoch, "final_tta": rows[-1]["tta_val_acc"],
                                                 "wall_s": time.perf_counter() - start}, indent=1))


def ours_command(data: Path, run_dir: Path, epochs: int, seed: int, overrides) -> list:
    trainer = [sys.executable, "-m", "trainer"]
    return [*trainer, "train", str(RECIPE), f"data.root={data}", f"run.dir={run_dir}", f"seed={seed}",
            f"train.epochs={epochs}", "eval.every_epochs=1", "eval.tta=none", "train.progress_bar=false",
            *overrides]


def finish_ours(run_dir: Path, seed: int, out: Path, wall: float, recipe_tta: str) -> None:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_epoch = [r["accuracy"] for r in rows if r.get("type") == "eval"]
    subprocess.run([sys.executable, "-m", "trainer", "eval", "--model", str(run_dir), "--output",
                    str(run_dir / "eval-tta.json"), f"eval.tta={recipe_tta}"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    final = json.loads((run_dir / "eval-tta.json").read_text())["accuracy"]
    write_file(out.parent, out.name, json.dumps({"side": "ours", "seed": seed, "per_epoch": per_epoch,
                                                 "final_tta": final, "tta": recipe_tta, "wall_s": wall}, indent=1))


def recipe_tta(overrides: list) -> str:
    """The test-time augmentation our side is scored with at the end: the recipe's eval.tta, or an --ours
    override of it (the run itself trains with eval.tta=none, so its own config.yaml cannot say)."""
    from omegaconf import OmegaConf

    given = [o.split("=", 1)[1] for o in overrides if o.startswith("eval.tta=")]
    return given[-1] if given else str(OmegaConf.load(RECIPE).eval.get("tta", "none"))


def table(results: list, epochs: int) -> str:
    """Markdown: per epoch, each side's mean over seeds (and the seeds), and ours minus the reference."""
    def mean(values):
        return sum(values) / len(values) if values else None

    sides = {s: [r for r in results if r["side"] == s] for s in ("airbench94", "ours")}
    head = "| epoch | airbench94 (reference) | ours | ours - reference |\n|---|---|---|---|\n"
    lines = []
    for e in range(epochs + 1):
        cells = []
        for side in ("airbench94", "ours"):
            vals = [r["final_tta" if e == epochs else "per_epoch"] for r in sides[side]]
            vals = vals if e == epochs else [v[e] for v in vals if len(v) > e]
            m = mean(vals)
            cells.append(m)
        fmt = ["-" if m is None else f"{100 * m:.2f}%" for m in cells]
        diff = "-" if None in cells else f"{100 * (cells[1] - cells[0]):+.2f}"
        label = f"{epochs}, with TTA" if e == epochs else str(e + 1)
        lines.append(f"| {label} | {fmt[0]} | {fmt[1]} | {diff} |")
    seeds = {s: sorted(r["seed"] for r in rs) for s, rs in sides.items()}
    notes = (f"\nSeeds: reference {seeds['airbench94']}, ours {seeds['ours']} (cells are means). "
             "TTA: the reference's tta_level 2, ours the recipe's eval.tta.\n")
    return head + "\n".join(lines) + notes


def smoke(out: Path) -> None:
    """Our side on generated images for one epoch: the script's plumbing, not accuracy (CI)."""
    from PIL import Image

    name = "airbench-side-by-side-smoke"
    check_results(out, [*result_files(name), "ours-seed0.json"])

    def draw(data: Path) -> None:  # the staging folder made_once renames to out/data
        rng = torch.Generator().manual_seed(0)
        for split, count in (("train", 24), ("test", 8)):
            for label in range(3):  # each class its own mean colour, so a few updates can learn something
                class_dir = data / split / f"class{label}"
                class_dir.mkdir(parents=True)
                for i in range(count):
                    pixels = (torch.rand(32, 32, 3, generator=rng) * 96 + 80 * label).to(torch.uint8).numpy()
                    Image.fromarray(pixels).save(class_dir / f"{i}.jpg", quality=90)

    data = made_once(out / "data", {"made_by": "bench/airbench_side_by_side.py --smoke", "classes": 3,
                                    "train_per_class": 24, "test_per_class": 8, "seed": 0}, draw, option="--out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = out / "ours-seed0"
    start = time.perf_counter()
    subprocess.run(ours_command(data, run_dir, 1, 0, ["train.batch_size=16", "eval.batch_size=32",
                                                       "data.image_size=32", "train.mixed_precision=no"]),
                   check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    finish_ours(run_dir, 0, out / "ours-seed0.json", time.perf_counter() - start, recipe_tta([]))
    result = json.loads((out / "ours-seed0.json").read_text())
    assert len(result["per_epoch"]) == 1 and 0 <= result["final_tta"] <= 1, result
    assert result["tta"] == "flip_translate", result  # the recipe's, not the run's eval.tta=none
    write_results(out, name, [result], table([result], 1))
    print(table([result], 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--airbench", type=Path, help="a checkout of KellerJordan/cifar10-airbench")
    p.add_argument("--data", type=Path, help="an ImageFolder root with train/ and test/ (the CIFAR-10 JPEGs)")
    p.add_argument("--out", type=Path, default=Path("/tmp/airbench-side"))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sides", nargs="+", default=["airbench94", "ours"], choices=["airbench94", "ours"])
    p.add_argument("--reference-precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--ours", nargs="*", default=[], help="extra key=value overrides for our side")
    p.add_argument("--threads", type=int, default=2, help="torch threads per side")
    p.add_argument("--parallel", action="store_true", help="run every side and seed at once")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="only the table, from every side's results already in --out (runs made in several calls)")
    p.add_argument("--_reference", nargs=2, metavar=("SEED", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.out = args.out.resolve()
    if args.smoke:
        return smoke(args.out)
    if args.report:
        return report(args.out, [json.loads(f.read_text()) for side in ("airbench94", "ours")
                                 for f in sorted(args.out.glob(f"{side}-seed*.json"))], args.epochs)
    if args._reference:  # a child of the run below, in --out, which the parent made
        torch.set_num_threads(args.threads)
        return run_reference(args.airbench.resolve(), args.out, args.epochs, int(args._reference[0]),
                             args.reference_precision, Path(args._reference[1]))
    if args.data is None or ("airbench94" in args.sides and args.airbench is None):
        p.error("--data is needed, and --airbench for the reference side")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    # every file this run leaves in --out, checked before hours of training
    check_results(args.out, [*result_files("side_by_side"), *(f"{side}-seed{seed}.{ext}" for side in args.sides
                                                             for seed in args.seeds for ext in ("json", "log"))])
    if "airbench94" in args.sides:
        write_reference_data(args.data.resolve(), args.out)
    jobs = []  # (side, seed, command, result file, run dir)
    for seed in args.seeds:
        for side in args.sides:
            result = args.out / f"{side}-seed{seed}.json"
            if side == "airbench94":
                cmd = [sys.executable, __file__, "--airbench", str(args.airbench), "--out", str(args.out),
                       "--epochs", str(args.epochs), "--threads", str(args.threads), "--reference-precision",
                       args.reference_precision, "--_reference", str(seed), str(result)]
                jobs.append((side, seed, cmd, result, None))
            else:
                run_dir = args.out / f"ours-seed{seed}"
                jobs.append((side, seed, ours_command(args.data.resolve(), run_dir, args.epochs, seed, args.ours),
                             result, run_dir))
    running = []
    out = bench_folder(args.out, "--out")
    for side, seed, cmd, result, run_dir in jobs:
        log = fresh_log(out, f"{side}-seed{seed}.log")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        running.append((proc, side, seed, result, run_dir, time.perf_counter(), recipe_tta(args.ours)))
        if not args.parallel:
            _finish(*running.pop())
    for item in running:
        _finish(*item)
    report(args.out, [json.loads(r.read_text()) for _, _, _, r, _ in jobs], args.epochs)


def report(out: Path, results: list, epochs: int) -> None:
    md = table(results, epochs)
    write_results(out, "side_by_side", results, md)
    print(md)


def _finish(proc, side, seed, result, run_dir, start, tta) -> None:
    if proc.wait() != 0:
        sys.exit(f"{side} seed {seed} failed (exit {proc.returncode}): see its .log beside {result}")
    if run_dir is not None:
        finish_ours(run_dir, seed, result, time.perf_counter() - start, tta)


if __name__ == "__main__":
    main()
