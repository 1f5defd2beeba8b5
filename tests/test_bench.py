"""Benchmarks are not timed tests: this only checks that each runs end to end on tiny sizes and writes its
JSON and Markdown results."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("script, extra, name", [
    ("overhead.py", [], "overhead-small_cnn-no-smoke"),
    ("overhead.py", ["--loader", "device"], "overhead-small_cnn-no-device-smoke"),
    ("input_pipeline.py", ["--decode-device", "cpu"], "input-pipeline-smoke"),
    ("accelerate_wrappers.py", [], "accelerate-wrappers-smoke"),
    ("checkpoint_io.py", [], "checkpoint-io-smoke"),
    ("seg_eval.py", [], "seg-eval-smoke"),
    ("det_eval.py", [], "det-eval-smoke"),
    ("eval_epoch.py", [], "eval-epoch-smoke"),
    ("airbench_side_by_side.py", [], "airbench-side-by-side-smoke")])
def test_benchmark_smoke(tmp_path, script, extra, name):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(tmp_path), *extra],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result
    assert (tmp_path / f"{name}.md").read_text().startswith("|")


def test_ablation_smoke_runs_every_variant_and_writes_its_table(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "ablation.py"), "--smoke", "--work", str(tmp_path),
                          "--variants", "baseline,ema,mixup_cutmix,trivialaugment,random_erasing", "--threads", "1"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "ema", "mixup_cutmix", "trivialaugment", "random_erasing"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["updates"] > 0 for r in rows)
    assert (tmp_path / "ablation.md").read_text().startswith("| variant |")


@pytest.mark.slow
def test_data_scale_smoke_measures_each_mode_and_writes_its_table(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "data_scale.py"), "--smoke", "--sizes", "200",
                          "--verify", "header,off", "--shards", "--repeats", "1", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    row = json.loads((tmp_path / "data-scale-smoke.json").read_text())["rows"][0]
    assert row["files"] == 200 and row["worker_memory"]["samples"] > 0
    for mode in ("header", "off", "shards"):  # shards: the start from the packed folder
        assert row[f"p1_verify_{mode}"]["seconds"] > 0 and row[f"p1_verify_{mode}"]["rank_peak_rss_mib"] > 0
    assert row["pack"]["shards"] == 2  # train and val, one shard each at this size
    assert row["reads"]["imagefolder"]["images_per_s"] > 0 and row["reads"]["shards"]["images_per_s"] > 0
    assert len((tmp_path / "data-scale-smoke.md").read_text().strip().splitlines()) == 2 + 3 + 1 + 2 + 1


@pytest.mark.slow
def test_dense_shards_smoke_reads_masks_and_coco_from_folder_and_shards(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "dense_shards.py"), "--smoke",
                          "--work", str(tmp_path / "work"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path / "dense-shards-smoke.json").read_text())["rows"]
    assert [(r["kind"], r["width"]) for r in rows] == [("masks", 32), ("coco", 32)]
    for r, folder in zip(rows, ("masks", "coco")):
        assert r["pack"]["shards"] == 2  # train and val, one shard each at this size
        assert r["reads"][folder]["images_per_s"] > 0 and r["reads"]["shards"]["images_per_s"] > 0
    assert len((tmp_path / "dense-shards-smoke.md").read_text().strip().splitlines()) == 2 + 2


@pytest.mark.slow
def test_unet_study_smoke_runs_every_row_on_both_sides(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "unet_study.py"), "--smoke", "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "unet-study-smoke.json").read_text())["rows"]
    assert [r["side"] for r in rows] == ["recipe"] * 7 + ["plain"] * 3 + ["recipe"] * 10
    assert all(0 <= run["miou"] <= 1 and 0 <= run["fg_iou"] <= 1 for r in rows for run in r["runs"])
