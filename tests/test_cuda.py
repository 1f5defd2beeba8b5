"""The CUDA paths, checked on a GPU: every test here is marked `cuda` and skipped, with the reason printed,
where torch sees no GPU (CI, CPU machines). `bench/gpu_check.py` runs them on a lent GPU:

    python -m pytest -m cuda tests/test_cuda.py -rs

Each run is the tiny generated dataset (`tiny_overrides`) through the real CLI, in a subprocess, so the
whole file takes a few minutes on one GPU. What a run really did on the device (its device, autocast dtype,
memory format, fused optimizer, pinned loader, compiled model, process-group backend, the grad scaler around
an overflowing step) is recorded by a small driver that wraps functions of the trainer from outside (PROBE
below: no hook in the product), so a test fails when a setting is accepted but not applied.
"""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import test_checkpoint
from tests.test_device_decode import jpeg_folder
from tests.conftest import PYTHONPATH, ROOT, assert_same_run, rows, run_cli, tiny_overrides, weights

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU: torch.cuda.is_available() is false on this machine "
                                         "(run on a GPU by bench/gpu_check.py)"),
]
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs for NCCL: this machine has {GPUS}")

PROBE = r'''
import json, os, sys
from datetime import timedelta
from pathlib import Path

import torch

if os.environ.get("PROBE_GLOO"):
    # two processes on one GPU: NCCL refuses two ranks on one device, and accelerate always picks NCCL on
    # CUDA, but it keeps a process group that exists already, so join a gloo one first (CUDA tensors)
    import torch.distributed as dist
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))

import trainer.loop as L
import trainer.session as S
from trainer.cli import main
from trainer.tasks.classify import Classification

facts = {"rank": int(os.environ.get("RANK", "0")), "batches": 0}
kept = {}
overflow_at = int(os.environ.get("PROBE_OVERFLOW_AT", "0"))  # 1-based training batch whose gradients become inf


def wrap(module, name, after):
    original = getattr(module, name)
    def wrapped(*a, **k):
        result = original(*a, **k)
        after(result)
        return result
    setattr(module, name, wrapped)


def seen_accelerator(acc):
    kept["acc"] = acc
    facts.update(device=str(acc.device), mixed_precision=acc.mixed_precision, scaler=acc.scaler is not None,
                 processes=acc.num_processes, non_blocking=acc.dataloader_config.non_blocking,
                 backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)


def seen_optimizer(opt):
    facts.update(optimizer=type(opt).__name__, fused=bool(opt.defaults.get("fused")))


def seen_loader(loader):
    facts["loader"] = type(loader).__name__
    facts["decoder"] = type(getattr(loader, "decoder", None)).__name__  # data.decode_device=cuda: BatchDecoder
    dl = getattr(loader, "dl", None)  # the DataLoader of the workers path, before accelerate wraps it
    if dl is not None:
        facts.update(pin_memory=dl.pin_memory, workers=dl.num_workers)


wrap(L, "make_accelerator", seen_accelerator)
wrap(S, "optimizer_from", seen_optimizer)
wrap(S, "build_train_loader", seen_loader)


def parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def first_batch(model, x):
    core = kept["acc"].unwrap_model(model)
    conv = next(m for m in core.modules() if isinstance(m, torch.nn.Conv2d))
    facts.update(cudnn_benchmark=torch.backends.cudnn.benchmark,
                 compiled=getattr(core, "_compiled_call_impl", None) is not None,
                 weight_channels_last=conv.weight.is_contiguous(memory_format=torch.channels_last),
                 batch_device=str(x.device))
    if facts["compiled"]:
        return  # a hook added now would make dynamo compile again once it is removed
    def hook(module, inputs, output):
        facts.update(conv_input_channels_last=inputs[0].is_contiguous(memory_format=torch.channels_last),
                     conv_output_dtype=str(output.dtype).replace("torch.", ""), conv_device=str(output.device))
        handle.remove()
    handle = conv.register_forward_hook(hook)


def poison_gradients(model):
    """This batch's gradient of one parameter becomes inf: a step the grad scaler must skip."""
    kept["before"], kept["scale_before"] = parameters(model), kept["acc"].scaler.get_scale()
    param = next(p for p in model.parameters() if p.requires_grad)
    def to_inf(grad):
        if kept.get("poisoned"):
            return None
        kept["poisoned"] = True
        return torch.full_like(grad, float("inf"))
    param.register_hook(to_inf)


original_loss = Classification.train_loss
def train_loss(self, model, batch, *a, **k):
    facts["batches"] += 1
    kept["model"] = model
    if facts["batches"] == 1:
        first_batch(model, batch[0])
    if overflow_at and facts["batches"] == overflow_at:
        poison_gradients(model)
    if overflow_at and facts["batches"] == overflow_at + 1:  # the overflowing step is over
        kept["after"] = parameters(model)
        facts["overflow"] = {
            "weights_unchanged": all(torch.equal(kept["before"][n], p) for n, p in kept["after"].items()),
            "scale_before": kept["scale_before"], "scale_after": kept["acc"].scaler.get_scale()}
    return original_loss(self, model, batch, *a, **k)
Classification.train_loss = train_loss

try:
    main(sys.argv[1:])
finally:
    if "after" in kept:  # later steps did train: the check above is not vacuous
        facts["overflow"]["changed_later"] = any(not torch.equal(kept["after"][n], p)
                                                 for n, p in parameters(kept["model"]).items())
    try:
        from torch._dynamo.utils import counters  # private, so read defensively
        facts["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
    except Exception:
        facts["compiled_graphs"] = None
    out = os.environ.get("PROBE_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"rank{facts['rank']}.json").write_text(json.dumps(facts))
'''

