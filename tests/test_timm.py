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
    model = build_model(name, 5, image_size=size, verbose=lambda *_: None, drop_path=0.1, dropout=0.2)
    model.eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 5)
    levels = model_levels(model, name, "model.layer_decay")
    head = dict(model.named_modules())[levels[-1][0]]
    assert head is model.get_classifier() and head.out_features == 5  # timm's own head, by its config's name
    assert len(levels) >= 3


def test_timm_arguments_reach_the_model():
    model = build_model("timm/mobilenetv3_small_050", 3, verbose=lambda *_: None, drop_path=0.1, dropout=0.3)
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
