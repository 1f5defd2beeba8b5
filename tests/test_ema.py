"""EMA of the weights, early stopping and SyncBatchNorm: what a user switching them on relies on.

EMA: the update rule and its warm-up against hand computations; the averaged weights are what evaluation
scores and what is exported; they live in every checkpoint, so a run killed with SIGKILL resumes bit for bit
on 1 and 2 processes. Early stopping: all ranks stop together after `patience` evaluations without an
improvement, and the run ends complete.
"""
from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import assert_same_run, rows, run_cli, tiny_overrides
from tests.test_checkpoint import run_driver, run_train
from trainer.checkpoint import POINTER
from trainer.ema import ModelEma
from trainer.export import export_model, load_exported


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_the_update_rule_and_its_warm_up_match_a_hand_computation():
    net = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = ModelEma(net, decay=0.9, warmup=False)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[3.0, 6.0]]))
    ema.update(net)  # 0.9 x [1, 2] + 0.1 x [3, 6]
    assert torch.allclose(ema.average["weight"], torch.tensor([[1.2, 2.4]]))
    ema.update(net)  # 0.9 x [1.2, 2.4] + 0.1 x [3, 6]
    assert torch.allclose(ema.average["weight"], torch.tensor([[1.38, 2.76]]))

    warm = ModelEma(net, decay=0.999, warmup=True, warmup_power=0.75)
    assert warm.decay_at(0) == 0.0  # the first update copies the weights
    assert warm.decay_at(15) == pytest.approx(1 - 16 ** -0.75)  # = 0.875
    assert warm.decay_at(10 ** 6) == 0.999  # capped by the decay


def test_the_average_is_float32_buffers_are_averaged_and_integers_copied():
    net = tiny_net().to(torch.bfloat16)
    net(torch.randn(2, 3, 5, 5, dtype=torch.bfloat16))
    ema = ModelEma(net, decay=0.5, warmup=False)
    assert all(v.dtype == torch.float32 for k, v in ema.average.items() if "num_batches" not in k)
    before = ema.average["1.running_mean"].clone()
    net.train()
    net(torch.randn(4, 3, 5, 5, dtype=torch.bfloat16) + 3)  # moves the BN statistics and its counter
    ema.update(net)
    expected = 0.5 * before + 0.5 * net[1].running_mean.float()
    assert torch.equal(ema.average["1.running_mean"], expected)
    assert int(ema.average["1.num_batches_tracked"]) == int(net[1].num_batches_tracked) == 2


def test_swapping_the_average_in_restores_the_training_weights_bit_for_bit(tmp_path):
    net = tiny_net()
    net(torch.randn(2, 3, 5, 5))
    ema = ModelEma(net, decay=0.9, warmup=False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with ema.swapped_in(net):
        assert torch.equal(net[0].weight, ema.average["0.weight"])
        export_model(net, tmp_path / "model", {"architecture": "x"})
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert all(torch.equal(exported[k], ema.average[k]) for k in exported)


def test_a_converted_sync_batchnorm_model_exports_plain_batchnorm_names(tmp_path):
    import torchvision

    plain = torchvision.models.resnet18(num_classes=3)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(torchvision.models.resnet18(num_classes=3))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    export_model(synced, tmp_path / "model", {
        "architecture": "resnet18", "task": "multiclass", "num_outputs": 3, "classes": ["a", "b", "c"],
        "image_size": 32, "small_input_stem": False, "mean": [0.5] * 3, "std": [0.25] * 3})
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert sorted(saved) == sorted(plain.state_dict())  # running_mean/var and num_batches_tracked included
    model, _ = load_exported(str(tmp_path / "model"))  # rebuilt as plain BatchNorm, strictly
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def test_sync_bn_on_cpu_is_one_line_before_any_data_is_read(tmp_path):
    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{"model.sync_bn": True}))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.sync_bn" in lines[0] and "CUDA" in lines[0], res.stderr
    assert not (tmp_path / "gen-multiclass").exists() and not (tmp_path / "run").exists()


EMA = {"ema.decay": 0.9, "ema.every": 2, "train.epochs": 3, "checkpoint.every_steps": 3,
       "checkpoint.keep_last": 2, "train.log_every_steps": 2}