def torchrun(processes: int) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def run_probe(tmp_path: Path, argv: list, processes: int = 1, env=None, timeout: int = 300):
    """`trainer <argv>` through PROBE; its facts land in tmp_path/facts/rank<N>.json."""
    driver = tmp_path / "probe.py"
    driver.write_text(PROBE)
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    return subprocess.run(launcher + [str(driver), *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": PYTHONPATH,
                                         "PROBE_OUT": str(tmp_path / "facts"), **(env or {})})


def facts(tmp_path: Path, rank: int = 0) -> dict:
    return json.loads((tmp_path / "facts" / f"rank{rank}.json").read_text())


def ok(res) -> None:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def train_rows(run_dir: Path) -> list:
    return [r for r in rows(run_dir) if r["type"] == "train"]


def finite_run(run_dir: Path, samples: int = 52) -> None:
    """Every logged loss is finite and the final evaluation scored the whole val split (4 x 13)."""
    assert all(math.isfinite(r["loss"]) for r in train_rows(run_dir))
    evals = [r for r in rows(run_dir) if r["type"] == "eval"]
    assert evals and evals[-1]["num_samples"] == samples


def eval_json(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and k != "processes"}


# ---- one GPU run shared by the checks of its settings, `trainer eval`/`predict` and the gloo evaluation ----

@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    """The fast path: data held on the GPU, bf16 autocast, channels_last, fused AdamW (the CUDA default)."""
    tmp = tmp_path_factory.mktemp("gpu-run")
    args = tiny_overrides(tmp, **{"data.loader": "device", "train.mixed_precision": "bf16",
                                  "model.channels_last": True, "train.epochs": 3, "train.log_every_steps": 2})
    res = run_probe(tmp, ["train", "-", *args])
    ok(res)
    return tmp, tmp / "run", facts(tmp)


def test_bf16_channels_last_device_loader_and_fused_adamw_run_on_the_gpu(gpu_run):
    _, run_dir, seen = gpu_run
    assert seen["device"].startswith("cuda") and seen["batch_device"].startswith("cuda")
    assert seen["loader"] == "DeviceLoader"
    assert seen["mixed_precision"] == "bf16" and seen["conv_output_dtype"] == "bfloat16"
    assert seen["weight_channels_last"] and seen["conv_input_channels_last"]
    assert seen["optimizer"] == "AdamW" and seen["fused"]  # optim.fused=null means fused on CUDA
    assert seen["cudnn_benchmark"] is True  # train.cudnn_benchmark's default
    assert not seen["scaler"]  # bf16 needs no loss scaling
    finite_run(run_dir)


