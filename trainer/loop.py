"""`train(cfg)`: the one training loop, top to bottom.

setup (accelerator, data, task, model, optimizer) -> run directory, new or resumed from its latest
checkpoint -> step loop (forward, backward, clip, step with lr from `lr_at`) -> periodic blocks (log,
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
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from trainer import requests
from trainer.checkpoint import (capture_rng, check_compatible, checkpoint_name, find_resume, read_checkpoint,
                                restore_rng, rotate, write_checkpoint)
from trainer.config import Config, to_dict, to_yaml
from trainer.data import build_data, class_balanced_sampler
from trainer.data.device import first_images, to_device_loader
from trainer.distributed import check_processes, make_accelerator, sync_buffers
from trainer.errors import ConfigError, TrainerError
from trainer.export import export_model
from trainer.metrics import (collect_outputs, compute_metrics, headline, higher_is_better, scalar_metrics,
                             score_outputs)
from trainer.models import build_model
from trainer.optim import Lookahead, build_optimizer, lr_at
from trainer.tasks import Task, class_weights, resolve_task
from trainer.reports import format_summary, plot_training_curves, write_eval_report
from trainer.tracking import (Tracker, check_run_dir_free, create_run_dir, default_run_dir, environment,
                              new_run_id, truncate_rows, write_json)


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
    }


def train(cfg: Config) -> dict:
    t_start = time.time()
    # ---- setup: processes, seeds ----
    acc = make_accelerator(cfg.train.device, cfg.train.mixed_precision, cfg.train.grad_accum_steps,
                           cfg.train.dist_timeout_s, log_with="wandb" if cfg.wandb.enabled else None)

    def say(*args) -> None:  # global rank 0 only (acc.print prints once per node); flushed for SLURM/CI logs
        if acc.is_main_process:
            print(*args, flush=True)

    check_processes(acc, say, cfg.train.dist_timeout_s)

    set_seed(cfg.seed)  # same on every rank: identical initial weights, one shuffle order
    run_dir = [str(Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg.run.name))]
    broadcast_object_list(run_dir)  # one name for all ranks, even with timestamps
    run_dir = Path(run_dir[0])
    cfg.run.dir = str(run_dir)
    resume_from = find_resume(run_dir, cfg.run.resume, cfg.run.overwrite)
    in_place = resume_from is not None and run_dir.resolve() in resume_from.resolve().parents
    # one of our runs that died before its first checkpoint: nothing was saved, so it starts again in place
    restart = resume_from is None and not cfg.run.overwrite and (run_dir / "run.json").is_file()
    if restart:
        say(f"[trainer] {run_dir} has no complete checkpoint yet: starting it again from the beginning")
    if not in_place:
        check_run_dir_free(run_dir, cfg.run.overwrite or restart)  # every rank checks before anyone creates it
    acc.wait_for_everyone()

    # ---- data ----
    with acc.main_process_first():  # the main process writes the generated dataset; the others then read it
        data = build_data(cfg.data, cfg.seed, ("train", "val"), verbose=say)
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    num_classes = len(data.classes)

    # ---- task ----
    kind = resolve_task(cfg.task, num_classes)
    if kind == "binary" and cfg.loss.label_smoothing > 0:
        raise ConfigError("loss.label_smoothing applies to multiclass tasks only")
    if kind == "multiclass" and cfg.loss.pos_weight is not None:
        raise ConfigError("loss.pos_weight applies to binary tasks only (use loss.class_weighted for multiclass)")
    task = Task(kind, num_classes, label_smoothing=cfg.loss.label_smoothing, pos_weight=cfg.loss.pos_weight,
                weights=class_weights(data.train_counts) if cfg.loss.class_weighted else None)
    eval_task = Task(kind, num_classes)  # metrics use the plain log loss: no smoothing, no class weights
    positive_index = 1  # binary: the class whose probability the threshold applies to
    if cfg.eval.positive_class is not None:
        if kind != "binary":
            raise ConfigError("eval.positive_class applies to binary tasks only")
        if cfg.eval.positive_class not in data.classes:
            raise ConfigError(f"eval.positive_class '{cfg.eval.positive_class}' is not a class; classes: {data.classes}")
        positive_index = data.classes.index(cfg.eval.positive_class)
    probe = scalar_metrics(compute_metrics(np.eye(num_classes, dtype=np.float32), np.arange(num_classes),
                                           np.zeros(num_classes), eval_task, data.classes, topk=cfg.eval.topk))
    if cfg.eval.monitor not in probe or cfg.eval.monitor in ("num_samples", "threshold"):
        raise ConfigError(f"eval.monitor '{cfg.eval.monitor}' is not a {kind} metric; choose one of "
                          f"{sorted(k for k in probe if k not in ('num_samples', 'threshold'))}")

    # ---- batch sizes and loaders ----
    global_batch = cfg.train.batch_size * acc.num_processes
    if global_batch > len(train_set):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {acc.num_processes} process(es) = "
                          f"{global_batch} is larger than the training split ({len(train_set)} images)")
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
    eval_batch = cfg.eval.batch_size or 2 * cfg.train.batch_size  # per process; no gradients, so larger

    # ---- model and optimizer ----
    small_stem = cfg.model.small_input_stem if cfg.model.small_input_stem is not None else cfg.data.image_size <= 64
    model = build_model(cfg.model.name, task.num_outputs, image_size=cfg.data.image_size,
                        small_input_stem=small_stem, pretrained_path=cfg.model.pretrained_path, verbose=say)
    if hasattr(model, "init_from_data") and not cfg.model.pretrained_path:  # e.g. airbench's whitening filters
        model.init_from_data(train_dl.first(5000) if cfg.data.loader == "device" else
                             first_images(train_set, cfg.data.image_size, data.mean, data.std, 5000))
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
    pos = {"epoch": 0, "step_in_epoch": 0, "update": 0, "samples_seen": 0, "metrics_rows": 0,
           "best": None, "log": None, "wandb_run_id": None, "done": False}
    if resume_from is not None:
        ckpt = read_checkpoint(resume_from)
        check_compatible(ckpt, cfg.model.name, kind, data.classes, acc.unwrap_model(model))
        acc.unwrap_model(model).load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        if lookahead is not None:
            if "lookahead" in ckpt["extra"]:
                lookahead.load_state_dict(ckpt["extra"]["lookahead"])
            else:  # e.g. weights from a run without it: start the slow copy from them
                lookahead = Lookahead(acc.unwrap_model(model))
                say(f"[trainer] {resume_from} has no lookahead state: the slow weights start from its weights")
        if ckpt["state"].get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["state"]["scaler"])
        saved_world = len(ckpt["state"]["rng"])
        if saved_world == acc.num_processes:
            restore_rng(ckpt["rng_tensors"][acc.process_index], ckpt["state"]["rng"][acc.process_index])
        else:
            say(f"[trainer] warning: checkpoint written by {saved_world} process(es), resuming on "
                f"{acc.num_processes}: the data order holds, but random draws (dropout) will differ")
        pos.update({k: ckpt["state"][k] for k in pos if k in ckpt["state"]})
        if not in_place:  # weights and position from another run; this run keeps its own log and W&B run
            pos.update(metrics_rows=0, wandb_run_id=None, done=False)
        say(f"[trainer] resuming from {resume_from} (update {pos['update']}, epoch {pos['epoch']}, "
            f"batch {pos['step_in_epoch']} of the epoch)")
        del ckpt
    if pos["done"]:
        say(f"[trainer] {run_dir} is already complete (update {pos['update']}); nothing to do. "
            f"Pass run.overwrite=true to train it again from scratch")
        acc.end_training()
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}

    # ---- run directory (created only now: bad input above has written nothing) ----
    meta = model_meta(cfg, task, data.classes, data.mean, data.std, small_stem, positive_index)
    derived = {"processes": acc.num_processes, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
               "per_device_batch": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
               "global_batch": global_batch * cfg.train.grad_accum_steps, "steps_per_epoch": steps_per_epoch,
               "updates_per_epoch": updates_per_epoch, "total_updates": total_updates,
               "warmup_updates": warmup_updates, "peak_lr": cfg.optim.lr, "task": kind, "classes": data.classes,
               "train_samples": len(train_set), "val_samples": len(val_set), "train_class_counts": data.train_counts,
               "skipped_images": data.skipped, "data": data.source, "mean": data.mean, "std": data.std}
    wandb_id = [pos["wandb_run_id"] or new_run_id()]
    broadcast_object_list(wandb_id)  # one W&B run for the whole training, across restarts
    wandb_id = wandb_id[0]
    wandb_seen_step = -1  # W&B already holds the rows up to this step (written before an interruption)
    if acc.is_main_process:
        if in_place:
            wandb_seen_step = truncate_rows(run_dir / "metrics.jsonl", pos["metrics_rows"])
        else:
            create_run_dir(run_dir, cfg.run.overwrite or restart)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        history = json.loads((run_dir / "run.json").read_text()).get("starts", []) if in_place else []
        write_json(run_dir / "run.json", {"derived": derived, "environment": environment(
            acc.num_processes, str(acc.device), acc.mixed_precision), "wandb_run_id": wandb_id,
            "starts": history + [{"update": pos["update"], "resumed_from": str(resume_from) if resume_from else None,
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]})
    acc.wait_for_everyone()
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
        if acc.is_main_process:
            state = {"architecture": cfg.model.name, "task": kind, "classes": data.classes,
                     "epoch": epoch, "step_in_epoch": step_in_epoch, "samples_seen": samples_seen,
                     "metrics_rows": tracker.rows, "wandb_run_id": wandb_id, "done": done,
                     "best": {k: (scalar_metrics(v) if k == "metrics" and v else v) for k, v in best.items()},
                     "log": {"loss_sum": [v for _, v in per_rank], "loss_count": loss_count,
                             "from_update": log_from_update},
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes}
            write_checkpoint(ckpt_root, update, acc.unwrap_model(model).state_dict(), opt.state_dict(), rng, state,
                             extra={"lookahead": lookahead.state_dict()} if lookahead is not None else None)
            keep = checkpoint_name(best["update"]) if cfg.checkpoint.keep_best and best["update"] is not None else None
            rotate(ckpt_root, cfg.checkpoint.keep_last, keep)
        acc.wait_for_everyone()  # nobody runs ahead (or exits) before the checkpoint is complete

    def log_train(epoch_float: float) -> float:
        nonlocal loss_sum, loss_count, log_from_update, t_log, samples_at_log
        totals = acc.reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(loss_count))]), reduction="sum")
        mean_loss = (totals[0] / totals[1].clamp_min(1)).item()
        if not math.isfinite(mean_loss):
            raise TrainerError(f"non-finite training loss ({mean_loss}) between updates {log_from_update} and "
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
        result = [None]
        if acc.is_main_process:
            try:
                result = [score_outputs(outputs, eval_task, data.classes, cfg.eval.threshold, cfg.eval.topk,
                                        positive_index, cfg.eval.threshold_tuning, cfg.eval.target_recall)]
            except TrainerError as err:  # raised on every rank below, so none waits for the others
                result = [str(err)]
        broadcast_object_list(result)
        if isinstance(result[0], str):
            raise TrainerError(result[0])
        metrics = result[0]
        tracker.log({"type": "eval", "split": "val", "step": update, "epoch": round(epoch_float, 4),
                     "samples_seen": samples_seen, **scalar_metrics(metrics)})
        value = metrics.get(cfg.eval.monitor)
        if value is not None and (best["value"] is None or sign * value > sign * best["value"]):
            best.update(value=value, update=update, metrics=scalar_metrics(metrics))
            if acc.is_main_process:
                save_model(run_dir / "best", metrics, outputs)
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
    if acc.is_main_process:
        save_model(run_dir / "model", last_metrics, last_outputs)
        curves = run_dir / "plots" / "training_curves.png"
        plot_training_curves(run_dir / "metrics.jsonl", curves)
        tracker.log_images({"plots/training_curves": curves,
                            **{f"plots/{p.stem}": p for p in sorted((run_dir / "model" / "plots").glob("*.png"))}},
                           step=update)
    summary = {"run_dir": str(run_dir), "task": kind, "updates": update, "samples_seen": samples_seen,
               "final": scalar_metrics(last_metrics), "best": best["metrics"], "monitor": cfg.eval.monitor,
               "seconds": round(time.time() - t_start, 1)}
    if acc.is_main_process:
        write_json(run_dir / "summary.json", summary)
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
