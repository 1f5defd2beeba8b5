"""Semantic-segmentation models: a plain dict from name to builder, plus local pretrained weights.

Every model takes a float [B, 3, H, W] batch and returns a plain dict of raw logits (no softmax: the loss
applies its own): "out" [B, C, H, W] at the input's H, W, and "aux" of the same shape where the model has an
auxiliary head (FCN, DeepLabV3) and aux_loss is on. Targets are int64 [B, H, W] class indices with 255 for
ignored pixels (torchvision's references/segmentation convention); that is the loss's business, not the model's.

Nothing here ever downloads: torchvision's segmentation builders default `weights_backbone` to ImageNet
weights, so every build passes weights=None, weights_backbone=None explicitly; pretrained weights come only
from a local file (`pretrained_path`).

Input sizes (probed on torch 2.14 / torchvision 0.29, forward in train mode): every model runs from a 1 px
side up at a per-process batch >= 2, and at any batch in eval mode. The one limit is BatchNorm in train mode,
which needs more than one value per channel: at a per-process batch of 1 the smallest map in the network must
keep >= 2 pixels, so see `min_input_size(name, per_process_batch)`; DeepLabV3's image-pooling branch
BatchNorms a 1x1 map, so it cannot train at a per-process batch of 1 at any size (a ragged last batch of one
image crashes it: drop the last incomplete training batch).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.errors import ConfigError
from trainer.models import read_state_dict, unknown_name

# ---- our U-Net ----


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    """[conv3x3 (no bias: BN follows) -> BN -> ReLU] x 2, the U-Net block (Ronneberger et al. 2015, with the
    BN that later implementations added)."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """A small U-Net that trains from scratch on a CPU: 4 downsamplings (total stride 16), widths
    base x (1, 2, 4, 8, 8), bilinear upsampling then concatenation with the skip and a double conv.

    The bottleneck keeps 8 x base channels instead of doubling to 16 x base (the bilinear variant of
    milesial/Pytorch-UNet): it roughly halves the parameters and the deepest layers' cost, and bilinear
    upsampling has no weights. base=16: 0.84 M parameters (3 classes); a train step (forward, backward, SGD)
    at batch 16, 64x64 takes 0.18 s on one thread of this 2-core CPU (base 24: 0.38 s, base 32: 0.51 s).

    Any input size works: the input is zero-padded at the bottom and right up to a multiple of 16 and the
    logits are cropped back. Zeros, because that is what every conv's own padding already shows the network
    beyond the image's edge (and, unlike reflect padding, it works when the pad is wider than the image).
    """

    stride = 16  # 2 ** number of 2x2 max-pools

    def __init__(self, num_classes: int, base: int = 16):
        super().__init__()
        widths = [base, 2 * base, 4 * base, 8 * base, 8 * base]  # per level, full resolution first
        self.stem = _double_conv(3, widths[0])
        self.down = nn.ModuleList(_double_conv(widths[i], widths[i + 1]) for i in range(4))
        # up[i]: the upsampled deeper map concatenated with the skip of level 3 - i, both widths[3 - i] wide
        # (the bottleneck is as wide as level 3, and each up block narrows to the next skip's width)
        self.up = nn.ModuleList(_double_conv(2 * widths[3 - i], widths[max(2 - i, 0)]) for i in range(4))
        self.head = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        pad_h, pad_w = -h % self.stride, -w % self.stride
        x = F.pad(x, (0, pad_w, 0, pad_h))  # (left, right, top, bottom)
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for block in self.up:
            skip = skips.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return {"out": self.head(y)[..., :h, :w]}


# ---- a U-Net decoder on a timm feature backbone (model.name=timm/<arch>) ----

TIMM_PREFIX = "timm/"  # as classification's model.name (trainer.models.TIMM_PREFIX)


class TimmUNet(nn.Module):
    """The U-Net's decoder on the feature maps of a timm model (`timm.create_model(arch, features_only=True)`,
    every level it offers, e.g. resnet18: strides 2..32, 64..512 channels): from the deepest map up, each step
    upsamples bilinearly to the next shallower map, concatenates it and applies the U-Net's double conv down to
    that map's width; then a 1x1 conv to the classes and a bilinear upsampling to the input size.

    The backbone is `self.backbone`, holding the classification model's own module names: a timm classifier's
    weights (a model.weights tag from the Hugging Face cache, or a model.pretrained_path file) fill it by name
    ("conv1.weight" -> "backbone.conv1.weight", `load_pretrained`), its head left out. The input is zero-padded
    at the bottom and right to a multiple of the deepest stride and the logits cropped back, as `UNet`."""

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        import timm

        self.backbone = timm.create_model(arch, features_only=True, pretrained=False)
        widths, strides = self.backbone.feature_info.channels(), self.backbone.feature_info.reduction()
        self.stride = max(strides)
        # up[i] merges the map of level n-1-i with the decoder's deeper output (the deepest map's width first)
        deeper = widths[-1]
        blocks = []
        for width in reversed(widths[:-1]):
            blocks.append(_double_conv(deeper + width, width))
            deeper = width
        self.up = nn.ModuleList(blocks)
        self.head = nn.Conv2d(deeper, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % self.stride, 0, -h % self.stride))
        maps = self.backbone(x)
        y = maps.pop()
        for block in self.up:
            skip = maps.pop()
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        y = F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": y[..., :h, :w]}


def _timm_unet(name: str) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, aux_loss: bool) -> nn.Module:
        return TimmUNet(name[len(TIMM_PREFIX):], num_classes)  # no aux head: aux_loss has nothing to switch

    return build


def _is_timm_backbone(name: str) -> bool:
    """model.name=timm/<arch>[.<tag>] of a timm model that offers feature maps (features_only)."""
    if not name.startswith(TIMM_PREFIX):
        return False
    import importlib.util

    if importlib.util.find_spec("timm") is None:
        raise ConfigError(f"model.name={name} needs timm, which is not installed: pip install timm "
                          f"-c launch/constraints.txt")
    import timm

    arch = name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        raise unknown_name("model.name (a timm backbone)", name, [TIMM_PREFIX + n for n in timm.list_models()],
                           list_all=False)
    return True


# ---- torchvision models ----


def _plain_dict(module: nn.Module, args, output) -> Dict[str, torch.Tensor]:
    """A forward hook: torchvision returns an OrderedDict; we hand on a plain dict with the same keys.
    A hook rather than a wrapper module, so the state-dict keys stay torchvision's own ("backbone.…",
    "classifier.…"): checkpoints of torchvision's reference scripts and backbone files load by name."""
    return dict(output)


