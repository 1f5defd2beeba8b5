"""Pretrained weights by name (model.weights, trainer/models.py): found in torch.hub's local cache only, never
downloaded unless asked, loaded without pickle, and their normalisation the run's default. No network: each
test writes the weights file itself, from a freshly initialised torchvision model."""
import json

import pytest
import torch
import torchvision

from trainer.config import load_config
from trainer.errors import ConfigError
from trainer.models import build_model, weights_file

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
                        verbose=lambda *_: None)
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
    # the user's own statistics win over the weights'
    mine = run_cli(*args, "run.dir=" + str(tmp_path / "mine"), "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]",
                   env={"TORCH_HOME": str(home)})
    assert mine.returncode == 0, mine.stderr[-2000:]
    assert json.loads((tmp_path / "mine" / "model" / "model.json").read_text())["std"] == [0.25] * 3

