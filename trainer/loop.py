"""`train(cfg)`: the one training loop, top to bottom.

setup (accelerator; the run directory checked and locked, new or resumed from its newest checkpoint that
verifies; data, task, model, optimizer; every start-up step agreed by all ranks) -> the run directory
written -> step loop (the task's loss, backward, clip, step with lr from `lr_at`) -> periodic blocks (log,
checkpoint; at each epoch's end evaluate and export the best) -> at the last update, the final model, its
reports and a final checkpoint.

What a batch, a loss, a metric or a report is belongs to the task (trainer/tasks); the loop only calls it.

Resuming is exact: the shuffle order is a pure function of (seed, epoch), augmentation of (seed, epoch,
sample), and the checkpoint holds everything else (weights, optimizer, every rank's RNG, the position in
the epoch, the logging accumulators), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from trainer import requests
from trainer.checkpoint import (capture_rng, check_compatible, checkpoint_name, read_checkpoint, restore_rng, rotate,
                                verify_checkpoint, write_checkpoint)
from trainer.config import Config, config_changes, eval_batch_size, load_yaml, to_dict, to_yaml
from trainer.data import data_fingerprint, data_inputs
from trainer.data.datasets import replaced_images
from trainer.data.loaders import build_train_loader, check_decode_device
from trainer.data.on_ranks import build_data_on_ranks
from trainer.distributed import agree, check_processes, make_accelerator, sync_buffers
from trainer.ema import ModelEma
from trainer.finetune import BackboneFreeze, FreezeAfter
from trainer.errors import ConfigError, TrainerError
from trainer.evaluation import evaluate
from trainer.export import model_card, write_model
from trainer.files import read_json
from trainer.metrics import headline, scalar_metrics
from trainer.models import build_model, check_input_size
from trainer.optim import Lookahead, lr_at, optimizer_from, schedule_from
from trainer.reports import plot_training_curves
from trainer.rundir import check_targets, commit, open_run
from trainer.tasks import build_task, report_files, task_spec
from trainer.tracking import LossLog, Tracker, default_run_dir, environment, new_run_id, truncate_rows


@dataclass
class LoopState:
    """Where a run is: what every checkpoint saves besides weights, optimizer and RNG, and a resume restores.
    "update" counts optimizer updates (the "step" of logs and checkpoint names); a batch is one micro-batch
    of this process."""
    update: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already trained on
    samples_seen: int = 0  # over all processes
    metrics_rows: int = 0  # rows in metrics.jsonl (a resume cuts the file back to them)
    best: dict = field(default_factory=lambda: {"value": None, "update": None, "metrics": None})
    log: Optional[dict] = None  # the loss accumulators since the last log row (tracking.LossLog.state)
    wandb_run_id: Optional[str] = None
    done: bool = False
    # early stopping: evaluations in a row without an improvement larger than min_delta over `reference`
    stale_evals: int = 0
    reference: Optional[float] = None
    stopped_early: Optional[str] = None  # why the run stopped before its last epoch

    def to_json(self, epoch: int, batch_in_epoch: int, done: bool) -> dict:
        """The checkpoint's copy; `epoch`/`batch_in_epoch` say where to resume (the next epoch after its end)."""
        return {"update": self.update, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "samples_seen": self.samples_seen, "metrics_rows": self.metrics_rows, "best": self.best,
                "wandb_run_id": self.wandb_run_id, "done": done, "stale_evals": self.stale_evals,
                "reference": self.reference, "stopped_early": self.stopped_early}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "LoopState":
        return cls(update=saved["update"], epoch=saved["epoch"],
                   # checkpoints before "step" meant updates only called it step_in_epoch
                   batch_in_epoch=saved.get("batch_in_epoch", saved.get("step_in_epoch", 0)),
                   samples_seen=saved["samples_seen"], metrics_rows=saved["metrics_rows"],
                   best=saved.get("best") or cls().best, log=saved.get("log"),
                   wandb_run_id=saved.get("wandb_run_id"), done=saved["done"],
                   stale_evals=saved.get("stale_evals", 0), reference=saved.get("reference"),
                   stopped_early=saved.get("stopped_early"))


