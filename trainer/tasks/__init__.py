"""What a task means, behind one small protocol; the loop never looks inside a batch.

A task module (classify.py: binary and multi-class; segment.py; detect.py) offers an object with:

    name, classes, num_outputs          what it is
    collate                             the DataLoader collate function (None: the default)
    metric_names(), higher_is_better(m) what eval.monitor may name, and which way is better
    train_loss(model, batch, memory_format) -> (loss, samples in this process's batch, {part name: loss part})
    loss_parts(model name)              the names of those parts (logged beside the loss; [] for none)
    to_device(batch, device, memory_format), forward(net, batch, tta) -> outputs
    evaluator(dataset)                  .add(batch, outputs) on every rank for each batch of its shard;
                                        .finish(accelerator) -> (metrics, outputs): the one collective, the same
                                        metrics on every rank, the gathered outputs on the main rank
    write_report(dir, metrics, outputs, name), summary(metrics)   eval.json, plots, the printed table (into a
                                        staging folder of the write gate, trainer/outputs.py)
    report_plots                        the file names write_report may draw into plots/ (`report_files`)
    export_meta(metrics)                its fields of model.json
    from_meta(meta)                     (a classmethod) the task of an exported model, for eval and predict
    prediction_writer(output, inputs, overlay, draw)   what `trainer predict` writes (.add per batch, .close)

It is built from the data's class names and counts plus its own config sections, and checks its options
against them there. Tasks are chosen by the plain dict TASKS (no registration decorators); the one
contract test in tests/test_tasks.py runs over every entry.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

from trainer.config import data_targets, task_data_mismatch
from trainer.errors import ConfigError
from trainer.tasks.classify import Classification, Task, class_weights, resolve_task
from trainer.tasks.detect import Detection, detector_options
from trainer.tasks.segment import Segmentation

__all__ = ["TASKS", "build_task", "report_files", "task_from_meta", "task_kind", "Classification", "Detection", "Segmentation", "Task",
           "class_weights", "resolve_task"]

# name -> builder(task name, classes, train counts (images; pixels for segmentation), loss config, eval config,
# **options of the data the task needs, such as ignore_index)
TASKS: Dict[str, Callable] = {
    "binary": Classification.build,
    "multiclass": Classification.build,
    "segmentation": Segmentation.build,
    "detection": Detection.build,
}
# the task of an exported model, by model.json's "task"
FROM_META: Dict[str, Callable[[dict], object]] = {
    "binary": Classification.from_meta,
    "multiclass": Classification.from_meta,
    "segmentation": Segmentation.from_meta,
    "detection": Detection.from_meta,
}


def report_files(task, name: str = "eval.json") -> list:
    """What `task.write_report(dir, ..., name)` may write, relative to dir (checked by the write gate before
    any work, and an earlier report's plots this one does not draw are removed)."""
    return [name, *(f"plots/{p}" for p in task.report_plots)]


_KIND_OF_TARGETS = {"masks": "segmentation", "boxes": "detection", "labels": "classification"}


def task_kind(task: str, data_cfg) -> str:
    """classification, segmentation or detection, from the config alone (before any data is read)."""
    return _KIND_OF_TARGETS[data_targets(data_cfg)]  # an explicit task must match its data (task_data_mismatch)


def build_task(task: str, classes: Sequence[str], train_counts: Sequence[int], loss_cfg, eval_cfg, data_cfg,
               model_cfg=None, category_ids: Sequence[int] = ()):
    """The task a run trains (`task=auto`: segmentation for mask data, detection for box data, else binary for
    2 classes, else multiclass), its options checked against the data. `model_cfg`: the model section (a
    detector's options); `category_ids`: detection data's own id of each class."""
    mismatch = task_data_mismatch(task, data_cfg)
    if mismatch:
        raise ConfigError(mismatch)
    kind = task_kind(task, data_cfg)
    if kind == "segmentation":
        return Segmentation.build(task, classes, train_counts, loss_cfg, eval_cfg, ignore_index=data_cfg.ignore_index)
    if kind == "detection":
        d = model_cfg.detection
        made = Detection.build(task, classes, category_ids, loss_cfg, eval_cfg,
                               detector_options(model_cfg, data_cfg.image_size),
                               derived=[k for k in ("min_size", "max_size") if getattr(d, k) is None])
        made.check_model(model_cfg.name)
        return made
    if loss_cfg.name != "ce":
        raise ConfigError(f"loss.name={loss_cfg.name} is for segmentation; classification trains with ce")
    name = resolve_task(task, len(classes))
    return TASKS[name](task, classes, train_counts, loss_cfg, eval_cfg)


def task_from_meta(meta: dict):
    if meta["task"] not in FROM_META:
        raise ConfigError(f"model.json names task '{meta['task']}', which this trainer does not know "
                          f"({', '.join(sorted(FROM_META))})")
    return FROM_META[meta["task"]](meta)
