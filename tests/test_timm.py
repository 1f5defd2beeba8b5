"""timm's models by their hub id (model.name=timm/<name>): built with timm's own arguments, split into backbone and
head for fine-tuning, trained through the CLI and resumed bitwise after a SIGKILL, rebuilt from model.json by
eval, predict and the ONNX export."""
from __future__ import annotations

import json
import signal

import pytest
import torch

from tests.conftest import PYTHONPATH, ROOT, assert_same_run, run_cli, run_forked, tiny_overrides
from trainer.errors import ConfigError
from trainer.finetune import model_levels
from trainer.models import build_model

TINY = ["timm/resnet10t", "timm/mobilenetv3_small_050", "timm/efficientnet_b0", "timm/convnext_atto.d2_in1k",
        "timm/vit_tiny_patch16_224"]


@pytest.mark.parametrize("name", TINY)
def test_a_timm_model_builds_runs_and_splits_into_backbone_and_head(name):
    size = 32
    model = build_model(name, 5, image_size=size, log=lambda *_: None, drop_path=0.1, dropout=0.2)
    model.eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)
    levels = model_levels(model, name, "model.layer_decay")
    head = dict(model.named_modules())[levels[-1][0]]
    assert head is model.get_classifier() and head.out_features == 5  # timm's own head, by its config's name
    assert len(levels) >= 3


def test_timm_arguments_reach_the_model():
    model = build_model("timm/mobilenetv3_small_050", 3, log=lambda *_: None, drop_path=0.1, dropout=0.3)
    assert model.drop_rate == 0.3
    assert max(b.drop_path.drop_prob for b in model.modules() if hasattr(b, "drop_path")
               and hasattr(b.drop_path, "drop_prob")) == pytest.approx(0.1, abs=0.02)


def test_unknown_and_bare_timm_names_are_refused_with_the_name_to_use():
    with pytest.raises(ConfigError, match=r"unknown model.name 'timm/resnet10x'; did you mean timm/resnet10t"):
        build_model("timm/resnet10x", 3)
    with pytest.raises(ConfigError, match=r"^unknown model.name 'resnet10t': timm's is model.name=timm/resnet10t$"):
        build_model("resnet10t", 3)


def test_without_timm_a_timm_name_says_how_to_install_it_and_other_names_still_work(monkeypatch):
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "timm" else found(name, *a))
    with pytest.raises(ConfigError, match=r"^model.name=timm/resnet10t needs timm, which is not installed: "
                                          r"pip install timm"):
        build_model("timm/resnet10t", 3)
    with pytest.raises(ConfigError, match=r"^unknown model.name 'resnet10t'; .*valid names: "):
        build_model("resnet10t", 3)
    assert build_model("small_cnn", 3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["timm/mobilenetv3_small_050", "timm/resnet10t"])
def test_a_timm_model_trains_resumes_bitwise_after_sigkill_and_its_export_rebuilds(tmp_path, name):
    # dropout and stochastic depth: the resumed run must restore the RNG too
    extra = {"model.name": name, "model.dropout": 0.2, "model.drop_path": 0.1,
             "train.epochs": 2, "train.log_every_steps": 2, "checkpoint.every_steps": 3}
    ref = run_cli("train", "-", *tiny_overrides(tmp_path, **{**extra, "run.dir": tmp_path / "ref"}))
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = tiny_overrides(tmp_path, **extra)
    killed = run_forked(["train", "-", *args], env={"FAULT": "kill_at_update", "FAULT_AT": "8",
                                                   "PYTHONPATH": PYTHONPATH}, script=ROOT / "tests" / "fault_driver.py")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("train", "-", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "model" / "model.json").read_text())["architecture"] == extra["model.name"]
    scored = run_cli("eval", "--model", str(tmp_path / "run" / "model"))  # rebuilt from model.json alone
    assert scored.returncode == 0, scored.stderr[-2000:]
    predicted = run_cli("predict", "--model", str(tmp_path / "run" / "model"), "--output",
                        str(tmp_path / "predictions.csv"), str(tmp_path / "gen-multiclass" / "test"))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    exported = run_cli("export", "--model", str(tmp_path / "run" / "model"), "--format", "onnx", "--output",
                       str(tmp_path / "model.onnx"))  # its parity check with PyTorch included
    assert exported.returncode == 0, exported.stderr[-2000:]


# ---- timm's pretrained tags by name (model.weights), from the Hugging Face cache only ----

REPO = "timm/resnet10t.c3_in1k"  # resnet10t's one tag, and timm's default for it


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache (HF_HUB_CACHE), offline, in which any download attempt fails the test."""
    import huggingface_hub

    cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:2]}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    return cache


def place_timm_weights(cache, repo: str = REPO, revision: str = "0123abcd") -> tuple:
    """A fresh 1000-class timm model saved as the hub cache holds `repo`'s model.safetensors (the layout
    `hf download` leaves: blobs aside, snapshots/<revision>/ and refs/main naming it). No network."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = timm.create_model(repo.removeprefix("timm/"), pretrained=False)
    folder = cache / f"models--{repo.replace('/', '--')}"
    path = folder / "snapshots" / revision / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return source, path


@pytest.mark.parametrize("name, weights", [("timm/resnet10t.c3_in1k", "DEFAULT"), ("timm/resnet10t", "c3_in1k"),
                                           ("timm/resnet10t", "DEFAULT")])
