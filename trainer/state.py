"""A run's state in one place: where it is (`LoopState`), what its checkpoints hold and how they are saved,
verified, rotated and restored (`TrainState`), and what a start compares with its own checkpoint before any data
is read (`compare_with_checkpoint`). The only training caller of trainer/checkpoint.py's read and write.

A checkpoint holds the unwrapped model's weights, the optimizer, the extensions' state (EMA, Lookahead: each
under its key), every rank's RNG, the loop's position and counters, the loss accumulators since the last log
row, and the run's identity a resume is checked against: its config and its training data's fingerprint, the
architecture, the task and the classes. The learning-rate schedule is a pure function of the update count, so
the count is its whole state; the data order is one of (seed, epoch), so the position in the epoch is its.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

from accelerate.utils import gather_object
from omegaconf import OmegaConf

from trainer.checkpoint import (capture_rng, check_compatible, checkpoint_name, read_checkpoint, restore_rng, rotate,
                                verify_checkpoint, write_checkpoint)
from trainer.config import config_changes, load_yaml
from trainer.distributed import agree
from trainer.errors import ConfigError, TrainerError
from trainer.files import read_json
from trainer.optim import Schedule


@dataclass
class LoopState:
    """Where a run is: what every checkpoint saves besides weights, optimizer and RNG, and a resume restores.
    "update" counts optimizer updates (the "step" of logs and checkpoint names); a batch is one micro-batch
    of this process."""
    update: int = 0
    epoch: int = 0
    # the epoch's samples already trained on: the position in its one global order (trainer/data/order.py),
    # the same on every rank and meaningful on any process count
    sample_in_epoch: int = 0
    samples_seen: int = 0  # over all processes
    metrics_rows: int = 0  # rows in metrics.jsonl (a resume cuts the file back to them)
    best: dict = field(default_factory=lambda: {"value": None, "update": None, "metrics": None})
    log: Optional[dict] = None  # the loss accumulators since the last log row (tracking.LossLog.state)
    # each logger's own run that a resume continues, by logger: {"wandb": made by us, "mlflow": made by MLflow}
    run_ids: dict = field(default_factory=dict)
    done: bool = False
    # early stopping (trainer/monitor.py): evaluations in a row without an improvement larger than min_delta
    # over `reference`
    stale_evals: int = 0
    reference: Optional[float] = None
    stopped_early: Optional[str] = None  # why the run stopped before its last epoch

    def to_json(self, epoch: int, sample_in_epoch: int, done: bool) -> dict:
        """The checkpoint's copy; `epoch`/`sample_in_epoch` say where to resume (the next epoch after its end)."""
        return {"update": self.update, "epoch": epoch, "sample_in_epoch": sample_in_epoch,
                "samples_seen": self.samples_seen, "metrics_rows": self.metrics_rows, "best": self.best,
                "run_ids": dict(self.run_ids), "done": done, "stale_evals": self.stale_evals,
                "reference": self.reference, "stopped_early": self.stopped_early}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "LoopState":
        return cls(update=saved["update"], epoch=saved["epoch"], sample_in_epoch=sample_position(saved),
                   samples_seen=saved["samples_seen"], metrics_rows=saved["metrics_rows"],
                   best=saved.get("best") or cls().best, log=saved.get("log"),
                   # checkpoints before tracking.log_with kept only the W&B run's id
                   run_ids=saved.get("run_ids") or ({"wandb": saved["wandb_run_id"]} if saved.get("wandb_run_id")
                                                    else {}),
                   done=saved["done"],
                   stale_evals=saved.get("stale_evals", 0), reference=saved.get("reference"),
                   stopped_early=saved.get("stopped_early"))


def sample_position(saved: dict) -> int:
    """The global sample position in the epoch a checkpoint's state holds. Checkpoints before positions were
    counted in samples held this process's batch index ("batch_in_epoch"; before "step" meant updates,
    "step_in_epoch"): every micro-step then trained batch_size x processes samples of the same order, so the
    position is their product (past the epoch's end after a short last batch: the epoch is done)."""
    if "sample_in_epoch" in saved:
        return saved["sample_in_epoch"]
    batches = saved.get("batch_in_epoch", saved.get("step_in_epoch", 0))
    if not batches:
        return 0
    world = saved.get("world_size", len(saved.get("rng", [])) or 1)
    batch_size = saved.get("config", {}).get("train", {}).get("batch_size")
    if not isinstance(batch_size, int):
        raise TrainerError("the checkpoint (of an earlier version) holds its position as batch "
                           f"{batches} of the epoch without the batch size that says which samples that is")
    return batches * batch_size * world


