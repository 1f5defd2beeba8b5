"""Hyperparameter sweeps: a sweep file expands into runs (grid or random search over config keys), run as a
SLURM job array (one override set per array task, `%` concurrency limit) or one after another locally;
`collect` gathers every run's best metric and swept values into a sorted table.

A sweep file (YAML):
    name: lr-wd                         # folder sweeps/<name>/ (or --dir)
    recipe: configs/quickstart_binary.yaml
    overrides: [train.epochs=4]         # applied to every run
    method: grid                        # grid | random
    samples: 8                          # random only: how many runs
    seed: 0                             # random only
    max_parallel: 4                     # SLURM array concurrency (%)
    parameters:
      optim.lr: [0.01, 0.003]           # a list: grid values / random choices
      optim.weight_decay: {distribution: log_uniform, min: 1.0e-5, max: 1.0e-2}   # random only
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np

from trainer.config import load_config, load_spec_file
from trainer.data import data_inputs
from trainer.errors import ConfigError, TrainerError
from trainer.files import read_json
from trainer.slurm_submit import submit_array
from trainer.outputs import Folder, Inputs, open_folder
from trainer.tasks import TASKS

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
SWEEP_KEYS = {"name", "recipe", "overrides", "method", "samples", "seed", "max_parallel", "parameters"}


def load_sweep(path: str) -> dict:
    p = Path(path)
    spec = load_spec_file(p, "sweep", SWEEP_KEYS, ("recipe", "parameters"))
    if not isinstance(spec["parameters"], dict) or not spec["parameters"]:
        raise ConfigError(f"sweep file {path}: 'parameters' must map config keys to values, got {spec['parameters']!r}")
    if not isinstance(spec.get("overrides", []), list):
        raise ConfigError(f"sweep file {path}: 'overrides' must be a list of key=value")
    spec.setdefault("name", p.stem)
    spec.setdefault("overrides", [])
    spec.setdefault("method", "grid")
    spec.setdefault("seed", 0)
    spec.setdefault("max_parallel", 0)
    if spec["method"] not in ("grid", "random"):
        raise ConfigError(f"sweep method must be grid or random, got {spec['method']!r}")
    if spec["method"] == "random" and int(spec.get("samples", 0)) < 1:
        raise ConfigError("a random sweep needs samples >= 1")
    return spec


def _sample(name: str, dist: dict, rng: np.random.Generator):
    kind, low, high = dist.get("distribution"), dist.get("min"), dist.get("max")
    if kind not in DISTRIBUTIONS or low is None or high is None or not low < high:
        raise ConfigError(f"sweep parameter {name}: need distribution in {DISTRIBUTIONS} and min < max, got {dist}")
    if kind == "uniform":
        return float(rng.uniform(low, high))
    if kind == "log_uniform":
        if low <= 0:
            raise ConfigError(f"sweep parameter {name}: log_uniform needs min > 0")
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return int(rng.integers(int(low), int(high) + 1))


def expand(spec: dict) -> List[dict]:
    """One {key: value} dict per run, in a fixed order."""
    params = spec["parameters"]
    if spec["method"] == "grid":
        for name, values in params.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grid sweep parameter {name} needs a non-empty list of values")
        names = list(params)
        return [dict(zip(names, combo)) for combo in itertools.product(*(params[n] for n in names))]
    rng = np.random.default_rng(spec["seed"])
    runs = []
    for _ in range(int(spec["samples"])):
        runs.append({name: (values[int(rng.integers(len(values)))] if isinstance(values, list)
                            else _sample(name, values, rng)) for name, values in params.items()})
    return runs


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) or v is None else str(v)


def prepare(sweep_file: str, out_dir: Optional[str] = None) -> Path:
    """Expand the sweep into sweeps/<name>/tasks.json, after checking every run's config loads. The folder is
    new, empty or this sweep's own, and lies outside everything the runs read."""
    spec = load_sweep(sweep_file)
    root = Path(out_dir or Path("sweeps") / spec["name"])
    inputs = Inputs([("the sweep file", sweep_file), ("the recipe", spec["recipe"])])
    tasks = []
    for i, values in enumerate(expand(spec)):
        overrides = list(spec["overrides"]) + [f"{k}={_value(v)}" for k, v in values.items()]
        run_dir = root / "runs" / f"{i:03d}"
        cfg = load_config(spec["recipe"], overrides + [f"run.dir={run_dir}"])  # a typo fails now, not in task 17
        inputs.extend(data_inputs(cfg.data))
        tasks.append({"index": i, "values": values, "args": [spec["recipe"], *overrides, f"run.dir={run_dir}"],
                      "run_dir": str(run_dir)})
    out = open_folder(root, "sweep", "sweep", "--dir", inputs, what="a sweep folder of the trainer")
    if (root / "tasks.json").is_file() and json.loads((root / "tasks.json").read_text()) != tasks:
        raise TrainerError(f"{root} holds a different sweep; choose another --dir or delete it")
    # everything the sweep writes at a fixed name, checked before the first: a refusal changes nothing
    out.check(["tasks.json", "sweep.json", "results.csv", "results.md"], folders=["status", "runs"])
    out.write_json("tasks.json", tasks)
    out.write_json("sweep.json", spec)
    return root


