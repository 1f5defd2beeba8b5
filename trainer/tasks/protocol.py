"""The task protocol, stated once: what every entry of `TASKS` (trainer/tasks/__init__.py) offers, and the few
helpers the tasks share. No torch here (nor in any *_spec.py): a config is checked against its task before torch
is imported.

A task comes in two halves:

- its spec (`TaskSpec`, in <task>_spec.py): what the task IS, class attributes and class methods read without
  building anything: the data it trains on, its default eval.monitor and which way is better, the config keys
  it owns, the fields of its model.json and of its ONNX file. `TASKS` maps each task name to one.
- its implementation (`TrainingTask`, in <task>.py, a subclass of its spec): what it DOES, built from the
  data's classes and counts plus its config sections: model, loss, evaluator, reports, predictions. The spec
  names it by its dotted path (`implementation`), imported when a task is first built: the spec imports
  nothing of it, and nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol, Sequence, Tuple

from trainer.errors import ConfigError, TrainerError


class TaskSpec(Protocol):
    """What a task is (class-level: no instance, no torch)."""

    title: str  # what messages call it ("binary or multiclass", "segmentation", ...)
    targets: str  # what its data holds: "labels", "masks" or "boxes" (trainer/targets.py reads a config's)
    data_hint: str  # where such data comes from (the formats), for the message refusing other data
    default_monitor: str  # the metric that picks best/ unless eval.monitor names another
    fixed_input_size: bool  # its networks take one input size (checked against data.image_size at start-up)
    implementation: str  # the dotted path of its TrainingTask class, imported (with torch) when first built

    @staticmethod
    def higher_is_better(metric: str) -> bool: ...

    @classmethod
    def check_config(cls, cfg, trained: "TaskSpec") -> None:
        """Every rule this task has about a whole config (`trained`: the spec of the task the config trains):
        while another task trains, the keys only this one reads are refused, each named; while it trains, the
        values of shared keys it cannot serve."""

    @staticmethod
    def check_meta(meta: dict, path) -> None:
        """Its own fields of model.json and its output count (one line naming `path` and the field)."""

    @staticmethod
    def onnx_fields(meta: dict) -> dict:
        """Its fields of the ONNX file's metadata: "probabilities" (how to read the logits) and any other; a
        TrainerError where its models cannot be exported."""


class TrainingTask(TaskSpec, Protocol):
    """What a task does. The loop, `trainer eval` and `trainer predict` only ever call these."""

    name: str  # its TASKS name, also model.json's "task"
    classes: List[str]
    num_outputs: int
    collate: Optional[Callable]  # the DataLoader collate function (None: the default)
    drop_last: bool  # the default of train.drop_last
    report_plots: Sequence[str]  # the files write_report may draw into plots/ (`report_files`)

    @classmethod
    def build(cls, classes: Sequence[str], data: "DataInfo", cfg: "Sections") -> "TrainingTask":
        """From the data's class names and counts and its config sections, each option checked against them."""

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainingTask":
        """The task of an exported model (model.json), for `trainer eval`, `predict` and `export`."""

    def build_model(self, name: str, image_size: int, small_input_stem: Optional[bool] = None,
                    pretrained_path: Optional[str] = None, log=print, drop_path: Optional[float] = None,
                    dropout: Optional[float] = None): ...

    def metric_names(self) -> List[str]:
        """The scalar metrics an evaluation reports (what eval.monitor may name)."""

    def train_loss(self, model, batch, memory_format) -> Tuple[Any, int, dict]:
        """(the loss to backpropagate, samples in this process's batch, {part name: loss part})."""

    def train_resizer(self, seed: int) -> Optional[Callable]:
        """A per-batch resize of the training batches, called with (batch, epoch, first global position of the
        micro-step) (detection's multi-scale training), or None."""

    def loss_parts(self, model_name: str) -> List[str]:
        """The names of those parts (logged beside the loss; [] for none)."""

    def to_device(self, batch, device, memory_format): ...

    def forward(self, net, batch, tta: str = "none"):
        """The outputs evaluation and `trainer predict` turn into metrics and predictions."""

    def evaluator(self, dataset, indices) -> Any:
        """`.add(batch, outputs)` on every rank for each batch of its share (`indices`: the split index of each
        image it will be given, in order); `.finish(accelerator) -> (metrics, outputs)`: the one collective,
        the same metrics on every rank, the gathered outputs on the main rank."""

    def write_report(self, out_dir, metrics: dict, outputs: dict, name: str = "eval.json") -> None:
        """eval.json and the plots beside it (into a staging folder of the write gate, trainer/outputs.py)."""

    def summary(self, metrics: dict) -> str:
        """The printed table."""

    def export_meta(self, metrics: dict) -> dict:
        """Its fields of model.json."""

    def match_data(self, data, dataset) -> None:
        """`trainer eval`: the data's classes against the model's (a DataError where they cannot be scored;
        labels renumbered where only the order differs)."""

    def check_predict_options(self, threshold: Optional[float], draw: Optional[str],
                              score_threshold: Optional[float]) -> None:
        """`trainer predict`'s options that are some task's own: refused, each named, where not this one's."""

    def predict_batch(self, images: list, meta: dict, device) -> tuple:
        """`trainer predict`: decoded images (uint8 [3, H, W], each its own size) as the batch `forward` takes."""

    def prediction_writer(self, output: str, given, overlay: bool = False, draw: Optional[str] = None,
                          overwrite: bool = False) -> Any:
        """What `trainer predict` writes: `.add(inputs, outputs, sizes, images)` per batch, `.close()`."""

    @classmethod
    def example(cls, name: str, tmp) -> "Example":
        """A tiny case of the task `name`, which the contract test (tests/test_tasks.py) runs every task through."""


