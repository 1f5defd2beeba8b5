"""What object detection is, read without torch (the spec half of the protocol, trainer/tasks/protocol.py).
The implementation is trainer/tasks/detect.py.
"""
from __future__ import annotations

import dataclasses

from trainer.errors import ConfigError, TrainerError
from trainer.tasks.protocol import outputs_do_not_fit


class DetectionSpec:
    """Boxes and their classes per image (torchvision's detectors: class 0 is the background)."""

    title = "detection"
    targets = "boxes"
    data_hint = "data.format=coco or voc_detection, shards of a COCO folder, or data.generated.variant=detection"
    default_monitor = "map"
    fixed_input_size = False  # a detector resizes each image itself (model.detection.min_size, max_size)
    implementation = "trainer.tasks.detect.Detection"  # its class (with torch), imported when first built

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return metric != "loss"  # every detection metric is a precision or a recall

    @classmethod
    def check_config(cls, cfg, trained) -> None:
        """Detection owns the box augmentations and the model.detection section: while another task trains,
        each is refused by name. While it trains: no random resized crop (boxes are cropped by iou_crop), no
        averaged test-time augmentation, and no loss.* key (a detector trains with its own loss)."""
        aug = cfg.data.augment
        if trained is not cls:
            if aug.scale_jitter is not None or aug.iou_crop or aug.multiscale_sizes is not None:
                key = "multiscale_sizes" if aug.multiscale_sizes is not None else (
                    "scale_jitter" if aug.scale_jitter is not None else "iou_crop")
                raise ConfigError(f"data.augment.{key} is for detection; classification and segmentation crop with "
                                  f"data.augment.random_resized_crop (segmentation also data.augment.scale_range)")
            if cfg.data.aspect_ratio_group_factor or cfg.data.repeat_factor_threshold is not None:
                key = "aspect_ratio_group_factor" if cfg.data.aspect_ratio_group_factor else "repeat_factor_threshold"
                raise ConfigError(f"data.{key} is a detection sampler; a {trained.title} run samples with "
                                  f"data.sampler")
            if aug.scale_range is not None and trained.title != "segmentation":
                raise ConfigError(f"data.augment.scale_range is for segmentation and detection; a {trained.title} "
                                  f"model crops with data.augment.random_resized_crop")
            section = cfg.model.detection
            defaults = dataclasses.asdict(type(section)())
            changed = sorted(k for k, v in dataclasses.asdict(section).items() if v != defaults[k])
            if changed:
                raise ConfigError(f"model.detection.{changed[0]} is for detection models; a {trained.title} model "
                                  f"takes no model.detection.* option")
            return
        if aug.random_resized_crop:
            raise ConfigError("data.augment.random_resized_crop crops classification and segmentation images; a "
                              "detector's boxes are cropped with data.augment.iou_crop (and rescaled by "
                              "data.augment.scale_jitter)")
        if cfg.eval.tta != "none":
            raise ConfigError(f"eval.tta={cfg.eval.tta} averages logits; a detector's boxes are not averaged that "
                              f"way: use eval.tta=none for detection")
        loss = cfg.loss
        if loss.name != "ce" or loss.class_weighted or loss.label_smoothing or loss.pos_weight:
            raise ConfigError("loss.* options are for classification and segmentation; a detector trains with its "
                              "own loss (tune it through model.detection.*)")

    @staticmethod
    def check_meta(meta: dict, path) -> None:
        classes, ids, kwargs = meta["classes"], meta.get("category_ids"), meta.get("model_kwargs")
        if not isinstance(ids, list) or len(ids) != len(classes) or not all(isinstance(c, int) for c in ids) \
                or len(set(ids)) != len(ids):
            raise TrainerError(f"{path}: category_ids must be one distinct integer per class, got {ids}")
        if not isinstance(kwargs, dict):
            raise TrainerError(f"{path}: a detection model needs model_kwargs (a mapping), got {kwargs!r}")
        if meta["num_outputs"] != len(classes) + 1:  # + the background
            raise outputs_do_not_fit(meta, path)

    @staticmethod
    def onnx_fields(meta: dict) -> dict:
        raise TrainerError("detection models cannot be exported to ONNX faithfully: torchvision's detectors "
                           "resize inside, return a data-dependent number of boxes and run NMS, which the "
                           "exporter does not reproduce; use trainer predict")