def test_timm_weights_are_found_in_the_hub_cache_by_tag_and_loaded_by_timm(name, weights, hf_cache):
    from trainer.models import timm_weights_file

    source, path = place_timm_weights(hf_cache)
    assert timm_weights_file(name, weights) == str(path)
    said = []
    model = build_model(name, 3, image_size=64, pretrained_path=str(path), log=said.append)
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(model.layer4[0].bn2.running_var, source.layer4[0].bn2.running_var)
    assert model.fc.weight.shape == (3, 512)  # timm's loader drops the 1000-class head for 3 classes
    assert "re-initialised: ['fc.bias', 'fc.weight']" in said[0]
    same = build_model(name, 1000, image_size=64, pretrained_path=str(path), log=said.append)
    assert torch.equal(same.fc.weight, source.fc.weight) and "re-initialised: none" in said[1]  # a head that fits


def test_a_missing_timm_file_is_one_line_naming_file_folder_and_command(hf_cache):
    from trainer.models import timm_weights_file

    for download in (False, True):  # HF_HUB_OFFLINE wins over model.weights_download=true
        with pytest.raises(ConfigError) as err:
            timm_weights_file("timm/resnet10t", "DEFAULT", download=download)
        message = str(err.value)
        assert "\n" not in message
        folder = hf_cache / "models--timm--resnet10t.c3_in1k" / "snapshots"
        assert f"model.safetensors of {REPO} is not in {folder}/" in message
        assert f"hf download {REPO} model.safetensors" in message
        assert ("HF_HUB_OFFLINE is set" if download else "model.weights_download=true") in message
    assert not hf_cache.exists()  # nothing fetched, nothing made
    with pytest.raises(ConfigError, match=r"timm has no such weights .* for resnet10t; its tags: DEFAULT, c3_in1k"):
        timm_weights_file("timm/resnet10t", "a1_in1k")
    with pytest.raises(ConfigError, match=r"names the tag c3_in1k; use model.weights=DEFAULT"):
        timm_weights_file("timm/resnet10t.c3_in1k", "a1_in1k")


def test_a_run_with_timm_weights_reads_images_as_the_tag_says(tmp_path, hf_cache):
    place_timm_weights(hf_cache)
    run = tmp_path / "run"
    args = ["train", "-", *tiny_overrides(tmp_path, **{"model.name": "timm/resnet10t", "model.weights": "DEFAULT",
                                                      "train.max_steps": 2, "eval.every_epochs": 0})]
    done = run_cli(*args, env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretrained tensors from" in done.stdout and "snapshots/0123abcd/model.safetensors" in done.stdout
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["architecture"] == "timm/resnet10t"
    # resnet10t.c3_in1k's pretrained_cfg: crop_pct 0.875, bicubic, centre crop, ImageNet's mean; input 176 px
    assert (card["crop_mode"], card["crop_pct"], card["interpolation"]) == ("center", 0.875, "bicubic")
    assert card["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert "the weights' own input is 176 px" in done.stdout
    # trainer eval reads the images as model.json says (resize 36, crop 32, bicubic): the run's own final loss
    scored = run_cli("eval", "--model", str(run / "model"), "--output", str(tmp_path / "eval.json"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    final = json.loads((run / "model" / "eval.json").read_text())["loss"]
    assert json.loads((tmp_path / "eval.json").read_text())["loss"] == final


# ---- timm feature backbones for segmentation (model.name=timm/<arch> with segmentation data) ----

def test_a_timm_backbone_segments_any_size_and_takes_a_classifiers_weights_by_name(hf_cache):
    from trainer.models import timm_weights_file
    from trainer.tasks.segment_models import build_segmentation_model, min_input_size

    source, _ = place_timm_weights(hf_cache)
    said = []
    model = build_segmentation_model("timm/resnet10t", 3, timm_weights_file("timm/resnet10t", "DEFAULT"),
                                     log=said.append)
    assert torch.equal(model.backbone.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(model.backbone.layer4[0].bn2.running_mean, source.layer4[0].bn2.running_mean)
    assert "not in the file: ['head.*', 'up.*']" in said[0] and "fit no name: ['fc']" in said[0]
    model.eval()
    for h, w in ((30, 36), (64, 64)):  # padded to the deepest stride (32) and cropped back
        assert model(torch.randn(1, 3, h, w))["out"].shape == (1, 3, h, w)
    assert min_input_size("timm/resnet10t", 1) == 33 and min_input_size("timm/resnet10t", 2) == 1


def test_a_segmentation_run_on_a_timm_backbone_with_its_tag_normalises_as_the_tag_and_predicts(tmp_path, hf_cache):
    place_timm_weights(hf_cache)
    run = tmp_path / "run"
    args = tiny_overrides(tmp_path, "segmentation", **{"model.name": "timm/resnet10t", "model.weights": "DEFAULT",
                                                       "train.max_steps": 2, "eval.every_epochs": 0,
                                                       "train.batch_size": 4})
    done = run_cli("train", "-", *args, env={"HF_HUB_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tensors from" in done.stdout and "snapshots/0123abcd/model.safetensors" in done.stdout
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["task"] == "segmentation" and card["architecture"] == "timm/resnet10t"
    assert card["mean"] == pytest.approx([0.485, 0.456, 0.406]) and "crop_mode" not in card  # masks: no crop
    predicted = run_cli("predict", "--model", str(run), "--output", str(tmp_path / "masks"),
                        str(tmp_path / "gen-segmentation" / "test" / "images"))  # rebuilt from model.json alone
    assert predicted.returncode == 0, predicted.stderr[-2000:]
