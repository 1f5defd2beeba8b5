"""Segmentation models, metrics and losses (trainer/tasks/segment_models.py, segment_metrics.py): CPU, no network."""
import json
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from trainer.errors import ConfigError, TrainerError
from trainer.tasks.segment_metrics import (confusion_matrix, cross_entropy_loss, dice_loss, metrics_from_confusion,
                                           pixel_class_weights)
from trainer.tasks.segment_models import SEGMENTATION_MODELS, build_segmentation_model, min_input_size

IGNORE = 255
WITH_AUX = {"fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A TORCH_HOME that does not exist and every download path refusing: a build that tried to fetch
    weights fails loudly, and one that wrote a cache would create the folder."""
    home = tmp_path / "bogus-torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    yield home
    assert not home.exists(), "something was written to TORCH_HOME"


def _targets(shape, num_classes, seed=0, ignored=0.2):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    target[torch.rand(shape, generator=g) < ignored] = IGNORE
    return target


def _state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


# ---- models ----


@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_every_model_forward_backward(name, offline):
    torch.manual_seed(0)
    model = build_segmentation_model(name, 3)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert type(out) is dict and set(out) == ({"out", "aux"} if name in WITH_AUX else {"out"})
    assert all(v.shape == (2, 3, 64, 64) for v in out.values())
    target = _targets((2, 64, 64), 3)
    loss = sum(cross_entropy_loss(v, target, IGNORE) for v in out.values()) + dice_loss(out["out"], target, IGNORE)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing and torch.isfinite(loss)


def test_aux_head_off(offline):
    model = build_segmentation_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=False)
    assert set(model(torch.randn(2, 3, 32, 32))) == {"out"}


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (17, 100), (64, 64)])
def test_unet_any_input_size(size):
    model = build_segmentation_model("unet", 3)
    for mode in (True, False):
        model.train(mode)
        assert model(torch.randn(2, 3, *size))["out"].shape == (2, 3, *size)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_segmentation_model("unet3", 3)
    assert "unet3" in str(err.value) and "deeplabv3_resnet50" in str(err.value) and "unet" in str(err.value)


@pytest.mark.parametrize("name", sorted(SEGMENTATION_MODELS))
def test_min_input_size_is_what_runs(name, offline):
    """The probed table: at a batch of 2 everything runs from 1 px; at a batch of 1 (train mode) the minimum
    runs and one less fails in BatchNorm, or no size runs at all (DeepLabV3's ASPP pooling)."""
    model = build_segmentation_model(name, 3).train()
    assert min_input_size(name) == 1
    model(torch.randn(2, 3, 1, 1))
    if name.startswith("deeplabv3"):
        with pytest.raises(ConfigError, match="per-process batch >= 2"):
            min_input_size(name, per_process_batch=1)
        return
    side = min_input_size(name, per_process_batch=1)
    assert model(torch.randn(1, 3, side, side))["out"].shape[-1] == side
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.randn(1, 3, side - 1, side - 1))


# ---- pretrained weights ----

HEADS = {"unet": {"head.weight", "head.bias"},
         "lraspp_mobilenet_v3_large": {"classifier.low_classifier.weight", "classifier.low_classifier.bias",
                                       "classifier.high_classifier.weight", "classifier.high_classifier.bias"}}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_pretrained_other_class_count(name, tmp_path, offline):
    torch.manual_seed(1)
    source = build_segmentation_model(name, 5)
    with torch.no_grad():  # every float tensor (buffers too) away from its initial value, so equality means loaded
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t))
    saved = _state(source)
    path = tmp_path / "five.safetensors"
    save_file(saved, str(path))
    messages = []
    model = build_segmentation_model(name, 3, pretrained_path=str(path), log=messages.append)
    own = model.state_dict()
    differ = {k for k in own if own[k].shape != saved[k].shape}
    assert differ == HEADS[name]
    assert all(torch.equal(own[k], saved[k]) for k in own if k not in differ)
    assert len(messages) == 1 and f"loaded {len(own) - len(differ)} of {len(own)}" in messages[0]
    assert f"re-initialised {len(differ)}" in messages[0]
    assert model(torch.randn(2, 3, 32, 32))["out"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("layout", ["backbone-prefixed", "bare", "classification-model", "pth-checkpoint"])
def test_pretrained_backbone_only(layout, tmp_path, offline):
    torch.manual_seed(2)
    source = build_segmentation_model("lraspp_mobilenet_v3_large", 3)
    with torch.no_grad():
        for t in source.state_dict().values():
            if t.is_floating_point():
                t.add_(1.0)
    backbone = {k: v for k, v in _state(source).items() if k.startswith("backbone.")}
    if layout == "backbone-prefixed":
        file_state = backbone
    elif layout == "bare":
        file_state = {k.removeprefix("backbone."): v for k, v in backbone.items()}
    elif layout == "classification-model":  # torchvision's mobilenet_v3_large keys: "features.N…" plus its own head
        file_state = {"features." + k.removeprefix("backbone."): v for k, v in backbone.items()}
        file_state["classifier.3.weight"] = torch.zeros(1000, 1280)
    else:
        file_state = {"model": backbone, "epoch": 3}  # torchvision's references save {"model": ..., "epoch": ...}
    path = tmp_path / ("weights.pth" if layout == "pth-checkpoint" else "backbone.safetensors")
    if layout == "pth-checkpoint":
        torch.save(file_state, path)
    else:
        save_file(file_state, str(path))
    messages = []
    model = build_segmentation_model("lraspp_mobilenet_v3_large", 3, pretrained_path=str(path),
                                     log=messages.append)
    own, src = model.state_dict(), _state(source)
    assert all(torch.equal(own[k], src[k]) for k in backbone)
    head = [k for k in own if k.startswith("classifier.") and own[k].is_floating_point()]
    assert head and not any(torch.equal(own[k], src[k]) for k in head)
    assert f"loaded {len(backbone)} of {len(own)}" in messages[0]
    assert ("fit no name" in messages[0]) == (layout == "classification-model")


def test_pretrained_matching_nothing_names_the_file(tmp_path):
    path = tmp_path / "unrelated.safetensors"
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ConfigError, match="unrelated.safetensors"):
        build_segmentation_model("unet", 3, pretrained_path=str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        build_segmentation_model("unet", 3, pretrained_path=str(tmp_path / "missing.safetensors"))


def test_pretrained_pickle_named_safetensors_is_refused(tmp_path):
    path = tmp_path / "sneaky.safetensors"
    torch.save(build_segmentation_model("unet", 3).state_dict(), path)
    with pytest.raises(TrainerError, match="pickle"):
        build_segmentation_model("unet", 3, pretrained_path=str(path))


# ---- confusion matrix and metrics ----


def test_confusion_matrix_matches_numpy():
    c = 5
    g = torch.Generator().manual_seed(3)
    pred = torch.randint(0, c, (4, 13, 17), generator=g)
    target = _targets((4, 13, 17), c, seed=4, ignored=0.3)
    cm = confusion_matrix(pred, target, c, IGNORE)
    p, t = pred.numpy().ravel(), target.numpy().ravel()
    keep = t != IGNORE
    ref = np.zeros((c, c), dtype=np.int64)
    np.add.at(ref, (t[keep], p[keep]), 1)
    assert cm.dtype == torch.int64 and np.array_equal(cm.numpy(), ref)
    assert cm.sum() == keep.sum() and 0 < keep.sum() < t.size
    empty = confusion_matrix(pred[:0], target[:0], c, IGNORE)
    assert empty.shape == (c, c) and empty.sum() == 0


@pytest.mark.parametrize("value", [7, -1, 254])
def test_confusion_matrix_rejects_unknown_target_value(value):
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[1, 2, 3] = value
    with pytest.raises(TrainerError, match=str(value)):
        confusion_matrix(torch.zeros_like(target), target, 3, IGNORE)


def test_metrics_by_hand_with_absent_and_only_predicted_classes():
    # rows = true, columns = predicted; "dog" appears nowhere, "bird" is only predicted (once)
    cm = np.array([[5, 1, 0, 1],
                   [2, 3, 0, 0],
                   [0, 0, 0, 0],
                   [0, 0, 0, 0]], dtype=np.int64)
    classes = ["bg", "cat", "dog", "bird"]
    m = metrics_from_confusion(torch.from_numpy(cm), classes)
    assert m == metrics_from_confusion(cm, classes)  # a tensor or an array
    approx = pytest.approx
    # bg: TP 5, 7 labelled, 7 predicted; cat: TP 3, 5 labelled, 4 predicted; bird: TP 0, 0 labelled, 1 predicted
    assert m["pixel_accuracy"] == approx(8 / 12)
    assert m["mean_class_accuracy"] == approx((5 / 7 + 3 / 5) / 2)
    assert m["miou"] == approx((5 / 9 + 3 / 6 + 0) / 3)
    assert m["mean_dice"] == approx((10 / 14 + 6 / 9 + 0) / 3)
    assert m["fwiou"] == approx(7 / 12 * 5 / 9 + 5 / 12 * 3 / 6)
    assert m["absent_classes"] == ["dog"] and m["num_pixels"] == 12
    assert m["per_class"]["bg"] == {"iou": approx(5 / 9), "dice": approx(5 / 7), "accuracy": approx(5 / 7), "pixels": 7}
    assert m["per_class"]["cat"] == {"iou": approx(0.5), "dice": approx(2 / 3), "accuracy": approx(0.6), "pixels": 5}
    assert m["per_class"]["bird"] == {"iou": 0.0, "dice": 0.0, "accuracy": None, "pixels": 0}
    assert m["per_class"]["dog"] == {"iou": None, "dice": None, "accuracy": None, "pixels": 0}
    assert m["confusion_matrix"] == cm.tolist() and type(m["confusion_matrix"][0][0]) is int
    json.dumps(m, allow_nan=False)  # no NaN anywhere, and JSON-ready


def test_metrics_of_an_all_ignored_split():
    m = metrics_from_confusion(torch.zeros(3, 3, dtype=torch.int64), ["a", "b", "c"])
    for key in ("pixel_accuracy", "mean_class_accuracy", "miou", "mean_dice", "fwiou"):
        assert m[key] is None
    assert m["num_pixels"] == 0 and m["absent_classes"] == ["a", "b", "c"]
    json.dumps(m, allow_nan=False)


def test_metrics_perfect_prediction():
    cm = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 1, 2]), 3, IGNORE)
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["miou"] == m["pixel_accuracy"] == m["fwiou"] == m["mean_dice"] == 1.0


