"""`trainer eval`: score an exported model on a dataset split, on one or many processes, and write eval.json."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from trainer.config import load_config
from trainer.data import build_data
from trainer.errors import DataError
from trainer.export import find_model_dir, load_exported
from trainer.loop import make_accelerator
from trainer.metrics import collect_outputs, compute_metrics, format_metrics
from trainer.tasks import Task
from trainer.tracking import write_json


def print_main(acc, *args) -> None:
    acc.print(*args, flush=True)


def run_eval(model_path: str, overrides: List[str], output: Optional[str] = None) -> dict:
    model_dir = find_model_dir(model_path)
    # a model inside a run folder: start from that run's config, so the data keys need not be repeated
    run_dir = model_dir.parent if (model_dir.parent / "config.yaml").is_file() else None
    base = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")) if run_dir else None
    cfg = load_config(None, overrides, base=base)
    model, meta = load_exported(str(model_dir))
    # the input pipeline is the model's, not re-measured on the new data
    cfg.data.image_size, cfg.data.mean, cfg.data.std = meta["image_size"], meta["mean"], meta["std"]
    acc = make_accelerator(cfg.train.device, cfg.train.mixed_precision)
    split = cfg.eval.split
    with acc.main_process_first():
        data = build_data(cfg.data, cfg.seed, (split,), verbose=lambda *a: print_main(acc, *a))
    dataset = data.datasets[split]
    classes = meta["classes"]
    if data.classes != classes:  # same names in another order, or a subset: map labels by name
        unknown = sorted(set(data.classes) - set(classes))
        if unknown:
            raise DataError(f"classes in {data.source} that the model does not know: {unknown} "
                            f"(model classes: {classes})")
        dataset.labels = [classes.index(data.classes[label]) for label in dataset.labels]
    task = Task(meta["task"], len(classes))
    threshold = meta.get("threshold") or 0.5
    loader = DataLoader(dataset, batch_size=cfg.eval.batch_size or 2 * cfg.train.batch_size, shuffle=False,
                        num_workers=cfg.data.num_workers)
    model, loader = acc.prepare(model, loader)
    out = collect_outputs(model, loader, task, acc)
    metrics = compute_metrics(out["probs"], out["labels"], out["losses"], task, threshold, cfg.eval.topk)
    report = {"model": str(model_dir), "architecture": meta["architecture"], "task": meta["task"],
              "split": split, "data": data.source, "processes": acc.num_processes, **metrics}
    target = Path(output) if output else (run_dir or model_dir) / "eval.json"
    if acc.is_main_process:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, report)
    print_main(acc, f"[eval] {split} of {data.source}: {format_metrics(metrics)}")
    print_main(acc, f"[eval] written: {target}")
    del model, loader
    acc.free_memory()
    acc.end_training()
    return report