def train(cfg: Config) -> dict:
    t_start = time.time()
    requests.begin_startup()  # until the step loop: a stop request leaves at once (nothing worth saving yet)
    if cfg.train.deterministic:  # before the first cuBLAS call (CUDA's reproducibility notes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
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
        inputs = data_inputs(cfg.data).add("model.pretrained_path", cfg.model.pretrained_path)
        plan = agree(acc, lambda: open_run(run_dir, cfg.run.resume, cfg.run.overwrite, inputs), main_only=True,
                     share=True)
        with plan:  # the main process holds the run's lock until the end; a failed start leaves nothing behind
            seen = agree(acc, lambda: compare_with_checkpoint(plan, cfg), main_only=True, share=True)
            if plan.kind == "complete":
                say(f"[trainer] {run_dir} is already complete (update {seen.get('update', '?')}); nothing to do. "
                    f"Pass run.overwrite=true to train it again from scratch")
                if seen.get("unloadable"):
                    say(f"[trainer] {seen['unloadable']}: the run cannot be continued from them; nothing was moved "
                        f"or changed")
                if seen.get("changes"):
                    say(f"[trainer] not applied, this config differs from the run's: {'; '.join(seen['changes'])}"
                        + ("" if seen.get("unloadable") else
                           " (run.allow_config_change=true continues training it under them)"))
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
    if plan.kind == "complete" and plan.checkpoint is None:
        return complete_without_checkpoint(plan, cfg)
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


def complete_without_checkpoint(plan, cfg: Config) -> dict:
    """Main process: a finished run none of whose checkpoints loads (each damaged, or all deleted). It is still
    complete (summary.json says so, and at which update), so the same command has nothing to do and says
    why it could not do more; asked to continue (a changed config under run.allow_config_change=true) it
    refuses in one line, as there is nothing to continue from. Nothing is loaded, moved or written either
    way. The config compared with is the run's config.yaml (its checkpoints hold the copy a resume uses)."""
    why = "; ".join(f"{f.name}: {problem}" for f, problem in plan.damaged)
    unloadable = f"none of its checkpoints loads ({why})" if why else "it has no checkpoint"
    try:
        finished_under = OmegaConf.to_container(load_yaml(plan.dir / "config.yaml", "the run's config"), resolve=True)
    except (OSError, ConfigError):  # absent or unreadable: what changed cannot be told
        finished_under = None
    changes = config_changes(finished_under, to_dict(cfg)) if isinstance(finished_under, dict) else []
    if changes and cfg.run.allow_config_change:
        raise TrainerError(f"run.dir {plan.dir} is complete, but {unloadable}: it cannot continue from them under "
                           f"the changed config ({'; '.join(changes)}); nothing was changed. Pass "
                           f"run.overwrite=true to train it again from scratch, or choose another run.dir")
    return {"changes": changes, "update": read_json(plan.dir / "summary.json").get("updates", "?"),
            "unloadable": unloadable}


def changed_config_message(checkpoint: Path, changes: list) -> str:
    return (f"resuming {checkpoint}, but this config changes what the run trains ({'; '.join(changes)}); pass "
            f"run.allow_config_change=true if you mean it, or choose a new run.dir")