class TrainState:
    """The run's model, optimizer and extensions with its `loop` state, as checkpoints hold them.

    `identity` is what a resume is checked against and every checkpoint records: config (the resolved config
    as a dict), data_fingerprint, architecture, task, classes. `keep_last`/`keep_best`: checkpoint.*."""

    def __init__(self, acc, core, opt, extensions, identity: dict, keep_last: int, keep_best: bool,
                 schedule: Schedule, total_from: Callable[[int, int, int], int]):
        self.acc, self.core, self.opt, self.extensions = acc, core, opt, extensions
        self.identity, self.keep_last, self.keep_best = identity, keep_last, keep_best
        # the learning rate of each update: this start's plan, or the checkpoint's re-planned one (`restore`);
        # total_from(update, epoch, position): the update the run ends at from there (session.Session)
        self.schedule, self.total_from = schedule, total_from
        self.replanned: Optional[str] = None  # what a resume with another global batch did to the schedule
        self.loop = LoopState()

    def save_checkpoint(self, out, epoch: int, sample_in_epoch: int, loss_log, metrics_rows: int,
                        done: bool = False) -> None:
        """Every rank (each rank's RNG and loss sums are gathered); the main process writes into the run's folder
        `out`, reads the checkpoint back, and only then rotates older ones away. Nobody runs ahead before it is
        complete; a failed write (a full disk) ends every rank with the same one line."""
        per_rank = gather_object([(capture_rng(), loss_log.mine())])
        acc, loop = self.acc, self.loop

        def write() -> None:
            saved = {**loop.to_json(epoch, sample_in_epoch, done), "metrics_rows": metrics_rows,
                     "log": loss_log.state([sums for _, sums in per_rank]), **self.identity,
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes, "schedule": self.schedule.to_json()}
            written = write_checkpoint(out, loop.update, self.core.state_dict(), self.opt.state_dict(),
                                       [rng for rng, _ in per_rank], saved, extra=self.extensions.state_dict())
            problem = verify_checkpoint(written)  # read back before older ones are rotated away (~0.03 s / 300 MB)
            if problem is not None:
                raise TrainerError(f"checkpoint {written} did not read back ({problem}); older checkpoints kept")
            best = loop.best["update"]
            rotate(out, self.keep_last, checkpoint_name(best) if self.keep_best and best is not None else None)

        agree(acc, write, main_only=True)

    def restore(self, path: Path, in_place: bool, allow_config_change: bool, weights_only: bool = False) -> List[str]:
        """Every rank: the checkpoint at `path` into the model, optimizer, extensions, scaler, RNG and loop state,
        checked against this run's identity first. `in_place`: the run's own checkpoint (its log and logger runs
        continue); else another run's weights and position (run.resume). `weights_only`: nothing will be trained
        from it (a complete run's final model exported again), so a changed global batch does not matter.
        Returns the notes to print."""
        acc, identity = self.acc, self.identity
        ckpt = read_checkpoint(path)
        check_compatible(ckpt, identity["architecture"], identity["task"], identity["classes"], self.core)
        before = saved_global_batch(ckpt["state"])
        change = batch_change(ckpt["state"], path, identity["global_batch"])
        if change and not (allow_config_change or weights_only):
            raise ConfigError(change)
        if not in_place and "config" in ckpt["state"] and not allow_config_change:
            changes = config_changes(ckpt["state"]["config"], identity["config"])
            if changes:
                raise ConfigError(changed_config_message(path, changes))
        saved_print = ckpt["state"].get("data_fingerprint")
        if saved_print is not None and saved_print != identity["data_fingerprint"] and not allow_config_change:
            raise ConfigError(f"resuming {path}: the training data differ from the checkpoint's (another file list, "
                              f"order or classes), so the position in the epoch would mean other images; pass "
                              f"run.allow_config_change=true if you mean it")
        self.core.load_state_dict(ckpt["model"], strict=True)
        self.opt.load_state_dict(ckpt["optimizer"])
        notes = self.extensions.load_state_dict(ckpt["extra"], self.core, path)
        if ckpt["state"].get("scaler") and acc.scaler is not None:
            acc.scaler.load_state_dict(ckpt["state"]["scaler"])
        saved_world = len(ckpt["state"]["rng"])
        loop = LoopState.from_checkpoint(ckpt["state"])
        if saved_world == acc.num_processes:
            restore_rng(ckpt["rng_tensors"][acc.process_index], ckpt["state"]["rng"][acc.process_index])
        else:  # the position is in global samples (trainer/data/order.py): the rest of the order is re-dealt
            notes.append(f"checkpoint written by {saved_world} process(es), resuming on {acc.num_processes}"
                         + (f" with the same global batch of {before}" if not change else "")
                         + f": epoch {loop.epoch} continues at its sample {loop.sample_in_epoch}, in the same order "
                         f"(augmentation follows the sample); the random draws made per process (dropout, drop "
                         f"path, mixup/CutMix pairs) differ from an uninterrupted run's")
        planned = ckpt["state"].get("schedule")
        if planned is not None and (change or planned.get("anchor") is not None):
            # the samples left take another number of updates: the learning rate keeps following the samples
            old = Schedule.from_json(planned)
            self.schedule = old.stretched(loop.update, self.total_from(loop.update, loop.epoch, loop.sample_in_epoch))
            if change:
                self.replanned = (f"global batch {before} -> {identity['global_batch']} at update {loop.update}: "
                                  f"the schedule's rest re-planned over the samples left, ending at update "
                                  f"{self.schedule.total_updates} instead of {old.total_updates}")
                notes.append(self.replanned)
        elif change:
            self.replanned = (f"global batch {before} -> {identity['global_batch']} at update {loop.update}: the "
                              f"checkpoint (of an earlier version) holds no schedule; this start's own applies")
            notes.append(self.replanned)
        if not in_place:  # weights and position from another run; this run keeps its own log and logger runs,
            # and its own best and early stopping: measured from its own evaluations (best/ is this run's)
            loop.metrics_rows, loop.run_ids, loop.done = 0, {}, False
            loop.best, loop.stale_evals, loop.reference, loop.stopped_early = LoopState().best, 0, None, None
        if loop.done and allow_config_change:  # a finished run continued under a changed config
            loop.done = False
        self.loop = loop
        return notes