class OneSizeOneLoss:
    """The protocol's answer for the tasks whose training batches all have the one input size and whose loss has
    no parts to log (classification, multi-label, segmentation); detection answers both itself."""

    def train_resizer(self, seed: int) -> None:
        return None

    @staticmethod
    def loss_parts(model_name: str) -> List[str]:
        return []


@dataclass(frozen=True)
class DataInfo:
    """What a task is built from besides the class names: the training split's counts per class (images;
    pixels for segmentation; boxes for detection; positive images for multi-label), for detection the
    annotation file's id of each class, and the number of training images (multi-label's pos_weight is
    negatives / positives: the counts alone do not say the negatives once an image may hold several classes)."""
    train_counts: Sequence[int]
    category_ids: Sequence[int] = ()
    num_images: int = 0


@dataclass(frozen=True)
class Sections:
    """The config a task is built from: `task` as asked (auto, or a name), and the sections it reads."""
    task: str
    loss: Any
    eval: Any
    data: Any
    model: Any = None


@dataclass(frozen=True)
class Example:
    """A tiny case of a task (`example`): what the contract test builds it from, trains on a batch of, evaluates
    and predicts, so the test holds every entry of TASKS to the protocol without knowing any of them."""
    classes: List[str]
    model: str  # a small model of the task
    config: dict  # the config keys (dotted) that say what the data is
    batch: Any  # a training batch of 6 samples
    dataset: Any  # an evaluation split of 7 (an odd size)
    inputs: Any  # 2 images, as `forward` takes them in `trainer predict`
    output: str  # the name of what `prediction_writer` writes (a file, or a folder)
    category_ids: Sequence[int] = ()  # detection: the data's id of each class


def check_monitor(task, monitor: str) -> None:
    """eval.monitor must name one of the task's metrics."""
    names = task.metric_names()
    if monitor not in names:
        raise ConfigError(f"eval.monitor '{monitor}' is not a {task.name} metric; choose one of {sorted(names)}")


def outputs_do_not_fit(meta: dict, path) -> TrainerError:
    """model.json's class count against its output count, as `check_meta` refuses it."""
    return TrainerError(f"{path}: {len(meta['classes'])} classes do not fit {meta['num_outputs']} output(s) of a "
                        f"{meta['task']} model")


def refuse_box_options(name: str, draw: Optional[str], score_threshold: Optional[float]) -> None:
    if draw is not None or score_threshold is not None:
        raise TrainerError(f"--draw and --score-threshold are for detection models; this one is {name}")


def refuse_threshold(name: str, threshold: Optional[float], hint: str) -> None:
    if threshold is not None:
        raise TrainerError(f"--threshold applies to binary models only; this one is {name}{hint}")
