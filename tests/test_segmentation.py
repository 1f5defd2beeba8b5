"""Semantic segmentation through the trainer: metrics exact on 1, 2 and 3 processes, a whole run on the generated
shapes that beats a per-pixel colour rule, `trainer predict`'s masks reproducing eval.json, `trainer eval` on 1
and 2 processes agreeing exactly, and a killed run resuming bit for bit."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate import debug_launcher
from PIL import Image
from torch import nn

from tests.conftest import PYTHONPATH, ROOT, assert_same_run, rows, run_cli

C, S = 4, 8  # classes (the last absent from every target), network input side
IGNORE = 255
SIZES = [(8, 8), (5, 7), (9, 6), (8, 8), (3, 4), (7, 7), (6, 9), (8, 8), (4, 4), (10, 5), (8, 3)]  # 11: odd


def make_split(seed: int = 0):
    """Per image: fixed logits at S x S (what the "network" says) and a target at the image's own size with
    ignored pixels; class 3 never appears in a target (absent from the labels; maybe predicted)."""
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 1, (len(SIZES), C, S, S)).astype(np.float32))
    targets = []
    for h, w in SIZES:
        t = rng.integers(0, C - 1, (h, w))
        t[rng.random((h, w)) < 0.2] = IGNORE
        targets.append(torch.from_numpy(t))
    return logits, targets


class IndexImages(torch.utils.data.Dataset):
    """Image i is the number i (in every pixel), its target the i-th mask."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((3, S, S), float(i)), self.targets[i]


class LookupNet(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, x):
        return {"out": self.table[x[:, 0, 0, 0].long()]}


def numpy_reference(logits, targets) -> np.ndarray:
    """The confusion matrix of the whole split, computed directly: each image's logits resized to its size
    (bilinear), argmax, counted over the non-ignored pixels."""
    cm = np.zeros((C, C), dtype=np.int64)
    for i, t in enumerate(targets):
        pred = F.interpolate(logits[i:i + 1], size=tuple(t.shape), mode="bilinear", align_corners=False)[0].argmax(0)
        keep = t.numpy() != IGNORE
        np.add.at(cm, (t.numpy()[keep], pred.numpy()[keep]), 1)
    return cm


def _evaluate(out_path: str) -> None:
    from trainer.distributed import make_accelerator
    from trainer.evaluation import evaluate
    from trainer.tasks import Segmentation

    acc = make_accelerator("cpu", "no")
    logits, targets = make_split()
    task = Segmentation([f"c{k}" for k in range(C)], ignore_index=IGNORE)
    metrics, _ = evaluate(LookupNet(logits), IndexImages(targets), task, acc, batch_size=3)
    if acc.is_main_process:
        with open(out_path, "w") as fh:
            json.dump({"metrics": metrics, "processes": acc.num_processes}, fh)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_segmentation_metrics_equal_a_numpy_confusion_matrix_on_any_process_count(processes, tmp_path):
    out = str(tmp_path / "m.json")
    if processes == 1:
        _evaluate(out)
    else:
        debug_launcher(lambda: _evaluate(out), num_processes=processes)
    result = json.loads(Path(out).read_text())
    assert result["processes"] == processes
    m = result["metrics"]
    logits, targets = make_split()
    cm = numpy_reference(logits, targets)
    assert m["confusion_matrix"] == cm.tolist()
    assert m["num_images"] == len(SIZES) and m["num_pixels"] == int(cm.sum())
    tp, fp, fn = np.diag(cm), cm.sum(0) - np.diag(cm), cm.sum(1) - np.diag(cm)
    present = (cm.sum(0) + cm.sum(1)) > 0
    iou = tp[present] / (tp + fp + fn)[present]
    assert m["miou"] == pytest.approx(float(iou.mean()), abs=1e-12)
    assert m["pixel_accuracy"] == pytest.approx(float(tp.sum() / cm.sum()), abs=1e-12)
    assert m["per_class"]["c3"]["pixels"] == 0 and m["per_class"]["c3"]["accuracy"] is None
    if processes > 1:  # the same numbers, loss included, as on one process
        single = str(tmp_path / "one.json")
        _evaluate(single)
        assert json.loads(Path(single).read_text())["metrics"] == m


