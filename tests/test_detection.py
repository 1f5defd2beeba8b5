"""Object detection through the trainer: COCO metrics exact on 1, 2 and 3 processes and equal to pycocotools
run directly (odd split, images without objects, a class absent from the split, non-contiguous category ids),
a whole run on the generated shapes that clearly beats an untrained detector, `trainer predict`'s JSON
reproducing eval.json when scored independently, `trainer eval` on 1 and 2 processes agreeing exactly, and a
killed run resuming bit for bit."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tests.conftest import PYTHONPATH, ROOT, assert_same_run, run_cli


def det_args(tmp: Path, run: str = "run", **extra) -> list:
    base = {"task": "detection", "data.format": "generated", "data.generated.variant": "detection",
            "data.generated.train_per_class": 12, "data.generated.val_per_class": 4, "data.generated.test_per_class": 1,
            "data.image_size": 64, "data.root": str(tmp / "gen-det"), "data.num_workers": 0,
            "model.name": "retinanet_small", "train.epochs": 2, "train.batch_size": 8, "train.progress_bar": "false",
            "optim.name": "adamw", "optim.lr": 0.002, "run.dir": str(tmp / run)}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def pycocotools_map(annotations: Path, preds: list) -> list:
    """COCOeval's 12 summary numbers for `trainer predict` records, scored directly against the file (images
    matched by file name, ids as the file has them)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        id_of = {img["file_name"]: img["id"] for img in gt.dataset["images"]}
        res = [{"image_id": id_of[Path(p["file"]).name], "category_id": p["category_id"], "bbox": p["bbox"],
                "score": p["score"]} for p in preds]
        e = COCOeval(gt, gt.loadRes(res), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return [float(v) for v in e.stats]


def hard_val_split(src: Path, dst: Path, keep: int = 13) -> None:
    """A COCO folder from the generated val split, made harder for the evaluation: an odd number of images, the
    first two with no annotation at all, one class (triangle, id 7) absent, and one crowd box."""
    dst.mkdir(parents=True)
    coco = json.loads((src / "annotations.json").read_text())
    images = coco["images"][:keep]
    ids = {img["id"] for img in images}
    empty = {images[0]["id"], images[1]["id"]}
    anns = [a for a in coco["annotations"] if a["image_id"] in ids - empty and a["category_id"] != 7]
    anns[0]["iscrowd"] = 1
    for img in images:
        shutil.copy(src / img["file_name"], dst / img["file_name"])
    (dst / "annotations.json").write_text(json.dumps({**coco, "images": images, "annotations": anns}))


@pytest.fixture(scope="module")
def det_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("det")
    res = run_cli("train", "-", *det_args(tmp))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    root = tmp / "hard"
    hard_val_split(tmp / "gen-det" / "val", root / "val")
    shutil.copytree(tmp / "gen-det" / "train", root / "train")
    return tmp, tmp / "run", root


def test_a_detection_run_describes_itself(det_run):
    _, run, _ = det_run
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["task"] == "detection" and meta["category_ids"] == [2, 3, 5, 7]
    assert meta["classes"] == ["circle", "cross", "square", "triangle"]
    assert meta["model_kwargs"]["min_size"] == 64 and meta["model_kwargs"]["nms_thresh"] == 0.5
    for plot in ("pr_curves", "boxes"):
        assert (run / "model" / "plots" / f"{plot}.png").stat().st_size > 2000, plot
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["type"] == "train"]
    # every part of the detector's loss is logged, and they add up to the loss (summed in float32 per step)
    assert train and all(abs(r["classification"] + r["bbox_regression"] - r["loss"]) < 1e-5 for r in train)
    assert all("map" in r and "map_50" in r for r in rows if r["type"] == "eval")
    assert (run / "plots" / "training_curves.png").is_file()


def _eval(run: Path, root: Path, out: Path, processes: int) -> dict:
    cmd = ([sys.executable, "-m", "trainer"] if processes == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m",
            "trainer"])
    res = subprocess.run(cmd + ["eval", "--model", str(run), "data.format=coco", f"data.root={root}",
                                "eval.batch_size=2", "--output", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_eval_is_exact_on_1_2_and_3_processes_and_predict_reproduces_it_under_pycocotools(det_run, tmp_path):
    _, run, root = det_run
    reports = {n: _eval(run, root, tmp_path / f"p{n}" / "eval.json", n) for n in (1, 2, 3)}
    one = reports[1]
    assert one["num_images"] == 13 and one["absent_classes"] == ["triangle"]
    assert one["per_class"]["triangle"] == {"ap": None, "ap50": None}
    assert one.pop("processes") == 1
    for n in (2, 3):
        r = dict(reports[n])
        assert r.pop("processes") == n
        assert r == one  # every number, per-class AP included, to the bit
    preds_file = tmp_path / "preds.json"
    res = run_cli("predict", "--model", str(run), str(root / "val"), "--output", str(preds_file), "--draw",
                  str(tmp_path / "drawn"))
    assert res.returncode == 0, res.stderr[-2000:]
    preds = json.loads(preds_file.read_text())
    assert preds and set(preds[0]) == {"file", "category", "category_id", "bbox", "score"}
    assert {p["category_id"] for p in preds} <= {2, 3, 5, 7}
    assert len(list((tmp_path / "drawn").glob("*.jpg"))) == 13
    stats = pycocotools_map(root / "val" / "annotations.json", preds)
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100"]
    assert [one[k] if one[k] is not None else -1.0 for k in keys] == stats[:9]  # to the bit


def test_predict_draws_neither_into_the_input_folder_nor_over_a_users_file(det_run, tmp_path):
    _, run, root = det_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "00000.jpg").write_bytes(b"the user's photo")
    preds = tmp_path / "preds.json"
    refused = {"lies inside the input folder": root / "val" / "drawn",
               "is not a folder of trainer predict's outputs": mine}
    for expected, draw in refused.items():
        res = run_cli("predict", "--model", str(run), str(root / "val"), "--output", str(preds), "--draw", str(draw))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and expected in lines[0], res.stderr[-2000:]
    assert not preds.exists() and not (root / "val" / "drawn").exists()
    assert [p.name for p in mine.iterdir()] == ["00000.jpg"] and (mine / "00000.jpg").read_bytes() == b"the user's photo"
    for _ in range(2):  # drawn again over its own drawings
        res = run_cli("predict", "--model", str(run), str(root / "val"), "--output", str(preds), "--draw",
                      str(tmp_path / "drawn"))
        assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "drawn").glob("*.jpg"))) == 13


