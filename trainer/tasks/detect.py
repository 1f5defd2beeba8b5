"""Object detection behind the task protocol of trainer/tasks: batches are (list of images float [3, H, W] in
[0, 1], each its own size; list of targets {"boxes" xyxy, "labels" 1..K}), the loss is the torchvision
detector's own loss dict (its sum is optimised, every part logged), and evaluation keeps each image's
detections (boxes in the image's own pixels, scores, labels), gathers them once to the main rank, checks that
every image of the split came exactly once, and scores them with pycocotools' COCOeval against the split's
annotations as the file gives them (trainer/tasks/detect_metrics.py): exact on any number of processes.

Labels are contiguous inside (1..K in the order of the file's category ids; 0 is background) and the file's
own category ids in everything written: eval.json's per-class table (by name), model.json, predictions.

Each image goes through the detector on its own in evaluation and in `trainer predict`: a detector pads the
images of one forward to a common size, and the float rounding of a convolution depends on its tensor's
shape, so one image per forward is what makes eval on 1 or N processes and `trainer predict` give the same
boxes and scores to the bit. Memory: the main rank holds every detection of the split at the end
(<= detections_per_img per image, ~450 bytes each as Python COCO records: 5,000 images x 100 = ~225 MB).

Models: trainer/tasks/detect_models.py; metrics: detect_metrics.py; plots: detect_reports.py; predictions:
one JSON list of COCO-style records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FrozenBatchNorm2d

from trainer.data.coco import DetectionDataset, collate_detection, read_coco
from trainer.data.generated import GENERATED_CATEGORY_IDS, write_generated_coco
from trainer.data.scale import MultiScale
from trainer.errors import ConfigError, DataError, TrainerError
from trainer.prediction_files import Given, PredictionFolder, output_path
from trainer.tasks.detect_metrics import DetectionEvaluator, coco_classes, to_coco_records
from trainer.tasks.detect_models import build_detection_model, check_name, loss_part_names, model_kwargs
from trainer.tasks.detect_reports import PLOTS, BoxPredictions, format_detection_summary, write_detection_report
from trainer.tasks.detect_spec import DetectionSpec
from trainer.tasks.protocol import DataInfo, Example, Sections, check_monitor, refuse_threshold

METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100", "loss")


def detector_options(model_cfg, image_size: int) -> dict:
    """The `model.detection` section as detect_models options; the input size defaults to data.image_size
    (the short side) and max_size to it x 1333 / 800 (torchvision's ratio)."""
    d = model_cfg.detection
    min_size = d.min_size or image_size
    return {"min_size": min_size, "max_size": d.max_size or int(round(min_size * 1333 / 800)),
            "anchor_sizes": d.anchor_sizes, "aspect_ratios": d.aspect_ratios,
            "trainable_backbone_layers": d.trainable_backbone_layers, "score_thresh": d.score_thresh,
            "nms_thresh": d.nms_thresh, "detections_per_img": d.detections_per_img}


@dataclass
class Detection(DetectionSpec):
    classes: List[str]  # names, in the order of the file's category ids; label k + 1 is classes[k]
    category_ids: List[int]  # the file's id of each class
    options: dict = field(default_factory=dict)  # detect_models options (resolved when the model is built)
    architecture: Optional[str] = None
    # options filled in from data.image_size rather than given: dropped for a model with a fixed input size (SSDlite)
    derived: Tuple[str, ...] = ()
    # training sizes the images itself (data.augment.scale_range's canvas or multiscale_sizes' short side per
    # batch): the detector's own resize is skipped in training, as the reference's `_skip_resize` for its "lsj"
    # and "multiscale" presets; evaluation and prediction still resize to min_size
    skip_train_resize: bool = False
    multiscale_sizes: Optional[Tuple[int, ...]] = None
    # eval.detection_loss: evaluation also runs each image in training mode for its loss parts (validation_losses)
    validation_loss: bool = False
    coco_backend: str = "pycocotools"  # eval.coco_backend: what scores the detections (detect_metrics.coco_classes)
    name = "detection"
    report_plots = PLOTS  # what write_report may draw into plots/
    drop_last = False
    collate = staticmethod(collate_detection)

    @property
    def num_outputs(self) -> int:
        return len(self.classes) + 1  # + background

    # -- construction --

    @classmethod
    def build(cls, classes: Sequence[str], data: DataInfo, cfg: Sections) -> "Detection":
        """`data.category_ids`: the annotation file's id of each class; the options are model.detection's, the
        input size derived from data.image_size where not given (`detector_options`)."""
        section = cfg.model.detection
        derived = tuple(k for k in ("min_size", "max_size") if getattr(section, k) is None)
        aug = cfg.data.augment
        multiscale = tuple(int(v) for v in aug.multiscale_sizes) if aug.multiscale_sizes else None
        made = cls(list(classes), [int(c) for c in data.category_ids],
                   detector_options(cfg.model, cfg.data.image_size), derived=derived,
                   skip_train_resize=aug.scale_range is not None or multiscale is not None, multiscale_sizes=multiscale,
                   validation_loss=cfg.eval.detection_loss, coco_backend=cfg.eval.coco_backend)
        coco_classes(made.coco_backend)  # at start-up: a backend that is not installed is refused now
        if cfg.eval.monitor == "loss" and not made.validation_loss:
            raise ConfigError("eval.monitor=loss needs the detector's validation loss, which is scored only with "
                              "eval.detection_loss=true (a second pass of every image: about twice the evaluation)")
        check_monitor(made, cfg.eval.monitor or made.default_monitor)
        made.check_model(cfg.model.name)
        return made

    @classmethod
    def from_meta(cls, meta: dict) -> "Detection":
        return cls(list(meta["classes"]), [int(c) for c in meta["category_ids"]], dict(meta["model_kwargs"]),
                   meta.get("architecture"))

    def build_model(self, name: str, image_size: int, small_input_stem: Optional[bool] = None,
                    pretrained_path: Optional[str] = None, log=print, drop_path: Optional[float] = None,
                    dropout: Optional[float] = None):
        if drop_path or dropout is not None:  # the config refuses them first; a direct caller is told here too
            raise ConfigError(f"model.drop_path and model.dropout are for classification models; {name} keeps its own")
        check_name(name)
        self.options, self.architecture = self.resolved(name), name  # what model.json records
        model = build_detection_model(name, self.num_outputs, self.options, pretrained_path, log=log)
        if self.skip_train_resize:
            model.transform._skip_resize = True  # torchvision's own switch (GeneralizedRCNNTransform.resize)
        return model

    def train_resizer(self, seed: int):
        """Multi-scale training (trainer/data/scale.py), or None."""
        if self.multiscale_sizes is None:
            return None
        if "max_size" not in self.options:
            raise ConfigError(f"data.augment.multiscale_sizes: {self.architecture} resizes every image to one fixed "
                              f"size; multi-scale training is for detectors that take model.detection.min_size")
        return MultiScale(self.multiscale_sizes, self.options["max_size"], seed)

    def resolved(self, name: str) -> dict:
        """Every option model `name` takes, as given or its default (model_kwargs); a size derived from
        data.image_size is left out for a model that takes none."""
        takes = model_kwargs(name)  # its defaults: the options it takes
        return model_kwargs(name, {k: v for k, v in self.options.items() if k in takes or k not in self.derived})

    def check_model(self, name: str) -> None:
        """At start-up, before the model is built: the model exists and takes every option given."""
        check_name(name)
        self.resolved(name)

    def metric_names(self) -> List[str]:
        return [m for m in METRICS if m != "loss" or self.validation_loss]  # a loss only where it is scored

    def loss_parts(self, model_name: str) -> List[str]:
        return loss_part_names(model_name)

    # -- training --

    def train_loss(self, model, batch, memory_format=torch.contiguous_format) -> Tuple[torch.Tensor, int, dict]:
        images, targets = batch
        parts = model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
        parts = {k: v.float() for k, v in parts.items()}  # summed in fp32 whatever the autocast dtype
        return sum(parts.values()), len(images), parts

    # -- evaluation --

    def to_device(self, batch, device, memory_format=torch.contiguous_format):
        images, targets = batch
        moved = []
        for t in targets:
            t = dict(t)
            t["boxes"], t["labels"] = t["boxes"].to(device), t["labels"].to(device)
            moved.append(t)
        return [x.to(device, non_blocking=True) for x in images], moved

    def forward(self, net, batch, tta: str = "none") -> List[Dict[str, torch.Tensor]]:
        """The detections of each image, one image per forward (see the module docstring); where the batch has
        targets (evaluation) and eval.detection_loss is on, each image's validation loss parts too, under
        "losses" (validation_losses)."""
        images, targets = (batch[0], batch[1]) if len(batch) > 1 else (batch[0], None)
        out = [net([x])[0] for x in images]
        if targets is not None and self.validation_loss:
            for det, x, t in zip(out, images, targets):
                det["losses"] = validation_losses(net, x, t)
        return out

    def evaluator(self, dataset, indices: torch.Tensor) -> DetectionEvaluator:
        return DetectionEvaluator(self, dataset, indices)

    def match_data(self, data, dataset) -> None:
        if (data.classes, data.category_ids) != (self.classes, self.category_ids):
            raise DataError(f"{data.source} has the categories {list(zip(data.category_ids, data.classes))}; the "
                            f"model was trained on {list(zip(self.category_ids, self.classes))} (id, name): the "
                            f"annotation file must use the same ones")

    # -- reports, export, predictions --

    def write_report(self, out_dir, metrics: dict, outputs: dict, name: str = "eval.json") -> None:
        write_detection_report(out_dir, metrics, outputs, self.classes, name=name)

    def summary(self, metrics: dict) -> str:
        return format_detection_summary(metrics)

    def export_meta(self, metrics: dict) -> dict:
        return {"task": self.name, "num_outputs": self.num_outputs, "classes": list(self.classes),
                "category_ids": list(self.category_ids), "model_kwargs": dict(self.options)}

    def check_predict_options(self, threshold: Optional[float], draw: Optional[str],
                              score_threshold: Optional[float]) -> None:
        refuse_threshold(self.name, threshold, "; use --score-threshold")

    @staticmethod
    def predict_batch(images: list, meta: dict, device) -> tuple:
        """Each image as it is, in [0, 1] (as detection_eval_transform): a detector resizes and normalises inside,
        and maps its boxes back to the image's pixels."""
        return ([(image.float() / 255).to(device) for image in images],)

    def prediction_writer(self, output: str, given: Given, overlay: bool = False, draw: Optional[str] = None,
                          overwrite: bool = False) -> BoxPredictions:
        if overlay:
            raise TrainerError("--overlay is for segmentation; a detection model draws its boxes with --draw DIR")
        out = output_path(output, given, "JSON", overwrite)
        return BoxPredictions(self, out, PredictionFolder(Path(draw), "--draw", given, (".jpg",)) if draw else None)

    @classmethod
    def example(cls, name: str, tmp) -> Example:
        """A generated COCO split of 7 images of 32 px (its first 6 as the training batch)."""
        write_generated_coco(Path(tmp) / "coco", 32, 0, {"val": 7})
        split = Path(tmp) / "coco" / "val"
        dataset = DetectionDataset(read_coco(split / "annotations.json", split, log=lambda *_: None))
        return Example(list(GENERATED_CATEGORY_IDS), "retinanet_small", {"data.format": "coco", "data.image_size": 32},
                       collate_detection([dataset[i] for i in range(6)]), dataset, [dataset[0][0], dataset[1][0]],
                       "preds.json", list(GENERATED_CATEGORY_IDS.values()))

    def records(self, image_id, detection: Dict[str, torch.Tensor]) -> List[dict]:
        """One image's detections as COCO result records in the file's category ids."""
        return to_coco_records(image_id, detection["boxes"].cpu().double(), detection["scores"].cpu(),
                               detection["labels"].cpu(), self.category_ids)


def validation_losses(net, image: torch.Tensor, target: dict) -> Dict[str, float]:
    """One image's loss parts as training computes them, without changing the model: a torchvision detector
    returns losses only in training mode, so the detector is put in it with every normalisation and dropout
    layer left in eval mode (BatchNorm uses, and does not update, its running statistics), and the random
    sampling of proposals and RoIs (R-CNN) runs under a torch RNG seeded by the image's split index, forked so
    the training RNG is untouched: the same numbers on any number of processes, and an exact resume."""
    was = {m: m.training for m in net.modules()}
    # the loss at the size evaluation sees: a detector whose training images the data sizes (_skip_resize,
    # Detection.skip_train_resize) would otherwise take this image at its own size in training mode
    sizers = [m for m in net.modules() if isinstance(m, GeneralizedRCNNTransform) and m._skip_resize]
    net.train()
    for m in sizers:
        m._skip_resize = False
    for m in net.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Dropout, FrozenBatchNorm2d)):
            m.eval()
    try:
        with torch.random.fork_rng(devices=[image.device] if image.device.type == "cuda" else []):
            torch.manual_seed(int(target["image_id"]))
            parts = net([image], [{"boxes": target["boxes"], "labels": target["labels"]}])
    finally:
        for m, training in was.items():
            m.train(training)
        for m in sizers:
            m._skip_resize = True
    return {k: float(v) for k, v in parts.items()}
