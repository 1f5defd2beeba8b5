"""What a distributed segmentation evaluation pays for agreeing across processes, next to its forward passes.

One U-Net and a synthetic split (fixed seed) of --images images at --size px with 5 classes, evaluated through
trainer.evaluation.evaluate on 1 process and on 2 (torchrun, gloo, one thread each): the wall time of the whole
evaluation, and of the evaluator's `finish` alone (the one all-reduce of the int64 confusion matrix plus the
gather of the per-image losses), medians of --repeats runs.

    .venv/bin/python bench/seg_eval.py --images 256 --size 64 --repeats 5
    .venv/bin/python bench/seg_eval.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate import check_results, result_files, write_results  # noqa: E402


def one(args) -> None:
    """Inside each process: time the evaluation and its finish; rank 0 prints one JSON line."""
    import torch

    from trainer.distributed import make_accelerator
    from trainer.evaluation import batch_share, evaluate
    from trainer.tasks import Segmentation

    acc = make_accelerator("cpu", "no")
    task = Segmentation(["background", "a", "b", "c", "d"])
    torch.manual_seed(0)
    model = task.build_model("unet", args.size)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, args.size, args.size, generator=g), torch.randint(0, 5, (args.size, args.size), generator=g))
            for _ in range(args.images)]
    totals, finishes = [], []
    for _ in range(args.repeats):
        mine = batch_share(len(data), 16, acc.process_index, acc.num_processes)  # as evaluate shares the split
        evaluator = task.evaluator(data, torch.tensor(mine, dtype=torch.int64))
        inner = evaluator.finish

        def timed_finish(accelerator):
            start = time.perf_counter()
            out = inner(accelerator)
            finishes.append(time.perf_counter() - start)
            return out

        evaluator.finish = timed_finish
        start = time.perf_counter()
        evaluate(model, data, task, acc, batch_size=16, evaluator=evaluator)
        totals.append(time.perf_counter() - start)
    if acc.is_main_process:
        print(json.dumps({"processes": acc.num_processes, "total_s": statistics.median(totals),
                          "finish_s": statistics.median(finishes)}), flush=True)
    acc.end_training()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.images, args.size, args.repeats = 8, 16, 1
    if args.one:
        return one(args)
    name = "seg-eval" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(name))
    rows = []
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # the caller's kept after
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    flags = ["--one", "--images", str(args.images), "--size", str(args.size), "--repeats", str(args.repeats)]
    for procs in (1, 2):
        cmd = ([sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(procs)]) + [__file__, *flags]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
        line = [l for l in res.stdout.splitlines() if l.startswith("{")]
        if res.returncode != 0 or not line:
            raise SystemExit(f"{procs} process(es) failed: {res.stderr[-2000:]}")
        rows.append(json.loads(line[-1]))
    result = {"benchmark": "seg_eval", "images": args.images, "size": args.size, "repeats": args.repeats,
              "rows": rows, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = ["| processes | evaluation s (median) | finish s (all-reduce + gather) | finish share |", "|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['total_s']:.3f} | {r['finish_s']:.4f} | {r['finish_s'] / r['total_s']:.2%} |"
              for r in rows]
    write_results(args.out, name, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