def sweep_folder(sweep_dir) -> Folder:
    """A sweep's folder to write into (its status and results): only one a sweep made. Everything in it is
    written as the sweep's, `trainer collect` included (a rerun of either replaces the results)."""
    return open_folder(sweep_dir, "sweep", "sweep", "sweep folder", what="a sweep folder of the trainer")


def task_args(sweep_dir: str, index: int) -> List[str]:
    tasks = json.loads((Path(sweep_dir) / "tasks.json").read_text())
    if not 0 <= index < len(tasks):
        raise TrainerError(f"sweep {sweep_dir} has tasks 0..{len(tasks) - 1}, not {index}")
    return tasks[index]["args"]


def submit_slurm(sweep_dir: Path, script: str, sbatch_args: List[str]) -> str:
    tasks = json.loads((sweep_dir / "tasks.json").read_text())
    spec = json.loads((sweep_dir / "sweep.json").read_text())
    job = submit_array(script, len(tasks), sweep_dir, f"TRAINER_SWEEP={sweep_dir}", sbatch_args,
                       int(spec.get("max_parallel") or 0))
    print(f"[sweep] submitted array job {job} ({len(tasks)} tasks); watch: squeue -j {job}; "
          f"results: trainer collect {sweep_dir}", flush=True)
    return job


def run_local(sweep_dir: Path) -> None:
    """Each task as its own process, one after another; a failed task is recorded and the sweep goes on."""
    tasks = json.loads((sweep_dir / "tasks.json").read_text())
    out = sweep_folder(sweep_dir)
    for task in tasks:
        print(f"[sweep] task {task['index']}/{len(tasks) - 1}: {' '.join(task['args'][1:])}", flush=True)
        rc = subprocess.run([sys.executable, "-m", "trainer", "train", *task["args"]]).returncode
        out.write_json(f"status/{task['index']}.json", {"exit_code": rc, "job": "local"})


def _cell(v) -> str:
    return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def collect(sweep_dir: str, metric: Optional[str] = None) -> List[dict]:
    """One row per task: status (done / unfinished / failed / not started), the monitored metric of its best
    evaluation, final accuracy, swept values. Written to results.csv and results.md, best first."""
    root = Path(sweep_dir)
    if not (root / "tasks.json").is_file():
        raise TrainerError(f"{sweep_dir} is not a sweep folder (no tasks.json) nor a tune folder (no tune.json)")
    tasks = json.loads((root / "tasks.json").read_text())
    rows, trained = [], {}  # trained: each done run's task, which says which way its monitor is better
    for task in tasks:
        run_dir = Path(task["run_dir"])
        summary_path = run_dir / "summary.json"
        status_path = root / "status" / f"{task['index']}.json"
        exit_info = read_json(status_path) or None  # absent, or cut (a status written before the atomic one)
        row = {"task": task["index"], "status": "not started", "monitor": None, "value": None,
               "final_accuracy": None, **{k: v for k, v in task["values"].items()}, "run_dir": str(run_dir)}
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text())
            trained[task["index"]] = TASKS.get(summary.get("task"))
            monitor = metric or summary.get("monitor", "accuracy")
            best = summary.get("best") or {}
            row.update(status="done", monitor=monitor, value=best.get(monitor),
                       final_accuracy=(summary.get("final") or {}).get("accuracy"))
        elif exit_info is not None and exit_info.get("exit_code") not in (0, 3, None):
            row["status"] = f"failed (exit {exit_info['exit_code']})"
        elif (run_dir / "checkpoints").is_dir() or (run_dir / "metrics.jsonl").is_file():
            row["status"] = "unfinished"
        rows.append(row)
    done = [r for r in rows if r["status"] == "done" and r["value"] is not None]
    spec = trained[done[0]["task"]] if done else None
    sign = -1 if spec is None or spec.higher_is_better(done[0]["monitor"].removeprefix("raw_")) else 1
    done.sort(key=lambda r: sign * r["value"])
    ordered = done + [r for r in rows if r not in done]
    columns = ["task", "status", "monitor", "value", "final_accuracy", *tasks[0]["values"].keys(), "run_dir"] if tasks else []
    out = sweep_folder(root)
    out.check(["results.csv", "results.md"])  # both, before either is written: a refusal changes nothing
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(ordered)
    out.write("results.csv", table.getvalue())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in ordered]
    out.write("results.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    print(f"[sweep] {len(done)}/{len(rows)} done; written {root / 'results.csv'} and {root / 'results.md'}", flush=True)
    return ordered
