"""What is logged into a run directory: metrics.jsonl (the source of truth) and the loggers of tracking.log_with
(TensorBoard, MLflow, W&B, Comet offline) through accelerate's trackers, and the training rows' bookkeeping
(`LossLog`, `TrainLog`). trainer.rundir owns the folder and its other files. Only the main process writes;
other ranks get no-ops, so call sites never branch on rank.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from trainer.distributed import SharedError, agree
from trainer.files import disk_error
from trainer.metrics import is_number


def _wandb(cfg, run_dir: Path, loop):
    from accelerate.tracking import WandBTracker

    return WandBTracker(cfg.wandb.project, name=run_dir.name, dir=str(run_dir), tags=list(cfg.wandb.tags),
                        entity=cfg.wandb.entity, id=loop.run_ids["wandb"], resume="allow")


def _tensorboard(cfg, run_dir: Path, loop):
    from accelerate.tracking import TensorBoardTracker

    # One log folder across restarts, a new event file per start. purge_step: tensorboard's reader drops every
    # event at or after this step written before this file starts, i.e. what a killed start logged past its
    # last checkpoint, which this start logs again (so the events read back equal metrics.jsonl's rows)
    return TensorBoardTracker("", str(run_dir / "tensorboard"), purge_step=loop.update + 1)


def _mlflow(cfg, run_dir: Path, loop):
    import mlflow
    from accelerate.tracking import MLflowTracker

    uri = cfg.tracking.mlflow_uri
    if uri is None or "://" not in uri or uri.startswith("file:"):
        # MLflow 3 refuses its file store unless told (it prefers SQLite, whose tables take ~9 s to create per
        # run, and whose locking network file systems do not honour); the file store is what a run folder wants,
        # and a file store the user names (a path or file:// URI) is one they chose: without this, a traceback
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(cfg.tracking.mlflow_uri or (run_dir / "mlflow").resolve().as_uri())
    return MLflowTracker(cfg.tracking.mlflow_experiment, run_id=loop.run_ids.get("mlflow"), run_name=run_dir.name)


def _comet_ml(cfg, run_dir: Path, loop):
    import comet_ml
    from accelerate.tracking import CometMLTracker

    # Offline: each start writes one archive into <run>/comet_ml/ (`comet upload FILE.zip` sends it later), under
    # the experiment key its checkpoints keep, so that every start's archive continues one experiment. Comet's
    # automatic logging is off: no captured console, code, git patch, environment, CO2 or framework hooks, so
    # that it records what the trainer logs and nothing leaves the run folder
    off = dict(log_code=False, log_graph=False, parse_args=False, log_git_metadata=False, log_git_patch=False,
               log_env_details=False, log_env_gpu=False, log_env_host=False, log_env_cpu=False,
               log_env_network=False, log_env_disk=False, auto_output_logging=False, auto_param_logging=False,
               auto_metric_logging=False, auto_log_co2=False)
    config = comet_ml.ExperimentConfig(offline_directory=str(run_dir / "comet_ml"), name=run_dir.name,
                                       display_summary_level=0, **off)
    return CometMLTracker(cfg.tracking.project, online=False, experiment_key=loop.run_ids.get("comet_ml"),
                          experiment_config=config)


# tracking.log_with's names (config.TRACKERS) -> the accelerate tracker of this run, in its local mode
LOGGERS = {"wandb": _wandb, "tensorboard": _tensorboard, "mlflow": _mlflow, "comet_ml": _comet_ml}


class Tracker:
    """metrics.jsonl on the main process, plus the loggers of tracking.log_with through accelerate's trackers."""

    def __init__(self, accelerator, out, rows: int = 0):
        """`out`: the run's folder (the write gate), where the main process appends to metrics.jsonl."""
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.rows = rows  # rows in metrics.jsonl so far (checkpoints record it)
        self.loggers = {}  # name -> started accelerate tracker (main process only)
        self.after_step = {}  # name -> rows up to this step reached that logger's run before a restart
        self.path = out.root / "metrics.jsonl"
        self._fh = out.append("metrics.jsonl") if self.is_main else None  # line-buffered: each row lands whole

    def start_loggers(self, cfg, run_dir: Path, loop, seen_step: int) -> None:
        """Main process: each logger of `config.trackers(cfg)` started inside `run_dir`, continuing the logger
        run this run's checkpoint names (`loop.run_ids`), which then gets only the rows after `seen_step` (W&B
        refuses a step twice, MLflow would keep both). A new run's id goes into `loop.run_ids` (saved by the
        main process with the next checkpoint). The config goes to each new logger run that takes one."""
        from trainer.config import flatten, to_dict, trackers

        for name in trackers(cfg):
            continued = seen_step >= 0 and bool(loop.run_ids.get(name))  # else a new logger run
            logger = LOGGERS[name](cfg, run_dir, loop)
            logger.start()
            if name == "mlflow":
                loop.run_ids[name] = logger.tracker.info.run_id
            if name == "comet_ml":
                loop.run_ids[name] = logger.tracker.get_key()
            if name == "wandb":  # W&B takes the config nested, and a resumed run's changes (allow_val_change)
                logger.store_init_configuration(to_dict(cfg))
            elif name in ("mlflow", "comet_ml") and not continued:  # the first start's config (MLflow refuses to
                logger.store_init_configuration(flatten(to_dict(cfg)))  # change a parameter)
            self.loggers[name] = logger
            self.after_step[name] = seen_step if continued and name != "tensorboard" else -1  # tb: purge_step

    def log(self, row: dict) -> None:
        """Every rank calls it; the main process writes (a failed write, e.g. a full disk, ends every rank
        with the same one line: the only collective here, once per logged row)."""
        self.rows += 1  # counted on every rank, so any rank's checkpoint state agrees
        agree(self.accelerator, lambda: self._write(row), main_only=True)

    def _write(self, row: dict) -> None:
        try:
            self._fh.write(json.dumps(row) + "\n")
        except OSError as err:
            raise disk_error(err, self.path) from None
        prefix = f"{row['split']}/" if row.get("type") == "eval" else "train/"
        numbers = {prefix + k: v for k, v in row.items() if is_number(v) and k != "step"}
        for name, logger in self.loggers.items():
            if row["step"] > self.after_step[name]:
                logger.log(numbers, step=row["step"])

    def log_images(self, images: dict, step: int) -> None:
        """PNG files (name -> path) to each logger that takes images: W&B images, TensorBoard images, MLflow
        artifacts under the name's folder. metrics.jsonl keeps only numbers."""
        files = {name: Path(path) for name, path in images.items() if Path(path).is_file()}
        if "wandb" in self.loggers:
            import wandb

            self.loggers["wandb"].log({name: wandb.Image(str(path)) for name, path in files.items()}, step=step)
        if "tensorboard" in self.loggers:
            import numpy as np
            from PIL import Image

            self.loggers["tensorboard"].log_images(
                {name: np.asarray(Image.open(path).convert("RGB"))[None] for name, path in files.items()},
                step=step, dataformats="NHWC")
        if "mlflow" in self.loggers:
            import mlflow

            for name, path in files.items():
                mlflow.log_artifact(str(path), artifact_path=str(Path(name).parent))
        if "comet_ml" in self.loggers:
            for name, path in files.items():
                self.loggers["comet_ml"].tracker.log_image(str(path), name=name, step=step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for logger in self.loggers.values():
            logger.finish()
        self.loggers = {}


class LossLog:
    """The training loss (and its named parts, e.g. a detector's box and class losses) between two log rows:
    summed on the device (`.item()` would sync the GPU every update), in float64 so a resumed sum equals the
    uninterrupted one exactly, averaged over all ranks when a row is written. Its state goes into every
    checkpoint (each rank's sums), so a resumed run writes the same rows."""

    def __init__(self, accelerator, saved: Optional[dict], update: int, parts: Sequence[str] = ()):
        self.accelerator, self.parts = accelerator, list(parts)
        width = 1 + len(self.parts)
        saved = saved or {"loss_sum": [[0.0] * width] * accelerator.num_processes, "loss_count": 0,
                          "from_update": update}
        sums = [v if isinstance(v, list) else [v] for v in saved["loss_sum"]]  # older checkpoints: the loss only
        sums = [v + [0.0] * (width - len(v)) for v in sums]
        own = sums[accelerator.process_index] if len(sums) == accelerator.num_processes \
            else [sum(col) / accelerator.num_processes for col in zip(*sums)]  # another process count: keep the mean
        self.sum = torch.tensor(own[:width], dtype=torch.float64, device=accelerator.device)
        self.count, self.from_update = saved["loss_count"], saved["from_update"]

    def add(self, loss: torch.Tensor, parts: Optional[dict] = None) -> None:
        if self.parts:
            values = [loss.detach().reshape(())] + [parts[name].detach().reshape(()) for name in self.parts]
            self.sum += torch.stack(values).to(self.sum.dtype)
        else:
            self.sum += loss.detach()
        self.count += 1

    def mine(self) -> list:
        """This rank's sums, for the checkpoint (one collective gathers every rank's)."""
        return self.sum.tolist()

    def state(self, per_rank_sums: list) -> dict:
        return {"loss_sum": per_rank_sums, "loss_count": self.count, "from_update": self.from_update}

    def mean_and_reset(self, update: int) -> Tuple[float, dict]:
        """The mean loss and parts over every rank since the last row (a collective: every rank calls it)."""
        totals = self.accelerator.reduce(torch.cat([self.sum, self.sum.new_tensor([float(self.count)])]),
                                         reduction="sum")
        means = (totals[:-1] / totals[-1].clamp_min(1)).tolist()
        mean = means[0]
        if not math.isfinite(mean):  # all-reduced: the same on every rank, so raised by all alike
            raise SharedError(f"non-finite training loss ({mean}) between updates {self.from_update} and {update}; "
                              f"lower optim.lr, set train.clip_grad_norm, or check the data")
        self.sum, self.count, self.from_update = self.sum * 0, 0, update
        return mean, dict(zip(self.parts, means[1:]))


def replaced_on_all_ranks(acc, dataset) -> int:
    """Unreadable training files stood in for since this start, over all ranks (a collective; see
    datasets.FileDataset). Counted when read, so batches the workers read ahead count too: a console line and
    summary.json carry it, not metrics.jsonl, whose rows a resumed run repeats exactly."""
    from trainer.data.datasets import replaced_images

    return int(acc.reduce(torch.tensor([replaced_images(dataset)], device=acc.device), "sum").item())


class TrainLog:
    """The training rows (every train.log_every_steps updates and at an epoch's end): the mean loss and its parts
    over every rank since the last row, the learning rate, the throughput; a console line too unless a progress
    bar shows. `loop`: the run's LoopState; `lr_of(update)`: the schedule; `dataset`: the training split (its files
    stood in for are counted)."""

    def __init__(self, acc, tracker: "Tracker", loss_log: "LossLog", loop, lr_of, dataset, say, bar: bool):
        self.acc, self.tracker, self.loss_log, self.loop = acc, tracker, loss_log, loop
        self.lr_of, self.dataset, self.say, self.bar = lr_of, dataset, say, bar
        self.t, self.samples = time.time(), loop.samples_seen

    def replaced(self) -> int:
        return replaced_on_all_ranks(self.acc, self.dataset)

    def __call__(self, epoch_float: float) -> float:
        """Every rank (the mean loss is all-reduced); the main process writes the row. Returns the mean loss."""
        loop = self.loop
        mean_loss, parts = self.loss_log.mean_and_reset(loop.update)
        replaced = self.replaced()
        now = time.time()
        lr, throughput = self.lr_of(max(loop.update - 1, 0)), (loop.samples_seen - self.samples) / max(now - self.t, 1e-9)
        self.tracker.log({"type": "train", "step": loop.update, "epoch": round(epoch_float, 4),
                          "samples_seen": loop.samples_seen, "lr": lr, "loss": mean_loss, **parts,
                          "throughput": throughput})
        if not self.bar:
            self.say(f"[train] step {loop.update} epoch {epoch_float:.2f} loss {mean_loss:.4f} lr {lr:.3g} "
                     f"{throughput:.0f} img/s" + (f" ({replaced} unreadable image(s) replaced since start)"
                                                  if replaced else ""))
        self.t, self.samples = now, loop.samples_seen
        return mean_loss