def _torchvision(name: str, has_aux: bool) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, aux_loss: bool) -> nn.Module:
        from torchvision.models import segmentation

        kwargs = {"aux_loss": aux_loss} if has_aux else {}  # lraspp has no aux head and takes no aux_loss
        # weights_backbone defaults to ImageNet weights in every segmentation builder: a download without these
        model = getattr(segmentation, name)(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        model.register_forward_hook(_plain_dict)
        return model

    return build


def _ours(cls) -> Callable[[int, bool], nn.Module]:
    def build(num_classes: int, aux_loss: bool) -> nn.Module:
        return cls(num_classes)  # no aux head: aux_loss has nothing to switch

    return build


# name -> builder(num_classes, aux_loss)
SEGMENTATION_MODELS: Dict[str, Callable[[int, bool], nn.Module]] = {
    "unet": _ours(UNet),  # 0.84 M params; the CPU/CI model
    "fcn_resnet50": _torchvision("fcn_resnet50", has_aux=True),  # 35.3 M
    "fcn_resnet101": _torchvision("fcn_resnet101", has_aux=True),  # 54.3 M
    "deeplabv3_resnet50": _torchvision("deeplabv3_resnet50", has_aux=True),  # 42.0 M
    "deeplabv3_resnet101": _torchvision("deeplabv3_resnet101", has_aux=True),  # 61.0 M
    "deeplabv3_mobilenet_v3_large": _torchvision("deeplabv3_mobilenet_v3_large", has_aux=True),  # 11.0 M
    "lraspp_mobilenet_v3_large": _torchvision("lraspp_mobilenet_v3_large", has_aux=False),  # 3.2 M
}

# The smallest square side whose train-mode forward runs at a per-process batch of 1 (None: no size does).
# Probed on torch 2.14 / torchvision 0.29: side 1..64 at batch 1, train mode; above the minimum every size runs.
# At batch >= 2 (or in eval mode) every model runs from 1 px. Why these numbers: the deepest BatchNorm sees a
# map of ceil(side / stride) pixels a side and needs >= 2 values per channel.
_MIN_SIDE_AT_BATCH_1: Dict[str, Optional[int]] = {
    "unet": 17,  # padded to 32: a 2x2 bottleneck (16 pads to 16: a 1x1 one)
    "fcn_resnet50": 9,  # output stride 8 (dilated layer3/4)
    "fcn_resnet101": 9,  # the same output stride
    "deeplabv3_resnet50": None,  # ASPP's image-pooling branch: BatchNorm on a 1x1 map, whatever the size
    "deeplabv3_resnet101": None,
    "deeplabv3_mobilenet_v3_large": None,  # the same ASPP
    "lraspp_mobilenet_v3_large": 17,  # output stride 16
}


def min_input_size(name: str, per_process_batch: int = 2) -> int:
    """The smallest square side a train step of model `name` runs at with this many images per process.
    ConfigError for an unknown name or for a combination no size allows (DeepLabV3 at a batch of 1). A timm
    backbone (not probed: any of timm's) is padded to its deepest stride, whose map must keep 2 pixels."""
    _check_name(name)
    if per_process_batch >= 2:
        return 1
    if _is_timm_backbone(name):
        return TimmUNet(name[len(TIMM_PREFIX):], 1).stride + 1
    side = _MIN_SIDE_AT_BATCH_1[name]
    if side is None:
        raise ConfigError(f"model {name} cannot train with 1 image per process (its ASPP pooling branch "
                          f"BatchNorms a 1x1 map); use a per-process batch >= 2 and drop the last incomplete batch")
    return side


def _check_name(name: str) -> None:
    if name not in SEGMENTATION_MODELS and not _is_timm_backbone(name):
        raise unknown_name("segmentation model", name, SEGMENTATION_MODELS)


def build_segmentation_model(name: str, num_classes: int, pretrained_path: Optional[str] = None,
                             aux_loss: bool = True, log=print) -> nn.Module:
    """Model `name` with `num_classes` output channels (background counts as a class), built without any
    download; weights from a local `pretrained_path` where given (see `load_pretrained`)."""
    _check_name(name)
    if num_classes < 1:
        raise ConfigError(f"a segmentation model needs num_classes >= 1, got {num_classes}")
    model = (_timm_unet(name) if name.startswith(TIMM_PREFIX) else SEGMENTATION_MODELS[name])(num_classes, aux_loss)
    if pretrained_path:
        load_pretrained(model, pretrained_path, log=log)
    return model


# ---- local pretrained weights ----


def _candidate_names(key: str) -> List[str]:
    """The model names a file's tensor may fill: the name itself (a full model), or the name under
    "backbone." (a backbone saved alone, or a classification model's weights: torchvision's segmentation
    models wrap a ResNet as is and a MobileNetV3's `.features`, so "layer1.0…" -> "backbone.layer1.0…" and
    "features.3…" -> "backbone.3…")."""
    names = [key, f"backbone.{key}"]
    if key.startswith("features."):
        names.append(f"backbone.{key.removeprefix('features.')}")
    return names


def _modules(keys) -> List[str]:
    """Tensor names shortened to their modules ("classifier.4.weight", "classifier.4.bias" -> "classifier.4"),
    or to their top-level modules ("classifier.*") when that would list more than 8: one readable line."""
    modules = sorted({k.rsplit(".", 1)[0] for k in keys})
    return modules if len(modules) <= 8 else sorted({m.split(".", 1)[0] + ".*" for m in modules})


def load_pretrained(model: nn.Module, path: str, log=print) -> None:
    """Fill every tensor of `model` that the file has under the same name (see `_candidate_names`) and shape;
    the rest (a classifier head for another class count, the heads when only a backbone is given) keeps its
    fresh initialisation. Reports the counts and the re-initialised modules; a file that fills nothing is a
    ConfigError naming it."""
    state = read_state_dict(path)
    own = model.state_dict()
    loaded: Dict[str, torch.Tensor] = {}
    wrong_shape, unused = [], []
    for key, tensor in state.items():
        target = next((n for n in _candidate_names(key) if n in own), None)
        if target is None:
            unused.append(key)
        elif own[target].shape != tensor.shape:
            wrong_shape.append(target)
        else:
            loaded[target] = tensor
    if not loaded:
        raise ConfigError(f"pretrained weights file {path} matches no tensor of the model by name and shape "
                          f"(its {len(state)} tensors start {sorted(state)[:3]}; the model's start {list(own)[:3]})")
    model.load_state_dict({**own, **loaded})  # strict: every key of the model is given
    reinit = [k for k in own if k not in loaded]
    log(f"loaded {len(loaded)} of {len(own)} tensors from {path}; "
            f"re-initialised {len(reinit)} (shape differs: {_modules(wrong_shape) or 'none'}; "
            f"not in the file: {_modules(k for k in reinit if k not in wrong_shape) or 'none'})"
            + (f"; {len(unused)} tensors of the file fit no name: {_modules(unused)}" if unused else ""))