def run_training(cfg: Config, acc, plan, say, t_start: float) -> dict:
    """The run itself, once its directory is decided and locked: data, task, model, resume, the step loop
    with its periodic blocks, and at the last update the final evaluation, export and save."""
    run_dir = plan.dir
    resume_from, in_place = plan.checkpoint if plan.kind == "resume" else None, plan.in_place
    small_stem = cfg.model.small_input_stem if cfg.model.small_input_stem is not None else cfg.data.image_size <= 64

    # the network against the input size, before any data is read: a throwaway model, built under a forked RNG
    # so that the real model's initial weights stay those of the seed
    def probe_input_size() -> None:
        with torch.random.fork_rng(devices=[]):
            check_input_size(build_model(cfg.model.name, 2, image_size=cfg.data.image_size,
                                         small_input_stem=small_stem, verbose=lambda *_: None,
                                         drop_path=cfg.model.drop_path, dropout=cfg.model.dropout),
                             cfg.model.name, cfg.data.image_size)

    if task_spec(cfg.task, cfg.data).fixed_input_size:  # classification; segmentation pads, detection resizes
        agree(acc, probe_input_size)

    def check_gpu_keys() -> None:
        if cfg.model.sync_bn and acc.device.type != "cuda":
            raise ConfigError(f"model.sync_bn=true needs GPUs: PyTorch's SyncBatchNorm runs only on CUDA (this "
                              f"run is on {acc.device.type}); set model.sync_bn=false")
        check_decode_device(cfg.data.decode_device, acc.device)

    agree(acc, check_gpu_keys)

    # ---- data and task (the main process scans first; the start-up checks of the files are split across ranks) ----
    data = build_data_on_ranks(acc, cfg.data, cfg.seed, ("train", "val"), say)
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    # eval.monitor=raw_<metric> (ema.evaluate=both) names the task's <metric> scored on the raw weights
    task_eval = replace(cfg.eval, monitor=cfg.eval.monitor.removeprefix("raw_")) if cfg.eval.monitor else cfg.eval
    task = agree(acc, lambda: build_task(cfg.task, data.classes, data.train_counts, cfg.loss, task_eval, cfg.data,
                                         cfg.model, data.category_ids))

    # ---- model and training loader ----
    def build() -> tuple:
        global_batch = cfg.train.batch_size * acc.num_processes
        if global_batch > len(train_set):
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {acc.num_processes} process(es) = "
                              f"{global_batch} is larger than the training split ({len(train_set)} images)")
        model = task.build_model(cfg.model.name, cfg.data.image_size, small_stem, cfg.model.pretrained_path, verbose=say,
                                 drop_path=cfg.model.drop_path, dropout=cfg.model.dropout)
        loader = build_train_loader(train_set, cfg.data, cfg.train.batch_size, cfg.seed, acc, data.mean, data.std,
                                    len(data.classes), cfg.model.channels_last, say,
                                    drop_last=task.drop_last if cfg.train.drop_last is None else cfg.train.drop_last,
                                    collate=task.collate)
        if hasattr(model, "init_from_data") and not cfg.model.pretrained_path:  # e.g. airbench's whitening filters
            model.init_from_data(loader.first(5000))
        return model, loader

    model, loader = agree(acc, build)  # a bad file met while decoding the split ends every rank alike
    if cfg.model.sync_bn:  # before DDP wraps it; the state_dict names stay BatchNorm's (exports load anywhere)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark and not cfg.train.deterministic
    if cfg.model.compile:  # in place: parameter names (checkpoints, exports) stay those of the plain model
        model.compile()
    opt = optimizer_from(model, cfg.optim, fused=cfg.optim.fused if cfg.optim.fused is not None
                         else acc.device.type == "cuda", model_name=cfg.model.name)
    model, opt = acc.prepare(model, opt)
    loader.prepare(acc)  # the DataLoader path: accelerate shards and seeds it; the device path needs nothing
    # the slow weights of Lookahead/EMA, the same on every rank (it follows the synchronised weights)
    core = acc.unwrap_model(model)  # the module itself (DDP's wrapper shares its tensors)
    lookahead = Lookahead(core) if cfg.optim.lookahead_every else None
    ema = ModelEma(core, cfg.ema.decay, cfg.ema.warmup, cfg.ema.warmup_power) if cfg.ema.decay > 0 else None
    # fine-tuning: the backbone (weights and BN statistics) held still for the first epochs; only the head trains
    freeze = agree(acc, lambda: BackboneFreeze(core, cfg.model.name)) if cfg.model.freeze_backbone_epochs else None
    # named parameters that stop training after some epochs (airbench94's whitening bias)
    after = cfg.optim.freeze_after_epochs
    retire = agree(acc, lambda: FreezeAfter(core, after)) if after else None
    eval_batch = eval_batch_size(cfg)

    # ---- derived numbers (in optimizer updates, so the schedule ignores the process count) ----
    batches_per_epoch = len(loader)  # per process
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum_steps)
    total_updates = cfg.train.epochs * updates_per_epoch
    if cfg.train.max_steps is not None:
        total_updates = min(total_updates, cfg.train.max_steps)
    schedule = schedule_from(cfg.optim, total_updates, updates_per_epoch)

    def lr_for(update: int) -> float:
        return lr_at(update, **schedule)

    # ---- resume: weights, optimizer, RNG, loop state (read and checked before anything is written) ----
    fingerprint = data_fingerprint(train_set, data.classes)
    state = LoopState()

    def load_resume() -> list:
        """Every rank: the checkpoint into the model, optimizer, scaler, RNG and loop state; returns notes."""
        nonlocal lookahead, ema, state
        notes = []
        ckpt = read_checkpoint(resume_from)
        check_compatible(ckpt, cfg.model.name, task.name, data.classes, core)
        if not in_place and "config" in ckpt["state"] and not cfg.run.allow_config_change:
            changes = config_changes(ckpt["state"]["config"], to_dict(cfg))
            if changes:
                raise ConfigError(changed_config_message(resume_from, changes))
        saved_print = ckpt["state"].get("data_fingerprint")
        if saved_print is not None and saved_print != fingerprint and not cfg.run.allow_config_change:
            raise ConfigError(f"resuming {resume_from}: the training data differ from the checkpoint's (another "
                              f"file list, order or classes), so the position in the epoch would mean other "
                              f"images; pass run.allow_config_change=true if you mean it")
        core.load_state_dict(ckpt["model"], strict=True)
        opt.load_state_dict(ckpt["optimizer"])
        if lookahead is not None:
            if "lookahead" in ckpt["extra"]:
                lookahead.load_state_dict(ckpt["extra"]["lookahead"])
            else:  # e.g. weights from a run without it: start the slow copy from them
                lookahead = Lookahead(core)
                notes.append(f"{resume_from} has no lookahead state: the slow weights start from its weights")
        if ema is not None:
            if "ema" in ckpt["extra"]:
                ema.load_state_dict(ckpt["extra"]["ema"])
            else:  # e.g. fine-tuning from a run without EMA: the average starts from the loaded weights
                ema = ModelEma(core, cfg.ema.decay, cfg.ema.warmup, cfg.ema.warmup_power)
                notes.append(f"{resume_from} has no EMA state: the average starts from its weights")
        if ckpt["state"].get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["state"]["scaler"])
        saved_world = len(ckpt["state"]["rng"])
        if saved_world == acc.num_processes:
            restore_rng(ckpt["rng_tensors"][acc.process_index], ckpt["state"]["rng"][acc.process_index])
        else:
            notes.append(f"warning: checkpoint written by {saved_world} process(es), resuming on "
                         f"{acc.num_processes}: the data order holds, but random draws (dropout) will differ")
        state = LoopState.from_checkpoint(ckpt["state"])
        if not in_place:  # weights and position from another run; this run keeps its own log and W&B run
            state.metrics_rows, state.wandb_run_id, state.done = 0, None, False
        if state.done and cfg.run.allow_config_change:  # a finished run continued under a changed config
            state.done = False
        return notes

    if resume_from is not None:
        for note in agree(acc, load_resume):
            say(f"[trainer] {note}")
        say(f"[trainer] resuming from {resume_from} (update {state.update}, epoch {state.epoch}, "
            f"batch {state.batch_in_epoch} of the epoch)")
    if state.done:
        say(f"[trainer] {run_dir} is already complete (update {state.update}); nothing to do. "
            f"Pass run.overwrite=true to train it again from scratch")
        acc.end_training()
        return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}

    # ---- the run directory is written now that every check has passed ----
    derived = {"processes": acc.num_processes, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
               "per_device_batch": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
               "global_batch": cfg.train.batch_size * acc.num_processes * cfg.train.grad_accum_steps,
               "batches_per_epoch": batches_per_epoch, "updates_per_epoch": updates_per_epoch,
               "total_updates": total_updates, "warmup_updates": schedule["warmup_updates"], "peak_lr": cfg.optim.lr,
               "task": task.name, "classes": data.classes, "train_samples": len(train_set),
               "val_samples": len(val_set), "train_class_counts": data.train_counts, "skipped_images": data.skipped,
               "data": data.source, "mean": data.mean, "std": data.std}
    state.wandb_run_id = agree(acc, lambda: state.wandb_run_id or new_run_id(), main_only=True, share=True)

    def start_run() -> int:
        """Main process: every file the run writes at a fixed name checked, then the plan committed (an
        overwrite's deletions, damaged checkpoints moved aside), then config.yaml (+ its history), run.json and
        metrics.jsonl cut back to the checkpoint's rows. Returns the last step W&B already holds (-1: none)."""
        check_targets(plan, report_files(task))
        for line in commit(plan):
            say(f"[trainer] {line}")
        out = plan.out
        continues = in_place or plan.kind == "restart"  # this run's own log: cut back to the checkpoint's rows
        seen_step = truncate_rows(out, "metrics.jsonl", state.metrics_rows) if continues else -1
        previous = read_json(run_dir / "run.json").get("starts", [])  # deleted by an overwrite; none if new
        number = len(previous) + 1
        while os.path.lexists(run_dir / f"config_history/start-{number:03d}.yaml"):  # a file kept by that name
            number += 1
        history = f"config_history/start-{number:03d}.yaml"
        out.write(history, to_yaml(cfg))
        out.write("config.yaml", to_yaml(cfg))
        out.write_json("run.json", {"derived": derived, "environment": environment(
            acc.num_processes, str(acc.device), acc.mixed_precision), "wandb_run_id": state.wandb_run_id,
            "starts": previous + [{"update": state.update, "kind": plan.kind, "config": history,
                                   "resumed_from": str(resume_from) if resume_from else None,
                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]})
        return seen_step

    wandb_seen_step = agree(acc, start_run, main_only=True, share=True)
    tracker = Tracker(acc, plan.out, cfg.wandb.enabled, rows=state.metrics_rows, wandb_after_step=wandb_seen_step)
    if cfg.wandb.enabled:
        acc.init_trackers(cfg.wandb.project, config=to_dict(cfg), init_kwargs={"wandb": {
            "name": run_dir.name, "dir": str(run_dir), "tags": list(cfg.wandb.tags), "entity": cfg.wandb.entity,
            "id": state.wandb_run_id, "resume": "allow"}})
    say(f"[trainer] {task.name} | {len(data.classes)} classes | {len(train_set)} train / {len(val_set)} val images "
        f"| model {cfg.model.name}")
    say(f"[trainer] processes={acc.num_processes} device={acc.device} mixed_precision={acc.mixed_precision} "
        f"per_device_batch={cfg.train.batch_size} grad_accum={cfg.train.grad_accum_steps} "
        f"global_batch={derived['global_batch']} batches_per_epoch={batches_per_epoch} "
        f"updates_per_epoch={updates_per_epoch} total_updates={total_updates} peak_lr={cfg.optim.lr}")
    say(f"[trainer] run directory: {run_dir}")
    requests.end_startup()  # from here a stop request is acted on at the next step boundary, after a save

    # ---- what the periodic blocks do ----
    loss_log = LossLog(acc, state.log, state.update, task.loss_parts(cfg.model.name))
    t_log, samples_at_log = time.time(), state.samples_seen
    monitor = cfg.eval.monitor or task.default_monitor
    sign = 1 if task.higher_is_better(monitor.removeprefix("raw_")) else -1
    # the weights that evaluation's metrics, best/ and model/ stand for: the EMA's unless raw ones are asked for
    scored = "raw" if ema is None or cfg.ema.evaluate == "raw" or monitor.startswith("raw_") else "ema"
    # a bar on a terminal; in a log file (SLURM, CI) a plain line per log step instead
    show_bar = acc.is_main_process and cfg.train.progress_bar and sys.stderr.isatty()

    def save_checkpoint(epoch: int, batch_in_epoch: int, done: bool = False) -> None:
        """Every rank calls this (RNG states and loss sums are gathered); the main process writes."""
        per_rank = gather_object([(capture_rng(), loss_log.mine())])  # each rank's RNG and loss accumulator
        rng = [r for r, _ in per_rank]

        def write() -> None:
            saved = {**state.to_json(epoch, batch_in_epoch, done), "metrics_rows": tracker.rows,
                     "log": loss_log.state([v for _, v in per_rank]),
                     "architecture": cfg.model.name, "task": task.name, "classes": data.classes,
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes,
                     # what a resume compares itself with: the config and the training data's identity
                     "config": to_dict(cfg), "data_fingerprint": fingerprint}
            extra = {**({"lookahead": lookahead.state_dict()} if lookahead is not None else {}),
                     **({"ema": ema.state_dict()} if ema is not None else {})}
            written = write_checkpoint(plan.out, state.update, core.state_dict(), opt.state_dict(), rng, saved,
                                       extra=extra)
            problem = verify_checkpoint(written)  # read back before older ones are rotated away (~0.03 s / 300 MB)
            if problem is not None:
                raise TrainerError(f"checkpoint {written} did not read back ({problem}); older checkpoints kept")
            best = state.best["update"]
            rotate(plan.out, cfg.checkpoint.keep_last,
                   checkpoint_name(best) if cfg.checkpoint.keep_best and best is not None else None)

        # nobody runs ahead (or exits) before the checkpoint is complete; a failed write (full disk) ends all
        agree(acc, write, main_only=True)

    def replaced_so_far() -> int:
        """Unreadable training files stood in for since this start, over all ranks (a collective; see
        datasets.FileDataset). Counted when read, so batches the workers read ahead count too: a console line
        and summary.json carry it, not metrics.jsonl, whose rows a resumed run repeats exactly."""
        return int(acc.reduce(torch.tensor([replaced_images(train_set)], device=acc.device), "sum").item())

    def log_train(epoch_float: float) -> float:
        """Every rank (the mean loss is all-reduced); the main process writes the row."""
        nonlocal t_log, samples_at_log
        mean_loss, parts = loss_log.mean_and_reset(state.update)
        replaced = replaced_so_far()
        now = time.time()
        lr, throughput = lr_for(max(state.update - 1, 0)), (state.samples_seen - samples_at_log) / max(now - t_log, 1e-9)
        tracker.log({"type": "train", "step": state.update, "epoch": round(epoch_float, 4),
                     "samples_seen": state.samples_seen, "lr": lr, "loss": mean_loss, **parts, "throughput": throughput})
        if not show_bar:
            say(f"[train] step {state.update} epoch {epoch_float:.2f} loss {mean_loss:.4f} lr {lr:.3g} "
                f"{throughput:.0f} img/s" + (f" ({replaced} unreadable image(s) replaced since start)" if replaced else ""))
        t_log, samples_at_log = now, state.samples_seen
        return mean_loss

    def export(target: str, metrics: dict, outputs: dict) -> None:
        """Main process: the scored weights + model.json (with the threshold used) and the eval report, replacing
        the run's folder `target` (model or best) in one rename."""
        with plan.out.replacing(target, fsync=True) as tmp:  # a reader never sees half a model
            with ema.swapped_in(core) if scored == "ema" else nullcontext():
                write_model(core, tmp, {
                    **model_card(cfg, data.mean, data.std, small_stem), **task.export_meta(metrics),
                    "step": state.update, "weights": scored, "metrics": scalar_metrics(metrics)})
            task.write_report(tmp, metrics, outputs)

    def score() -> tuple:
        """Every rank: (metrics of the scored weights, their outputs for the reports, the scalars to log).
        With ema.evaluate=both the EMA's metrics are logged under their names and the raw weights' as raw_<name>."""
        sync_buffers(core, acc)  # every rank scores its shard with rank 0's BN statistics

        def run() -> tuple:
            return evaluate(model, val_set, task, acc, eval_batch, cfg.data.num_workers, memory_format, cfg.eval.tta)

        if ema is None or cfg.ema.evaluate == "raw":
            metrics, outputs = run()
            return metrics, outputs, scalar_metrics(metrics)
        ema.sync(acc)
        with ema.swapped_in(core):
            metrics, outputs = run()
        if cfg.ema.evaluate == "ema":
            return metrics, outputs, scalar_metrics(metrics)
        raw_metrics, raw_outputs = run()
        logged = {**scalar_metrics(metrics), **{f"raw_{k}": v for k, v in scalar_metrics(raw_metrics).items()}}
        return (raw_metrics, raw_outputs, logged) if scored == "raw" else (metrics, outputs, logged)

    def no_improvement_for(value: float) -> Optional[str]:
        """Early stopping, after an evaluation: why the run stops now, or None."""
        rule = cfg.train.early_stopping
        if not rule.patience or value is None:
            return None
        if state.reference is None or sign * (value - state.reference) > rule.min_delta:
            state.reference, state.stale_evals = value, 0
            return None
        state.stale_evals += 1
        if state.stale_evals < rule.patience:
            return None
        return (f"early stopping: {monitor} did not improve on {state.reference:.6g} by more than {rule.min_delta} "
                f"in {rule.patience} evaluation(s)")

    def agree_on_requests() -> tuple:
        """(save, stop) requested on any rank; every rank gets the same answer at the same step."""
        if acc.num_processes == 1:  # nothing to agree on: no device tensor, so no GPU sync per update
            return requests.pending()
        flags = torch.tensor([float(f) for f in requests.pending()], device=acc.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0]), bool(flags[1])

    # ---- the step loop: epochs of batches; an update when the gradients of `grad_accum_steps` are in ----
    last = state.update >= total_updates  # (a resume under fewer epochs may start past the end)
    for epoch in range(state.epoch, max(cfg.train.epochs, state.epoch + 1)):
        loader.set_epoch(epoch)
        if freeze is not None and epoch >= cfg.model.freeze_backbone_epochs:  # over (or a resume past it)
            freeze.release(core)
            freeze = None
        skip = state.batch_in_epoch if epoch == state.epoch else 0  # batches this epoch already trained on
        state.epoch, state.batch_in_epoch = epoch, skip
        bar = tqdm(total=batches_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                   disable=not show_bar or last, dynamic_ncols=True)
        stop = False
        for batch in ([] if last else loader.batches(skip)):
            with acc.accumulate(model):
                if freeze is not None:
                    freeze.before_forward(core)  # evaluation put the backbone's BN back in train mode
                loss, batch_size, parts = task.train_loss(model, batch, memory_format)
                acc.backward(loss)
                if acc.sync_gradients:
                    if freeze is not None:
                        freeze.before_step(core)  # no step, momentum or decay for it; clipping sees the head only
                    if retire is not None:
                        retire.before_step(core, epoch)
                    if cfg.train.clip_grad_norm is not None:
                        acc.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                    for group in opt.param_groups:
                        group["lr"] = lr_for(state.update) * group.get("lr_scale", 1.0)
                opt.step()  # a no-op on accumulation micro-batches (accelerate skips it)
                opt.zero_grad(set_to_none=True)
            loss_log.add(loss, parts)
            state.samples_seen += batch_size * acc.num_processes
            state.batch_in_epoch += 1
            bar.update(1)
            if not acc.sync_gradients:
                continue
            # -- an optimizer update is complete: the only place where the run may be saved or stopped --
            state.update += 1
            last = state.update >= total_updates
            if lookahead is not None and state.update % cfg.optim.lookahead_every == 0:
                sync_buffers(core, acc)  # the same slow copy on every rank
                lookahead.step(core, cfg.optim.lookahead_decay * (state.update / total_updates) ** 3)
            if ema is not None and state.update % cfg.ema.every == 0:
                ema.update(core)
            if state.update % cfg.train.log_every_steps == 0:
                bar.set_postfix(loss=f"{log_train(epoch + state.batch_in_epoch / batches_per_epoch):.4f}")
            save_now, stop = agree_on_requests()
            if not last and (save_now or stop or (cfg.checkpoint.every_steps
                                                  and state.update % cfg.checkpoint.every_steps == 0)):
                save_checkpoint(epoch, state.batch_in_epoch)
                requests.clear()
            if last or stop:
                break
        bar.close()
        if stop and not last:
            say(f"[trainer] stopped on request at update {state.update}; checkpoint saved. "
                f"Run the same command to resume.")
            tracker.close()
            del model, opt, loader
            acc.free_memory()
            acc.end_training()
            return {"run_dir": str(run_dir), "stopped": True, "updates": state.update}

        # -- the end of an epoch (or of the run): log, evaluate, save --
        last = last or epoch >= cfg.train.epochs - 1
        epoch_float = epoch + state.batch_in_epoch / batches_per_epoch
        if loss_log.count:
            log_train(epoch_float)
        if last and lookahead is not None:  # the final model is the slow copy
            sync_buffers(core, acc)
            lookahead.step(core, 1.0)
        if last or (cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0):
            metrics, outputs, logged = score()
            tracker.log({"type": "eval", "split": "val", "step": state.update, "epoch": round(epoch_float, 4),
                         "samples_seen": state.samples_seen, **logged})
            value = logged.get(monitor)
            if value is not None and (state.best["value"] is None or sign * value > sign * state.best["value"]):
                state.best = {"value": value, "update": state.update, "metrics": logged}
                agree(acc, lambda: export("best", metrics, outputs), main_only=True)
            say(f"[eval] step {state.update} epoch {epoch_float:.2f}: {headline(metrics)}"
                + (f" ({scored} weights)" if ema is not None else ""))
            # the metrics are the same on every rank; rank 0's decision is shared all the same (one tiny collective)
            why = agree(acc, lambda: no_improvement_for(value), main_only=True, share=True)
            if why is not None and not last:
                state.stopped_early, last = why, True
                say(f"[trainer] {why}: the run ends here, at update {state.update} of {total_updates}")
        if not last and cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
            save_checkpoint(epoch + 1, 0)
        if last:
            break

    # ---- the end: the final model, its reports, the summary, a final checkpoint ----
    summary = {"run_dir": str(run_dir), "task": task.name, "updates": state.update,
               "samples_seen": state.samples_seen, "final": logged, "best": state.best["metrics"],
               "monitor": monitor, "weights": scored, "stopped_early": state.stopped_early,
               "seconds": round(time.time() - t_start, 1), "replaced_images_this_start": replaced_so_far()}

    def finish() -> None:
        export("model", metrics, outputs)
        png = plot_training_curves(run_dir / "metrics.jsonl")
        curves = plan.out.write("plots/training_curves.png", png) if png else run_dir / "plots" / "none"
        tracker.log_images({"plots/training_curves": curves,
                            **{f"plots/{p.stem}": p for p in sorted((run_dir / "model" / "plots").glob("*.png"))}},
                           step=state.update)
        plan.out.write_json("summary.json", summary)  # from now on the same command says "complete"

    agree(acc, finish, main_only=True)
    save_checkpoint(cfg.train.epochs, 0, done=True)  # the same command run again now says "complete"
    say(f"[trainer] final model on the val split:\n{task.summary(metrics)}")
    final, best = (f"{v:.4f}" if v is not None else "n/a" for v in (logged.get(monitor), state.best["value"]))
    say(f"[trainer] done in {summary['seconds']} s: val {monitor} {final} (best {best}) on "
        f"{metrics.get('num_samples', metrics.get('num_images'))} images")
    say(f"[trainer] run directory: {run_dir}  (final model: {run_dir / 'model'}, best: {run_dir / 'best'})")
    # release DDP and the process group in this order: avoids gloo's abort at interpreter exit
    tracker.close()
    del model, opt, loader
    acc.free_memory()
    acc.end_training()
    return summary
