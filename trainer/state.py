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
from typing import List, Optional

from accelerate.utils import gather_object
from omegaconf import OmegaConf

from trainer.checkpoint import (capture_rng, check_compatible, checkpoint_name, read_checkpoint, restore_rng, rotate,
                                verify_checkpoint, write_checkpoint)
from trainer.config import config_changes, load_yaml
from trainer.distributed import agree
from trainer.errors import ConfigError, TrainerError
from trainer.files import read_json


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
    # each logger's own run that a resume continues, by logger: {"wandb": made by us, "mlflow": made by MLflow}
    run_ids: dict = field(default_factory=dict)
    done: bool = False
    # early stopping (trainer/monitor.py): evaluations in a row without an improvement larger than min_delta
    # over `reference`
    stale_evals: int = 0
    reference: Optional[float] = None
    stopped_early: Optional[str] = None  # why the run stopped before its last epoch

    def to_json(self, epoch: int, batch_in_epoch: int, done: bool) -> dict:
        """The checkpoint's copy; `epoch`/`batch_in_epoch` say where to resume (the next epoch after its end)."""
        return {"update": self.update, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "samples_seen": self.samples_seen, "metrics_rows": self.metrics_rows, "best": self.best,
                "run_ids": dict(self.run_ids), "done": done, "stale_evals": self.stale_evals,
                "reference": self.reference, "stopped_early": self.stopped_early}

    @classmethod
    def from_checkpoint(cls, saved: dict) -> "LoopState":
        return cls(update=saved["update"], epoch=saved["epoch"],
                   # checkpoints before "step" meant updates only called it step_in_epoch
                   batch_in_epoch=saved.get("batch_in_epoch", saved.get("step_in_epoch", 0)),
                   samples_seen=saved["samples_seen"], metrics_rows=saved["metrics_rows"],
                   best=saved.get("best") or cls().best, log=saved.get("log"),
                   # checkpoints before tracking.log_with kept only the W&B run's id
                   run_ids=saved.get("run_ids") or ({"wandb": saved["wandb_run_id"]} if saved.get("wandb_run_id")
                                                    else {}),
                   done=saved["done"],
                   stale_evals=saved.get("stale_evals", 0), reference=saved.get("reference"),
                   stopped_early=saved.get("stopped_early"))


class TrainState:
    """The run's model, optimizer and extensions with its `loop` state, as checkpoints hold them.

    `identity` is what a resume is checked against and every checkpoint records: config (the resolved config
    as a dict), data_fingerprint, architecture, task, classes. `keep_last`/`keep_best`: checkpoint.*."""

    def __init__(self, acc, core, opt, extensions, identity: dict, keep_last: int, keep_best: bool):
        self.acc, self.core, self.opt, self.extensions = acc, core, opt, extensions
        self.identity, self.keep_last, self.keep_best = identity, keep_last, keep_best
        self.loop = LoopState()

    def save_checkpoint(self, out, epoch: int, batch_in_epoch: int, loss_log, metrics_rows: int,
                        done: bool = False) -> None:
        """Every rank (each rank's RNG and loss sums are gathered); the main process writes into the run's folder
        `out`, reads the checkpoint back, and only then rotates older ones away. Nobody runs ahead before it is
        complete; a failed write (a full disk) ends every rank with the same one line."""
        per_rank = gather_object([(capture_rng(), loss_log.mine())])
        acc, loop = self.acc, self.loop

        def write() -> None:
            saved = {**loop.to_json(epoch, batch_in_epoch, done), "metrics_rows": metrics_rows,
                     "log": loss_log.state([sums for _, sums in per_rank]), **self.identity,
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "world_size": acc.num_processes}
            written = write_checkpoint(out, loop.update, self.core.state_dict(), self.opt.state_dict(),
                                       [rng for rng, _ in per_rank], saved, extra=self.extensions.state_dict())
            problem = verify_checkpoint(written)  # read back before older ones are rotated away (~0.03 s / 300 MB)
            if problem is not None:
                raise TrainerError(f"checkpoint {written} did not read back ({problem}); older checkpoints kept")
            best = loop.best["update"]
            rotate(out, self.keep_last, checkpoint_name(best) if self.keep_best and best is not None else None)

        agree(acc, write, main_only=True)

    def restore(self, path: Path, in_place: bool, allow_config_change: bool) -> List[str]:
        """Every rank: the checkpoint at `path` into the model, optimizer, extensions, scaler, RNG and loop state,
        checked against this run's identity first. `in_place`: the run's own checkpoint (its log and logger runs
        continue); else another run's weights and position (run.resume). Returns the notes to print."""
        acc, identity = self.acc, self.identity
        ckpt = read_checkpoint(path)
        check_compatible(ckpt, identity["architecture"], identity["task"], identity["classes"], self.core)
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
        if saved_world == acc.num_processes:
            restore_rng(ckpt["rng_tensors"][acc.process_index], ckpt["state"]["rng"][acc.process_index])
        else:
            notes.append(f"warning: checkpoint written by {saved_world} process(es), resuming on "
                         f"{acc.num_processes}: the data order holds, but random draws (dropout) will differ")
        loop = LoopState.from_checkpoint(ckpt["state"])
        if not in_place:  # weights and position from another run; this run keeps its own log and logger runs
            loop.metrics_rows, loop.run_ids, loop.done = 0, {}, False
        if loop.done and allow_config_change:  # a finished run continued under a changed config
            loop.done = False
        self.loop = loop
        return notes


# ---- what a start compares with its own checkpoint, before any data is read ----

def compare_with_checkpoint(plan, cfg, cfg_dict: dict) -> dict:
    """Main process: the checkpoint this run resumes from (its own) against this config (`cfg_dict`, the whole
    config as a dict). Keys that change the data order or the schedule are refused (unless
    run.allow_config_change); for a complete run they are only reported (nothing is trained or written).
    Returns {changes, update} (and {unloadable} for a complete run none of whose checkpoints loads). A
    checkpoint of another run (run.resume=) is compared once the model is built: that it fits the model at
    all is said first."""
    allow = cfg.run.allow_config_change
    if plan.kind == "complete" and plan.checkpoint is None:
        return complete_without_checkpoint(plan, cfg_dict, allow)
    if plan.checkpoint is None or not plan.in_place:
        return {}
    state = json.loads((plan.checkpoint / "state.json").read_text())
    changes = config_changes(state["config"], cfg_dict) if "config" in state else []
    if changes and not allow and plan.kind != "complete":
        raise ConfigError(changed_config_message(plan.checkpoint, changes))
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


def changed_config_message(checkpoint: Path, changes: list) -> str:
    return (f"resuming {checkpoint}, but this config changes what the run trains ({'; '.join(changes)}); pass "
            f"run.allow_config_change=true if you mean it, or choose a new run.dir")
