"""Model builders: a plain dict from name to builder, and timm's models by their hub id (timm/<name>). Every
model returns raw logits (no sigmoid/softmax layer:
the loss applies its own, numerically stable, one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Protocol, runtime_checkable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import stochastic_depth

from trainer.errors import ConfigError
from trainer.files import load_safetensors


class TutorialNet(nn.Module):
    """The PyTorch CIFAR-10 tutorial network (two 5x5 convs, three linear layers), for any square input size."""

    def __init__(self, num_outputs: int, image_size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        )
        side = ((image_size - 4) // 2 - 4) // 2  # 32 -> 28 -> 14 -> 10 -> 5
        if side < 1:
            raise ConfigError(f"model tutorial_cnn needs data.image_size >= 16, got {image_size}")
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_outputs),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class SingleConvCNN(nn.Module):
    """`BinaryCNN` / `MultiClassCNN`: conv 3->16 (k3 s1 p1), ReLU, 2x2 max-pool, flatten, linear."""

    def __init__(self, num_outputs: int, image_size: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(16 * (image_size // 2) ** 2, num_outputs)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32/64/128 channels) and a global max-pool: small, fast on CPU, and
    position-invariant enough for the generated shapes."""

    def __init__(self, num_outputs: int, image_size: int = 32, width: int = 32):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(2)] if pool else [])

        self.features = nn.Sequential(*block(3, width, True), *block(width, 2 * width, True),
                                      *block(2 * width, 4 * width, False))
        self.head = nn.Linear(4 * width, num_outputs)

    def forward(self, x):
        return self.head(torch.amax(self.features(x), dim=(2, 3)))


class LinearModel(nn.Module):
    """A linear classifier on raw pixels: the baseline the generated dataset is meant to defeat."""

    def __init__(self, num_outputs: int, image_size: int = 32):
        super().__init__()
        self.fc = nn.Linear(3 * image_size * image_size, num_outputs)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


@runtime_checkable
class InitFromData(Protocol):
    """A model whose first weights are computed from training images before the first step (AirbenchNet's
    whitening filters): the session calls `init_from_data` with up to 5,000 normalised training images, unless
    the weights come from a file (they hold the computed filters already)."""

    def init_from_data(self, images: torch.Tensor) -> None: ...


