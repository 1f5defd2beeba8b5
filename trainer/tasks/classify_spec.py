"""What binary and multi-class classification are, read without torch (the spec half of the protocol,
trainer/tasks/protocol.py): the data they train on, their monitor, the config keys only they read, the fields of
their model.json and ONNX file. The implementation is trainer/tasks/classify.py.
"""
from __future__ import annotations

from trainer.errors import ConfigError, TrainerError
from trainer.metrics import is_number
from trainer.tasks.protocol import outputs_do_not_fit


class ClassificationSpec:
    """Binary (one logit) and multi-class (a logit per class) image classification."""

    title = "binary or multiclass"
    targets = "labels"
    data_hint = "an image folder of class folders, cifar, or a generated classification variant"
    default_monitor = "accuracy"
    fixed_input_size = True  # strided stems and pooling: too small an image_size fails inside the first forward
    implementation = "trainer.tasks.classify.Classification"  # its class (with torch), imported when first built

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return not (metric in ("loss", "log_loss") or metric.endswith("_loss"))

    @classmethod
    def check_config(cls, cfg, trained) -> None:
        """Classification owns the device loader, the class-balanced sampler, GPU decoding of JPEG files, the
        per-image augmentation policies and batch mixing, the options of classification networks and their
        fine-tuning, and the binary threshold keys: while another task trains, each is refused by name."""
        data, aug = cfg.data, cfg.data.augment
        cuda_decode = data.decode_device == "cuda" and data.loader == "workers"  # other loaders: config.validate says
        if trained is cls:
            if cuda_decode and data.format not in ("imagefolder", "shards"):
                raise ConfigError(_cuda_decode_is_for_files(data.format))
            return
        if data.loader == "device":
            raise ConfigError(f"data.loader=device is for classification; {trained.title} reads images and their "
                              f"{trained.targets} through data.loader=workers")
        if data.sampler == "weighted":
            raise ConfigError(f"data.sampler=weighted draws images by class label; {trained.title} data has no one "
                              f"label per image (segmentation: try loss.class_weighted=true)")
        if cuda_decode:
            raise ConfigError(_cuda_decode_is_for_files(data.format))
        # a task of image-level targets on classification's networks (multilabel: its targets do not move with the
        # pixels, and mixing.py mixes its multi-hot rows) takes the per-image policies, batch mixing and the
        # network options
        image_level = getattr(trained, "image_level_targets", False)
        for key, on in (("mixup_alpha", aug.mixup_alpha > 0), ("cutmix_alpha", aug.cutmix_alpha > 0),
                        ("auto_augment", aug.auto_augment != "none"), ("random_erasing", aug.random_erasing > 0)):
            if on and not image_level:
                raise ConfigError(f"data.augment.{key} is for classification; {trained.title} data would need its "
                                  f"{trained.targets} transformed alike")
        for key, on in (("model.drop_path", cfg.model.drop_path is not None),
                        ("model.dropout", cfg.model.dropout is not None),
                        ("model.freeze_backbone_epochs", cfg.model.freeze_backbone_epochs > 0),
                        ("optim.head_lr_scale", cfg.optim.head_lr_scale != 1),
                        ("optim.layer_decay", cfg.optim.layer_decay is not None),
                        # segmentation and detection resize images and their masks/boxes their own way
                        ("data.crop_mode", data.crop_mode is not None), ("data.crop_pct", data.crop_pct is not None),
                        ("data.interpolation", data.interpolation is not None)):
            if on and not image_level:
                raise ConfigError(f"{key} is for classification models; {trained.title} models do not take it")
        if cfg.eval.positive_class is not None:
            raise ConfigError("eval.positive_class applies to binary classification only")
        if cfg.eval.threshold_tuning and not getattr(trained, "tunes_thresholds", False):  # multilabel: per class
            raise ConfigError("eval.threshold_tuning applies to binary and multilabel classification only")

    @staticmethod
    def check_meta(meta: dict, path) -> None:
        classes, binary = meta["classes"], meta["task"] == "binary"
        if meta["num_outputs"] != (1 if binary else len(classes)) or (binary and len(classes) != 2):
            raise outputs_do_not_fit(meta, path)
        threshold = meta.get("threshold")
        if binary and threshold is not None and not (is_number(threshold) and 0 < threshold < 1):
            raise TrainerError(f"{path}: threshold must be in (0, 1), got {threshold}")
        if meta.get("positive_class") is not None and meta["positive_class"] not in classes:
            raise TrainerError(f"{path}: positive_class '{meta['positive_class']}' is not one of {classes}")

    @staticmethod
    def onnx_fields(meta: dict) -> dict:
        if meta["task"] != "binary":
            return {"probabilities": "softmax over axis 1"}
        return {"probabilities": "sigmoid (one logit: P(classes[1]))", "threshold": meta.get("threshold") or 0.5,
                "positive_class": meta.get("positive_class")}


def _cuda_decode_is_for_files(fmt: str) -> str:
    return (f"data.decode_device=cuda decodes the JPEGs of image folders and their shards (classification); "
            f"data.format={fmt} is decoded on the CPU: set data.decode_device=cpu")


def resolve_task(task: str, num_classes: int) -> str:
    """binary or multiclass: the task named, or for task=auto the one the class count says."""
    if task == "auto":
        return "binary" if num_classes == 2 else "multiclass"
    if task == "binary" and num_classes != 2:
        raise ConfigError(f"task=binary needs exactly 2 classes, the data has {num_classes}")
    return task
