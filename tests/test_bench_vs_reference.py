"""bench/vs_reference.py is a benchmark, not a timed test (the references need a checkout of pytorch/vision's
references/ the tests do not have): this checks that the data it writes in the references' own layouts (VOC
for segmentation, COCO 2017 for detection) is read by torchvision's readers, which the reference scripts use,
and by ours, the same images and labels on both; the slow test runs its smoke mode (our side) end to end."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT


def bench_module():
    sys.path.insert(0, str(ROOT / "bench"))  # the script imports gate.py from its own folder
    spec = importlib.util.spec_from_file_location("vs_reference", ROOT / "bench" / "vs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_voc_layout_reads_the_same_in_torchvision_and_ours(tmp_path):
    from torchvision.datasets import VOCSegmentation

    from trainer.data.masks import voc_pairs

    bench_module().draw_voc(tmp_path, {"train": 3, "val": 2}, 32, seed=0)
    for split, n in (("train", 3), ("val", 2)):
        theirs = VOCSegmentation(str(tmp_path), year="2012", image_set=split)
        assert len(theirs) == n and list(zip(theirs.images, theirs.masks)) == voc_pairs(tmp_path, "2012", split)
        image, mask = theirs[0]
        assert image.size == (32, 32) and set(np.unique(np.asarray(mask))) <= set(range(5))  # background + 4 shapes


def test_the_coco_layout_reads_the_same_in_pycocotools_and_ours_with_a_polygon_per_box(tmp_path):
    from pycocotools.coco import COCO

    from trainer.data.coco import read_coco_splits

    bench_module().draw_coco(tmp_path, {"train": 3, "val": 2}, 32, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotations", "train2017", "val2017"]
    ours = read_coco_splits(tmp_path, ["train", "val"], log=lambda *a: None)
    for split, n in (("train", 3), ("val", 2)):
        theirs = COCO(str(tmp_path / "annotations" / f"instances_{split}2017.json"))
        assert len(theirs.getImgIds()) == len(ours[split]) == n
        for a in theirs.loadAnns(theirs.getAnnIds()):
            x, y, w, h = a["bbox"]  # the reference's reader needs a "segmentation": the box's corners
            assert a["segmentation"] == [[x, y, x + w, y, x + w, y + h, x, y + h]]
        first = theirs.imgs[1]["file_name"]
        assert Image.open(tmp_path / f"{split}2017" / first).size == (32, 32)


@pytest.mark.slow
def test_smoke_runs_our_side_of_both_tasks(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "vs_reference.py"), "--smoke", "--out", str(tmp_path),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads((tmp_path / "vs-reference-smoke.json").read_text())
    for task in ("segmentation", "detection"):
        ours = result["tasks"][task]["runs"]["ours"]
        assert ours["error"] is None and ours["wall_s"][0] > 0 and ours["cpu_s"][0] > 0
        assert 0 <= ours["accuracy"][0] <= 1
    assert (tmp_path / "vs-reference-smoke.md").read_text().startswith("| task |")
