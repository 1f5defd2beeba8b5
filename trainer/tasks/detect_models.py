"""Object-detection models: a plain dict from name to builder, the options users tune, local pretrained weights.

Every model is a torchvision detector and speaks its protocol: `model(images, targets)` with images a LIST of
float [3, H, W] tensors in [0, 1] (each its own size) and targets [{"boxes": float [N, 4] xyxy in that image's
pixels, "labels": int64 [N] in 1..K}] (an image without objects: boxes of shape (0, 4)). In train mode it returns
a dict of loss terms (`loss_part_names`; the total is their sum); in eval mode [{"boxes", "scores", "labels"}] per
image, boxes xyxy in the ORIGINAL image's pixels (the model resizes internally and maps back). `num_classes`
counts the background: K + 1 for K object classes (label 0 is background in the R-CNN and SSD heads; the
sigmoid heads of RetinaNet and FCOS never see a target 0, so K + 1 works for every model).

Nothing here downloads: torchvision's detection builders default `weights_backbone` to ImageNet weights (all
but the _v2 ones), so every build passes weights=None, weights_backbone=None; weights come only from a local
file (`pretrained_path`, see `load_detection_pretrained`). Built from scratch, torchvision uses plain BatchNorm2d
in the backbone (not FrozenBatchNorm2d) and keeps every backbone layer trainable.

Options (`DETECTION_OPTIONS`), all optional; a missing or None value means the model's own default, and a
model that cannot take an option raises a ConfigError naming the option and the model:
- min_size, max_size: the internal resize (shorter side to min_size unless the longer would pass max_size).
  The torchvision defaults (800/1333) blow a 64 px image up to 800 px: set them to the data's size.
- anchor_sizes: per feature level, a list of sizes in px of the resized image (a number for one size);
  aspect_ratios (h/w): one list for every level, or a list per level. Every level needs the same number of
  anchors (the head is shared across levels); a changed count re-initialises the head's last convolutions.
- trainable_backbone_layers: freeze all but the last N backbone stages (torchvision's numbering: resnet 0-5,
  mobilenet 0-6; the maximum = nothing frozen, the default). Frozen stages also get FrozenBatchNorm2d, so their
  running statistics stay those of the pretrained file. torchvision ignores this option when it builds without
  weights; here it is applied after `pretrained_path` is loaded, the way torchvision's pretrained builders freeze.
- score_thresh, nms_thresh, detections_per_img: post-processing in eval mode (R-CNN: box_score_thresh, ...).
  Keep score_thresh low (0.05 or below) for mAP: COCO AP integrates over all scores; a high threshold cuts recall.

Training speed from scratch, 1 thread of this 2-core CPU (torch 2.14, torchvision 0.29), 128 px images resized
to each model's default size, forward + backward + SGD step, mean of 2 steps after a warm-up (noisy: 2x):
  retinanet_small (128 px, batch 16)                  78-97 img/s   1.05 M params
  ssdlite320_mobilenet_v3_large (320 px, batch 2)      7.6 img/s    2.25 M
  fasterrcnn_mobilenet_v3_large_320_fpn (320, 2)       1.0 img/s   19.0 M
  fasterrcnn_mobilenet_v3_large_fpn (800, 2)           0.6 img/s   19.0 M
  retinanet_resnet50_fpn_v2 (800, 2)                   0.15 img/s  36.4 M
  fcos_resnet50_fpn (800, 2)                           0.14 img/s  32.1 M
  fasterrcnn_resnet50_fpn_v2 (800, 2)                  0.06 img/s  43.3 M (first step only: 31 s)
retinanet_small learns the generated shapes scenes (trainer.data.generated plan_scene/render_scene, 4 classes,
boxes per class-connected component) from scratch: 500 train images of 128 px, AdamW lr 2e-3 (wd 1e-4 on
weights, 50-step warm-up, cosine over 3 minutes), batch 16, h+v flips, 1 thread: mAP50 0.85 / mAP 0.64 on 100 val
images after 180 s of training (35 epochs; 0.62 at the run's 90 s mark). At 96 px (min/max_size 96, the same
anchors; 146 img/s): mAP50 0.56 at 60 s, 0.83 at 120 s, 0.82 / mAP 0.61 at 180 s. Faster R-CNN on the same small
backbone reached 0.57 mAP50 in 180 s at 128 px (23 img/s): fewer, slower steps.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from trainer.errors import ConfigError
from trainer.metrics import is_number
from trainer.models import read_state_dict, unknown_name
from trainer.tasks.segment_models import load_pretrained

DETECTION_OPTIONS = ("min_size", "max_size", "anchor_sizes", "aspect_ratios", "trainable_backbone_layers",
                     "score_thresh", "nms_thresh", "detections_per_img")

_RCNN_LOSSES = ["loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]
_ONE_STAGE_LOSSES = ["classification", "bbox_regression"]

# ---- our small RetinaNet ----


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallBackbone(nn.Module):
    """Four stages of [conv3x3 stride 2, conv3x3] (conv-BN-ReLU), widths 16, 32, 64, 128 at strides 2, 4, 8, 16,
    then a 5th stage (128, stride 32); torchvision's FeaturePyramidNetwork over the stride 8, 16 and 32 maps gives
    three `out_channels`-wide levels "0", "1", "2". Trains from scratch: no pretrained file exists for it."""

    widths = (16, 32, 64, 128, 128)
    returned = (2, 3, 4)  # stage indices: strides 8, 16, 32

    def __init__(self, out_channels: int = 64):
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        stages, cin = [], 3
        for w in self.widths:
            stages.append(nn.Sequential(_conv_bn_relu(cin, w, 2), _conv_bn_relu(w, w, 1)))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fpn = FeaturePyramidNetwork([self.widths[i] for i in self.returned], out_channels)
        self.out_channels = out_channels  # read by torchvision's detectors

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.returned:
                feats[str(len(feats))] = x
        return self.fpn(feats)


def _retinanet_small(num_classes: int, kw: dict) -> nn.Module:
    """torchvision's RetinaNet (focal loss, 4-conv heads, here with GroupNorm as in retinanet_v2) on
    `SmallBackbone`, 64 channels. Anchors for 64-128 px images of objects 10-100 px: 16, 32 and 64 px at strides
    8, 16, 32, times 1 and sqrt 2, ratios 0.5, 1, 2 (6 per location). ~1.05 M parameters (5 classes)."""
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.retinanet import RetinaNetHead

    backbone = SmallBackbone(out_channels=64)
    anchors = _anchor_generator(kw["anchor_sizes"], kw["aspect_ratios"])
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], num_classes,
                         norm_layer=partial(nn.GroupNorm, 16))
    return RetinaNet(backbone, num_classes, min_size=kw["min_size"], max_size=kw["max_size"],
                     anchor_generator=anchors, head=head, score_thresh=kw["score_thresh"],
                     nms_thresh=kw["nms_thresh"], detections_per_img=kw["detections_per_img"])


# ---- torchvision models ----


def _anchor_generator(sizes: List[List[float]], ratios: List[List[float]]):
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    return AnchorGenerator(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in ratios))


def _new_conv(old: nn.Conv2d, out_channels: int, bias: float) -> nn.Conv2d:
    """`old`'s layer with another output width, initialised as torchvision's heads do (normal std 0.01)."""
    conv = nn.Conv2d(old.in_channels, out_channels, old.kernel_size, old.stride, old.padding)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.constant_(conv.bias, bias)
    return conv


def _set_anchors(model: nn.Module, sizes: List[List[float]], ratios: List[List[float]]) -> None:
    """Swap a built model's anchor generator; when the anchors per location change, the head's last convs
    (their outputs are per anchor) are re-initialised at the new width. The generator holds no weights."""
    from torchvision.models.detection import FasterRCNN, RetinaNet

    anchors = _anchor_generator(sizes, ratios)
    n = anchors.num_anchors_per_location()[0]
    if isinstance(model, FasterRCNN):
        model.rpn.anchor_generator = anchors
        head = model.rpn.head
        if head.cls_logits.out_channels != n:
            head.cls_logits = _new_conv(head.cls_logits, n, 0.0)
            head.bbox_pred = _new_conv(head.bbox_pred, 4 * n, 0.0)
    elif isinstance(model, RetinaNet):
        model.anchor_generator = anchors
        cls, reg = model.head.classification_head, model.head.regression_head
        if cls.num_anchors != n:
            prior = 0.01  # RetinaNetClassificationHead's prior_probability
            cls.cls_logits = _new_conv(cls.cls_logits, n * cls.num_classes, -math.log((1 - prior) / prior))
            cls.num_anchors = n
            reg.bbox_reg = _new_conv(reg.bbox_reg, 4 * n, 0.0)
    else:
        raise AssertionError(f"no anchors to set on {type(model).__name__}")


def _torchvision(name: str) -> Callable[[int, dict], nn.Module]:
    def build(num_classes: int, kw: dict) -> nn.Module:
        from torchvision.models import detection

        prefix = "box_" if name.startswith("fasterrcnn") else ""  # FasterRCNN's names: box_score_thresh, ...
        args = {f"{prefix}{k}": kw[k] for k in ("score_thresh", "nms_thresh", "detections_per_img")}
        args.update({k: kw[k] for k in ("min_size", "max_size") if k in kw})  # SSD's size is fixed
        # weights_backbone defaults to ImageNet weights in most detection builders: a download without this
        model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes, **args)
        if "anchor_sizes" in kw:
            _set_anchors(model, kw["anchor_sizes"], kw["aspect_ratios"])
        return model

    return build


# name -> builder(num_classes, resolved options from `model_kwargs`); trainable_backbone_layers and pretrained
# weights are applied by build_detection_model
DETECTION_MODELS: Dict[str, Callable[[int, dict], nn.Module]] = {
    "retinanet_small": _retinanet_small,  # 1.05 M params; the CPU/CI model, from scratch on 64-128 px
    "fasterrcnn_mobilenet_v3_large_fpn": _torchvision("fasterrcnn_mobilenet_v3_large_fpn"),  # 19 M
    "fasterrcnn_mobilenet_v3_large_320_fpn": _torchvision("fasterrcnn_mobilenet_v3_large_320_fpn"),  # 19 M
    "fasterrcnn_resnet50_fpn": _torchvision("fasterrcnn_resnet50_fpn"),  # 41 M
    "fasterrcnn_resnet50_fpn_v2": _torchvision("fasterrcnn_resnet50_fpn_v2"),  # 43 M
    "retinanet_resnet50_fpn": _torchvision("retinanet_resnet50_fpn"),  # 34 M
    "retinanet_resnet50_fpn_v2": _torchvision("retinanet_resnet50_fpn_v2"),  # 36 M
    "fcos_resnet50_fpn": _torchvision("fcos_resnet50_fpn"),  # 32 M
    "ssdlite320_mobilenet_v3_large": _torchvision("ssdlite320_mobilenet_v3_large"),  # 2.2 M (reduced tail)
    "ssd300_vgg16": _torchvision("ssd300_vgg16"),  # 35.6 M
}
# torchvision's other detection builders need targets this task does not read: why, for the error naming them
NOT_BOX_DETECTORS = {name: "it trains on instance masks (segmentation polygons), not boxes alone"
                     for name in ("maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2")}
NOT_BOX_DETECTORS["keypointrcnn_resnet50_fpn"] = "it trains on keypoints, not boxes alone"

# ---- options: each model's defaults (torchvision 0.29's own values; a test compares them with built models) ----

_RCNN_ANCHOR_RATIOS = [0.5, 1.0, 2.0]
_FASTERRCNN_POST = {"score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100}
_MOBILENET_FPN = {  # 3 levels: strides 16 and 32 (features 13 and 16) plus a max-pooled one
    "anchor_sizes": [[32, 64, 128, 256, 512]] * 3, "aspect_ratios": [_RCNN_ANCHOR_RATIOS] * 3,
    "trainable_backbone_layers": 6, **_FASTERRCNN_POST}

# Every option a model takes, with its default. An option missing here is one the model cannot take.
_DEFAULTS: Dict[str, dict] = {
    "retinanet_small": {"min_size": 128, "max_size": 128,
                        "anchor_sizes": [[16, 23], [32, 45], [64, 91]], "aspect_ratios": [_RCNN_ANCHOR_RATIOS] * 3,
                        "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 100},
    "fasterrcnn_mobilenet_v3_large_fpn": {"min_size": 800, "max_size": 1333, **_MOBILENET_FPN},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"min_size": 320, "max_size": 640, **_MOBILENET_FPN},
    "fasterrcnn_resnet50_fpn": {"min_size": 800, "max_size": 1333, "anchor_sizes": [[32], [64], [128], [256], [512]],
                                "aspect_ratios": [_RCNN_ANCHOR_RATIOS] * 5, "trainable_backbone_layers": 5,
                                **_FASTERRCNN_POST},
    "fasterrcnn_resnet50_fpn_v2": {  # 5 levels: strides 4, 8, 16, 32 and a max-pooled 64
        "min_size": 800, "max_size": 1333, "anchor_sizes": [[32], [64], [128], [256], [512]],
        "aspect_ratios": [_RCNN_ANCHOR_RATIOS] * 5, "trainable_backbone_layers": 5, **_FASTERRCNN_POST},
    "retinanet_resnet50_fpn_v2": {  # 5 levels P3-P7; 3 scales per octave, as torchvision's _default_anchorgen
        "min_size": 800, "max_size": 1333,
        "anchor_sizes": [[x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))] for x in (32, 64, 128, 256, 512)],
        "aspect_ratios": [_RCNN_ANCHOR_RATIOS] * 5, "trainable_backbone_layers": 5,
        "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 300},
    "retinanet_resnet50_fpn": {  # the v2's anchors, levels and post-processing (its FPN's P6 comes from C5)
        "min_size": 800, "max_size": 1333,
        "anchor_sizes": [[x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3))] for x in (32, 64, 128, 256, 512)],
        "aspect_ratios": [_RCNN_ANCHOR_RATIOS] * 5, "trainable_backbone_layers": 5,
        "score_thresh": 0.05, "nms_thresh": 0.5, "detections_per_img": 300},
    "fcos_resnet50_fpn": {"min_size": 800, "max_size": 1333, "trainable_backbone_layers": 5,
                          "score_thresh": 0.2, "nms_thresh": 0.6, "detections_per_img": 100},
    "ssdlite320_mobilenet_v3_large": {"score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 300},
    "ssd300_vgg16": {"score_thresh": 0.01, "nms_thresh": 0.45, "detections_per_img": 200},
}

# Why a model cannot take an option: the ConfigError says so.
_CANNOT = {
    ("fcos_resnet50_fpn", "anchor_sizes"): "FCOS is anchor-free (one point per location, fixed scale ranges)",
    ("fcos_resnet50_fpn", "aspect_ratios"): "FCOS is anchor-free (one point per location, fixed scale ranges)",
    ("ssdlite320_mobilenet_v3_large", "min_size"): "SSDlite resizes every image to a fixed 320x320",
    ("ssdlite320_mobilenet_v3_large", "max_size"): "SSDlite resizes every image to a fixed 320x320",
    ("ssdlite320_mobilenet_v3_large", "anchor_sizes"): "SSDlite's default boxes are fixed (DefaultBoxGenerator)",
    ("ssdlite320_mobilenet_v3_large", "aspect_ratios"): "SSDlite's default boxes are fixed (DefaultBoxGenerator)",
    ("ssdlite320_mobilenet_v3_large", "trainable_backbone_layers"):
        "its backbone is split into SSD's own blocks; freezing by stage is not offered",
    ("retinanet_small", "trainable_backbone_layers"): "it trains from scratch: there is no pretrained backbone",
    ("ssd300_vgg16", "min_size"): "SSD300 resizes every image to a fixed 300x300",
    ("ssd300_vgg16", "max_size"): "SSD300 resizes every image to a fixed 300x300",
    ("ssd300_vgg16", "anchor_sizes"): "SSD300's default boxes are fixed (DefaultBoxGenerator)",
    ("ssd300_vgg16", "aspect_ratios"): "SSD300's default boxes are fixed (DefaultBoxGenerator)",
    ("ssd300_vgg16", "trainable_backbone_layers"): "its VGG backbone is split into SSD's own blocks; freezing by "
                                                   "stage is not offered",
}

# what trainable_backbone_layers counts, and which classification files fit the body (load_detection_pretrained)
_BACKBONE_KIND = {
    "fasterrcnn_mobilenet_v3_large_fpn": "mobilenet", "fasterrcnn_mobilenet_v3_large_320_fpn": "mobilenet",
    "fasterrcnn_resnet50_fpn_v2": "resnet", "retinanet_resnet50_fpn_v2": "resnet", "fcos_resnet50_fpn": "resnet",
    "fasterrcnn_resnet50_fpn": "resnet", "retinanet_resnet50_fpn": "resnet",
}


def check_name(name: str) -> None:
    if name in NOT_BOX_DETECTORS:
        raise ConfigError(f"detection model {name} is not offered: {NOT_BOX_DETECTORS[name]}")
    if name not in DETECTION_MODELS:
        raise unknown_name("model.name (a detection model)", name, DETECTION_MODELS)


def _is_int(v) -> bool:
    return is_number(v) and isinstance(v, int)


def _per_level(value, levels: int, option: str, name: str) -> List[List[float]]:
    """A list per level from a list per level (numbers or lists of numbers) or, for aspect_ratios, one flat
    list meaning every level."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"detection option {option} must be a non-empty list, got {value!r}")
    if option == "aspect_ratios" and all(is_number(v, finite=True) for v in value):
        value = [list(value)] * levels
    if len(value) != levels:
        raise ConfigError(f"detection option {option} for model {name} needs {levels} entries, one per feature "
                          f"level, got {len(value)}: {value!r}")
    out = [list(v) if isinstance(v, (list, tuple)) else [v] for v in value]
    if not all(v and all(is_number(x, finite=True) and x > 0 for x in v) for v in out):
        raise ConfigError(f"detection option {option} must hold positive numbers, got {value!r}")
    return out