def test_predict_score_threshold_and_wrong_options(det_run, tmp_path):
    _, run, root = det_run
    out = tmp_path / "p.json"
    res = run_cli("predict", "--model", str(run), str(root / "val"), "--output", str(out), "--score-threshold", "0.9")
    assert res.returncode == 0, res.stderr[-2000:]
    assert all(p["score"] >= 0.9 for p in json.loads(out.read_text()))
    bad = run_cli("predict", "--model", str(run), str(root / "val"), "--output", str(tmp_path / "q.json"),
                  "--threshold", "0.5")
    assert bad.returncode != 0 and "--score-threshold" in bad.stderr and not (tmp_path / "q.json").exists()


@pytest.mark.slow
def test_the_quick_start_clearly_beats_an_untrained_detector(tmp_path):
    """The quick start's RetinaNet against the same network untrained (max_steps=1, the lr still ~0) on the same
    validation images. Scored at the end only (eval.every_epochs=0): evaluating never changes what trains (eval.*
    may even change on resume), and the 5 evaluations on the way cost about as much as 5 of its 30 epochs."""
    root = tmp_path / "gen-det"
    res = run_cli("train", str(ROOT / "configs" / "quickstart_detection.yaml"), f"data.root={root}",
                  f"run.dir={tmp_path / 'run'}", "train.progress_bar=false", "eval.every_epochs=0", timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    trained = json.loads((tmp_path / "run" / "summary.json").read_text())["final"]
    res = run_cli("train", str(ROOT / "configs" / "quickstart_detection.yaml"), f"data.root={root}",
                  f"run.dir={tmp_path / 'untrained'}", "train.progress_bar=false", "train.max_steps=1", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    untrained = json.loads((tmp_path / "untrained" / "summary.json").read_text())["final"]
    assert trained["map_50"] > 0.5 and trained["map_50"] > untrained["map_50"] + 0.4, (trained, untrained)


@pytest.mark.slow
def test_sigkill_in_a_detection_run_then_the_same_command_is_bitwise_identical(tmp_path):
    # with every seeded draw detection has: the per-sample augmentation, the per-batch multi-scale side, the
    # repeat-factor epoch (53 positions for 48 images) and the aspect-ratio grouping of the order
    extra = {"checkpoint.every_steps": 3, "data.augment.scale_jitter": "[0.8,1.25]", "data.augment.iou_crop": "true",
             "data.augment.multiscale_sizes": "[48,56,64]", "data.repeat_factor_threshold": 0.5,
             "data.aspect_ratio_group_factor": 3}
    ref = run_cli("train", "-", *det_args(tmp_path, "ref", **extra))
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = det_args(tmp_path, "run", **extra)
    driver = ROOT / "tests" / "fault_driver.py"
    killed = subprocess.run([sys.executable, str(driver), "train", "-", *args], capture_output=True, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "FAULT": "kill_at_update",
                                                        "FAULT_AT": "8", "PYTHONPATH": PYTHONPATH})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli("train", "-", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")


# Faster R-CNN v2's box head runs four 256-channel convolutions on 512 sampled RoIs per image whatever the image
# size (~5 s per image and update on one CPU core): its run is one update of one image
@pytest.mark.parametrize("recipe, batch", [pytest.param("fasterrcnn_coco", 1, marks=pytest.mark.slow),
                                           ("retinanet_coco", 2)])
def test_the_coco_recipes_run_their_keys_on_generated_scenes(recipe, batch, tmp_path):
    """configs/<recipe>.yaml as written (SGD, the step schedule with its warm-up, aspect-ratio grouping, the
    ResNet-50 FPN v2 detector), only the data and the sizes made tiny: an update or two and an evaluation."""
    res = run_cli("train", ROOT / "configs" / f"{recipe}.yaml", "data.format=generated",
                  "data.generated.variant=detection", "data.generated.train_per_class=2",
                  "data.generated.val_per_class=1", "data.generated.test_per_class=1", "data.image_size=64",
                  f"data.root={tmp_path / 'gen'}", "data.num_workers=0", "train.mixed_precision=no",
                  f"train.batch_size={batch}", f"train.max_steps={3 - batch}", "train.progress_bar=false",
                  "eval.batch_size=2", f"run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "aspect-ratio grouping (factor 3)" in res.stdout and f"total_updates={3 - batch}" in res.stdout
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