# ---- losses ----


def _confident(target, num_classes, shift=0):
    """Logits of 1000 on class (target + shift) mod C: softmax is exactly one-hot in float32."""
    cls = (target.clamp(0, num_classes - 1) + shift) % num_classes
    return 1000.0 * F.one_hot(cls, num_classes).permute(0, 3, 1, 2).float()


def test_dice_loss_perfect_and_wrong():
    target = _targets((2, 16, 16), 4, seed=5)
    assert dice_loss(_confident(target, 4), target, IGNORE).item() == pytest.approx(0.0, abs=1e-6)
    wrong = dice_loss(_confident(target, 4, shift=1), target, IGNORE).item()
    assert 0.97 < wrong <= 1.0  # 1 - eps / (2 n_c + eps) per class, n_c ~ 100 pixels here


def test_dice_loss_ignores_ignored_pixels():
    target = _targets((2, 16, 16), 3, seed=6)
    base = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    ignored = (target == IGNORE).unsqueeze(1).expand_as(base)
    changed = torch.where(ignored, 50 * torch.randn_like(base), base)
    losses, grads = [], []
    for logits in (base, changed):
        logits = logits.clone().requires_grad_(True)
        loss = dice_loss(logits, target, IGNORE)
        loss.backward()
        losses.append(loss.detach())
        grads.append(logits.grad)
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    assert grads[0][ignored].abs().max() == 0 and grads[0][~ignored].abs().max() > 0
    assert torch.isfinite(grads[0]).all()


@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, dice_loss])
def test_losses_with_every_pixel_ignored(loss_fn):
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE)
    loss = loss_fn(logits, target, IGNORE)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("weights,smoothing", [(None, 0.0), ([0.5, 2.0, 1.0], 0.0), ([0.5, 2.0, 1.0], 0.1)])
def test_cross_entropy_is_torchs_mean(weights, smoothing):
    logits = torch.randn(2, 3, 8, 8)
    target = _targets((2, 8, 8), 3, seed=8)
    ours = cross_entropy_loss(logits, target, IGNORE, class_weights=weights, label_smoothing=smoothing)
    ref = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=smoothing,
                          weight=None if weights is None else torch.tensor(weights))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_pixel_class_weights():
    assert pixel_class_weights([10, 30, 0, 20]) == pytest.approx([1.5, 0.5, 0.0, 0.75])
    assert pixel_class_weights([5, 5]) == [1.0, 1.0]