def model_kwargs(name: str, options: Optional[dict] = None) -> dict:
    """The resolved options of model `name`: every option it takes, the user's value where given (not None),
    else its default. JSON-serialisable (ints, floats, lists); store it in model.json next to the name and
    num_classes, and `build_detection_model(name, num_classes, that_dict)` rebuilds the same architecture.
    ConfigError for an unknown option, an option the model cannot take, or a bad value."""
    check_name(name)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - set(DETECTION_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown detection option(s) {unknown}; valid options: {', '.join(DETECTION_OPTIONS)}")
    defaults = _DEFAULTS[name]
    for option in options:
        if option not in defaults:
            why = _CANNOT.get((name, option), "not supported")
            raise ConfigError(f"detection model {name} cannot take option {option}: {why}")
    kw = {**defaults, **options}
    for key in ("min_size", "max_size", "detections_per_img"):
        if key in kw and not (_is_int(kw[key]) and kw[key] >= 1):
            raise ConfigError(f"detection option {key} must be an int >= 1, got {kw[key]!r}")
    for key in ("score_thresh", "nms_thresh"):
        if not (is_number(kw[key], finite=True) and 0 <= kw[key] <= 1):
            raise ConfigError(f"detection option {key} must be a number in [0, 1], got {kw[key]!r}")
    if "trainable_backbone_layers" in kw:
        top = defaults["trainable_backbone_layers"]
        if not (_is_int(kw["trainable_backbone_layers"]) and 0 <= kw["trainable_backbone_layers"] <= top):
            raise ConfigError(f"detection option trainable_backbone_layers for model {name} must be an int in "
                              f"0..{top} ({top}: nothing frozen), got {kw['trainable_backbone_layers']!r}")
    if "anchor_sizes" in kw:
        levels = len(defaults["anchor_sizes"])
        kw["anchor_sizes"] = _per_level(kw["anchor_sizes"], levels, "anchor_sizes", name)
        kw["aspect_ratios"] = _per_level(kw["aspect_ratios"], levels, "aspect_ratios", name)
        per_location = {len(s) * len(r) for s, r in zip(kw["anchor_sizes"], kw["aspect_ratios"])}
        if len(per_location) > 1:
            raise ConfigError(f"model {name} needs the same number of anchors (sizes x aspect ratios) at every "
                              f"feature level (its head is shared across levels); got {sorted(per_location)}")
    return kw


def loss_part_names(name: str) -> List[str]:
    """The keys of the loss dict model `name` returns in train mode, in its order (the total loss is their sum)."""
    check_name(name)
    if name.startswith("fasterrcnn"):
        return list(_RCNN_LOSSES)
    if name.startswith("fcos"):
        return _ONE_STAGE_LOSSES + ["bbox_ctrness"]
    if name.startswith("ssd"):
        return _ONE_STAGE_LOSSES[::-1]  # SSD returns them in this order
    return list(_ONE_STAGE_LOSSES)  # RetinaNet


# ---- building, freezing, local pretrained weights ----


def build_detection_model(name: str, num_classes: int, options: Optional[dict] = None,
                          pretrained_path: Optional[str] = None, log=print) -> nn.Module:
    """Model `name` for `num_classes` classes INCLUDING the background (K + 1), built without any download,
    with `options` (see the module docstring and `model_kwargs`); weights from a local `pretrained_path` where
    given, then trainable_backbone_layers applied."""
    kw = model_kwargs(name, options)
    if not _is_int(num_classes) or num_classes < 2:
        raise ConfigError(f"a detection model needs num_classes >= 2 (K object classes + background), "
                          f"got {num_classes}")
    model = DETECTION_MODELS[name](num_classes, kw)
    if pretrained_path:
        load_detection_pretrained(model, name, pretrained_path, log=log)
    if kw.get("trainable_backbone_layers", 0) < _DEFAULTS[name].get("trainable_backbone_layers", 0):
        freeze_backbone_stages(model, _BACKBONE_KIND[name], kw["trainable_backbone_layers"])
    return model


def load_detection_pretrained(model: nn.Module, name: str, path: str, log=print) -> None:
    """Weights from a local file, by name and shape (segment_models.load_pretrained: a tensor that fits nowhere
    keeps its fresh initialisation, and the message lists it).

    - A detector's checkpoint (torchvision's, or one of ours): tensors by their own names; a box predictor for
      another class count is re-initialised.
    - A classification model's file (torchvision's resnet50 or mobilenet_v3_large state dict) when none of its
      names is the detector's: loaded into the backbone's body (resnet: "layer1.0..." -> body "layer1.0...";
      mobilenet: "features.3..." -> body "3..."). FPN, RPN and heads stay fresh.
    SSDlite built without a backbone file uses MobileNetV3's reduced tail (torchvision's choice when training from
    scratch), so torchvision's own SSDlite checkpoint fills it only partly: the message names what did not fit."""
    own = model.state_dict()
    state = read_state_dict(path)
    if name not in _BACKBONE_KIND or any(k in own for k in state):
        load_pretrained(model, path, log=log)
        return
    holder = nn.Module()  # body's tensors under "backbone.", where load_pretrained looks for a backbone's names
    holder.backbone = model.backbone.body
    load_pretrained(holder, path, log=lambda msg: log(f"backbone weights: {msg}"))


def _frozen(module: nn.Module) -> nn.Module:
    """`module` with no trainable parameter and every BatchNorm2d replaced by a FrozenBatchNorm2d holding its
    statistics (in train mode a BatchNorm2d would keep updating them)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, key).copy_(getattr(module, key).detach())
        return frozen
    for child_name, child in module.named_children():
        setattr(module, child_name, _frozen(child))
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def freeze_backbone_stages(model: nn.Module, kind: str, trainable_layers: int) -> None:
    """Freeze all but the last `trainable_layers` stages of model.backbone.body, counted as torchvision's
    _resnet_fpn_extractor (layer4, layer3, layer2, layer1, conv1 + bn1) and _mobilenet_extractor (the strided
    blocks of mobilenet_v3_large.features: 6 stages) count them."""
    body = model.backbone.body
    children = list(body.named_children())
    if kind == "resnet":
        trained = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trained.append("bn1")
        frozen = [n for n, _ in children if n not in trained]
    else:
        stages = [0] + [i for i, (_, m) in enumerate(children) if getattr(m, "_is_cn", False)] + [len(children) - 1]
        freeze_before = len(children) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
        frozen = [n for n, _ in children[:freeze_before]]
    for child_name in frozen:
        setattr(body, child_name, _frozen(getattr(body, child_name)))