@pytest.mark.parametrize("loader", ["device", "workers"])
def test_the_first_gpu_steps_match_the_cpu(tmp_path, loader):
    """fp32: the same seed, data and order on both devices, so the first losses agree to float tolerance
    (the GPU's convolutions may use TF32). The workers path pins its batches and copies them non_blocking;
    it also runs fused SGD."""
    extra = {"data.loader": loader, "train.max_steps": 4, "train.log_every_steps": 1}
    if loader == "workers":
        extra.update({"data.num_workers": 2, "optim.name": "sgd", "optim.lr": 0.01})
    gpu = run_probe(tmp_path, ["train", "-", *tiny_overrides(tmp_path, **extra, **{
        "run.dir": tmp_path / "gpu", **({"optim.fused": True} if loader == "workers" else {})})])
    ok(gpu)
    ok(run_cli("train", "-", *tiny_overrides(tmp_path, **extra, **{"run.dir": tmp_path / "cpu",
                                                                   "train.device": "cpu"})))
    seen = facts(tmp_path)
    assert seen["device"].startswith("cuda") and seen["batch_device"].startswith("cuda")
    if loader == "workers":
        assert seen["loader"] == "WorkerLoader" and seen["workers"] == 2
        assert seen["pin_memory"] is True and seen["non_blocking"] is True
        assert seen["optimizer"] == "SGD" and seen["fused"]
    else:
        assert seen["loader"] == "DeviceLoader"
    on_gpu, on_cpu = train_rows(tmp_path / "gpu"), train_rows(tmp_path / "cpu")
    assert [r["step"] for r in on_gpu] == [r["step"] for r in on_cpu] == [1, 2, 3, 4]
    for a, b in zip(on_gpu[:3], on_cpu[:3]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-2), (on_gpu, on_cpu)