class AirbenchNet(nn.Module):
    """A fast CIFAR net in the style of airbench94 (Keller Jordan, arXiv 2404.00498), written from the paper's
    description: ~2 M parameters, ~0.24 GFLOP per 32 px image.

    A frozen 2x2 patch-whitening conv (3 -> 24: the 12 eigenvectors of the training patches' covariance,
    scaled by 1/sqrt(eigenvalue), and their negatives; set by `init_from_data`), GELU, then three groups
    [conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU] of widths 64/256/256, a global max-pool and
    a bias-free linear head whose logits are scaled by 1/9. Convs are bias-free with a partial identity
    (dirac) init; BN scales are frozen at 1 (only the shifts train), eps 1e-12, momentum 0.4.
    The whitening conv runs in fp32 even under bf16 autocast: rounding its input to bf16, amplified by the
    whitening, costs ~10% relative error on the highest-frequency channels.
    """

    def __init__(self, num_outputs: int, image_size: int = 32, widths=(64, 256, 256)):
        super().__init__()
        if image_size < 16:
            raise ConfigError(f"model airbench needs data.image_size >= 16, got {image_size}")
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data, never trained
        nn.init.zeros_(self.whiten.bias)  # as airbench94 (nn.Conv2d's default is uniform +-1/sqrt(12) here)

        def bn(c):
            norm = nn.BatchNorm2d(c, eps=1e-12, momentum=0.4)
            norm.weight.requires_grad_(False)
            return norm

        def conv(cin, cout):
            layer = nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)
            nn.init.dirac_(layer.weight.data[:cin])  # the first cin filters start as the identity
            return layer

        groups, cin = [], 24
        for width in widths:
            groups += [conv(cin, width), nn.MaxPool2d(2), bn(width), nn.GELU(),
                       conv(width, width), bn(width), nn.GELU()]
            cin = width
        self.features = nn.Sequential(*groups)
        self.head = nn.Linear(cin, num_outputs, bias=False)
        self.logit_scale = 1 / 9

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Whitening filters from the 2x2 patches of normalised training images (N, 3, H, W)."""
        cov, count = torch.zeros(12, 12, dtype=torch.float64), 0
        for chunk in images.split(256):  # chunks: all patches of 5,000 images at once would be ~0.5 GB
            patches = torch.nn.functional.unfold(chunk.detach().cpu().double(), kernel_size=2)  # (n, 12, positions)
            patches = patches.transpose(1, 2).reshape(-1, 12)
            cov += patches.T @ patches
            count += patches.shape[0]
        cov /= count
        values, vectors = torch.linalg.eigh(cov)  # ascending
        filters = (vectors.T / torch.sqrt(values.clamp_min(0) + eps)[:, None]).flip(0).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))

    def forward(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self.whiten(x.float())
        x = self.features(nn.functional.gelu(x))
        return self.head(torch.amax(x, dim=(2, 3))) * self.logit_scale


TTA_MODES = ("none", "flip", "flip_translate")


def forward_tta(model: nn.Module, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits with test-time augmentation: flip = the mean of the logits of the image and its mirror;
    flip_translate (airbench94's tta_level 2, 6 forward passes) = half the flip logits of the image, plus half
    the mean of the flip logits of the image shifted by one pixel up-left and by one down-right (reflect
    padding, so the size stays)."""
    if tta == "none":
        return model(x)
    if tta == "flip":
        return (model(x).float() + model(torch.flip(x, dims=[3])).float()) / 2
    if tta == "flip_translate":
        h, w = x.shape[-2:]
        padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        return (forward_tta(model, x, "flip") + sum(forward_tta(model, s, "flip") for s in shifted) / 2) / 2
    raise ConfigError(f"unknown test-time augmentation '{tta}' ({', '.join(TTA_MODES)})")


def _stride_one(conv: nn.Conv2d) -> None:
    conv.stride = (1, 1)


def _resnet_stem(model) -> None:  # ResNet, ResNeXt, Wide ResNet: 7x7 stride-2 conv + max-pool -> one 3x3 stride-1 conv
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def _densenet_stem(model) -> None:  # the same change on DenseNet's conv0 / pool0
    model.features.conv0 = nn.Conv2d(3, model.features.conv0.out_channels, kernel_size=3, stride=1, padding=1,
                                     bias=False)
    model.features.pool0 = nn.Identity()


def _convnext_stem(model) -> None:  # 4x4 stride-4 patchify conv -> 3x3 stride-1
    old = model.features[0][0]
    model.features[0][0] = nn.Conv2d(3, old.out_channels, kernel_size=3, stride=1, padding=1)


def _shufflenet_stem(model) -> None:
    _stride_one(model.conv1[0])
    model.maxpool = nn.Identity()


# torchvision class name -> how its stem keeps full resolution for 32x32-class inputs (the usual CIFAR adaptation:
# the first stride-2 layers become stride 1). Parameter shapes change only where a 7x7 or 4x4 conv becomes 3x3
# (ResNet family, DenseNet, ConvNeXt). A class missing here (ViT, Swin, MaxViT, VGG, AlexNet, GoogLeNet, Inception
# v3, SqueezeNet) keeps its stem: `model.small_input_stem=true` is refused for it.
_SMALL_STEMS: Dict[str, Callable[[nn.Module], None]] = {
    "ResNet": _resnet_stem,
    "DenseNet": _densenet_stem,
    "ConvNeXt": _convnext_stem,
    "ShuffleNetV2": _shufflenet_stem,
    "MobileNetV2": lambda m: _stride_one(m.features[0][0]),
    "MobileNetV3": lambda m: _stride_one(m.features[0][0]),
    "EfficientNet": lambda m: _stride_one(m.features[0][0]),
    "MNASNet": lambda m: _stride_one(m.layers[0]),
    "RegNet": lambda m: _stride_one(m.stem[0]),
}