# ---- what a start compares with its own checkpoint, before any data is read ----

def compare_with_checkpoint(plan, cfg, cfg_dict: dict, global_batch: int) -> dict:
    """Main process: the checkpoint this run resumes from (its own) against this config (`cfg_dict`, the whole
    config as a dict). Keys that change the data order or the schedule are refused (unless
    run.allow_config_change); for a complete run they are only reported (nothing is trained or written).
    Returns {changes, update} (and {unloadable} for a complete run none of whose checkpoints loads). A
    checkpoint of another run (run.resume=) is compared once the model is built: that it fits the model at
    all is said first. `global_batch`: this start's (the batch keys are compared as that one number)."""
    allow = cfg.run.allow_config_change
    if plan.kind == "complete" and plan.checkpoint is None:
        return complete_without_checkpoint(plan, cfg_dict, allow)
    if plan.checkpoint is None or not plan.in_place:
        return {}
    state = json.loads((plan.checkpoint / "state.json").read_text())
    changes = config_changes(state["config"], cfg_dict) if "config" in state else []
    if changes and not allow and plan.kind != "complete":
        raise ConfigError(changed_config_message(plan.checkpoint, changes))
    change = batch_change(state, plan.checkpoint, global_batch)
    if change and not allow and plan.kind != "complete":
        raise ConfigError(change)
    if changes and plan.kind == "complete" and allow:
        plan.kind = "resume"  # meant: a finished run continues from its final checkpoint
        changes = []
    return {"changes": changes, "update": state["update"]}


def complete_without_checkpoint(plan, cfg_dict: dict, allow_config_change: bool) -> dict:
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
    changes = config_changes(finished_under, cfg_dict) if isinstance(finished_under, dict) else []
    if changes and allow_config_change:
        raise TrainerError(f"run.dir {plan.dir} is complete, but {unloadable}: it cannot continue from them under "
                           f"the changed config ({'; '.join(changes)}); nothing was changed. Pass "
                           f"run.overwrite=true to train it again from scratch, or choose another run.dir")
    return {"changes": changes, "update": read_json(plan.dir / "summary.json").get("updates", "?"),
            "unloadable": unloadable}


def saved_global_batch(state: dict) -> Optional[int]:
    """The global batch a checkpoint's run trained with (recorded since resumes may change the process count;
    before, its config's batch and accumulation times the processes that wrote it)."""
    if "global_batch" in state:
        return state["global_batch"]
    train = state.get("config", {}).get("train")
    if not isinstance(train, dict):
        return None
    world = state.get("world_size", len(state.get("rng", [])) or 1)
    return train.get("batch_size", 64) * world * train.get("grad_accum_steps", 1)


def batch_change(state: dict, checkpoint: Path, global_batch: int) -> Optional[str]:
    """The one line refusing a resume whose global batch differs from its checkpoint's (None when equal): the
    per-process batch and accumulation may change with the process count, what a step trains may not."""
    before = saved_global_batch(state)
    if before is None or before == global_batch:
        return None
    return (f"resuming {checkpoint}: the global batch (train.batch_size x processes x train.grad_accum_steps) "
            f"would change from {before} to {global_batch}, which changes what each update trains; keep it "
            f"(e.g. train.global_batch_size={before}, which derives the rest from the process count), or pass "
            f"run.allow_config_change=true to continue with the rest of the schedule re-planned over the "
            f"samples left")


def changed_config_message(checkpoint: Path, changes: list) -> str:
    return (f"resuming {checkpoint}, but this config changes what the run trains ({'; '.join(changes)}); pass "
            f"run.allow_config_change=true if you mean it, or choose a new run.dir")
