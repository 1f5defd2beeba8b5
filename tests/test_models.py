import pytest
import torch
import torchvision

from trainer.errors import ConfigError
from trainer.models import MODELS, OWN_MODELS, build_model, check_input_size

# the models each training feature is tested on: ours and the torchvision classifiers the recipes use
CORE = sorted(OWN_MODELS) + ["resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                             "efficientnet_b0", "convnext_tiny"]
TORCHVISION_CLASSIFIERS = torchvision.models.list_models(module=torchvision.models)
# the smallest side that runs, where 32 px does not: no small-image stem for these (check_input_size names it);
# vit_h_14: a multiple of its 14 px patch
MIN_SIDE = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 42}


def _params(name: str) -> int:
    """Parameters with 1,000 classes, from torchvision's weights meta: known without building the model."""
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if _params(n) > 50e6 else n
                                  for n in TORCHVISION_CLASSIFIERS])
def test_every_torchvision_classifier_builds_by_its_name_and_runs(name):
    """Every classifier torchvision lists is a model.name: built at 32 px (or its smallest size) for 3 classes,
    one eval forward pass gives 3 logits per image. Models over 50 M parameters (VGG, ViT-L/H, RegNet 16-128 GF,
    ...) are slow: seconds to initialise each."""
    assert name in MODELS
    size = MIN_SIDE.get(name, 32)
    torch.manual_seed(0)
    model = build_model(name, 3, image_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 3)
    if name in MIN_SIDE:  # a smaller size is refused at start-up, naming the key
        with pytest.raises(ConfigError, match="data.image_size=16"):
            check_input_size(build_model(name, 3, image_size=16).eval(), name, 16)


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("num_outputs", [1, 3])
def test_every_model_forward_backward(name, num_outputs):
    torch.manual_seed(0)
    model = build_model(name, num_outputs, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, num_outputs)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("name", ["tutorial_cnn", "multiclass_cnn", "small_cnn", "linear"])
def test_own_models_any_input_size(name):
    model = build_model(name, 4, image_size=48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 4)


def test_small_stem_keeps_resolution():
    small = build_model("resnet18", 10, image_size=32)
    big = build_model("resnet18", 10, image_size=224)
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert big.conv1.stride == (2, 2)
    assert build_model("resnet18", 10, image_size=32, small_input_stem=False).conv1.stride == (2, 2)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("resnet19", 2)
    assert "resnet19" in str(err.value) and "did you mean resnet18" in str(err.value)
    assert "tutorial_cnn" in str(err.value)
    with pytest.raises(ConfigError, match="did you mean regnet_y_400mf"):
        build_model("regnet_y_400", 2)


@pytest.mark.parametrize("name, attr", [("resnext50_32x4d", "conv1"), ("wide_resnet50_2", "conv1"),
                                        ("regnet_y_400mf", "stem.0"), ("densenet121", "features.conv0"),
                                        ("shufflenet_v2_x0_5", "conv1.0"), ("mnasnet0_5", "layers.0"),
                                        ("mobilenet_v2", "features.0.0"), ("efficientnet_v2_s", "features.0.0")])
def test_small_stem_on_every_family_that_has_one(name, attr):
    """At 32 px the first stride-2 layer keeps full resolution; at 224 px it is torchvision's own."""
    assert build_model(name, 3, image_size=32).get_submodule(attr).stride == (1, 1)
    assert build_model(name, 3, image_size=224).get_submodule(attr).stride == (2, 2)


def test_small_stem_refused_where_there_is_none():
    with pytest.raises(ConfigError, match="vit_b_16 has no small-image stem"):
        build_model("vit_b_16", 3, image_size=32, small_input_stem=True)


def test_pretrained_from_local_file_reinitialises_head(tmp_path):
    from safetensors.torch import save_file

    src = build_model("resnet18", 10, image_size=32)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        dst = build_model("resnet18", 3, image_size=32, pretrained_path=str(tmp_path / f), log=lambda *_: None)
        assert torch.equal(dst.conv1.weight, src.conv1.weight)
        assert dst.fc.weight.shape == (3, 512)


def test_pretrained_wrong_architecture_is_clear(tmp_path):
    from safetensors.torch import save_file

    src = build_model("small_cnn", 2)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="does not fit"):
        build_model("resnet18", 2, pretrained_path=str(tmp_path / "w.safetensors"))


def test_airbench_whitening_decorrelates_the_training_patches():
    torch.manual_seed(0)
    base = torch.randn(64, 3, 12, 12)
    images = base + 0.8 * torch.roll(base, 1, dims=3)  # neighbouring pixels correlated, like photos
    model = build_model("airbench", 10)
    model.init_from_data(images)
    with torch.no_grad():
        out = torch.nn.functional.conv2d(images, model.whiten.weight[:12])  # no bias
    flat = out.permute(1, 0, 2, 3).reshape(12, -1).double()
    cov = flat @ flat.T / flat.shape[1]
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.02)  # eigenvalues >> eps here
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])
    assert not model.whiten.weight.requires_grad


def test_flip_tta_is_the_mean_of_both_mirrors():
    from trainer.models import forward_tta

    model = build_model("small_cnn", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = (model(x) + model(x.flip(3))) / 2
        assert torch.allclose(forward_tta(model, x, "flip"), expected)
        assert torch.equal(forward_tta(model, x, "none"), model(x))


def test_flip_translate_tta_is_airbench94s_six_views():
    from trainer.models import forward_tta

    model = build_model("small_cnn", 3).eval()
    x = torch.randn(2, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, 0:32, 0:32], padded[:, :, 2:34, 2:34]
    assert torch.equal(up_left[:, :, 1:, 1:], x[:, :, :31, :31])  # the image moved one pixel down-right
    with torch.no_grad():
        def mirror(v):
            return (model(v) + model(v.flip(3))) / 2
        expected = 0.5 * mirror(x) + 0.5 * (mirror(up_left) + mirror(down_right)) / 2
        assert torch.allclose(forward_tta(model, x, "flip_translate"), expected, atol=1e-6)


def test_airbench_whitening_bias_starts_at_zero():
    assert torch.equal(build_model("airbench", 10).whiten.bias, torch.zeros(24))
