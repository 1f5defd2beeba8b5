"""What the checkpoint checksums cost, next to writing and loading the checkpoint itself.

For each model (AdamW state, so the checkpoint is about 3x the weights), several repeats:
  write    trainer.checkpoint.write_checkpoint: safetensors files, fsync, sha256 of each file, rename
  verify   trainer.checkpoint.verify_checkpoint: every file against its stored sha256 (what a resume adds)
  load     read_checkpoint + load_state_dict into the model and the optimizer, every byte read once (the
           resume itself: safetensors maps the files, so a byte is read when a tensor is first used)
  resume   verify, then load: what a resume costs with the check
Two cache states: warm (the files in the page cache: a resume right after a save on the same machine) and
cold (the page cache dropped first, as on a new node after preemption; root only: /proc/sys/vm/drop_caches).
The overhead of the check is (resume - load) / load.

    .venv/bin/python bench/checkpoint_io.py --models small_cnn resnet18 resnet50 --repeats 5
    .venv/bin/python bench/checkpoint_io.py --smoke
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gate import check_results, result_files, write_results

ROOT = Path(__file__).resolve().parents[1]
# the loop's fields a checkpoint must hold (their values do not matter here)
LOOP_STATE = {"epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "metrics_rows": 0, "architecture": "bench",
              "task": "multiclass", "classes": [], "done": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["small_cnn", "resnet18", "resnet50"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs")
    args = p.parse_args()
    if args.smoke:
        args.models, args.repeats = ["small_cnn"], 2
    results_name = "checkpoint-io" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(results_name))
    from trainer.checkpoint import capture_rng, read_checkpoint, verify_checkpoint, write_checkpoint
    from trainer.models import build_model
    from trainer.outputs import Folder

    can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK) and not args.smoke
    rows = []
    for name in args.models:
        model = build_model(name, 1000 if name.startswith("resnet") else 10, image_size=224, log=lambda *_: None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 3, 64, 64)).sum().backward()
        opt.step()  # the optimizer state exists (exp_avg, exp_avg_sq)
        times = {"write": [], "verify": [], "load": [], "cold_load": [], "cold_resume": []}
        with tempfile.TemporaryDirectory() as tmp:
            out = Folder(Path(tmp), "bench", owner="run")  # a run folder, as training writes its checkpoints
            size_mb = 0.0
            for r in range(args.repeats):
                start = time.perf_counter()
                folder = write_checkpoint(out, r + 1, model.state_dict(), opt.state_dict(), [capture_rng()], LOOP_STATE)
                times["write"].append(time.perf_counter() - start)
                size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
                start = time.perf_counter()
                problem = verify_checkpoint(folder)
                times["verify"].append(time.perf_counter() - start)
                assert problem is None, problem
                times["load"].append(timed(lambda: load(read_checkpoint, folder, model, opt)))
                if can_drop:
                    drop_page_cache()
                    times["cold_load"].append(timed(lambda: load(read_checkpoint, folder, model, opt)))
                    drop_page_cache()
                    times["cold_resume"].append(timed(lambda: (verify_checkpoint(folder),
                                                               load(read_checkpoint, folder, model, opt))))
        med = {k: statistics.median(v) if v else None for k, v in times.items()}
        rows.append({"model": name, "checkpoint_mb": round(size_mb, 1), "seconds": times, "median_s": med,
                     "warm_overhead": med["verify"] / med["load"],
                     "cold_overhead": (med["cold_resume"] - med["cold_load"]) / med["cold_load"] if can_drop else None})
        print(f"{name}: {size_mb:.1f} MB  {json.dumps({k: round(v, 3) for k, v in med.items() if v is not None})}",
              flush=True)
    result = {"benchmark": "checkpoint_io", "repeats": args.repeats, "rows": rows, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def cell(v, fmt="{:.3f}"):
        return "n/a" if v is None else fmt.format(v)

    lines = ["| model | checkpoint MB | write s | warm: verify s | warm: load s | warm: check / load | cold: load s "
             "| cold: verify + load s | cold: check / load |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['checkpoint_mb']} | {cell(r['median_s']['write'])} | {cell(r['median_s']['verify'])} "
              f"| {cell(r['median_s']['load'])} | {cell(r['warm_overhead'], '{:.0%}')} | {cell(r['median_s']['cold_load'])} "
              f"| {cell(r['median_s']['cold_resume'])} | {cell(r['cold_overhead'], '{:+.0%}')} |" for r in rows]
    write_results(args.out, results_name, result, "\n".join(lines))
    print("\n".join(lines))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load(read_checkpoint, folder: Path, model, opt) -> None:
    ckpt = read_checkpoint(folder)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    for tensors in (ckpt["model"], *ckpt["optimizer"]["state"].values(), *ckpt["rng_tensors"].values()):
        for t in tensors.values():
            if torch.is_tensor(t):
                t.float().sum()  # every mapped page read, as the first training step would


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3\n")


if __name__ == "__main__":
    main()