# ---- stochastic depth and head dropout ----

class _DropPathBasicBlock(BasicBlock):
    """torchvision's BasicBlock with its residual branch dropped per sample (`drop_path`, set on the instance).
    The block's class is swapped in place (`_add_resnet_drop_path`): parameter names, the state dict and
    pretrained weights are those of the plain block. Not a forward hook on bn2: SyncBatchNorm conversion
    replaces the BN modules and would silently drop such a hook."""

    drop_path = 0.0

    def forward(self, x):  # torchvision 0.29's BasicBlock.forward, with stochastic_depth on the branch
        out = self.relu(self.bn1(self.conv1(x)))
        out = stochastic_depth(self.bn2(self.conv2(out)), self.drop_path, "row", self.training)
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class _DropPathBottleneck(Bottleneck):
    """torchvision's Bottleneck with stochastic depth on its residual branch (see `_DropPathBasicBlock`)."""

    drop_path = 0.0

    def forward(self, x):  # torchvision 0.29's Bottleneck.forward, with stochastic_depth on the branch
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = stochastic_depth(self.bn3(self.conv3(out)), self.drop_path, "row", self.training)
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def _add_resnet_drop_path(model: nn.Module, drop_path: float) -> None:
    """Stochastic depth on every residual block, the drop probability rising linearly from 0 at the first
    block to `drop_path` at the last (timm's and torchvision's ConvNeXt schedule; Huang et al. 2016)."""
    blocks = [m for m in model.modules() if type(m) in (BasicBlock, Bottleneck)]
    for i, block in enumerate(blocks):
        block.__class__ = _DropPathBasicBlock if type(block) is BasicBlock else _DropPathBottleneck
        block.drop_path = drop_path * i / max(len(blocks) - 1, 1)


class _HeadDropout:
    """A forward pre-hook on the final Linear: dropout on its input in training mode. A hook rather than an
    nn.Dropout layer so that module names (state dict, pretrained weights, exports) stay the model's own."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, linear: nn.Module, args: tuple) -> tuple:
        return (nn.functional.dropout(args[0], self.p, training=linear.training), *args[1:])

    def __repr__(self) -> str:
        return f"_HeadDropout(p={self.p})"


def final_linear(model: nn.Module) -> nn.Linear:
    """The last nn.Linear in registration order: the classifier of every classification model here."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer")
    return linears[-1]


# torchvision's builders take these themselves (as stochastic_depth_prob / dropout); the ResNet family gets stochastic
# depth from `_add_resnet_drop_path`, the rest of the nets with a final nn.Linear get head dropout from `_HeadDropout`
_TAKES_STOCHASTIC_DEPTH = ("convnext", "efficientnet", "swin", "maxvit")
_TAKES_DROPOUT = ("mobilenet", "efficientnet", "mnasnet", "squeezenet", "vgg", "alexnet", "googlenet", "inception")
_RESNET_FAMILY = ("resnet", "resnext", "wide_resnet")


