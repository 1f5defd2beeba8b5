import pytest
import torch

from trainer.errors import ConfigError
from trainer.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
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
    assert "resnet19" in str(err.value) and "resnet18" in str(err.value) and "tutorial_cnn" in str(err.value)


def test_pretrained_from_local_file_reinitialises_head(tmp_path):
    from safetensors.torch import save_file

    src = build_model("resnet18", 10, image_size=32)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        dst = build_model("resnet18", 3, image_size=32, pretrained_path=str(tmp_path / f), verbose=lambda *_: None)
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
