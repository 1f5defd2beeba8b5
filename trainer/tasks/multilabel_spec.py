"""What multi-label classification is, read without torch (the spec half of the protocol, trainer/tasks/protocol.py):
the data it trains on (label sets: data.format=multilabel, the generated multilabel variant), its monitor (mAP),
the config keys only it reads, the fields of its model.json and ONNX file. The implementation is
trainer/tasks/multilabel.py.

Its keys: data.csv (the CSV's columns; refused while another task trains), and the shared ones it gives a
multi-label meaning: loss.class_weighted (per-class BCE pos_weight = negatives / positives, from the training
counts), eval.threshold (every class's threshold until tuned) and eval.threshold_tuning=max_f1 (each class's
threshold chosen on val for its F1).
"""
from __future__ import annotations

from trainer.errors import ConfigError, TrainerError
from trainer.metrics import is_number
from trainer.tasks.protocol import outputs_do_not_fit


class MultilabelSpec:
    """Multi-label image classification: a logit per class, each an independent sigmoid."""

    title = "multilabel"
    targets = "label sets"
    data_hint = "data.format=multilabel (a CSV per split) or the generated multilabel variant"
    default_monitor = "map"  # macro average precision: threshold-free, the usual multi-label headline
    fixed_input_size = True  # classification networks (strided stems and pooling)
    tunes_thresholds = True  # eval.threshold_tuning is its own too (max_f1, per class)
    # targets of the whole image, on classification's networks: the per-image policies (auto_augment,
    # random_erasing), mixup/CutMix (trainer/data/mixing.py mixes multi-hot rows) and the network options
    # (dropout, drop_path, fine-tuning) apply; classify_spec, which owns those keys, reads this
    image_level_targets = True
    implementation = "trainer.tasks.multilabel.Multilabel"

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return not (metric in ("loss", "hamming_loss") or metric.endswith("_loss"))

    @classmethod
    def check_config(cls, cfg, trained) -> None:
        """data.csv is read by this task's data only: refused elsewhere; its values must name columns."""
        csv_cfg, defaults = cfg.data.csv, type(cfg.data.csv)()
        if trained is not cls:
            for key in ("image_column", "labels_column", "separator"):
                if getattr(csv_cfg, key) != getattr(defaults, key):
                    raise ConfigError(f"data.csv.{key} is for data.format=multilabel; {trained.title} data has no CSV")
            return
        for key in ("image_column", "labels_column", "separator"):
            if not isinstance(getattr(csv_cfg, key), str) or not getattr(csv_cfg, key):
                raise ConfigError(f"data.csv.{key} must be a non-empty string, got {getattr(csv_cfg, key)!r}")
        if csv_cfg.image_column == csv_cfg.labels_column:
            raise ConfigError(f"data.csv.image_column and data.csv.labels_column are both '{csv_cfg.image_column}'")
        tuning = cfg.eval.threshold_tuning
        if tuning not in (None, "max_f1"):
            raise ConfigError(f"eval.threshold_tuning={tuning} is for binary tasks; multilabel tunes each class's "
                              f"threshold for its F1: eval.threshold_tuning=max_f1")
        if cfg.loss.pos_weight is not None:
            raise ConfigError("loss.pos_weight is one number for binary tasks; multilabel weighs each class's "
                              "positives from the training counts: loss.class_weighted=true")
        if cfg.loss.label_smoothing > 0:
            raise ConfigError("loss.label_smoothing applies to multiclass and segmentation tasks, not multilabel")

    @staticmethod
    def check_meta(meta: dict, path) -> None:
        classes = meta["classes"]
        if meta["num_outputs"] != len(classes):
            raise outputs_do_not_fit(meta, path)
        thresholds = meta.get("thresholds")
        if not isinstance(thresholds, list) or len(thresholds) != len(classes) or not all(
                is_number(t) and 0 < t < 1 for t in thresholds):
            raise TrainerError(f"{path}: thresholds must be a list of {len(classes)} numbers in (0, 1), one per "
                               f"class, got {thresholds}")

    @staticmethod
    def onnx_fields(meta: dict) -> dict:
        return {"probabilities": "sigmoid of each logit (independent classes)",
                "thresholds": [float(t) for t in meta["thresholds"]]}
