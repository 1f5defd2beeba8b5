"""What accelerate's own wrappers cost per training step, against the raw PyTorch calls they wrap.

One tiny model (flatten + linear, so the step itself costs almost nothing) and in-memory batches; three
loops over the same batches, alternating, several repeats, median ms per step:
  raw        forward, cross-entropy, optimizer.zero_grad, loss.backward(), optimizer.step()
  prepared   the same with accelerate's objects: `with accelerator.accumulate(model)`,
             `accelerator.backward(loss)`, the prepared (AcceleratedOptimizer) step and zero_grad
  unwrapped  the prepared model, but `loss.backward()` and the wrapped optimizer's own step/zero_grad
The difference prepared - raw is what accelerate adds to every step, whatever the model; trainer.loop uses
the prepared calls (they handle gradient accumulation, loss scaling and DDP's no_sync).

    .venv/bin/python bench/accelerate_wrappers.py --repeats 15
    .venv/bin/python bench/accelerate_wrappers.py --smoke
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gate import check_results, result_files, write_results

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="steps per timed loop")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: a check that it runs")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.repeats = 3, 2
    results_name = "accelerate-wrappers" + ("-smoke" if args.smoke else "")
    check_results(args.out, result_files(results_name))
    from accelerate import Accelerator
    import accelerate

    torch.manual_seed(0)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    device = acc.device

    def make():
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10)).to(device)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    xs = [torch.randn(args.batch, 3, 32, 32, device=device) for _ in range(args.steps)]
    ys = [torch.randint(0, 10, (args.batch,), device=device) for _ in range(args.steps)]
    raw_model, raw_opt = make()
    model, opt = acc.prepare(*make())

    def raw():
        for x, y in zip(xs, ys):
            loss = F.cross_entropy(raw_model(x), y)
            raw_opt.zero_grad(set_to_none=True)
            loss.backward()
            raw_opt.step()

    def prepared():
        for x, y in zip(xs, ys):
            with acc.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)

    def unwrapped():
        for x, y in zip(xs, ys):
            loss = F.cross_entropy(model(x), y)
            opt.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            opt.optimizer.step()

    loops = {"raw": raw, "prepared": prepared, "unwrapped": unwrapped}
    ms = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, fn in loops.items():  # alternating, so drift in machine speed hits all three alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ms[name].append(1000 * (time.perf_counter() - start) / args.steps)
    med = {name: statistics.median(v) for name, v in ms.items()}
    result = {"benchmark": "accelerate_wrappers", "device": str(device), "batch": args.batch, "steps": args.steps,
              "repeats": args.repeats, "ms_per_step": ms, "median_ms_per_step": med,
              "prepared_minus_raw_ms": med["prepared"] - med["raw"],
              "torch": torch.__version__, "accelerate": accelerate.__version__,
              "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    lines = ["| loop | ms per step (median) | min | max |", "|---|---|---|---|"]
    lines += [f"| {n} | {med[n]:.3f} | {min(v):.3f} | {max(v):.3f} |" for n, v in ms.items()]
    lines.append(f"| prepared - raw | {result['prepared_minus_raw_ms']:+.3f} | | |")
    write_results(args.out, results_name, result, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