# ---- whole runs on the generated shapes ----

def seg_args(tmp: Path, run: str = "run", **extra) -> list:
    base = {"task": "segmentation", "data.format": "generated", "data.generated.variant": "segmentation",
            "data.generated.train_per_class": 60, "data.generated.val_per_class": 8, "data.generated.test_per_class": 2,
            "data.image_size": 32, "data.root": str(tmp / "gen-seg"), "data.num_workers": 0,
            "data.augment.random_resized_crop": "false", "data.augment.crop_padding": 0, "model.name": "unet",
            "train.epochs": 2, "train.batch_size": 16, "train.progress_bar": "false", "optim.name": "adamw",
            "optim.lr": 0.003, "run.dir": str(tmp / run)}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    res = run_cli("train", "-", *seg_args(tmp))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return tmp, tmp / "run"


def test_a_segmentation_run_describes_itself_and_predict_reproduces_eval(seg_run, tmp_path):
    tmp, run = seg_run
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["task"] == "segmentation" and meta["ignore_index"] == 255 and meta["classes"][0] == "background"
    for plot in ("confusion_matrix", "iou_per_class", "overlays"):
        assert (run / "model" / "plots" / f"{plot}.png").stat().st_size > 2000, plot
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "eval"] and all("miou" in r for r in rows if r["type"] == "eval")
    val = tmp / "gen-seg" / "val"
    res = run_cli("eval", "--model", str(run), "--output", str(tmp_path / "eval.json"))
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads((tmp_path / "eval.json").read_text())
    out = tmp_path / "masks"
    res = run_cli("predict", "--model", str(run), str(val / "images"), "--output", str(out), "--overlay")
    assert res.returncode == 0, res.stderr[-2000:]
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(p.with_suffix(".png").name for p in (val / "images").iterdir())
    assert len(list(out.glob("*.overlay.jpg"))) == len(names)
    cm = np.zeros((5, 5), dtype=np.int64)
    for name in names:
        pred, truth = np.array(Image.open(out / name)), np.array(Image.open(val / "masks" / name))
        assert pred.shape == truth.shape and pred.dtype == np.uint8
        keep = truth != 255
        np.add.at(cm, (truth[keep], pred[keep]), 1)
    assert cm.tolist() == report["confusion_matrix"]  # pixel for pixel


def test_predict_never_writes_over_the_images_or_the_ground_truth_and_reruns_over_its_own(seg_run, tmp_path):
    tmp, run = seg_run
    val = tmp / "gen-seg" / "val"
    before = {p: p.read_bytes() for p in sorted(val.rglob("*")) if p.is_file()}
    images = sorted(str(p) for p in (val / "images").iterdir())
    # the run's own data is an input of its model's predictions too: nothing is written into it
    refused = [("lies inside data.root", ["predict", "--model", str(run), *images, "--output", str(val / "images")]),
               ("lies inside data.root", ["predict", "--model", str(run), str(val / "images"), "--output",
                                          str(val / "masks")])]
    for expected, argv in refused:
        res = run_cli(*argv)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr[-2000:]
    assert {p: p.read_bytes() for p in sorted(val.rglob("*")) if p.is_file()} == before
    for _ in range(2):  # the same prediction again replaces its own masks
        res = run_cli("predict", "--model", str(run), images[0], images[1], "--output", str(tmp_path / "masks"))
        assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "masks").glob("*.png"))) == 2


def test_eval_on_one_and_two_processes_agrees_exactly(seg_run, tmp_path):
    _, run = seg_run
    one = run_cli("eval", "--model", str(run), "--output", str(tmp_path / "one" / "eval.json"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "trainer", "eval", "--model", str(run), "--output", str(tmp_path / "two" / "eval.json")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / k / "eval.json").read_text()) for k in ("one", "two"))
    assert (a.pop("processes"), b.pop("processes")) == (1, 2)
    assert a == b


