"""Fine-tuning a classification model: its split into backbone and head, a depth per parameter for layer-wise
lr decay (`trainer.optim.param_groups`), freezing the backbone for the first epochs (`BackboneFreeze`), and
named parameters that stop training after some epochs (`FreezeAfter`).

Depths count from the stem (0), one level per stage or feature block, to the head (the deepest level):
resnet conv1/bn1 = 0, layer1..layer4 = 1..4, fc = 5; mobilenet_v3 / efficientnet / convnext features[i] = i
(convnext's stem, stages and downsample layers alike), classifier = len(features); our own nets: their
top-level children in order, then their last Linear (the head). The head is resnet `fc`, the `classifier` of
mobilenet/efficientnet/convnext (convnext's: LayerNorm2d + Linear), and our nets' last Linear.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainer.errors import ConfigError
from trainer.models import MODELS, OWN_MODELS, TIMM_PREFIX, final_linear


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def model_levels(model: nn.Module, model_name: str, key: str) -> List[List[str]]:
    """Module names level by level, from the stem to the head (the last level). A name in a later level wins
    over one in an earlier (our nets' head lies inside their last child). `key`: the config key that asked,
    for the error on a model without a split (segmentation, detection)."""
    if model_name.startswith(("resnet", "resnext", "wide_resnet")):
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"], ["fc"]]
    if model_name.startswith(("mobilenet_v3", "efficientnet", "convnext")):
        return [[f"features.{i}"] for i in range(len(model.features))] + [["classifier"]]
    timm_head = model.pretrained_cfg.get("classifier") if model_name.startswith(TIMM_PREFIX) else None
    if timm_head or (model_name in MODELS and any(isinstance(m, nn.Linear) for m in model.modules())):
        # our own nets, the other torchvision classifiers and timm's (whose config names the head: fc, head.fc,
        # classifier): top-level children that hold more than the head, then the head (SqueezeNet has no nn.Linear
        # head: its classifier is a 1x1 conv)
        head = timm_head or next(name for name, m in model.named_modules() if m is final_linear(model))
        body = [name for name, child in model.named_children()
                if any(not _under(f"{name}.{p}", head) for p, _ in child.named_parameters())]
        own = [name for name, _ in model.named_parameters(recurse=False)]  # ViT's class_token: with the stem
        return [own + body[:1]] + [[name] for name in body[1:]] + [[head]]
    raise ConfigError(f"{key}: model {model_name} has no backbone/head split; it works with the classification "
                      f"models with a linear head ({', '.join(sorted(OWN_MODELS))}, torchvision's classifiers but "
                      f"SqueezeNet, timm's)")


def _level_of(name: str, levels: List[List[str]]) -> int:
    for depth in range(len(levels) - 1, -1, -1):  # the deepest match: the head before the child holding it
        if any(_under(name, prefix) for prefix in levels[depth]):
            return depth
    raise ValueError(f"parameter {name} is in no level of the split (a changed torchvision model?)")


def parameter_depths(model: nn.Module, model_name: str, key: str) -> Dict[str, int]:
    """Every parameter's name -> its depth; the head's parameters, and only they, have the largest."""
    levels = model_levels(model, model_name, key)
    return {name: _level_of(name, levels) for name, _ in model.named_parameters()}


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel and torch.compile wrappers (accelerate's unwrap_model, locally)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


class BackboneFreeze:
    """Trains only the head: the backbone's weights and BatchNorm statistics stay as they are.

    `before_forward` before every training batch (evaluation puts the model back in train mode), `before_step`
    after backward and before gradient clipping and the optimizer step, while the freeze lasts; `release` once
    at its end. The gradients are dropped rather than requires_grad turned off: DDP registers its gradient
    hooks once, at wrap time. A parameter whose .grad is None is skipped entirely by SGD and AdamW: no
    update, no momentum or Adam state, no weight decay. The backbone's gradients are still computed (and
    all-reduced): freezing saves no backward time. Build it after anything that replaces modules
    (SyncBatchNorm conversion): it holds the BatchNorm modules it found.

    As an extension of the step loop (trainer/extensions.py, model.freeze_backbone_epochs): it holds for the
    first `until_epoch` epochs (a resume past them releases it at once) and does nothing after.
    """

    def __init__(self, model: nn.Module, model_name: str, until_epoch: Optional[int] = None):
        self.until_epoch, self.active = until_epoch, True
        self.model = _unwrap(model)
        head = model_levels(self.model, model_name, "model.freeze_backbone_epochs")[-1]

        def in_head(name: str) -> bool:
            return any(_under(name, prefix) for prefix in head)

        self.norms = [m for name, m in self.model.named_modules() if isinstance(m, _BatchNorm) and not in_head(name)]
        self.params = [p for name, p in self.model.named_parameters() if not in_head(name)]

    def _check(self, model: nn.Module) -> None:
        if _unwrap(model) is not self.model:
            raise ValueError("BackboneFreeze was built for another model")

    def start_epoch(self, model: nn.Module, epoch: int) -> None:
        if self.active and self.until_epoch is not None and epoch >= self.until_epoch:  # over (or resumed past)
            self.release(model)

    def before_forward(self, model: nn.Module) -> None:
        """The backbone's BatchNorm layers in eval mode: they normalise with, and no longer update, their
        running statistics."""
        self._check(model)
        if not self.active:
            return
        for norm in self.norms:
            norm.eval()

    def before_step(self, model: nn.Module, epoch: Optional[int] = None) -> None:
        """Drops the backbone's gradients, so the optimizer skips its parameters and gradient clipping sees
        only the head's."""
        self._check(model)
        if not self.active:
            return
        for p in self.params:
            p.grad = None

    def release(self, model: nn.Module) -> None:
        """The end of the freeze: the backbone's BatchNorm layers back in train mode if the model is training
        (a later .train() would do it too)."""
        self._check(model)
        self.active = False
        for norm in self.norms:
            norm.train(self.model.training)


class FreezeAfter:
    """Parameters that stop training after a number of epochs (`optim.freeze_after_epochs`: name prefix ->
    epochs; airbench94 trains its whitening bias for 3). Like BackboneFreeze, their gradients are dropped
    before the optimizer step (no update, momentum or weight decay; DDP still reduces them); the epoch alone
    decides, so a resumed run freezes them at the same update. A prefix that names no parameter is an error."""

    def __init__(self, model: nn.Module, after: Dict[str, int]):
        self.model = _unwrap(model)
        names = [name for name, _ in self.model.named_parameters()]
        self.params: Dict[int, List[nn.Parameter]] = {}  # epochs -> the parameters frozen from then on
        for prefix, epochs in after.items():
            chosen = [p for name, p in self.model.named_parameters() if _under(name, prefix)]
            if not chosen:
                raise ConfigError(f"optim.freeze_after_epochs: no parameter is named {prefix!r} or starts with "
                                  f"{prefix + '.'!r} (some are: {', '.join(names[:6])})")
            self.params.setdefault(int(epochs), []).extend(chosen)

    def before_step(self, model: nn.Module, epoch: int) -> None:
        """Drops the gradients of the parameters whose training ended before `epoch` (0-based)."""
        if _unwrap(model) is not self.model:
            raise ValueError("FreezeAfter was built for another model")
        for epochs, params in self.params.items():
            if epoch >= epochs:
                for p in params:
                    p.grad = None