def _torchvision(name: str) -> Callable:
    def build(num_outputs: int, image_size: int = 32, small_input_stem: Optional[bool] = None,
              drop_path: Optional[float] = None, dropout: Optional[float] = None) -> nn.Module:
        import torchvision

        # None leaves torchvision's default: stochastic depth 0.1 (convnext_tiny) / 0.2 (efficientnet_b0),
        # dropout 0.2 (mobilenet_v3, efficientnet_b0), nothing for the ResNets
        kwargs = {}
        if drop_path is not None and name.startswith(_TAKES_STOCHASTIC_DEPTH):
            kwargs["stochastic_depth_prob"] = drop_path
        if dropout is not None and name.startswith(_TAKES_DROPOUT):
            kwargs["dropout"] = dropout
        if name.startswith("vit_"):  # the position embedding is sized for the input: any multiple of the patch
            kwargs["image_size"] = image_size
        if name == "maxvit_t":  # its attention grids are sized for the input (a multiple of 224 runs)
            kwargs["input_size"] = (image_size, image_size)
        if name in ("googlenet", "inception_v3"):  # one logits tensor in train mode too (no aux heads' tuple);
            kwargs.update(aux_logits=False, init_weights=True)  # init_weights: torchvision's own, without its warning
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_outputs, **kwargs)
        except (ValueError, AssertionError) as err:  # ViT: a multiple of its patch; MaxViT: of 224 (its 7x7 grids)
            raise ConfigError(f"data.image_size={image_size} does not fit model {name}: "
                              f"{str(err).splitlines()[0]}") from None
        stem = _SMALL_STEMS.get(type(model).__name__)
        if small_input_stem and stem is None:
            raise ConfigError(f"model.small_input_stem=true: model {name} has no small-image stem here; it works "
                              f"with the {', '.join(sorted(_SMALL_STEMS))} families")
        if stem is not None and (small_input_stem if small_input_stem is not None else image_size <= 64):
            stem(model)
        if drop_path and name.startswith(_RESNET_FAMILY):
            _add_resnet_drop_path(model, drop_path)
        if dropout and not name.startswith(_TAKES_DROPOUT):  # ResNet, ConvNeXt, ...: no dropout layer of their own
            final_linear(model).register_forward_pre_hook(_HeadDropout(dropout))
        return model

    return build


def _ours(cls) -> Callable:
    def build(num_outputs: int, image_size: int = 32, small_input_stem: Optional[bool] = None,
              drop_path: Optional[float] = None, dropout: Optional[float] = None) -> nn.Module:
        model = cls(num_outputs, image_size)  # drop_path: refused by build_model (no residual blocks)
        if dropout:  # before the last Linear, as for the ResNets (none of these nets has dropout of its own)
            final_linear(model).register_forward_pre_hook(_HeadDropout(dropout))
        return model

    return build


def _torchvision_classifiers() -> list:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # 80 in torchvision 0.29


OWN_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "tutorial_cnn": _ours(TutorialNet),
    "binary_cnn": _ours(SingleConvCNN),  # BinaryCNN: the same net with one output
    "multiclass_cnn": _ours(SingleConvCNN),  # MultiClassCNN
    "small_cnn": _ours(SmallCNN),
    "airbench": _ours(AirbenchNet),  # the CIFAR speed-recipe net (configs/airbench_cifar10.yaml)
    "linear": _ours(LinearModel),
}
# every classifier torchvision has, by its own name (resnet18, regnet_y_400mf, vit_b_16, ...)
MODELS: Dict[str, Callable[..., nn.Module]] = {
    **OWN_MODELS, **{name: _torchvision(name) for name in _torchvision_classifiers()}}
# model.drop_path: the nets with residual blocks that take stochastic depth (MobileNet, RegNet, DenseNet: none here)
DROP_PATH_MODELS = tuple(n for n in MODELS if n.startswith(_RESNET_FAMILY + _TAKES_STOCHASTIC_DEPTH))
# model.name=timm/<name>: one of timm's models by its Hugging Face hub id (timm/resnet50.a1_in1k; the tag after the
# dot names pretrained weights, unused here). The prefix is required: resnet50, efficientnet_b0, ... name different
# nets in torchvision and timm, and a model.json must rebuild the same one whatever either library adds later.
TIMM_PREFIX = "timm/"


