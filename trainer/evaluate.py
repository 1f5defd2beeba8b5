"""`trainer eval`: score an exported model on a dataset split, on one or many processes, and write eval.json."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from omegaconf import OmegaConf

from trainer import host_memory
from trainer.config import eval_batch_size, load_config, load_yaml
from trainer.data import data_inputs
from trainer.data.datasets import Fit
from trainer.data.on_ranks import build_data_on_ranks
from trainer.distributed import agree, make_accelerator, print0
from trainer.errors import ConfigError
from trainer.evaluation import evaluate
from trainer.export import find_model_dir, load_exported
from trainer.outputs import output_file
from trainer.predict import model_inputs
from trainer.tasks import TASKS, report_files, task_data_mismatch, task_from_meta


def eval_split(data_cfg, configured: str, as_configured: bool, trained_on: Optional[str]) -> Tuple[str, str]:
    """Which split `trainer eval` scores, and why, in words for its output. A folder of class folders with no
    train/ (so no val/ or test/ either) named by data.root on the command line is scored whole: a user pointing
    eval at a folder of test images expects every image, not the seeded data.val_fraction hold-out that training
    would take from it. Not when it is the folder the run trained on: scoring it whole would score training
    images; nor when this command says eval.split (or `as_configured` says otherwise)."""
    if as_configured or data_cfg.format != "imagefolder" or not data_cfg.root:
        return configured, f"eval.split={configured}"
    root = Path(data_cfg.root)
    split_layout = (root / "train").is_dir() or (root / "train.csv").is_file()  # a multi-label folder has splits
    if not root.is_dir() or split_layout:
        return configured, f"eval.split={configured}"
    if trained_on and Path(trained_on).resolve() == root.resolve():
        return configured, (f"eval.split={configured}: the run trained on this folder, so only its held-out "
                            f"share is scored")
    return "all", ("a folder of class folders without train/, val/ or test/ is scored whole; eval.split=val scores "
                   "its seeded data.val_fraction hold-out instead")


def run_eval(model_path: str, overrides: List[str], output: Optional[str] = None, overwrite: bool = False) -> dict:
    def said(key: str) -> bool:  # did this command set the key itself?
        return any(o.startswith(f"{key}=") for o in overrides)

    model_dir = find_model_dir(model_path)
    # a model inside a run folder: start from that run's config, so the data keys need not be repeated
    run_dir = model_dir.parent if (model_dir.parent / "config.yaml").is_file() else None
    if run_dir is None and not said("data.root") and not said("data.format"):
        raise ConfigError(f"{model_dir} is an exported model without its run's config: say which data to score, "
                          f"e.g. trainer eval --model {model_path} data.root=/path/to/images")
    base = OmegaConf.to_container(load_yaml(run_dir / "config.yaml", "run config")) if run_dir else None
    cfg = load_config(None, overrides, base=base)
    split, why = eval_split(cfg.data, cfg.eval.split, said("eval.split") or not said("data.root"),
                            (base or {}).get("data", {}).get("root"))
    model, meta = load_exported(str(model_dir))
    mismatch = task_data_mismatch(meta["task"], cfg.data, advise=False)
    if mismatch:  # before any data is read: a classifier would try to score boxes as labels
        raise ConfigError(f"{model_dir} holds a {meta['task']} model, which cannot score this data ({mismatch})")
    # the input pipeline is the model's, not re-measured on the new data
    cfg.data.image_size, cfg.data.mean, cfg.data.std = meta["image_size"], meta["mean"], meta["std"]
    if TASKS[meta["task"]].fixed_input_size:  # the classifiers' resize and crop (segmentation, detection: their own)
        fit = Fit.from_meta(meta)
        cfg.data.crop_mode, cfg.data.crop_pct, cfg.data.interpolation = (fit.crop_mode, fit.crop_pct,
                                                                          fit.interpolation)
    cfg.data.exif_orientation = meta.get("exif_orientation", False)
    cfg.data.scaled_decode = meta.get("scaled_decode", False)  # older models were evaluated on whole decodes
    task = task_from_meta(meta)
    if output is None and run_dir is None:
        raise ConfigError(f"{model_dir} is an exported model outside a run: its eval.json and plots are its "
                          f"training's; say where this evaluation goes with --output PATH")
    # checked now, before any data is read: never into the data or the model, never over a file of the user's
    # (eval.json and the plots beside it, unless --overwrite)
    out, name = output_file(Path(output) if output else run_dir / "eval.json", "eval", "--output",
                            data_inputs(cfg.data).extend(model_inputs(model_dir)), overwrite,
                            companions=report_files(task)[1:])
    target = out.root / name
    # fp32 unless asked: the same arithmetic as `trainer predict`, so both give the same probabilities
    acc = make_accelerator(cfg.train.device, cfg.train.mixed_precision if said("train.mixed_precision") else "no")
    say = print0(acc)
    data = build_data_on_ranks(acc, cfg.data, cfg.seed, (split,), say)
    dataset = data.datasets[split]
    say(f"[eval] scoring the {split} split of {data.source}: {len(dataset)} images ({why})")
    agree(acc, lambda: task.match_data(data, dataset))  # the data's classes against the model's
    if said("eval.threshold"):  # else the model's own (possibly tuned) threshold
        task.threshold = cfg.eval.threshold
    task.topk = tuple(cfg.eval.topk)
    if hasattr(task, "validation_loss"):  # a detector: its loss scored only on request (eval.detection_loss)
        task.validation_loss, task.coco_backend = cfg.eval.detection_loss, cfg.eval.coco_backend
    model.to(acc.device)
    # the model's own test-time augmentation (model.json), unless this command says eval.tta=...
    tta = cfg.eval.tta if said("eval.tta") else meta.get("tta", "none")
    with host_memory.kept(cfg.train.keep_freed_memory):  # the run's setting, or this command's override
        metrics, outputs = evaluate(model, dataset, task, acc, eval_batch_size(cfg), cfg.data.num_workers, tta=tta)

    def write() -> dict:
        report = {"model": str(model_dir), "architecture": meta["architecture"], "task": meta["task"],
                  "split": split, "data": data.source, "processes": acc.num_processes, "tta": tta, **metrics}
        with out.staged(stale=report_files(task)[1:]) as stage:  # placed whole once every plot is drawn
            task.write_report(stage, report, outputs, name=name)
        print(f"[eval] {split} of {data.source}:\n{task.summary(metrics)}", flush=True)
        print(f"[eval] written: {target} (plots in {target.parent / 'plots'})", flush=True)
        return report

    report = agree(acc, write, main_only=True, share=True)  # every rank returns the same report
    del model
    acc.free_memory()
    acc.end_training()
    return report