@pytest.mark.parametrize("optimizer, fused", [("adamw", True), ("sgd", True), ("adamw", False)])
def test_fp16_grad_scaler_skips_an_overflowing_step(tmp_path, optimizer, fused):
    """fp16 through accelerate's GradScaler: the 3rd batch's gradients are made inf; that step must leave every
    weight as it was and halve the scale (GradScaler's backoff), and training must go on. Fused optimizers
    take the scaler's inf check inside their kernel; the unfused one is skipped by the scaler itself."""
    args = tiny_overrides(tmp_path, **{"train.mixed_precision": "fp16", "optim.name": optimizer,
                                       "optim.fused": fused, "optim.lr": 0.01 if optimizer == "sgd" else 0.003,
                                       "train.max_steps": 6, "train.log_every_steps": 1})
    res = run_probe(tmp_path, ["train", "-", *args], env={"PROBE_OVERFLOW_AT": "3"})
    ok(res)
    seen = facts(tmp_path)
    assert seen["scaler"] and seen["mixed_precision"] == "fp16" and seen["conv_output_dtype"] == "float16"
    assert seen["fused"] is fused and seen["optimizer"] == {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
    step = seen["overflow"]
    assert step["weights_unchanged"], "the overflowing step changed the weights"
    assert step["scale_after"] == step["scale_before"] / 2, step
    assert step["changed_later"], "no step after the overflow trained"
    finite_run(tmp_path / "run")


def test_compiled_model_trains_and_exports_plain_names(tmp_path):
    args = tiny_overrides(tmp_path, **{"model.compile": True, "data.loader": "device",
                                       "train.mixed_precision": "bf16", "model.channels_last": True,
                                       "train.epochs": 2})
    ok(run_probe(tmp_path, ["train", "-", *args], timeout=600))
    seen = facts(tmp_path)
    assert seen["device"].startswith("cuda") and seen["compiled"]
    assert seen["compiled_graphs"] is None or seen["compiled_graphs"] >= 1
    finite_run(tmp_path / "run")
    assert not [k for k in weights(tmp_path / "run") if "_orig_mod" in k]  # exports load into a plain model


def test_sigkill_and_resume_on_the_gpu_is_bitwise(tmp_path):
    """The device-data fast path (airbench net, lookahead, flip TTA) in bf16 + channels_last, killed at update 7
    and resumed by the same command, ends bitwise equal to an uninterrupted run with train.deterministic=true
    (deterministic kernels, cuDNN's autotuner off, cuBLAS's fixed workspace)."""
    gpu = {**test_checkpoint.DEVICE_PATH, "train.mixed_precision": "bf16", "model.channels_last": True,
           "train.deterministic": True}
    ok(test_checkpoint.run_driver(tmp_path, test_checkpoint.overrides(tmp_path, "ref", **gpu), "none", 0))
    args = test_checkpoint.overrides(tmp_path, "run", **gpu)
    killed = test_checkpoint.run_driver(tmp_path, args, "kill_at_update", 7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "model").exists()
    resumed = test_checkpoint.run_driver(tmp_path, args, "none", 0)
    ok(resumed)
    assert "resuming from" in resumed.stdout and "device=cuda" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")


# ---- data.decode_device=cuda: nvJPEG batches (trainer.data.device_decode) ----

def test_gpu_decode_gives_the_cpu_decoders_batches_within_nvjpeg_rounding(tmp_path):
    """The same encoded batch through the decoder on the GPU (nvJPEG) and on the CPU (libjpeg-turbo), with the
    same per-sample augmentation: the batches agree within the decoders' rounding, the sideways photo included
    (turned upright by `upright`: nvJPEG does not read EXIF)."""
    from trainer.data.datasets import FileDataset, PadCropFlip
    from trainer.data.device_decode import BatchDecoder, collate_encoded
    from trainer.data.folders import scan_split

    root = jpeg_folder(tmp_path / "jpegs") / "train"
    classes = ["a", "b", "c", "d"]
    samples = scan_split(root, classes, [])
    std = [0.25] * 3
    ds = FileDataset(samples, PadCropFlip(32, 4, True, [0.5] * 3, std), seed=3)
    on_gpu, on_cpu = BatchDecoder(ds, torch.device("cuda")), BatchDecoder(ds, torch.device("cpu"))
    batch = collate_encoded([on_gpu.samples[i] for i in range(len(ds))])
    assert sorted(set(batch.orientations)) == [1, 6]
    (xg, yg), (xc, yc) = on_gpu(batch), on_cpu(batch)
    assert xg.is_cuda and yg.is_cuda and torch.equal(yg.cpu(), yc)
    levels = (xg.cpu() - xc).abs() * std[0] * 255  # back to 8-bit levels
    assert levels.mean() < 2 and levels.amax(dim=(1, 2, 3)).max() < 48, levels.amax(dim=(1, 2, 3))


def test_uint8_batches_normalised_on_the_gpu_hold_the_cpu_workers_floats():
    """build_train_loader on a GPU leaves the samples uint8 and normalises each batch there: the floats equal,
    bit for bit, the float samples the workers make on a CPU run (mul, sub and div are IEEE-rounded on both)."""
    from types import SimpleNamespace

    from tests.test_augment import data_cfg, images
    from trainer.data.datasets import ArrayDataset, train_transform
    from trainer.data.loaders import build_train_loader

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg = data_cfg(**{"data.num_workers": 0, "data.image_size": 16})
    rrc = train_transform(16, mean, std, True, 0, True, 0.35, 0.0)
    out = []
    for device in ("cpu", "cuda"):
        acc = SimpleNamespace(device=torch.device(device), process_index=0, num_processes=1)
        ds = ArrayDataset(images(12, side=24), [i % 5 for i in range(12)], rrc, seed=3)
        loader = build_train_loader(ds, cfg, 4, 3, acc, mean, std, 5, False, say=lambda *a: None)
        loader.prepare(acc)
        assert (loader.normalise is not None) == ds.uint8_samples == (device == "cuda")
        loader.set_epoch(1)
        out.append([(x.cpu(), y.cpu()) for x, y in loader.batches()])
    assert len(out[0]) == len(out[1]) == 3
    for (a, y), (b, z) in zip(*out):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(y, z)


def test_gpu_decode_trains_and_resumes_bitwise_after_sigkill(tmp_path):
    """A JPEG folder trained with data.decode_device=cuda (2 loader workers reading, bf16), killed at update 7 and
    resumed by the same command, ends bitwise equal to an uninterrupted run (train.deterministic=true)."""
    root = jpeg_folder(tmp_path / "jpegs")
    gpu = {"data.format": "imagefolder", "data.root": str(root), "data.decode_device": "cuda",
           "data.num_workers": 2, "data.image_size": 32, "train.mixed_precision": "bf16", "train.deterministic": True}
    probe = run_probe(tmp_path, ["train", "-", *test_checkpoint.overrides(tmp_path, "probe", **gpu,
                                                                           **{"train.max_steps": 2})])
    ok(probe)
    seen = facts(tmp_path)
    assert seen["loader"] == "WorkerLoader" and seen["decoder"] == "BatchDecoder" and seen["workers"] == 2
    assert seen["batch_device"].startswith("cuda")
    assert "decoded and augmented on cuda" in probe.stdout
    ok(test_checkpoint.run_driver(tmp_path, test_checkpoint.overrides(tmp_path, "ref", **gpu), "none", 0))
    finite_run(tmp_path / "ref")
    args = test_checkpoint.overrides(tmp_path, "run", **gpu)
    killed = test_checkpoint.run_driver(tmp_path, args, "kill_at_update", 7)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = test_checkpoint.run_driver(tmp_path, args, "none", 0)
    ok(resumed)
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")


# ---- the exported model on the GPU and on the CPU ----

def predictions(path: Path) -> dict:
    return {r["path"]: r for r in csv.DictReader(path.open())}


def test_eval_and_predict_on_the_gpu_match_the_cpu(gpu_run, tmp_path):
    tmp, run_dir, _ = gpu_run
    outputs = {}
    for device in ("cuda", "cpu"):
        ok(run_cli("eval", "--model", str(run_dir), "--output", str(tmp_path / f"{device}.json"),
                   *(["train.device=cpu"] if device == "cpu" else [])))
        ok(run_cli("predict", "--model", str(run_dir), str(tmp / "gen-multiclass" / "val"), "--device", device,
                   "--output", str(tmp_path / f"{device}.csv")))
        outputs[device] = eval_json(tmp_path / f"{device}.json"), predictions(tmp_path / f"{device}.csv")
    (gpu_eval, gpu_pred), (cpu_eval, cpu_pred) = outputs["cuda"], outputs["cpu"]
    n = cpu_eval["num_samples"]
    assert gpu_eval["num_samples"] == n == len(cpu_pred) == 52 and gpu_pred.keys() == cpu_pred.keys()
    # convolutions may run in TF32 on the GPU (cuDNN's default): ~1e-3 relative on the logits
    for key, value in cpu_eval.items():
        tol = 1e-3 if "loss" in key else 2 / n  # a count-based metric moves by 1/n per flipped sample
        assert gpu_eval[key] == pytest.approx(value, abs=tol), key
    columns = [c for c in next(iter(cpu_pred.values())) if c.startswith("prob_")]
    worst = max(abs(float(gpu_pred[p][c]) - float(cpu_pred[p][c])) for p in cpu_pred for c in columns)
    assert worst <= 5e-3, f"max |p_gpu - p_cpu| = {worst:.2e}"
    for path, row in cpu_pred.items():
        probs = sorted(float(row[c]) for c in columns)
        if probs[-1] - probs[-2] > 1e-2:  # not a near-tie: the same label
            assert gpu_pred[path]["label"] == row["label"], path


# ---- several processes ----

GLOO_ON_ONE_GPU = {"PROBE_GLOO": "1", "CUDA_VISIBLE_DEVICES": "0",
                   # accelerate hands DDP device_ids=[local rank]: cuda:1 does not exist on one GPU; without
                   # device_ids DDP uses the device the model is on (cuda:0)
                   "ACCELERATE_BYPASS_DEVICE_MAP": "true"}


def test_two_processes_on_one_gpu_over_gloo(gpu_run, tmp_path):
    """Where NCCL refuses two ranks on one device: gloo on CUDA tensors (DDP's all-reduce, the start-up check,
    the stop/save agreement at every update, the loss all-reduce), and the exact eval gather, whose 2-process
    numbers equal 1 process's."""
    args = tiny_overrides(tmp_path, **{"train.epochs": 2, "train.mixed_precision": "bf16",
                                       "train.batch_size": 8, "train.log_every_steps": 2})
    res = run_probe(tmp_path, ["train", "-", *args], processes=2, env=GLOO_ON_ONE_GPU)
    ok(res)
    assert "backend gloo" in res.stdout and "processes=2" in res.stdout
    for rank in (0, 1):
        seen = facts(tmp_path, rank)
        assert seen["device"] == "cuda:0" and seen["backend"] == "gloo" and seen["processes"] == 2
    finite_run(tmp_path / "run")
    _, model_run, _ = gpu_run
    same_eval_on_one_and_two(tmp_path, model_run,
                             lambda cmd: run_probe(tmp_path, cmd, processes=2, env=GLOO_ON_ONE_GPU))


def same_eval_on_one_and_two(tmp_path: Path, model_run: Path, two_processes) -> None:
    """`trainer eval` of one model on 1 process and on 2 (`two_processes(cli_args)` runs those) gives the same
    metrics exactly: batches of 3 on both counts, so the same images in every batch on the same GPU model."""
    ok(run_cli("eval", "--model", str(model_run), "--output", str(tmp_path / "one.json"), "eval.batch_size=3",
               env={"CUDA_VISIBLE_DEVICES": "0"}))
    ok(two_processes(["eval", "--model", str(model_run), "--output", str(tmp_path / "two.json"), "eval.batch_size=3"]))
    one, both = eval_json(tmp_path / "one.json"), eval_json(tmp_path / "two.json")
    assert json.loads((tmp_path / "two.json").read_text())["processes"] == 2
    assert one["num_samples"] == both["num_samples"] == 52
    assert one == both


@two_gpus
def test_nccl_on_two_gpus_start_up_check_and_exact_eval_gather(gpu_run, tmp_path):
    args = tiny_overrides(tmp_path, **{"train.epochs": 2, "train.mixed_precision": "bf16",
                                       "data.loader": "device", "train.batch_size": 8})
    res = run_probe(tmp_path, ["train", "-", *args], processes=2, env={"CUDA_VISIBLE_DEVICES": "0,1"})
    ok(res)
    assert "backend nccl" in res.stdout and "processes=2" in res.stdout
    assert [facts(tmp_path, r)["device"] for r in (0, 1)] == ["cuda:0", "cuda:1"]
    finite_run(tmp_path / "run")
    _, model_run, _ = gpu_run
    same_eval_on_one_and_two(tmp_path, model_run, lambda cmd: subprocess.run(
        torchrun(2) + ["-m", "trainer", *cmd], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "0,1"}))


@two_gpus
def test_nccl_stop_request_saves_and_resumes_bitwise(tmp_path):
    """SIGTERM on both ranks at update 5: the ranks agree (an NCCL all-reduce), save and exit; the same command
    then resumes, bitwise equal to an uninterrupted 2-GPU run."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    extra = {"train.deterministic": True}
    ok(test_checkpoint.run_driver(tmp_path, test_checkpoint.overrides(tmp_path, "ref", **extra), "none", 0,
                                  processes=2, env=env))
    args = test_checkpoint.overrides(tmp_path, "run", **extra)
    stopped = test_checkpoint.run_driver(tmp_path, args, "sigterm_at_update", 5, processes=2, env=env)
    assert stopped.returncode != 0 and "stopped on request" in stopped.stdout, stopped.stderr[-3000:]
    resumed = test_checkpoint.run_driver(tmp_path, args, "none", 0, processes=2, env=env)
    ok(resumed)
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")
