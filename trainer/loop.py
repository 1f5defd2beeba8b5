"""`train(cfg)`: the one training loop, top to bottom.

setup (accelerator; the run directory checked and locked, new or resumed from its newest checkpoint that
verifies; data, task, model, optimizer; every start-up step agreed by all ranks) -> the run directory
written -> step loop (forward, backward, clip, step with lr from `lr_at`) -> periodic blocks (log,
checkpoint, evaluate, export best) -> export the final model and its reports.

Resuming is exact: the shuffle order is a pure function of (seed, epoch), augmentation of (seed, epoch,
sample), and the checkpoint holds everything else (weights, optimizer, every rank's RNG, the position in
the epoch, the logging accumulators), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer import requests
from trainer.checkpoint import (capture_rng, check_compatible, checkpoint_name, read_checkpoint, restore_rng, rotate,
                                verify_checkpoint, write_checkpoint)
from trainer.config import Config, config_changes, to_dict, to_yaml
from trainer.data import build_data, class_balanced_sampler, data_fingerprint, data_roots
from trainer.data.device import first_images, to_device_loader
from trainer.distributed import SharedError, agree, check_processes, main_first, make_accelerator, sync_buffers
from trainer.errors import ConfigError, TrainerError
from trainer.export import export_model
from trainer.files import atomic_write, atomic_write_json, read_json
from trainer.metrics import (collect_outputs, compute_metrics, headline, higher_is_better, scalar_metrics,
                             score_outputs)
from trainer.models import build_model, check_input_size
from trainer.optim import Lookahead, build_optimizer, lr_at
from trainer.rundir import commit, open_run
from trainer.tasks import Task, class_weights, resolve_task
from trainer.reports import format_summary, plot_training_curves, write_eval_report
from trainer.tracking import Tracker, default_run_dir, environment, new_run_id, truncate_rows


def model_meta(cfg: Config, task: Task, classes, mean, std, small_input_stem: bool, positive_index: int) -> dict:
    """What `trainer predict` needs besides the weights (model.json)."""
    return {
        "architecture": cfg.model.name, "task": task.kind, "num_outputs": task.num_outputs,
        "classes": list(classes), "class_to_idx": {c: i for i, c in enumerate(classes)},
        "image_size": cfg.data.image_size, "small_input_stem": small_input_stem,
        "mean": list(mean), "std": list(std),
        "threshold": cfg.eval.threshold if task.kind == "binary" else None,
        "positive_class": classes[positive_index] if task.kind == "binary" else None,
        "tta": cfg.eval.tta,  # applied by `trainer eval` and `trainer predict` too
        "exif_orientation": cfg.data.exif_orientation,  # read images as training did
    }


def train(cfg: Config) -> dict:
    t_start = time.time()
    requests.begin_startup()  # until the step loop: a stop request leaves at once (nothing worth saving yet)
    try:
        # ---- setup: processes, seeds ----
        acc = make_accelerator(cfg.train.device, cfg.train.mixed_precision, cfg.train.grad_accum_steps,
                               cfg.train.dist_timeout_s, log_with="wandb" if cfg.wandb.enabled else None)

        def say(*args) -> None:  # global rank 0 only (acc.print prints once per node); flushed for SLURM/CI logs
            if acc.is_main_process:
                print(*args, flush=True)

        check_processes(acc, say, cfg.train.dist_timeout_s)
        set_seed(cfg.seed)  # same on every rank: identical initial weights, one shuffle order

        # ---- run directory: checked and locked by the main process; nothing is written before every check ----
        # Each start-up step runs through `agree`: an error on any rank ends every rank with the same one line.
        cfg.run.dir = agree(acc, lambda: str(cfg.run.dir or default_run_dir(cfg.run.name)), main_only=True,
                            share=True)
        run_dir = Path(cfg.run.dir)
        plan = agree(acc, lambda: open_run(run_dir, cfg.run.resume, cfg.run.overwrite, data_roots(cfg.data)),
                     main_only=True, share=True)
        with plan:  # the main process holds the run's lock until the end; a failed start leaves nothing behind
            seen = agree(acc, lambda: compare_with_checkpoint(plan, cfg), main_only=True, share=True)
            if plan.kind == "complete":
                say(f"[trainer] {run_dir} is already complete (update {seen.get('update', '?')}); nothing to do. "
                    f"Pass run.overwrite=true to train it again from scratch")
                if seen.get("changes"):
                    say(f"[trainer] not applied, this config differs from the run's: {'; '.join(seen['changes'])} "
                        f"(run.allow_config_change=true continues training it under them)")
                acc.end_training()
                summary = run_dir / "summary.json"
                return json.loads(summary.read_text()) if summary.is_file() else {}
            return run_training(cfg, acc, plan, say, t_start)
    finally:
        requests.end_startup()


def compare_with_checkpoint(plan, cfg: Config) -> dict:
    """Main process: the checkpoint this run resumes from (its own) against this config, before any data is
    read. Keys that change the data order or the schedule are refused (unless run.allow_config_change); for
    a complete run they are only reported (nothing is trained or written). Returns {changes, update}.
    (A checkpoint of another run, run.resume=, is compared once the model is built: that it fits the model
    at all is said first.)"""
    if plan.checkpoint is None or not plan.in_place:
        return {}
    state = json.loads((plan.checkpoint / "state.json").read_text())
    changes = config_changes(state["config"], to_dict(cfg)) if "config" in state else []
    if changes and not cfg.run.allow_config_change and plan.kind != "complete":
        raise ConfigError(changed_config_message(plan.checkpoint, changes))
    if changes and plan.kind == "complete" and cfg.run.allow_config_change:
        plan.kind = "resume"  # meant: a finished run continues from its final checkpoint
        changes = []
    return {"changes": changes, "update": state["update"]}


def changed_config_message(checkpoint: Path, changes: list) -> str:
    return (f"resuming {checkpoint}, but this config changes what the run trains ({'; '.join(changes)}); pass "
            f"run.allow_config_change=true if you mean it, or choose a new run.dir")


def run_training(cfg: Config, acc, plan, say, t_start: float) -> dict:
    """The run itself, once its directory is decided and locked: data, model, resume, the step loop, export."""
    run_dir = plan.dir
    resume_from, in_place = plan.checkpoint if plan.kind == "resume" else None, plan.in_place
    small_stem = cfg.model.small_input_stem if cfg.model.small_input_stem is not None else cfg.data.image_size <= 64

    # the network against the input size, before any data is read: a throwaway model, built under a forked RNG
    # so that the real model's initial weights stay those of the seed
    def probe_input_size() -> None:
        with torch.random.fork_rng(devices=[]):
            check_input_size(build_model(cfg.model.name, 2, image_size=cfg.data.image_size,
                                         small_input_stem=small_stem, verbose=lambda *_: None),
                             cfg.model.name, cfg.data.image_size)

    agree(acc, probe_input_size)
    # ---- data (the main process first: it writes the generated dataset; the others then read it) ----
    data = main_first(acc, lambda: build_data(cfg.data, cfg.seed, ("train", "val"), verbose=say))
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    num_classes = len(data.classes)

    def build() -> tuple:
        """Task, training loader and model; every check of the config against the data."""
        kind = resolve_task(cfg.task, num_classes)
        if kind == "binary" and cfg.loss.label_smoothing > 0:
            raise ConfigError("loss.label_smoothing applies to multiclass tasks only")
        if kind == "multiclass" and cfg.loss.pos_weight is not None:
            raise ConfigError("loss.pos_weight applies to binary tasks only (use loss.class_weighted for multiclass)")
        task = Task(kind, num_classes, label_smoothing=cfg.loss.label_smoothing, pos_weight=cfg.loss.pos_weight,
                    weights=class_weights(data.train_counts) if cfg.loss.class_weighted else None)
        positive_index = 1  # binary: the class whose probability the threshold applies to
        if cfg.eval.positive_class is not None:
            if kind != "binary":
                raise ConfigError("eval.positive_class applies to binary tasks only")
            if cfg.eval.positive_class not in data.classes:
                raise ConfigError(f"eval.positive_class '{cfg.eval.positive_class}' is not a class; "
                                  f"classes: {data.classes}")
            positive_index = data.classes.index(cfg.eval.positive_class)
        probe = scalar_metrics(compute_metrics(np.eye(num_classes, dtype=np.float32), np.arange(num_classes),
                                               np.zeros(num_classes), Task(kind, num_classes), data.classes,
                                               topk=cfg.eval.topk))
        if cfg.eval.monitor not in probe or cfg.eval.monitor in ("num_samples", "threshold"):
            raise ConfigError(f"eval.monitor '{cfg.eval.monitor}' is not a {kind} metric; choose one of "
                              f"{sorted(k for k in probe if k not in ('num_samples', 'threshold'))}")
        global_batch = cfg.train.batch_size * acc.num_processes
        if global_batch > len(train_set):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {acc.num_processes} process(es) = "
                              f"{global_batch} is larger than the training split ({len(train_set)} images)")
        model = build_model(cfg.model.name, task.num_outputs, image_size=cfg.data.image_size,
                            small_input_stem=small_stem, pretrained_path=cfg.model.pretrained_path, verbose=say)
        sampler = (class_balanced_sampler(train_set.labels, num_classes, cfg.seed)
                   if cfg.data.sampler == "weighted" else None)
        aug = cfg.data.augment
        if cfg.data.loader == "device":  # the whole split decoded once onto the device; batched augmentation there
            t_decode = time.time()
            train_dl = to_device_loader(train_set, cfg.data.image_size, acc.device, cfg.train.batch_size, data.mean,
                                        data.std, cfg.seed, acc.process_index, acc.num_processes, aug.crop_padding,
                                        aug.flip_mode, aug.hflip, cfg.model.channels_last)
            say(f"[trainer] data.loader=device: {len(train_set)} training images decoded to a uint8 tensor on "
                f"{acc.device} ({train_dl.images.numel() / 2**20:.0f} MiB) in {time.time() - t_decode:.1f} s")
        else:
            workers = cfg.data.num_workers
            # persistent: workers are started once (the epoch reaches them through shared memory, see datasets.py)
            loader_kw = dict(num_workers=workers, pin_memory=acc.device.type == "cuda", persistent_workers=workers > 0,
                             prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None)
            train_dl = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=sampler is None, sampler=sampler,
                                  # its own generator: worker seeds never draw from the global RNG (exact resume)
                                  generator=torch.Generator().manual_seed(cfg.seed), drop_last=False, **loader_kw)
        if hasattr(model, "init_from_data") and not cfg.model.pretrained_path:  # e.g. airbench's whitening filters
            model.init_from_data(train_dl.first(5000) if cfg.data.loader == "device" else
                                 first_images(train_set, cfg.data.image_size, data.mean, data.std, 5000))
        return kind, task, positive_index, global_batch, model, sampler, train_dl

    kind, task, positive_index, global_batch, model, sampler, train_dl = agree(acc, build)
    eval_task = Task(kind, num_classes)  # metrics use the plain log loss: no smoothing, no class weights
    eval_batch = cfg.eval.batch_size or 2 * cfg.train.batch_size  # per process; no gradients, so larger

    # ---- model and optimizer ----
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.model.compile:  # in place: parameter names (checkpoints, exports) stay those of the plain model
        model.compile()
    fused = cfg.optim.fused if cfg.optim.fused is not None else acc.device.type == "cuda"
    opt = build_optimizer(model, cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum,
                          cfg.optim.nesterov, cfg.optim.betas, cfg.optim.bias_lr_scale, fused)
    if cfg.data.loader == "device":  # not a DataLoader: nothing for accelerate to wrap (it is already sharded)
        model, opt = acc.prepare(model, opt)
    else:
        model, opt, train_dl = acc.prepare(model, opt, train_dl)
    # the slow weights of Lookahead/EMA, the same on every rank (it follows the synchronised weights)
    lookahead = Lookahead(acc.unwrap_model(model)) if cfg.optim.lookahead_every else None

    # ---- derived numbers (all in optimizer updates, so the schedule ignores the process count) ----
    steps_per_epoch = len(train_dl)  # per-process micro-batches
    updates_per_epoch = math.ceil(steps_per_epoch / cfg.train.grad_accum_steps)
    total_updates = cfg.train.epochs * updates_per_epoch
    if cfg.train.max_steps is not None:
        total_updates = min(total_updates, cfg.train.max_steps)
    warmup_updates = round(cfg.optim.warmup_epochs * updates_per_epoch)
    milestones = [round(e * updates_per_epoch) for e in cfg.optim.step_milestones]

    def lr_for(update: int) -> float:
        return lr_at(update, total_updates, cfg.optim.lr, warmup_updates, cfg.optim.schedule,
                     cfg.optim.min_lr_ratio, milestones, cfg.optim.step_gamma, cfg.optim.warmup_start_ratio)

    # ---- resume: weights, optimizer, RNG, position (read and checked before anything is written) ----
    fingerprint = data_fingerprint(train_set, data.classes)
    pos = {"epoch": 0, "step_in_epoch": 0, "update": 0, "samples_seen": 0, "metrics_rows": 0,
           "best": None, "log": None, "wandb_run_id": None, "done": False}

    def load_resume() -> list:
        """Every rank: the checkpoint into the model, optimizer, scaler, RNG and position; returns notes."""
        nonlocal lookahead
        notes = []
        ckpt = read_checkpoint(resume_from)
        check_compatible(ckpt, cfg.model.name, kind, data.classes, acc.unwrap_model(model))
        if not in_place and "config" in ckpt["state"] and not cfg.run.allow_config_change:
            changes = config_changes(ckpt["state"]["config"], to_dict(cfg))
            if changes:
                raise ConfigError(changed_config_message(resume_from, changes))
        saved_print = ckpt["state"].get("data_fingerprint")
        if saved_print is not None and saved_print != fingerprint and not cfg.run.allow_config_change:
            raise ConfigError(f"resuming {resume_from}: the training data differ from the checkpoint's (another "
                              f"file list, order or classes), so the position in the epoch would mean other "
                              f"images; pass run.allow_config_change=true if you mean it")
        acc.unwrap_model(model).load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        if lookahead is not None:
            if "lookahead" in ckpt["extra"]:
                lookahead.load_state_dict(ckpt["extra"]["lookahead"])
            else:  # e.g. weights from a run without it: start the slow copy from them
                lookahead = Lookahead(acc.unwrap_model(model))
                notes.append(f"{resume_from} has no lookahead state: the slow weights start from its weights")
        if ckpt["state"].get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["state"]["scaler"])
        saved_world = len(ckpt["state"]["rng"])
        if saved_world == acc.num_processes:
            restore_rng(ckpt["rng_tensors"][acc.process_index], ckpt["state"]["rng"][acc.process_index])
        else:
            notes.append(f"warning: checkpoint written by {saved_world} process(es), resuming on "
                         f"{acc.num_processes}: the data order holds, but random draws (dropout) will differ")
        pos.update({k: ckpt["state"][k] for k in pos if k in ckpt["state"]})
        if not in_place:  # weights and position from another run; this run keeps its own log and W&B run
            pos.update(metrics_rows=0, wandb_run_id=None, done=False)
        if pos["done"] and cfg.run.allow_config_change:  # a finished run continued under a changed config
            pos["done"] = False
        return notes

    if resume_from is not None:
        for note in agree(acc, load_resume):
            say(f"[trainer] {note}")
        say(f"[trainer] resuming from {resume_from} (update {pos['update']}, epoch {pos['epoch']}, "
            f"batch {pos['step_in_epoch']} of the epoch)")
    if pos["done"]:
        say(f"[trainer] {run_dir} is already complete (update {pos['update']}); nothing to do. "
            f"Pass run.overwrite=true to train it again from scratch")
        acc.end_training()
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}

    # ---- the run directory is written now that every check has passed ----
    meta = model_meta(cfg, task, data.classes, data.mean, data.std, small_stem, positive_index)
    derived = {"processes": acc.num_processes, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
               "per_device_batch": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
               "global_batch": global_batch * cfg.train.grad_accum_steps, "steps_per_epoch": steps_per_epoch,
               "updates_per_epoch": updates_per_epoch, "total_updates": total_updates,
               "warmup_updates": warmup_updates, "peak_lr": cfg.optim.lr, "task": kind, "classes": data.classes,
               "train_samples": len(train_set), "val_samples": len(val_set), "train_class_counts": data.train_counts,
               "skipped_images": data.skipped, "data": data.source, "mean": data.mean, "std": data.std}
    wandb_id = agree(acc, lambda: pos["wandb_run_id"] or new_run_id(), main_only=True, share=True)

    def start_run() -> int:
        """Main process: commit the plan (marker, damaged checkpoints moved aside, an overwrite's deletions),
        then config.yaml (+ its history), run.json and metrics.jsonl cut back to the checkpoint's rows.
        Returns the last step W&B already holds (-1: none)."""
        for line in commit(plan):
            say(f"[trainer] {line}")
        continues = in_place or plan.kind == "restart"  # this run's own log: cut back to the checkpoint's rows
        seen_step = truncate_rows(run_dir / "metrics.jsonl", pos["metrics_rows"]) if continues else -1
        previous = read_json(run_dir / "run.json").get("starts", [])  # deleted by an overwrite; none if new
        history = run_dir / "config_history" / f"start-{len(previous) + 1:03d}.yaml"
        history.parent.mkdir(exist_ok=True)
        atomic_write(history, to_yaml(cfg))
        atomic_write(run_dir / "config.yaml", to_yaml(cfg))
        atomic_write_json(run_dir / "run.json", {"derived": derived, "environment": environment(
            acc.num_processes, str(acc.device), acc.mixed_precision), "wandb_run_id": wandb_id,
            "starts": previous + [{"update": pos["update"], "kind": plan.kind,
                                   "config": str(history.relative_to(run_dir)),
                                   "resumed_from": str(resume_from) if resume_from else None,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]})
        return seen_step

    wandb_seen_step = agree(acc, start_run, main_only=True, share=True)
    tracker = Tracker(acc, run_dir, cfg.wandb.enabled, rows=pos["metrics_rows"], wandb_after_step=wandb_seen_step)
    if cfg.wandb.enabled:
        acc.init_trackers(cfg.wandb.project, config=to_dict(cfg), init_kwargs={"wandb": {
            "name": run_dir.name, "dir": str(run_dir), "tags": list(cfg.wandb.tags), "entity": cfg.wandb.entity,
            "id": wandb_id, "resume": "allow"}})
    say(f"[trainer] {kind} | {num_classes} classes | {len(train_set)} train / {len(val_set)} val images | "
        f"model {cfg.model.name}")
    say(f"[trainer] processes={acc.num_processes} device={acc.device} mixed_precision={acc.mixed_precision} "
        f"per_device_batch={cfg.train.batch_size} grad_accum={cfg.train.grad_accum_steps} "
        f"global_batch={derived['global_batch']} steps_per_epoch={steps_per_epoch} "
        f"updates_per_epoch={updates_per_epoch} total_updates={total_updates} peak_lr={cfg.optim.lr}")
    say(f"[trainer] run directory: {run_dir}")
    requests.end_startup()  # from here a stop request is acted on at the next step boundary, after a save

    # ---- the step loop ----
    update, samples_seen = pos["update"], pos["samples_seen"]
    best = pos["best"] or {"value": None, "update": None, "metrics": None}
    last_metrics, last_outputs = None, None
    log_state = pos["log"] or {"loss_sum": [0.0] * acc.num_processes, "loss_count": 0, "from_update": update}
    own_sum = log_state["loss_sum"][acc.process_index] if len(log_state["loss_sum"]) == acc.num_processes \
        else sum(log_state["loss_sum"]) / acc.num_processes  # another process count: keep the mean right
    # on device: .item() would sync every step; float64 so a resumed sum equals the uninterrupted one exactly
    loss_sum = torch.tensor(own_sum, dtype=torch.float64, device=acc.device)
    loss_count, log_from_update = log_state["loss_count"], log_state["from_update"]
    t_log, samples_at_log = time.time(), samples_seen
    sign = 1 if higher_is_better(cfg.eval.monitor) else -1
    ckpt_root = run_dir / "checkpoints"

    def save_checkpoint(epoch: int, step_in_epoch: int, done: bool = False) -> None:
        """Every rank calls this (RNG states are gathered); the main process writes."""
        per_rank = gather_object([(capture_rng(), loss_sum.item())])  # each rank's RNG and loss accumulator
        rng = [r for r, _ in per_rank]

        def write() -> None:
            state = {"architecture": cfg.model.name, "task": kind, "classes": data.classes,
                     "epoch": epoch, "step_in_epoch": step_in_epoch, "samples_seen": samples_seen,
                     "metrics_rows": tracker.rows, "wandb_run_id": wandb_id, "done": done,
                     "best": {k: (scalar_metrics(v) if k == "metrics" and v else v) for k, v in best.items()},
                     "log": {"loss_sum": [v for _, v in per_rank], "loss_count": loss_count,
                             "from_update": log_from_update},
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes,
                     # what a resume compares itself with: the config and the training data's identity
                     "config": to_dict(cfg), "data_fingerprint": fingerprint}
            extra = {"lookahead": lookahead.state_dict()} if lookahead is not None else None
            written = write_checkpoint(ckpt_root, update, acc.unwrap_model(model).state_dict(), opt.state_dict(), rng,
                                       state, extra=extra)
            problem = verify_checkpoint(written)  # read back before older ones are rotated away (~0.03 s / 300 MB)
            if problem is not None:
                raise TrainerError(f"checkpoint {written} did not read back ({problem}); older checkpoints kept")
            keep = checkpoint_name(best["update"]) if cfg.checkpoint.keep_best and best["update"] is not None else None
            rotate(ckpt_root, cfg.checkpoint.keep_last, keep)

        # nobody runs ahead (or exits) before the checkpoint is complete; a failed write (full disk) ends all
        agree(acc, write, main_only=True)

    def log_train(epoch_float: float) -> float:
        nonlocal loss_sum, loss_count, log_from_update, t_log, samples_at_log
        totals = acc.reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(loss_count))]), reduction="sum")
        mean_loss = (totals[0] / totals[1].clamp_min(1)).item()
        if not math.isfinite(mean_loss):
            raise SharedError(f"non-finite training loss ({mean_loss}) between updates {log_from_update} and "
                               f"{update}; lower optim.lr, set train.clip_grad_norm, or check the data")
        now = time.time()
        tracker.log({"type": "train", "step": update, "epoch": round(epoch_float, 4), "samples_seen": samples_seen,
                     "lr": lr_for(max(update - 1, 0)), "loss": mean_loss,
                     "throughput": (samples_seen - samples_at_log) / max(now - t_log, 1e-9)})
        if not show_bar:
            say(f"[train] step {update} epoch {epoch_float:.2f} loss {mean_loss:.4f} lr {lr_for(max(update - 1, 0)):.3g} "
                f"{(samples_seen - samples_at_log) / max(now - t_log, 1e-9):.0f} img/s")
        loss_sum, loss_count, log_from_update, t_log, samples_at_log = loss_sum * 0, 0, update, now, samples_seen
        return mean_loss

    def save_model(target: Path, metrics: dict, outputs: dict) -> None:
        """Main process: export weights + model.json (with the threshold used), then its eval report and plots."""
        export_model(acc.unwrap_model(model), target, {**meta, "threshold": metrics.get("threshold"), "step": update,
                                                       "metrics": scalar_metrics(metrics)})
        write_eval_report(target, metrics, outputs["probs"], outputs["labels"], data.classes, kind, positive_index)

    def evaluate(epoch_float: float) -> tuple:
        """Score the whole val split; every rank gets the same metrics; a new best is exported to best/."""
        sync_buffers(acc.unwrap_model(model), acc)  # every rank scores its shard with rank 0's BN statistics
        outputs = collect_outputs(model, val_set, eval_task, acc, eval_batch, cfg.data.num_workers, memory_format,
                                  cfg.eval.tta)
        metrics = agree(acc, lambda: score_outputs(outputs, eval_task, data.classes, cfg.eval.threshold, cfg.eval.topk,
                                                   positive_index, cfg.eval.threshold_tuning, cfg.eval.target_recall),
                        main_only=True, share=True)
        tracker.log({"type": "eval", "split": "val", "step": update, "epoch": round(epoch_float, 4),
                     "samples_seen": samples_seen, **scalar_metrics(metrics)})
        value = metrics.get(cfg.eval.monitor)
        if value is not None and (best["value"] is None or sign * value > sign * best["value"]):
            best.update(value=value, update=update, metrics=scalar_metrics(metrics))
            agree(acc, lambda: save_model(run_dir / "best", metrics, outputs), main_only=True)
        say(f"[eval] step {update} epoch {epoch_float:.2f}: {headline(metrics)}")
        return metrics, outputs

    def agree_on_requests() -> tuple:
        """(save, stop) requested on any rank; every rank gets the same answer at the same step."""
        if acc.num_processes == 1:  # nothing to agree on: no device tensor, so no GPU sync per update
            return requests.pending()
        flags = torch.tensor([float(f) for f in requests.pending()], device=acc.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    # a bar on a terminal; in a log file (SLURM, CI) a plain line per log step instead
    show_bar = acc.is_main_process and cfg.train.progress_bar and sys.stderr.isatty()
    done, stopped = update >= total_updates, False
    epoch, step_in_epoch = pos["epoch"], pos["step_in_epoch"]
    for epoch in range(pos["epoch"], cfg.train.epochs):
        if done:
            break
        train_set.set_epoch(epoch)  # per-sample augmentation seeds
        if sampler is not None:
            sampler.set_epoch(epoch)
        train_dl.set_epoch(epoch)  # seedable shuffle order
        skip = pos["step_in_epoch"] if epoch == pos["epoch"] else 0  # batches this epoch already trained on
        if cfg.data.loader == "device":
            loader = train_dl.batches(skip)
        else:
            loader = acc.skip_first_batches(train_dl, skip) if skip else train_dl
        bar = tqdm(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=not show_bar, dynamic_ncols=True)
        step_in_epoch = skip
        for x, y in loader:
            x = x.to(memory_format=memory_format)
            with acc.accumulate(model):
                loss = task.loss(model(x), y)
                acc.backward(loss)
                if acc.sync_gradients:
                    if cfg.train.clip_grad_norm is not None:
                        acc.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                    for group in opt.param_groups:
                        group["lr"] = lr_for(update) * group.get("lr_scale", 1.0)
                opt.step()  # a no-op on accumulation micro-steps (accelerate skips it)
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            loss_count += 1
            samples_seen += x.shape[0] * acc.num_processes
            step_in_epoch += 1
            bar.update(1)
            if not acc.sync_gradients:
                continue
            # ---- an optimizer update is complete: the only place where the run may be saved or stopped ----
            update += 1
            if lookahead is not None and update % cfg.optim.lookahead_every == 0:
                sync_buffers(acc.unwrap_model(model), acc)  # the same slow copy on every rank
                lookahead.step(acc.unwrap_model(model), cfg.optim.lookahead_decay * (update / total_updates) ** 3)
            if update % cfg.train.log_every_steps == 0:
                bar.set_postfix(loss=f"{log_train(epoch + step_in_epoch / steps_per_epoch):.4f}")
            done = update >= total_updates
            save_now, stopped = agree_on_requests()
            if not done and (save_now or stopped or (cfg.checkpoint.every_steps
                                                     and update % cfg.checkpoint.every_steps == 0)):
                save_checkpoint(epoch, step_in_epoch)
                requests.clear()
            if done or stopped:
                break
        bar.close()
        if stopped and not done:
            break
        epoch_float = epoch + step_in_epoch / steps_per_epoch
        if loss_count:
            log_train(epoch_float)
        last_epoch = done or epoch == cfg.train.epochs - 1
        if last_epoch and lookahead is not None:  # the final model is the slow copy
            sync_buffers(acc.unwrap_model(model), acc)
            lookahead.step(acc.unwrap_model(model), 1.0)
        if last_epoch or (cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0):
            last_metrics, last_outputs = evaluate(epoch_float)
        if not last_epoch and cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
            save_checkpoint(epoch + 1, 0)
        done = done or last_epoch

    if stopped and not done:
        say(f"[trainer] stopped on request at update {update}; checkpoint saved. Run the same command to resume.")
        tracker.close()
        del model, opt, train_dl
        acc.free_memory()
        acc.end_training()
        return {"run_dir": str(run_dir), "stopped": True, "updates": update}

    # ---- export, reports and summary ----
    if last_metrics is None:  # resumed after the last evaluation, before the end was saved
        last_metrics, last_outputs = evaluate(epoch + step_in_epoch / steps_per_epoch)
    summary = {"run_dir": str(run_dir), "task": kind, "updates": update, "samples_seen": samples_seen,
               "final": scalar_metrics(last_metrics), "best": best["metrics"], "monitor": cfg.eval.monitor,
               "seconds": round(time.time() - t_start, 1)}

    def finish() -> None:
        save_model(run_dir / "model", last_metrics, last_outputs)
        curves = run_dir / "plots" / "training_curves.png"
        plot_training_curves(run_dir / "metrics.jsonl", curves)
        tracker.log_images({"plots/training_curves": curves,
                            **{f"plots/{p.stem}": p for p in sorted((run_dir / "model" / "plots").glob("*.png"))}},
                           step=update)
        atomic_write_json(run_dir / "summary.json", summary)  # from now on the same command says "complete"

    agree(acc, finish, main_only=True)
    save_checkpoint(cfg.train.epochs, 0, done=True)  # the same command run again now says "complete"
    say(f"[trainer] final model on the val split:\n{format_summary(last_metrics, data.classes, kind)}")
    best_text = "n/a" if best["value"] is None else f"{best['value']:.4f}"
    say(f"[trainer] done in {summary['seconds']} s: val accuracy {last_metrics['accuracy']:.4f} "
        f"(best {cfg.eval.monitor} {best_text}) on {last_metrics['num_samples']} images")
    say(f"[trainer] run directory: {run_dir}  (final model: {run_dir / 'model'}, best: {run_dir / 'best'})")
    # release DDP and the process group in this order: avoids gloo's abort at interpreter exit
    tracker.close()
    del model, opt, train_dl
    acc.free_memory()
    acc.end_training()
    return summary