@pytest.mark.slow
def test_the_quick_start_beats_a_per_pixel_colour_rule_by_a_wide_margin(tmp_path):
    """The generated shapes need a CNN: a colour rule fitted on the training pixels (each quantised colour
    -> its most frequent class) against the quick start's U-Net (about 2.5 minutes on one thread). Scored at the
    end only (eval.every_epochs=0): evaluating never changes what trains."""
    root = tmp_path / "gen-seg"
    res = run_cli("train", str(ROOT / "configs" / "quickstart_segmentation.yaml"), f"data.root={root}",
                  f"run.dir={tmp_path / 'run'}", "train.progress_bar=false", "eval.every_epochs=0", timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    miou = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["miou"]

    def pixels(split):  # each pixel's colour quantised to 8 levels per channel as one code in [0, 512), its class
        for mask in sorted((root / split / "masks").glob("*.png")):
            rgb = np.array(Image.open(root / split / "images" / mask.name).convert("RGB")).astype(np.int64) // 32
            yield (rgb[..., 0] * 64 + rgb[..., 1] * 8 + rgb[..., 2]).reshape(-1), np.array(Image.open(mask)).reshape(-1)

    table = np.zeros((512, 5), np.int64)
    for code, label in pixels("train"):
        np.add.at(table, (code, label), 1)
    rule_of = np.where(table.sum(1) > 0, table.argmax(1), 0)  # a colour never seen in training -> background
    cm = np.zeros((5, 5), np.int64)
    for code, label in pixels("val"):
        np.add.at(cm, (label, rule_of[code]), 1)
    present = (cm.sum(0) + cm.sum(1)) > 0
    rule = float((np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm)).clip(1))[present].mean())
    assert miou > rule + 0.3, (miou, rule)


@pytest.mark.slow
def test_sigkill_in_a_segmentation_run_then_the_same_command_is_bitwise_identical(tmp_path):
    # scale jitter both ways (its draws seeded by sample) and the poly schedule (a pure function of the update)
    extra = {"checkpoint.every_steps": 3, "data.augment.scale_range": "[0.5,2.0]", "optim.schedule": "poly"}
    ref = run_cli("train", "-", *seg_args(tmp_path, "ref", **extra))
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = seg_args(tmp_path, "run", **extra)
    driver = ROOT / "tests" / "fault_driver.py"
    killed = subprocess.run([sys.executable, str(driver), "train", "-", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT": "kill_at_update",
                                                        "FAULT_AT": "20", "PYTHONPATH": PYTHONPATH})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("train", "-", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_the_voc_recipe_runs_its_keys_on_generated_scenes(tmp_path):
    """configs/deeplabv3_voc.yaml as written (poly schedule, scale jitter 0.5-2 with its crop, DeepLabV3 with the
    aux loss), only the data and the sizes made tiny and the GPU-only keys off: two updates and an evaluation."""
    res = run_cli("train", ROOT / "configs" / "deeplabv3_voc.yaml", "data.format=generated",
                  "data.generated.variant=segmentation", "data.generated.train_per_class=1",
                  "data.generated.val_per_class=1", "data.generated.test_per_class=1", "data.image_size=32",
                  f"data.root={tmp_path / 'gen'}", "data.num_workers=0", "model.sync_bn=false",
                  "train.mixed_precision=no", "train.batch_size=2", "train.max_steps=2", "train.progress_bar=false",
                  f"run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "total_updates=2" in res.stdout and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["optim"]["schedule"] == "poly" and saved["data"]["augment"]["scale_range"] == [0.5, 2.0]
    # the second (last) update's lr on the poly curve: 0.02 x (1 - 1/2)^0.9
    last = [r for r in rows(tmp_path / "run") if r["type"] == "train"][-1]
    assert last["step"] == 2 and last["lr"] == pytest.approx(0.02 * 0.5 ** 0.9)