def test_evaluation_scores_and_exports_the_average_and_both_logs_both(tmp_path):
    args = tiny_overrides(tmp_path, **{**EMA, "ema.evaluate": "both", "eval.monitor": "raw_loss"})
    res = run_cli("train", "-", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    evals = [r for r in rows(run) if r["type"] == "eval"]
    assert len(evals) == 3 and all("accuracy" in r and "raw_accuracy" in r for r in evals)
    assert any(r["accuracy"] != r["raw_accuracy"] or r["loss"] != r["raw_loss"] for r in evals)
    best_update = min(evals, key=lambda r: r["raw_loss"])["step"]
    assert json.loads((run / "best" / "model.json").read_text())["weights"] == "raw"  # the monitored ones
    assert json.loads((run / "best" / "model.json").read_text())["step"] == best_update
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights"] == "raw" and summary["best"]["raw_loss"] == min(r["raw_loss"] for r in evals)

    # monitoring the EMA's metric: model/ holds the average, as the final checkpoint saved it
    run2 = tmp_path / "ema-run"
    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{**EMA, "run.dir": str(run2)}))
    assert res.returncode == 0, res.stderr[-3000:]
    final = run2 / "checkpoints" / json.loads((run2 / "checkpoints" / POINTER).read_text())["checkpoint"]
    average, exported = load_file(str(final / "ema.safetensors")), load_file(str(run2 / "model" / "model.safetensors"))
    raw = load_file(str(final / "model.safetensors"))
    assert all(torch.equal(exported[k], average[k]) for k in exported)
    assert any(not torch.equal(exported[k], raw[k]) for k in exported)
    assert int(average["__updates__"]) == 15  # 30 updates, every 2nd
    assert json.loads((run2 / "model" / "model.json").read_text())["weights"] == "ema"


# what a user resuming a regularised run has on: EMA with mixup and CutMix (each batch's mixing is seeded by
# its position, so the batches after the resume point are mixed as in the uninterrupted run)
EMA_MIX = {**EMA, "data.augment.mixup_alpha": 0.2, "data.augment.cutmix_alpha": 1.0}


@pytest.fixture(scope="module")
def ema_reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ema-ref")
    made = {}

    def get(processes: int) -> object:
        if processes not in made:
            run = tmp / f"ref{processes}"
            res = run_train(tiny_overrides(tmp, **{**EMA_MIX, "run.dir": str(run)}), processes)
            assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
            made[processes] = run
        return made[processes]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("processes, at", [(1, 7), (2, 5)])
def test_sigkill_with_ema_and_mixing_resumes_bit_for_bit(ema_reference, tmp_path, processes, at):
    ref = ema_reference(processes)
    args = tiny_overrides(tmp_path, **EMA_MIX)
    killed = run_driver(tmp_path, args, "kill_at_update", at, processes=processes)
    assert killed.returncode != 0
    assert processes > 1 or killed.returncode == -signal.SIGKILL
    resumed = run_train(args, processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(ref, tmp_path / "run")
    for name in ("ema.safetensors", "model.safetensors"):
        pointer = json.loads((ref / "checkpoints" / POINTER).read_text())["checkpoint"]
        a, b = (load_file(str(r / "checkpoints" / pointer / name)) for r in (ref, tmp_path / "run"))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_early_stopping_ends_two_processes_together_as_a_complete_run(tmp_path):
    # lr 1e-9 (0 is refused): nothing learns, so no evaluation improves by more than min_delta; stops after
    # patience + 1 evaluations
    args = tiny_overrides(tmp_path, **{"train.epochs": 6, "optim.lr": 1e-9, "train.early_stopping.patience": 2,
                                       "train.early_stopping.min_delta": 0.01, "model.name": "linear"})
    res = run_train(args, processes=2)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    evals = [r for r in rows(run) if r["type"] == "eval"]
    assert len(evals) == 3, evals
    assert "early stopping" in res.stdout and "did not improve" in res.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_early"].startswith("early stopping") and summary["updates"] == evals[-1]["step"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "best" / "model.safetensors").is_file()
    again = run_train(args, processes=2)
    assert again.returncode == 0 and "already complete" in again.stdout, again.stdout[-2000:]


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_ema_and_early_stopping_serve_segmentation_and_detection_alike(tmp_path, task):
    from tests.test_detection import det_args
    from tests.test_segmentation import seg_args

    make = seg_args if task == "segmentation" else det_args
    args = make(tmp_path, **{"train.epochs": 4, "ema.decay": 0.9, "ema.evaluate": "both", "optim.lr": 1e-9,
                             "train.early_stopping.patience": 1, "train.early_stopping.min_delta": 0.5})
    res = run_cli("train", "-", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    evals = [r for r in rows(run) if r["type"] == "eval"]
    assert len(evals) == 2  # the first sets the reference, the second cannot beat it by 0.5
    monitor = json.loads((run / "summary.json").read_text())["monitor"]
    assert monitor in evals[0] and f"raw_{monitor}" in evals[0]
    assert json.loads((run / "model" / "model.json").read_text())["weights"] == "ema"
    final = run / "checkpoints" / json.loads((run / "checkpoints" / POINTER).read_text())["checkpoint"]
    assert (final / "ema.safetensors").is_file()
