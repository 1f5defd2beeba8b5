"""Pretrained weights by name (model.weights, trainer/models.py): found in torch.hub's local cache only, never
downloaded unless asked, loaded without pickle, and their normalisation the run's default. No network: each
test writes the weights file itself, from a freshly initialised torchvision model."""
import json
from pathlib import Path

import pytest
import torch
import torchvision

from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.data.datasets import Fit, eval_transform
from trainer.models import build_model, weights_file, weights_preprocessing

from .conftest import run_cli

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # torchvision's ImageClassification


def place_weights(home, name: str, weights_enum) -> tuple:
    """A fresh 1000-class torchvision `name` saved where torch.hub keeps `weights_enum`'s file under `home`."""
    torch.manual_seed(1)
    source = torchvision.models.get_model(name, weights=None)
    path = home / "hub" / "checkpoints" / weights_enum.url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    return source, path


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return home


@pytest.mark.parametrize("spelling", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_weights_are_found_by_name_and_loaded(spelling, torch_home):
    source, path = place_weights(torch_home, "resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    assert weights_file("resnet18", spelling) == str(path)
    model = build_model("resnet18", 3, image_size=224, pretrained_path=weights_file("resnet18", spelling),
                        log=lambda *_: None)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (3, 512)  # the head for 3 classes: re-initialised


def test_a_missing_file_is_one_line_naming_file_folder_and_command(torch_home):
    with pytest.raises(ConfigError) as err:
        weights_file("resnet50", "ResNet50_Weights.IMAGENET1K_V2")
    message = str(err.value)
    folder = torch_home / "hub" / "checkpoints"
    assert "\n" not in message
    assert f"resnet50-11ad3fa6.pth is not in {folder}" in message
    assert "load_state_dict_from_url('https://download.pytorch.org/models/resnet50-11ad3fa6.pth')" in message
    assert "model.weights_download=true" in message
    assert not torch_home.exists()  # nothing fetched, nothing made


@pytest.mark.parametrize("name, weights, match", [
    ("resnet18", "ResNet50_Weights.IMAGENET1K_V2", "are not resnet18's weights"),
    ("resnet18", "IMAGENET1K_V9", "resnet18 has DEFAULT, IMAGENET1K_V1"),
    ("small_cnn", "DEFAULT", "small_cnn has no torchvision weights"),
])
def test_weights_that_do_not_exist_are_named(name, weights, match, torch_home):
    with pytest.raises(ConfigError, match=match):
        weights_file(name, weights)


def test_weights_and_a_file_path_together_are_refused():
    with pytest.raises(ConfigError, match="model.weights and model.pretrained_path"):
        load_config(overrides=["model.weights=DEFAULT", "model.pretrained_path=w.pth"])


def test_a_run_with_weights_normalises_as_the_weights_and_records_it(tmp_path, tiny):
    home = tmp_path / "torch-home"
    source, _ = place_weights(home, "mobilenet_v3_small", torchvision.models.MobileNet_V3_Small_Weights.DEFAULT)
    run = tmp_path / "run"
    args = ["train", "-", *tiny(**{"model.name": "mobilenet_v3_small", "model.weights": "DEFAULT",
                             "model.small_input_stem": False, "train.max_steps": 2, "eval.every_epochs": 0})]
    missing = run_cli(*args, env={"TORCH_HOME": str(tmp_path / "empty-home")})
    assert missing.returncode == 2 and "mobilenet_v3_small-047dcff4.pth is not in" in missing.stderr
    assert not run.exists()  # refused before anything was written
    done = run_cli(*args, env={"TORCH_HOME": str(home)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained tensors from" in done.stdout and "mobilenet_v3_small-047dcff4.pth" in done.stdout
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["mean"] == pytest.approx(IMAGENET_MEAN) and card["std"] == pytest.approx(IMAGENET_STD)
    # MobileNet_V3_Small_Weights: ImageClassification(crop_size=224, resize_size=256), at this run's 32 px
    assert (card["crop_mode"], card["crop_pct"], card["interpolation"]) == ("center", 224 / 256, "bilinear")
    assert card["resize_size"] == 36  # floor(32 / 0.875)
    assert "data.crop_mode, data.crop_pct, data.interpolation from the weights" in done.stdout
    # the user's own statistics and crop win over the weights'
    mine = run_cli(*args, "run.dir=" + str(tmp_path / "mine"), "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                   "data.crop_pct=1", "data.interpolation=bicubic", env={"TORCH_HOME": str(home)})
    assert mine.returncode == 0, mine.stderr[-2000:]
    card = json.loads((tmp_path / "mine" / "model" / "model.json").read_text())
    assert card["std"] == [0.25] * 3
    assert (card["crop_mode"], card["crop_pct"], card["interpolation"], card["resize_size"]) == (
        "center", 1.0, "bicubic", 32)


def test_the_weights_preprocessing_is_their_own_resize_crop_and_interpolation():
    """torchvision's weights.transforms() and timm's pretrained_cfg read as data.crop_mode/crop_pct/interpolation,
    and the trainer's eval transform with them resizes and crops as the libraries' own transforms do (to within
    one uint8 level: torchvision's v1 resize of a tensor and PIL's round differently from v2's uint8 path)."""
    import timm
    from PIL import Image

    image = torch.randint(0, 256, (3, 300, 420), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    cases = [  # model.name, model.weights, the library's transform of that image, expected fit
        ("resnet50", "IMAGENET1K_V2", torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms(),
         ("center", 224 / 232, "bilinear", 232)),
        ("timm/resnet18.a1_in1k", "DEFAULT", lambda x: timm.data.create_transform(
            **timm.data.resolve_data_config({}, model=timm.create_model("resnet18.a1_in1k")))(
            Image.fromarray(x.permute(1, 2, 0).numpy())), ("center", 0.95, "bicubic", 235)),
    ]
    for name, weights, theirs, expected in cases:
        model_cfg = load_config(overrides=[f"model.name={name}", f"model.weights={weights}"]).model
        found = weights_preprocessing(model_cfg)
        fit = Fit(found["crop_mode"], found["crop_pct"], found["interpolation"])
        assert (fit.crop_mode, fit.crop_pct, fit.interpolation, fit.resize_size(224)) == pytest.approx(expected)
        assert found["mean"] == pytest.approx(IMAGENET_MEAN) and found["image_size"] == 224
        ours = eval_transform(224, found["mean"], found["std"], fit)(image)
        assert ours.shape == (3, 224, 224)
        assert (ours - theirs(image)).abs().max() <= 1.01 / 255 / min(IMAGENET_STD)


def test_predict_and_the_onnx_description_follow_model_json_and_old_models_squash():
    from trainer.onnx_export import model_properties
    from trainer.tasks.classify import Classification

    meta = {"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3, "crop_mode": "center", "crop_pct": 0.5,
            "interpolation": "nearest"}
    image = torch.arange(3 * 16 * 32, dtype=torch.float32).reshape(3, 16, 32).remainder(256).to(torch.uint8)
    batch, = Classification.predict_batch([image], meta, "cpu")
    # shorter side 16 -> floor(16 / 0.5) = 32 (nearest: each row twice), longer side 32 -> 64; the centre 16 x 16
    crop = image.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, 8:24, 24:40]
    assert torch.allclose(batch[0], (crop.float() / 255 - 0.5) / 0.25, atol=1e-6)  # the same pixels, float rounding
    old = {k: v for k, v in meta.items() if k not in ("crop_mode", "crop_pct", "interpolation")}
    assert Fit.from_meta(old) == Fit()  # a model.json from before these fields: squashed, as it was trained
    props = model_properties({**meta, "task": "multiclass", "architecture": "small_cnn", "classes": ["a", "b"],
                              "num_outputs": 2, **Fit.from_meta(meta).meta(16)}, {"probabilities": "softmax"},
                             Path("m"), ["batch", 3, 16, 16], ["batch", 2])
    assert props["resize_size"] == 32 and props["crop_mode"] == "center"
    assert "shorter side resized to 32 px (nearest), centre crop 16 px" in props["input"]


@pytest.mark.parametrize("key, value", [("data.crop_mode", "center"), ("data.crop_pct", 0.9),
                                        ("data.interpolation", "bicubic")])
def test_the_crop_keys_are_refused_where_the_task_resizes_its_own_way(key, value):
    with pytest.raises(ConfigError, match=f"{key} is for classification models; segmentation"):
        load_config(overrides=["data.generated.variant=segmentation", f"{key}={value}"])

