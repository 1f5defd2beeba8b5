"""What a run trains with, built once at its start: data, task, model, optimizer, training loader, schedule and
extensions (`build_session` -> `Session`). Each phase is a function of its own with explicit arguments, run
through `agree` so that a mistake found on any rank (a bad file met while decoding, a model that cannot take
the input size) ends every rank with the same one line. The step loop (trainer/loop.py) only uses the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from trainer.config import eval_batch_size
from trainer.data import data_fingerprint
from trainer.data.datasets import Fit
from trainer.data.loaders import build_train_loader, check_decode_device
from trainer.data.on_ranks import build_data_on_ranks
from trainer.distributed import agree
from trainer.errors import ConfigError
from trainer.export import model_card
from trainer.extensions import Extensions, build_extensions
from trainer.models import (TIMM_PREFIX, InitFromData, build_model, check_input_size, pretrained_source,
                            weights_preprocessing)
from trainer.monitor import task_metric
from trainer.optim import Schedule, optimizer_from, schedule_from
from trainer.tasks import build_task, task_spec


@dataclass
class Session:
    """A run's parts. `model` is what accelerate prepared (DDP on several processes), `core` the module inside
    it (the same tensors); counts are per process except the updates (the schedule is counted in those)."""
    data: Any  # trainer.data.Data: datasets, classes, counts, mean/std, source
    task: Any
    model: torch.nn.Module
    core: torch.nn.Module
    opt: torch.optim.Optimizer
    loader: Any  # .steps(start), .set_epoch(e), len(), .dealing (trainer/data/loaders.py)
    memory_format: torch.memory_format
    extensions: Extensions
    small_stem: bool
    batches_per_epoch: int  # micro-steps, per process
    epoch_samples: int  # the samples an epoch trains, over all processes (its order less a dropped last batch)
    updates_per_epoch: int
    grad_accum_steps: int
    epochs: int
    max_steps: Optional[int]
    schedule: Schedule  # the learning rate of each update as this start plans it (a resume may restore another)
    fingerprint: str  # the training data's identity (data_fingerprint), which checkpoints record
    card: dict  # model.json's fields that are not the task's (export.model_card)
    eval_batch: int  # images per evaluation batch, per process
    derived: dict  # the numbers run.json records and the start-up prints (processes, batches, updates, lr, data)

    @property
    def total_updates(self) -> int:
        return self.schedule.total_updates

    def total_from(self, update: int, epoch: int, position: int) -> int:
        """The update the run ends at when update `update` leaves it at sample `position` of `epoch`: the
        micro-steps left in that epoch (grouped into updates) and its remaining epochs, on this start's
        process count and batch (what a resume with another global batch re-plans the schedule over)."""
        this_epoch = math.ceil(len(self.loader.dealing.steps(position)) / self.grad_accum_steps)
        total = update + this_epoch + max(self.epochs - epoch - 1, 0) * self.updates_per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)

    @property
    def train_set(self):
        return self.data.datasets["train"]

    @property
    def val_set(self):
        return self.data.datasets["val"]


def build_session(cfg, acc, say: Callable) -> Session:
    # auto: small images get the small-image stem, but timm's nets keep their own (model.json says so)
    small_stem = cfg.model.small_input_stem if cfg.model.small_input_stem is not None else (
        cfg.data.image_size <= 64 and not cfg.model.name.startswith(TIMM_PREFIX))
    if task_spec(cfg.task, cfg.data).fixed_input_size:  # classification; segmentation pads, detection resizes
        agree(acc, lambda: probe_input_size(cfg.model, cfg.data.image_size, small_stem))
    agree(acc, lambda: check_gpu_keys(cfg.model.sync_bn, cfg.data.decode_device, acc.device))
    # pretrained weights by name read images as they were trained, unless the data section says otherwise
    image_level = task_spec(cfg.task, cfg.data).fixed_input_size  # the classifiers: resize and crop as evaluated
    data_cfg = agree(acc, lambda: weights_data(cfg.data, cfg.model, image_level, say))
    # the main process scans first; the start-up checks of the files are split across ranks
    data = build_data_on_ranks(acc, data_cfg, cfg.seed, ("train", "val"), say)
    task_eval = replace(cfg.eval, monitor=task_metric(cfg.eval.monitor))  # the task knows its own metric names
    task = agree(acc, lambda: build_task(cfg.task, data.classes, data.train_counts, cfg.loss, task_eval, cfg.data,
                                         cfg.model, data.category_ids, len(data.datasets["train"])))
    # a bad file met while decoding the split (airbench's whitening reads a sample) ends every rank alike
    resolved = replace(cfg, data=data_cfg)  # the loader's first images (airbench's whitening) fit as evaluation's
    model, loader = agree(acc, lambda: model_and_loader(resolved, acc, data, task, small_stem, say))
    model, opt, memory_format = prepare(model, loader, cfg.model, cfg.optim, cfg.train, acc)
    core = acc.unwrap_model(model)  # the module itself (DDP's wrapper shares its tensors)
    extensions = agree(acc, lambda: build_extensions(cfg, core, acc))
    # in optimizer updates, so that the schedule has the same shape on any process count
    batches_per_epoch = len(loader)  # per process
    updates_per_epoch = math.ceil(batches_per_epoch / cfg.train.grad_accum_steps)
    total_updates = cfg.train.epochs * updates_per_epoch
    if cfg.train.max_steps is not None:
        total_updates = min(total_updates, cfg.train.max_steps)
    schedule = Schedule(schedule_from(cfg.optim, total_updates, updates_per_epoch), total_updates)
    train_set, val_set = data.datasets["train"], data.datasets["val"]
    derived = {"processes": acc.num_processes, "device": str(acc.device), "mixed_precision": acc.mixed_precision,
               "per_device_batch": cfg.train.batch_size, "grad_accum_steps": cfg.train.grad_accum_steps,
               "global_batch": cfg.train.batch_size * acc.num_processes * cfg.train.grad_accum_steps,
               "batches_per_epoch": batches_per_epoch, "updates_per_epoch": updates_per_epoch,
               "total_updates": total_updates, "warmup_updates": schedule.kwargs["warmup_updates"], "peak_lr": cfg.optim.lr,
               "task": task.name, "classes": data.classes, "train_samples": len(train_set),
               "val_samples": len(val_set), "train_class_counts": data.train_counts, "skipped_images": data.skipped,
               "data": data.source, "mean": data.mean, "std": data.std}
    return Session(data, task, model, core, opt, loader, memory_format, extensions, small_stem, batches_per_epoch,
                   loader.dealing.end, updates_per_epoch, cfg.train.grad_accum_steps, cfg.train.epochs,
                   cfg.train.max_steps, schedule, data_fingerprint(train_set, data.classes),
                   model_card(cfg, data.mean, data.std, small_stem, Fit.from_cfg(data_cfg) if image_level else None),
                   eval_batch_size(cfg), derived)


def weights_data(data_cfg, model_cfg, image_level: bool, say: Callable):
    """The data section with model.weights' preprocessing (`weights_preprocessing`) filled in where it says
    null: data.mean and data.std together, and for classifiers (`image_level`) each of data.crop_mode,
    data.crop_pct and data.interpolation. data.image_size stays the user's; one line says what was taken."""
    found = weights_preprocessing(model_cfg) or {}
    changes = {}
    if not (data_cfg.mean and data_cfg.std) and "mean" in found:
        changes.update(mean=found["mean"], std=found["std"])
    if image_level:
        changes.update({key: found[key] for key in ("crop_mode", "crop_pct", "interpolation")
                        if key in found and getattr(data_cfg, key) is None})
    if not changes:
        return data_cfg
    resolved = replace(data_cfg, **changes)
    fit = Fit.from_cfg(resolved)
    taken = ", ".join(f"data.{key}" for key in changes)
    own = found.get("image_size")
    size = f"; the weights' own input is {own} px" if own and own != data_cfg.image_size else ""
    say(f"[trainer] model.weights={model_cfg.weights}: {taken} from the weights"
        + (f" (evaluation: {fit.describe(data_cfg.image_size)}{size})" if image_level else ""))
    return resolved