def _timm(name: str) -> Callable:
    def build(num_outputs: int, image_size: int = 32, small_input_stem: Optional[bool] = None,
              drop_path: Optional[float] = None, dropout: Optional[float] = None,
              pretrained_state: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
        import timm

        if small_input_stem:
            raise ConfigError(f"model.small_input_stem=true: timm's models have no small-image stem here (model "
                              f"{TIMM_PREFIX}{name}); leave it null")
        # timm's own arguments; None leaves the model's default (timm drops None-valued ones)
        kwargs = dict(pretrained=False, num_classes=num_outputs, drop_path_rate=drop_path, drop_rate=dropout)
        if pretrained_state is not None:  # read without pickle by the caller, loaded by timm's own loader: its
            # checkpoint filter (a ViT's position embedding resampled to img_size) and its classifier handling
            # (dropped for another class count); source "" so that timm never looks at the hub itself
            overlay = dict(state_dict=pretrained_state, source="")
            cfg = timm.models.get_pretrained_cfg(name)
            heads = cfg.classifier if cfg is not None else None
            heads = [heads] if isinstance(heads, str) else list(heads or ())
            rows = [pretrained_state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in pretrained_state]
            if rows:  # the file's own class count, not the tag's: a head of this run's size is kept (an export)
                overlay["num_classes"] = rows[0]
            kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        try:  # transformers size their position embeddings for the input; the CNNs take no img_size
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:
            pass
        try:
            return timm.create_model(name, **kwargs)
        except TypeError as err:  # e.g. a net without stochastic depth given model.drop_path
            raise ConfigError(f"model {TIMM_PREFIX}{name} does not take these settings (model.drop_path / "
                              f"model.dropout): {str(err).splitlines()[0]}") from None
        except RuntimeError as err:  # timm's strict load: a file of another architecture
            raise ConfigError(f"the pretrained weights do not fit model {TIMM_PREFIX}{name}: "
                              f"{str(err).splitlines()[0]}") from None

    return build


def model_builder(name: str) -> Callable[..., nn.Module]:
    """model.name's builder: MODELS', or timm's for timm/<name> (refused with the closest names otherwise)."""
    import importlib.util

    if name.startswith(TIMM_PREFIX):
        if importlib.util.find_spec("timm") is None:  # a dependency, but a hand-made environment may lack it
            raise ConfigError(f"model.name={name} needs timm, which is not installed: pip install timm "
                              f"-c launch/constraints.txt")
        import timm

        if not timm.is_model(name[len(TIMM_PREFIX):]):
            raise unknown_name("model.name", name, [TIMM_PREFIX + n for n in timm.list_models()], list_all=False)
        return _timm(name[len(TIMM_PREFIX):])
    if name not in MODELS:
        if importlib.util.find_spec("timm") is not None:
            import timm

            if timm.is_model(name):
                raise ConfigError(f"unknown model.name '{name}': timm's is model.name={TIMM_PREFIX}{name}")
        raise unknown_name("model.name", name, MODELS)
    return MODELS[name]


def unknown_name(key: str, name: str, valid, list_all: bool = True) -> ConfigError:
    """The error for a model name that is not one of `valid`: the closest names first (difflib), then all (or,
    without `list_all`, for timm's ~1,400, where to find them)."""
    import difflib

    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    listed = f"valid names: {', '.join(sorted(valid))}" if list_all else "valid names: timm.list_models()"
    return ConfigError(f"unknown {key} '{name}'{hint} {listed}")


def build_model(name: str, num_outputs: int, image_size: int = 32, small_input_stem: Optional[bool] = None,
                pretrained_path: Optional[str] = None, log=print, drop_path: Optional[float] = None,
                dropout: Optional[float] = None) -> nn.Module:
    """`drop_path`: stochastic depth, the drop probability of the last residual block (0 = off); `dropout`:
    before the classifier head (0 = off). None = the model's own (torchvision's defaults, see `_torchvision`).
    Neither changes parameter names, and both act only in training mode: a model built without them loads
    the same weights and gives the same eval-mode outputs (exports are rebuilt that way)."""
    builder = model_builder(name)
    if drop_path and name not in DROP_PATH_MODELS and not name.startswith(TIMM_PREFIX):
        raise ConfigError(f"model.drop_path={drop_path}: model {name} has no stochastic depth; it works with the "
                          f"{', '.join(_RESNET_FAMILY + _TAKES_STOCHASTIC_DEPTH)} models")
    if pretrained_path and name.startswith(TIMM_PREFIX):  # timm loads it itself (see _timm)
        state = read_state_dict(pretrained_path)
        model = builder(num_outputs, image_size=image_size, small_input_stem=small_input_stem, drop_path=drop_path,
                        dropout=dropout, pretrained_state=state)
        own = model.state_dict()
        fresh = sorted(k for k in own if k not in state or state[k].shape != own[k].shape)
        log(f"loaded {len(own) - len(fresh)} pretrained tensors from {pretrained_path} (timm's loader); "
                f"re-initialised: {fresh or 'none'}")
        return model
    model = builder(num_outputs, image_size=image_size, small_input_stem=small_input_stem, drop_path=drop_path,
                    dropout=dropout)
    if pretrained_path:
        load_pretrained(model, pretrained_path, log)
    return model


def read_state_dict(path: str, what: str = "pretrained weights file") -> Dict[str, torch.Tensor]:
    """Names -> tensors from a .safetensors file, or from a torch.save file read with weights_only=True (no
    code runs). A .pth may hold the state dict itself or a checkpoint dict with it under "model" (torchvision's
    reference scripts) or "state_dict". `what` names the file in errors (the config key that gave it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} does not exist: {path}")
    if p.suffix == ".safetensors":
        state = load_safetensors(p, what)
    else:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"{what} {path} is not a plain state dict: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ConfigError(f"{what} {path} is not a state dict (names -> tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DDP's wrapper prefix


# ---- pretrained weights by name (model.weights), from torch.hub's local cache only ----

def torchvision_weights(name: str, weights: str):
    """The torchvision weights enum member that `model.weights` names for model `name`: DEFAULT, a tag of the
    model's own enum (IMAGENET1K_V2) or the full name (ResNet50_Weights.IMAGENET1K_V2). ConfigError otherwise,
    listing what the model has."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        raise ConfigError(f"model.weights={weights}: model {name} has no torchvision weights (use "
                          f"model.pretrained_path for a local file)") from None
    tag = weights.removeprefix(f"{enum.__name__}.")
    if "." in tag:  # another model's enum
        raise ConfigError(f"model.weights={weights} are not {name}'s weights; its weights: {enum.__name__}.*")
    if tag != "DEFAULT" and tag not in enum.__members__:
        raise ConfigError(f"model.weights={weights}: {name} has {', '.join(['DEFAULT', *enum.__members__])}")
    return enum[tag]


def weights_file(name: str, weights: str, download: bool = False, log=print) -> str:
    """The local file of torchvision weights `weights` for model `name`: torch.hub's cache (TORCH_HOME, else
    ~/.cache/torch, then hub/checkpoints/), under the last part of the weights' url, as torchvision's own
    builders look for it. Never downloads unless `download` (model.weights_download=true): a missing file is one
    line naming the file, the folder and the command that fetches it on a machine with network."""
    import torch.hub

    entry = torchvision_weights(name, weights)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / entry.url.rsplit("/", 1)[-1]
    if not path.is_file() and download:
        log(f"downloading {entry.url} to {folder} (model.weights_download=true)")
        torch.hub.load_state_dict_from_url(entry.url, progress=False, check_hash=True, weights_only=True)
    if not path.is_file():
        fetch = f"python -c \"import torch.hub; torch.hub.load_state_dict_from_url('{entry.url}')\""
        raise ConfigError(f"model.weights={weights}: {path.name} is not in {folder} (nothing is downloaded unless "
                          f"model.weights_download=true); on a machine with network run {fetch} and copy "
                          f"~/.cache/torch/hub/checkpoints/{path.name} into {folder} (or set TORCH_HOME)")
    return str(path)


# ---- timm's pretrained tags (model.weights with model.name=timm/...), from the Hugging Face cache only ----

def timm_pretrained_cfg(name: str, weights: str):
    """timm's pretrained config of the weights `weights` names for model.name `name` (timm/<arch>[.<tag>]):
    DEFAULT = the tag in the name, else timm's default tag of the architecture; any other value is a tag
    (a1_in1k), which must agree with the name's. ConfigError listing the architecture's tags otherwise."""
    import timm

    arch, _, named_tag = name[len(TIMM_PREFIX):].partition(".")
    tag = named_tag if weights == "DEFAULT" else weights
    if named_tag and tag != named_tag:
        raise ConfigError(f"model.weights={weights}: model.name={name} already names the tag {named_tag}; use "
                          f"model.weights=DEFAULT (or model.name={TIMM_PREFIX}{arch})")
    try:
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:  # timm's "Invalid pretrained tag"
        cfg = None
    if cfg is None or not cfg.hf_hub_id:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        raise ConfigError(f"model.weights={weights}: timm has no such weights on the Hugging Face hub for {arch}; "
                          f"its tags: {', '.join(['DEFAULT', *tags]) if tags else 'none'}")
    return cfg


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub, else
    XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub. Read from the environment now, not from
    huggingface_hub.constants (fixed when it was first imported)."""
    import os

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _hf_offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


TIMM_WEIGHTS_FILE = "model.safetensors"  # every timm/ repository on the hub has it; no pickle to run


def timm_weights_file(name: str, weights: str, download: bool = False, log=print) -> str:
    """The cached model.safetensors of timm weights `weights` for model.name `name`, in the hub cache's layout
    (<cache>/models--timm--<arch>.<tag>/snapshots/<revision>/model.safetensors, the revision refs/main names).
    Never downloads unless `download` (model.weights_download=true) and HF_HUB_OFFLINE is unset: a missing file
    is one line naming the file, the folder and the command that fetches it on a machine with network."""
    repo = timm_pretrained_cfg(name, weights).hf_hub_id
    cache = hf_hub_cache()
    folder = cache / f"models--{repo.replace('/', '--')}"
    path = _cached_hub_file(cache, folder, repo)
    if path is None and download and not _hf_offline():
        from huggingface_hub import hf_hub_download

        log(f"downloading {TIMM_WEIGHTS_FILE} of {repo} into {cache} (model.weights_download=true)")
        hf_hub_download(repo, TIMM_WEIGHTS_FILE, cache_dir=cache)
        path = _cached_hub_file(cache, folder, repo)
    if path is None:
        why = "HF_HUB_OFFLINE is set" if download and _hf_offline() else (
            "nothing is downloaded unless model.weights_download=true")
        fetch = (f"python -c \"from huggingface_hub import hf_hub_download; hf_hub_download('{repo}', "
                 f"'{TIMM_WEIGHTS_FILE}')\"")
        raise ConfigError(f"model.weights={weights}: {TIMM_WEIGHTS_FILE} of {repo} is not in {folder}/snapshots/ "
                          f"({why}); on a machine with network run hf download {repo} {TIMM_WEIGHTS_FILE} (or "
                          f"{fetch}) and copy ~/.cache/huggingface/hub/{folder.name} into {cache} (or set "
                          f"HF_HUB_CACHE or HF_HOME)")
    return path


def _cached_hub_file(cache: Path, folder: Path, repo: str) -> Optional[str]:
    """The cached file through huggingface_hub's own lookup (refs/main -> snapshot), else the one snapshot
    holding it when refs/ was not copied along; None when absent."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, TIMM_WEIGHTS_FILE, cache_dir=cache)
    if isinstance(found, str) and Path(found).is_file():
        return found
    snapshots = sorted((folder / "snapshots").glob(f"*/{TIMM_WEIGHTS_FILE}"))
    return str(snapshots[0]) if len(snapshots) == 1 else None


def pretrained_source(model_cfg, log=print) -> Optional[str]:
    """The file a run's model starts from: model.pretrained_path, or the local file of model.weights."""
    if model_cfg.weights and model_cfg.name.startswith(TIMM_PREFIX):
        model_builder(model_cfg.name)  # a timm name that exists (and timm installed), before its weights
        return timm_weights_file(model_cfg.name, model_cfg.weights, model_cfg.weights_download, log)
    if model_cfg.weights:
        return weights_file(model_cfg.name, model_cfg.weights, model_cfg.weights_download, log)
    return model_cfg.pretrained_path


def weights_preprocessing(model_cfg) -> Optional[dict]:
    """How model.weights' own training read images: mean, std and, where the weights define them (classifiers),
    crop_mode, crop_pct and interpolation (the keys of data.* and of trainer.data.datasets.Fit) and the input
    side they were evaluated at (image_size: reported, never imposed: data.image_size is the user's); None without
    weights. torchvision: its weights.transforms() (ImageClassification: resize_size, crop_size,
    interpolation); timm: the tag's pretrained_cfg (what timm.data.resolve_data_config reads). The defaults of
    those data keys: pretrained features expect them."""
    if not model_cfg.weights:
        return None
    if model_cfg.name.startswith(TIMM_PREFIX):
        cfg = timm_pretrained_cfg(model_cfg.name, model_cfg.weights)
        found = {"mean": list(cfg.mean), "std": list(cfg.std), "image_size": cfg.input_size[-1]}
        if cfg.crop_pct is not None:  # timm's "border" mode (pad, keep all) is not offered: its centre crop instead
            found.update(crop_mode="squash" if cfg.crop_mode == "squash" else "center", crop_pct=float(cfg.crop_pct))
        if cfg.interpolation in ("bilinear", "bicubic", "nearest"):
            found["interpolation"] = cfg.interpolation
        return found
    transforms = torchvision_weights(model_cfg.name, model_cfg.weights).transforms()
    found = {}
    mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    if mean is not None and std is not None:
        found.update(mean=list(mean), std=list(std))
    crop, resize = getattr(transforms, "crop_size", None), getattr(transforms, "resize_size", None)
    if crop and resize:  # ImageClassification: the shorter side to resize_size, then the centre crop_size
        found.update(crop_mode="center", crop_pct=crop[0] / resize[0],
                     interpolation=transforms.interpolation.value, image_size=crop[0])
    return found or None


def load_pretrained(model: nn.Module, path: str, log=print, what: str = "model.pretrained_path") -> None:
    """Load a local state dict without running code: .safetensors, or a .pth read with weights_only=True.

    Tensors whose shape differs (the classifier head for another class count, a changed stem) are left
    at their fresh initialisation and listed; any other missing or unexpected key is an error.
    """
    state = read_state_dict(path, what)
    own = model.state_dict()
    kept = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    reinit = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ConfigError(f"{what} {path} does not fit model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    model.load_state_dict({**own, **kept})
    log(f"loaded {len(kept)} pretrained tensors from {path}; re-initialised (shape differs): {reinit or 'none'}")


@torch.no_grad()
def check_input_size(model: nn.Module, name: str, image_size: int) -> None:
    """Fail at start-up, naming the smallest size that works, when `image_size` is too small for the
    network (strided stems and pooling shrink the map to nothing: a RuntimeError deep inside the first
    forward otherwise). One image through the fresh model in eval mode: milliseconds for CIFAR-size nets,
    ~0.2 s for ResNet-50 at 224 px on this CPU."""
    def runs(size: int) -> bool:
        try:
            model(torch.zeros(1, 3, size, size))
            return True
        except RuntimeError:
            return False

    was_training = model.training
    model.eval()
    try:
        if runs(image_size):
            return
        sizes = (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
        works = next((s for s in sizes if s > image_size and runs(s)), None)
    finally:
        model.train(was_training)
    need = f"at least {works}" if works else "a larger size"
    raise ConfigError(f"data.image_size={image_size} is too small for model {name}: it needs {need} "
                      f"(its downsampling leaves nothing to classify)")
