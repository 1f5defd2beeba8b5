"""What a task means, behind one protocol (trainer/tasks/protocol.py); the loop never looks inside a batch.

`TASKS` is the one table of tasks: each name (the config's `task`, model.json's "task") to its spec, the half of
a task read without torch: the data it trains on, its monitor, the config keys it owns, its model.json and ONNX
fields. The spec's `implementation` names the task class (<task>.py, with its *_metrics, *_models and *_reports
modules), built by `build_task` from the data's classes and counts plus its config sections, and by
`task_from_meta` from an exported model. No registration decorators; the contract test in tests/test_tasks.py
runs over every entry.

A new task is: its modules here (<task>_spec.py, <task>.py and its parts), one line in TASKS, the reader of its
data (trainer/data, and the targets it holds: trainer/targets.py), and its tests.

Nothing here imports torch (config.validate calls `check_config` before torch is imported: a config is checked
in 0.3 s, where importing the task classes takes 5 s):
the task classes are imported when first built, or first named (`from trainer.tasks import Segmentation`).
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional, Sequence

from trainer.errors import ConfigError
from trainer.targets import data_targets
from trainer.tasks.classify_spec import ClassificationSpec, resolve_task
from trainer.tasks.detect_spec import DetectionSpec
from trainer.tasks.multilabel_spec import MultilabelSpec
from trainer.tasks.protocol import DataInfo, Sections, TaskSpec
from trainer.tasks.segment_spec import SegmentationSpec

__all__ = ["TASKS", "build_task", "check_config", "implementation", "report_files", "task_data_mismatch",
           "task_from_meta", "task_spec", "Classification", "Detection", "Multilabel", "Segmentation", "Task", "class_weights",
           "resolve_task"]

TASKS: Dict[str, TaskSpec] = {
    "binary": ClassificationSpec,
    "multiclass": ClassificationSpec,
    "segmentation": SegmentationSpec,
    "detection": DetectionSpec,
    "multilabel": MultilabelSpec,
}


def task_spec(task: str, data_cfg) -> TaskSpec:
    """The spec of the task a config trains: the one it names, or for task=auto the one whose targets its data
    holds (binary and multiclass share theirs: the class count chooses, when the task is built)."""
    return TASKS[task] if task in TASKS else _training_on(data_targets(data_cfg))


def _training_on(targets: str) -> TaskSpec:
    return next(spec for spec in TASKS.values() if spec.targets == targets)


def task_data_mismatch(task: str, data_cfg, advise: bool = True) -> Optional[str]:
    """Why `task` cannot train on this data (None when it can); `advise`: with the task that would."""
    if task not in TASKS:  # auto
        return None
    wanted, found = TASKS[task], data_targets(data_cfg)
    if found == wanted.targets:
        return None
    source = (f"data.generated.variant={data_cfg.generated.variant}" if data_cfg.format == "generated"
              else f"data.format={data_cfg.format}")
    return (f"task={task} trains on {wanted.targets} ({wanted.data_hint}), but {source} holds {found}"
            + (f": use task={_training_on(found).title} (or task=auto)" if advise else ""))


def check_config(cfg) -> None:
    """Every task's rules about a whole config (trainer.config.validate calls this at load): the task must fit
    its data, then each task's `check_config` (its own keys refused while another task trains)."""
    mismatch = task_data_mismatch(cfg.task, cfg.data)
    if mismatch:
        raise ConfigError(mismatch)
    trained = task_spec(cfg.task, cfg.data)
    for spec in dict.fromkeys(TASKS.values()):
        spec.check_config(cfg, trained)


def build_task(task: str, classes: Sequence[str], train_counts: Sequence[int], loss_cfg, eval_cfg, data_cfg,
               model_cfg=None, category_ids: Sequence[int] = (), num_images: int = 0):
    """The task a run trains (`task=auto`: segmentation for mask data, detection for box data, multilabel for
    label sets, else binary for
    2 classes, else multiclass), its options checked against the data. `model_cfg`: the model section (a
    detector's options); `category_ids`: detection data's own id of each class; `num_images`: the training
    split's size."""
    mismatch = task_data_mismatch(task, data_cfg)
    if mismatch:
        raise ConfigError(mismatch)
    made = implementation(task_spec(task, data_cfg))
    return made.build(list(classes), DataInfo(train_counts, category_ids, num_images),
                      Sections(task, loss_cfg, eval_cfg, data_cfg, model_cfg))


def implementation(spec: TaskSpec):
    """The task class a spec names (imported with torch on first use)."""
    module, name = spec.implementation.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def task_from_meta(meta: dict):
    """The task of an exported model, from its model.json."""
    if meta["task"] not in TASKS:
        raise ConfigError(f"model.json names task '{meta['task']}', which this trainer does not know "
                          f"({', '.join(sorted(TASKS))})")
    return implementation(TASKS[meta["task"]]).from_meta(meta)


def report_files(task, name: str = "eval.json") -> list:
    """What `task.write_report(dir, ..., name)` may write, relative to dir (checked by the write gate before
    any work, and an earlier report's plots this one does not draw are removed)."""
    return [name, *(f"plots/{p}" for p in task.report_plots)]


# the names of the task classes and their helpers, imported (with torch) when first asked for
_CLASSES = {"Classification": "classify", "Task": "classify", "class_weights": "classify_metrics",
            "Segmentation": "segment", "Detection": "detect", "Multilabel": "multilabel"}


def __getattr__(name: str):
    if name in _CLASSES:
        return getattr(importlib.import_module(f"trainer.tasks.{_CLASSES[name]}"), name)
    raise AttributeError(f"module 'trainer.tasks' has no attribute '{name}'")