def probe_input_size(model_cfg, image_size: int, small_stem: bool) -> None:
    """The network against the input size, before any data is read: a throwaway model, built under a forked RNG
    so that the real model's initial weights stay those of the seed."""
    with torch.random.fork_rng(devices=[]):
        check_input_size(build_model(model_cfg.name, 2, image_size=image_size, small_input_stem=small_stem,
                                     log=lambda *_: None, drop_path=model_cfg.drop_path, dropout=model_cfg.dropout),
                         model_cfg.name, image_size)


def check_gpu_keys(sync_bn: bool, decode_device: str, device: torch.device) -> None:
    if sync_bn and device.type != "cuda":
        raise ConfigError(f"model.sync_bn=true needs GPUs: PyTorch's SyncBatchNorm runs only on CUDA (this run is on "
                          f"{device.type}); set model.sync_bn=false")
    check_decode_device(decode_device, device)


def model_and_loader(cfg, acc, data, task, small_stem: bool, say: Callable) -> tuple:
    """The task's model and the training loader (with the task's collate and last-batch rule); a model that
    learns something from the data before training (airbench's whitening filters) does it here."""
    train_set = data.datasets["train"]
    global_batch = cfg.train.batch_size * acc.num_processes
    if global_batch > len(train_set):
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {acc.num_processes} process(es) = "
                          f"{global_batch} is larger than the training split ({len(train_set)} images)")
    pretrained = pretrained_source(cfg.model, say)  # model.pretrained_path, or model.weights' local file
    model = task.build_model(cfg.model.name, cfg.data.image_size, small_stem, pretrained, log=say,
                             drop_path=cfg.model.drop_path, dropout=cfg.model.dropout)
    loader = build_train_loader(train_set, cfg.data, cfg.train.batch_size, cfg.seed, acc, data.mean, data.std,
                                len(data.classes), cfg.model.channels_last, say,
                                drop_last=task.drop_last if cfg.train.drop_last is None else cfg.train.drop_last,
                                collate=task.collate, resizer=task.train_resizer(cfg.seed),
                                global_batch=cfg.train.batch_size * acc.num_processes * cfg.train.grad_accum_steps)
    if isinstance(model, InitFromData) and not pretrained:  # e.g. airbench's whitening filters
        model.init_from_data(loader.first(5000))
    return model, loader


def prepare(model, loader, model_cfg, optim_cfg, train_cfg, acc) -> tuple:
    """(the prepared model, its optimizer, the memory format): SyncBatchNorm, channels-last, cuDNN autotuning,
    torch.compile, then accelerate's `prepare` (DDP, mixed precision) and the loader's."""
    if model_cfg.sync_bn:  # before DDP wraps it; the state_dict names stay BatchNorm's (exports load anywhere)
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if model_cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = train_cfg.cudnn_benchmark and not train_cfg.deterministic
    if model_cfg.compile:  # in place: parameter names (checkpoints, exports) stay those of the plain model
        model.compile()
    opt = optimizer_from(model, optim_cfg, fused=optim_cfg.fused if optim_cfg.fused is not None
                         else acc.device.type == "cuda", model_name=model_cfg.name)
    model, opt = acc.prepare(model, opt)
    loader.prepare(acc)  # the DataLoader path: accelerate shards and seeds it; the device path needs nothing
    return model, opt, memory_format
