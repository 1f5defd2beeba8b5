"""Packed shards (trainer.data.shards): `trainer pack` and data.format=shards train exactly as the folder does,
a cut-short pack resumes, every image is checked once, and a damaged pack is one line naming the shard."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest

import trainer.data.shards as shards
from tests.conftest import assert_same_run, make_folder, run_cli
from trainer.config import load_config
from trainer.data import build_data, data_fingerprint
from trainer.errors import DataError, TrainerError
from trainer.outputs import LEDGER


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    make_folder(root / "train", ("cat", "dog", "eel"), 14, ext=".jpg")
    make_folder(root / "val", ("cat", "dog", "eel"), 4, ext=".png")
    return root


def quiet(*_):
    pass


def digests(dest: Path) -> dict:
    """The pack's files (not the write gate's record, which holds their modification times)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dest.iterdir()) if p.name != LEDGER}


def data_cfg(root: Path, fmt: str, **kw):
    overrides = [f"data.format={fmt}", f"data.root={root}", "data.image_size=16"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, overrides).data


def test_shards_give_the_folders_datasets_images_and_fingerprint(folder, tmp_path):
    index = shards.pack(folder, tmp_path / "packed", shard_mb=0.008, say=quiet)
    assert len(index["splits"]["train"]) > 2  # several shards per split, in the order of the files
    for val_fraction in (0.0, 0.25):  # the val folder; or val held out of train, as the folder splits it
        kw = {"data.val_fraction": val_fraction}
        splits = ("train", "val")
        if val_fraction:  # no val/ folder: the folder path and the shards hold out the same images
            shutil.move(folder / "val", tmp_path / "val-aside")
            shutil.rmtree(tmp_path / "packed")
            shards.pack(folder, tmp_path / "packed", shard_mb=0.008, say=quiet)
        a = build_data(data_cfg(folder, "imagefolder", **kw), seed=0, splits=splits, log=quiet)
        b = build_data(data_cfg(tmp_path / "packed", "shards", **kw), seed=0, splits=splits, log=quiet)
        assert (a.classes, a.train_counts, a.mean, a.std) == (b.classes, b.train_counts, b.mean, b.std)
        for split in splits:
            da, db = a.datasets[split], b.datasets[split]
            assert da.labels.tolist() == db.labels.tolist()
            for i in range(len(da)):
                assert da.load(i).equal(db.load(i))  # the same bytes, decoded the same way
                assert da[i][0].equal(db[i][0])  # and the same augmentation, seeded by (seed, epoch, index)
        assert data_fingerprint(a.datasets["train"], a.classes) == data_fingerprint(b.datasets["train"], b.classes)


@pytest.mark.slow
def test_training_from_shards_equals_training_from_the_folder(folder, tmp_path):
    """Same seed: bitwise the same weights and metrics rows, with DataLoader workers."""
    assert run_cli("pack", str(folder), str(tmp_path / "packed"), "--shard-mb", "0.01").returncode == 0
    common = ["data.image_size=16", "model.name=small_cnn", "train.epochs=2", "train.batch_size=8",
              "data.num_workers=2", "train.progress_bar=false"]
    for fmt, root in (("imagefolder", folder), ("shards", tmp_path / "packed")):
        res = run_cli("train", "-", f"data.format={fmt}", f"data.root={root}", f"run.dir={tmp_path / fmt}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(tmp_path / "imagefolder", tmp_path / "shards")
    ev = run_cli("eval", "--model", str(tmp_path / "shards"), "--output", str(tmp_path / "eval.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]  # trainer eval reads the run's shards too
    final = [json.loads(line) for line in (tmp_path / "shards" / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == final["accuracy"]


def test_a_cut_short_pack_resumes_keeping_its_finished_shards(folder, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    shards.pack(folder, whole, shard_mb=0.008, say=quiet)
    real, written = shards._write_shard, []

    def dies_after_two(out, target, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt  # Ctrl-C, a preempted job: the third shard never appears
        written.append(target.name)
        return real(out, target, *a, **k)

    monkeypatch.setattr(shards, "_write_shard", dies_after_two)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        shards.pack(folder, cut, shard_mb=0.008, say=quiet)
    assert not (cut / "index.json").exists() and (cut / ".plan.json").is_file()
    with pytest.raises(DataError, match="not a packed dataset .*cut short: run the same trainer pack again"):
        build_data(data_cfg(cut, "shards"), seed=0, log=quiet)
    kept = {name: (cut / name).stat().st_mtime_ns for name in written}
    monkeypatch.setattr(shards, "_write_shard", real)
    notes = []
    shards.pack(folder, cut, shard_mb=0.008, say=notes.append)
    assert any("resuming" in n for n in notes)
    assert {name: (cut / name).stat().st_mtime_ns for name in written} == kept  # not written again
    assert digests(cut) == digests(whole)  # the same pack as one that was never interrupted


def test_every_image_is_checked_once_when_packed(folder, tmp_path):
    bad = folder / "train" / "dog" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # cut short: the header parses, the pixels do not
    with pytest.raises(DataError, match=f"cannot read image {bad}: .*--skip-bad-images"):
        shards.pack(folder, tmp_path / "a", shard_mb=0.008, say=quiet)
    assert not (tmp_path / "a" / "index.json").exists()
    fixed = folder / "train" / "cat" / "0.jpg"
    shutil.copy(fixed, bad)  # fixed (another size): the same command resumes; only the shards it changes are new
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.arrow")}
    shards.pack(folder, tmp_path / "a", shard_mb=0.008, say=quiet)
    again = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "a").glob("*.arrow") if p.name in done}
    assert done and again == done  # the shards before the bad file were whole: kept
    assert digests(tmp_path / "a") == digests(shards.pack(folder, tmp_path / "fresh", shard_mb=0.008, say=quiet)
                                               and tmp_path / "fresh")
    bad.write_bytes(bad.read_bytes()[:300])
    index = shards.pack(folder, tmp_path / "b", shard_mb=0.008, skip_bad=True, say=quiet)
    assert [path for path, _ in index["skipped"]] == ["train/dog/3.jpg"]
    data = build_data(data_cfg(tmp_path / "b", "shards"), seed=0, log=quiet)
    assert len(data.datasets["train"]) == 3 * 14 - 1 and "train/dog/3.jpg" not in list(data.datasets["train"].paths)



def test_a_class_whose_every_image_is_bad_is_refused_when_packed_and_when_training_from_such_a_pack(folder, tmp_path,
                                                                                                     monkeypatch):
    """--skip-bad-images may not leave a class with no training image, as data.skip_bad_images=true may not on
    the folder path: a run would train a class it never sees without a word."""
    for image in (folder / "train" / "eel").iterdir():
        image.write_bytes(image.read_bytes()[:300])  # cut short: the header parses, the pixels do not
    lost = "class 'eel' has no readable training image left: {} dropped all 14 of its files, e.g. {}"
    in_folder = lost.format("data.skip_bad_images=true", folder / "train/eel/0.jpg")
    with pytest.raises(DataError, match=re.escape(in_folder)):
        build_data(data_cfg(folder, "imagefolder", **{"data.skip_bad_images": "true"}), seed=0, log=quiet)
    with pytest.raises(DataError, match=re.escape(lost.format("--skip-bad-images", "train/eel/0.jpg"))
                       + ".*the same trainer pack again"):
        shards.pack(folder, tmp_path / "packed", shard_mb=0.008, skip_bad=True, say=quiet)
    assert not (tmp_path / "packed" / "index.json").exists()  # no pack to train from
    with pytest.raises(DataError, match="a pack was cut short"):
        build_data(data_cfg(tmp_path / "packed", "shards"), seed=0, log=quiet)
    # a pack made before pack refused it: training from it is refused as the folder path refuses
    monkeypatch.setattr(shards, "_check_every_class_kept", lambda *a: None)
    index = shards.pack(folder, tmp_path / "older", shard_mb=0.008, skip_bad=True, say=quiet)
    assert len(index["skipped"]) == 14
    with pytest.raises(DataError, match=re.escape(lost.format("trainer pack --skip-bad-images", "train/eel/0.jpg"))
                       + r" \(the shards at .*older hold none of its images\)"):
        build_data(data_cfg(tmp_path / "older", "shards"), seed=0, log=quiet)
    data = build_data(data_cfg(tmp_path / "older", "shards"), seed=0, splits=("val",), log=quiet)
    assert len(data.datasets["val"]) == 3 * 4  # scoring a split of it is no training: not refused

@pytest.mark.parametrize("damage, message", [
    ("missing", r"shard .*train-00001.arrow is missing \(the index lists \d+ images in it\)"),
    ("truncated", r"shard .*train-00001.arrow is \d+ bytes, its index says \d+: cut short"),
    ("garbage", r"shard .*train-00001.arrow cannot be read"),
    ("no index", r"is not a packed dataset \(no index.json; make one with: trainer pack SRC"),
    ("no rows table", r"rows.arrow cannot be read .*pack again"),
])
def test_a_damaged_pack_is_one_line_naming_the_shard(folder, tmp_path, damage, message):
    dest = tmp_path / "packed"
    shards.pack(folder, dest, shard_mb=0.008, say=quiet)
    shard = dest / "train-00001.arrow"
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "garbage":
        shard.write_bytes(b"\0" * shard.stat().st_size)  # the same size: the Arrow footer check finds it
    elif damage == "no index":
        (dest / "index.json").unlink()
    else:
        (dest / "rows.arrow").unlink()
    with pytest.raises(DataError, match=message):
        build_data(data_cfg(dest, "shards"), seed=0, log=quiet)


def test_pack_refuses_to_write_into_its_source_or_over_other_files(folder, tmp_path):
    with pytest.raises(TrainerError, match="lies inside the folder packed"):
        shards.pack(folder, folder / "packed", say=quiet)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(TrainerError, match="notes already exists and is not a pack of the trainer"):
        shards.pack(folder, other, say=quiet)
    assert [p.name for p in other.iterdir()] == ["mine.txt"] and not (folder / "packed").exists()
    shards.pack(folder, tmp_path / "p", shard_mb=0.008, say=quiet)
    (folder / "train" / "cat" / "0.jpg").unlink()
    with pytest.raises(DataError, match="already holds a packed dataset of other files"):
        shards.pack(folder, tmp_path / "p", shard_mb=0.008, say=quiet)


def test_a_process_keeps_a_bounded_number_of_shards_open(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
    shards.pack(folder, tmp_path / "packed", shard_mb=0.004, say=quiet)
    a = build_data(data_cfg(folder, "imagefolder"), seed=0, log=quiet).datasets["train"]
    b = build_data(data_cfg(tmp_path / "packed", "shards"), seed=0, log=quiet).datasets["train"]
    assert len(set(b.shards.shard.tolist())) > 4
    for i in list(range(len(b))) + list(range(len(b)))[::-1]:  # every shard, opened and closed again
        assert a.load(i).equal(b.load(i))
        assert len(b.shards._fds) <= 2


def test_the_device_loader_reads_shards_as_it_reads_the_folder(folder, tmp_path):
    from trainer.data.device import decode_split

    shards.pack(folder, tmp_path / "packed", shard_mb=0.008, say=quiet)
    a = build_data(data_cfg(folder, "imagefolder"), seed=0, log=quiet).datasets["train"]
    b = build_data(data_cfg(tmp_path / "packed", "shards"), seed=0, log=quiet).datasets["train"]
    assert decode_split(a, 16).equal(decode_split(b, 16))


def test_pack_refuses_masks_without_splits_and_a_broken_coco_file_instead_of_reading_them_as_classes(tmp_path):
    flat = tmp_path / "flat"  # images/ and masks/ at the top: would be read as two classes named so
    make_folder(flat, ("images", "masks"), 2)
    with pytest.raises(DataError, match="without split folders"):
        shards.pack(flat, tmp_path / "packed", say=quiet)
    src = tmp_path / "src"  # an annotation file makes it a COCO folder: read and checked, not class folders
    make_folder(src / "train", ("cat", "dog"), 2)
    (src / "train" / "annotations.json").write_text("{}")
    with pytest.raises(DataError, match="annotations.json"):
        shards.pack(src, tmp_path / "packed", say=quiet)
    assert not (tmp_path / "packed").exists()


# ---- segmentation: a masks folder packed ----

def generated(tmp_path: Path, variant: str, size: int, counts: dict) -> Path:
    """The generated segmentation or detection data: a real masks or COCO folder to pack."""
    from trainer.data.generated import ensure_generated

    return ensure_generated(tmp_path / variant, variant, size, 0, counts)


@pytest.fixture
def masks_folder(tmp_path):
    return generated(tmp_path, "segmentation", 32, {"train": 5, "val": 2})


def test_a_masks_folder_packs_into_shards_that_give_its_images_masks_and_fingerprint(masks_folder, tmp_path):
    index = shards.pack(masks_folder, tmp_path / "packed", shard_mb=0.01, say=quiet)
    assert index["kind"] == "masks" and len(index["splits"]["train"]) > 1
    splits = ("train", "val")
    for val_fraction in (0.0, 0.25):  # the val folder; or val held out of train, as the folder splits it
        kw = {"data.val_fraction": val_fraction, "task": "segmentation"}
        if val_fraction:
            shutil.move(masks_folder / "val", tmp_path / "val-aside")
            shutil.rmtree(tmp_path / "packed")
            shards.pack(masks_folder, tmp_path / "packed", shard_mb=0.01, say=quiet)
        (masks_folder / "classes.txt").rename(tmp_path / "classes-aside")  # the pack holds the class names itself
        b = build_data(data_cfg(tmp_path / "packed", "shards", **kw), seed=0, splits=splits, log=quiet)
        (tmp_path / "classes-aside").rename(masks_folder / "classes.txt")
        a = build_data(data_cfg(masks_folder, "masks", **kw), seed=0, splits=splits, log=quiet)
        assert (a.classes, a.train_counts, a.mean, a.std) == (b.classes, b.train_counts, b.mean, b.std)
        for split in splits:
            da, db = a.datasets[split], b.datasets[split]
            assert len(da) == len(db) > 0
            for i in range(len(da)):
                assert da.load(i).equal(db.load(i)) and da.load_mask(i).equal(db.load_mask(i))
                xa, ya = da[i]
                xb, yb = db[i]
                assert xa.equal(xb) and ya.equal(yb)  # the same augmentation of both, seeded by (seed, epoch, index)
        assert data_fingerprint(a.datasets["train"], a.classes) == data_fingerprint(b.datasets["train"], b.classes)


def test_a_bad_mask_is_named_when_packed_and_a_bad_value_when_training_starts(masks_folder, tmp_path):
    import numpy as np
    from PIL import Image

    mask = sorted((masks_folder / "train" / "masks").iterdir())[3]
    good = mask.read_bytes()
    Image.new("RGB", (32, 32)).save(mask)  # a colour mask: refused when packed, naming it
    with pytest.raises(DataError, match=f"mask {mask} is a colour image"):
        shards.pack(masks_folder, tmp_path / "packed", shard_mb=0.01, say=quiet)
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(mask)  # a value no class has: found at the start
    shards.pack(masks_folder, tmp_path / "packed", shard_mb=0.01, say=quiet)  # resumes the pack cut short
    cfg = data_cfg(tmp_path / "packed", "shards", task="segmentation")
    with pytest.raises(DataError, match=r"mask train/masks/\S+ \(in the shards at .*packed\) has value 9"):
        build_data(cfg, seed=0, splits=("train", "val"), log=quiet)
    mask.write_bytes(good)


def test_a_task_that_wants_labels_is_refused_on_packed_masks(masks_folder, tmp_path):
    from trainer.errors import ConfigError

    shards.pack(masks_folder, tmp_path / "packed", shard_mb=0.01, say=quiet)
    with pytest.raises(ConfigError, match="task=multiclass trains on labels .*holds masks"):
        data_cfg(tmp_path / "packed", "shards", task="multiclass")


@pytest.mark.slow
def test_segmentation_from_shards_trains_as_from_the_masks_folder(masks_folder, tmp_path):
    """Same seed: bitwise the same weights and metrics rows (mIoU included), with DataLoader workers."""
    assert run_cli("pack", str(masks_folder), str(tmp_path / "packed"), "--shard-mb", "0.01").returncode == 0
    common = ["task=segmentation", "data.image_size=32", "model.name=unet", "train.epochs=2", "train.batch_size=4",
              "data.num_workers=2", "train.progress_bar=false", "optim.name=adamw", "optim.lr=0.003"]
    for fmt, root in (("masks", masks_folder), ("shards", tmp_path / "packed")):
        res = run_cli("train", "-", f"data.format={fmt}", f"data.root={root}", f"run.dir={tmp_path / fmt}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(tmp_path / "masks", tmp_path / "shards")
    ev = run_cli("eval", "--model", str(tmp_path / "shards"), "--output", str(tmp_path / "eval.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]  # trainer eval reads the run's packed masks too
    final = [json.loads(line) for line in (tmp_path / "shards" / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads((tmp_path / "eval.json").read_text())["miou"] == final["miou"]


# ---- detection: a COCO folder packed ----

@pytest.fixture
def coco_folder(tmp_path):
    return generated(tmp_path, "detection", 64, {"train": 3, "val": 1})


def test_a_coco_folder_packs_into_shards_that_give_its_images_boxes_and_fingerprint(coco_folder, tmp_path):
    index = shards.pack(coco_folder, tmp_path / "packed", shard_mb=0.02, say=quiet)
    assert index["kind"] == "coco" and len(index["splits"]["train"]) > 1
    assert (tmp_path / "packed" / "train-annotations.json").read_bytes() == \
        (coco_folder / "train" / "annotations.json").read_bytes()  # the annotation file as it was
    kw = {"task": "detection", "data.image_size": 64}
    a = build_data(data_cfg(coco_folder, "coco", **kw), seed=0, splits=("train", "val"), log=quiet)
    shutil.move(coco_folder, tmp_path / "aside")  # the shards alone
    b = build_data(data_cfg(tmp_path / "packed", "shards", **kw), seed=0, splits=("train", "val"), log=quiet)
    for i in range(len(b.datasets["train"])):
        b.datasets["train"][i]  # every image read from the shards, the folder out of the way
    shutil.move(tmp_path / "aside", coco_folder)
    assert (a.classes, a.train_counts, a.category_ids) == (b.classes, b.train_counts, b.category_ids)
    for split in ("train", "val"):
        da, db = a.datasets[split], b.datasets[split]
        assert len(da) == len(db) > 0
        for key in ("widths", "heights", "image_ids", "boxes", "labels", "iscrowd", "file_xywh", "starts"):
            assert getattr(da.split, key).tolist() == getattr(db.split, key).tolist(), key
        for i in range(len(da)):
            assert da.load(i).equal(db.load(i))
            (xa, ta), (xb, tb) = da[i], db[i]  # the same augmentation of both, seeded by (seed, epoch, index)
            assert xa.equal(xb) and ta["boxes"].equal(tb["boxes"]) and ta["labels"].equal(tb["labels"])
    assert data_fingerprint(a.datasets["train"], a.classes) == data_fingerprint(b.datasets["train"], b.classes)


def test_a_coco_pack_notices_changed_annotations_and_names_a_missing_annotation_file(coco_folder, tmp_path):
    shards.pack(coco_folder, tmp_path / "packed", shard_mb=0.02, say=quiet)
    ann = coco_folder / "train" / "annotations.json"
    data = json.loads(ann.read_text())
    data["annotations"] = data["annotations"][1:]
    ann.write_text(json.dumps(data))  # same images, one box fewer: another dataset
    with pytest.raises(DataError, match="already holds a packed dataset of other files"):
        shards.pack(coco_folder, tmp_path / "packed", shard_mb=0.02, say=quiet)
    with pytest.raises(DataError, match="--skip-bad-images cannot leave images of a COCO folder out"):
        shards.pack(coco_folder, tmp_path / "other", skip_bad=True, say=quiet)
    (tmp_path / "packed" / "val-annotations.json").unlink()
    with pytest.raises(DataError, match="val-annotations.json is missing"):
        build_data(data_cfg(tmp_path / "packed", "shards", task="detection"), seed=0, splits=("train", "val"),
                   log=quiet)


@pytest.mark.slow
def test_detection_from_shards_trains_as_from_the_coco_folder(coco_folder, tmp_path):
    """Same seed: bitwise the same weights and metrics rows (mAP included), and trainer eval reads the shards."""
    assert run_cli("pack", str(coco_folder), str(tmp_path / "packed"), "--shard-mb", "0.02").returncode == 0
    common = ["task=detection", "data.image_size=64", "model.name=retinanet_small", "train.epochs=2",
              "train.batch_size=4", "data.num_workers=2", "train.progress_bar=false", "optim.name=adamw",
              "optim.lr=0.002"]
    for fmt, root in (("coco", coco_folder), ("shards", tmp_path / "packed")):
        res = run_cli("train", "-", f"data.format={fmt}", f"data.root={root}", f"run.dir={tmp_path / fmt}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(tmp_path / "coco", tmp_path / "shards")
    ev = run_cli("eval", "--model", str(tmp_path / "shards"), "--output", str(tmp_path / "eval.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    final = [json.loads(line) for line in (tmp_path / "shards" / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads((tmp_path / "eval.json").read_text())["map"] == final["map"]


@pytest.mark.parametrize("kind", ["classes", "masks", "coco", "multilabel"])
@pytest.mark.parametrize("damage", ["overwritten", "cut short"])
def test_an_image_damaged_in_its_shard_after_the_start_is_one_line_naming_it_and_the_shards(
        kind, damage, folder, masks_folder, coco_folder, multilabel_folder, tmp_path):
    """The pack was whole when training started (build_data checked it); a shard changed since is found when a
    sample is read: one DataError naming the image's path in the packed folder and the shards, not a PIL error."""
    src, kw = {"classes": (folder, {}), "masks": (masks_folder, {"task": "segmentation", "data.image_size": 32}),
               "coco": (coco_folder, {"task": "detection", "data.image_size": 64}),
               "multilabel": (multilabel_folder, {"task": "multilabel"})}[kind]
    dest = tmp_path / "packed"
    shards.pack(src, dest, shard_mb=1, say=quiet)
    ds = build_data(data_cfg(dest, "shards", **kw), seed=0, splits=("train",), log=quiet).datasets["train"]
    i = len(ds) - 1
    row = int(ds.rows[i])
    pack = ds.shards
    shard = dest / pack.files[int(pack.shard[row])]
    start, length = int(pack.offset[row]), int(pack.length[row])
    with shard.open("r+b") as fh:
        if damage == "overwritten":
            fh.seek(start)
            fh.write(b"\0" * length)  # the same size: only decoding finds it
        else:
            fh.truncate(start + length // 2)
    with pytest.raises(DataError, match=rf"^cannot read image {re.escape(ds.paths[i])} \(in the shards at "
                                        rf"{re.escape(str(dest))}\): "):
        ds[i]


# ---- multi-label: a CSV folder packed ----

@pytest.fixture
def multilabel_folder(tmp_path):
    root = generated(tmp_path, "multilabel", 16, {"train": 6, "val": 2, "test": 2})
    train = (root / "train.csv").read_text().splitlines()
    image = train[2].split(",")[0]
    train[2] = f"{image},"  # an image with no label (every class negative): a row of no class indices
    (root / "train.csv").write_text("\n".join(train) + "\n")
    return root


def ml_cfg(root: Path, fmt: str, **kw):
    return data_cfg(root, fmt, task="multilabel", **kw)


def test_a_multilabel_folder_packs_into_shards_that_give_its_images_targets_and_fingerprint(multilabel_folder,
                                                                                            tmp_path):
    index = shards.pack(multilabel_folder, tmp_path / "packed", shard_mb=0.004, say=quiet)
    assert index["kind"] == "multilabel" and len(index["splits"]["train"]) > 1 and set(index["splits"]) == \
        {"train", "val", "test"}
    splits = ("train", "val", "test")
    a = build_data(ml_cfg(multilabel_folder, "multilabel"), seed=0, splits=splits, log=quiet)
    shutil.move(multilabel_folder, tmp_path / "aside")  # the shards alone: no CSV, no image file
    b = build_data(ml_cfg(tmp_path / "packed", "shards"), seed=0, splits=splits, log=quiet)
    for split in splits:
        for i in range(len(b.datasets[split])):
            b.datasets[split][i]  # every image read from the shards, the folder out of the way
    shutil.move(tmp_path / "aside", multilabel_folder)
    assert (a.classes, a.train_counts, a.mean, a.std) == (b.classes, b.train_counts, b.mean, b.std)
    for split in splits:
        da, db = a.datasets[split], b.datasets[split]
        assert da.labels.dtype == db.labels.dtype and da.labels.tolist() == db.labels.tolist()
        for i in range(len(da)):
            assert da.load(i).equal(db.load(i))
            (xa, ya), (xb, yb) = da[i], db[i]  # the same augmentation, seeded by (seed, epoch, index)
            assert xa.equal(xb) and ya.tolist() == yb.tolist()
    assert a.datasets["train"].labels[1].sum() == 0  # the row with no label stayed one
    assert data_fingerprint(a.datasets["train"], a.classes) == data_fingerprint(b.datasets["train"], b.classes)
    # scoring one split (trainer eval): the model's statistics, and no training split needed
    c = build_data(ml_cfg(tmp_path / "packed", "shards", **{"data.mean": a.mean, "data.std": a.std}), seed=0,
                   splits=("test",), log=quiet)
    assert c.datasets["test"].labels.tolist() == a.datasets["test"].labels.tolist()


def test_a_cut_short_multilabel_pack_resumes_and_another_label_set_writes_its_shard_again(multilabel_folder,
                                                                                          tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    shards.pack(multilabel_folder, whole, shard_mb=0.004, say=quiet)
    real, written = shards._write_shard, []

    def dies_after_two(out, target, *a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(target.name)
        return real(out, target, *a, **k)

    monkeypatch.setattr(shards, "_write_shard", dies_after_two)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        shards.pack(multilabel_folder, cut, shard_mb=0.004, say=quiet)
    monkeypatch.setattr(shards, "_write_shard", real)
    kept = {name: (cut / name).stat().st_mtime_ns for name in written}
    shards.pack(multilabel_folder, cut, shard_mb=0.004, say=quiet)
    assert {name: (cut / name).stat().st_mtime_ns for name in written} == kept
    assert digests(cut) == digests(whole)
    # the same files with another label set: the listing differs, so an unfinished pack rewrites that shard
    (cut / "index.json").unlink()
    (cut / "rows.arrow").unlink()
    train = (multilabel_folder / "train.csv").read_text().splitlines()
    train[1] = train[1].split(",")[0] + ",circle"
    (multilabel_folder / "train.csv").write_text("\n".join(train) + "\n")
    shards.pack(multilabel_folder, cut, shard_mb=0.004, say=quiet)
    assert (cut / "train-00000.arrow").stat().st_mtime_ns != kept["train-00000.arrow"]
    data = build_data(ml_cfg(cut, "shards"), seed=0, splits=("train",), log=quiet)
    assert data.datasets["train"].labels[0].tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("defect, message", [
    ("unknown val label", r"val.csv line 2: label 'zebra' is not a class of .*classes.txt"),
    ("missing image", r"val.csv line 3: image .* not found"),
    ("class without image", r"class 'star' has no positive image in .*train.csv"),
])
def test_a_multilabel_folder_is_checked_when_packed_as_when_training_and_nothing_is_written(
        multilabel_folder, tmp_path, defect, message):
    val = multilabel_folder / "val.csv"
    if defect == "unknown val label":
        lines = val.read_text().splitlines()
        lines[1] = lines[1].split(",")[0] + ",circle zebra"
        val.write_text("\n".join(lines) + "\n")
    elif defect == "missing image":
        (multilabel_folder / val.read_text().splitlines()[2].split(",")[0]).unlink()
    else:
        with (multilabel_folder / "classes.txt").open("a") as fh:
            fh.write("star\n")
    with pytest.raises(DataError, match=message):
        build_data(ml_cfg(multilabel_folder, "multilabel"), seed=0, log=quiet)
    with pytest.raises(DataError, match=message):
        shards.pack(multilabel_folder, tmp_path / "packed", shard_mb=0.004, say=quiet)
    assert not (tmp_path / "packed").exists()


def test_an_unreadable_multilabel_image_is_named_when_packed_and_skipped_as_the_folder_skips_it(multilabel_folder,
                                                                                               tmp_path):
    name = (multilabel_folder / "train.csv").read_text().splitlines()[4].split(",")[0]
    bad = multilabel_folder / name
    bad.write_bytes(bad.read_bytes()[:60])  # cut short
    with pytest.raises(DataError, match=f"cannot read image {re.escape(str(bad))}: .*--skip-bad-images"):
        shards.pack(multilabel_folder, tmp_path / "a", shard_mb=0.004, say=quiet)
    index = shards.pack(multilabel_folder, tmp_path / "b", shard_mb=0.004, skip_bad=True, say=quiet)
    assert [path for path, _ in index["skipped"]] == [name]
    kw = {"data.skip_bad_images": "true", "data.verify_images": "full"}
    a = build_data(ml_cfg(multilabel_folder, "multilabel", **kw), seed=0, log=quiet)
    b = build_data(ml_cfg(tmp_path / "b", "shards"), seed=0, log=quiet)
    assert len(b.datasets["train"]) == len(a.datasets["train"]) == 4 * 6 - 1
    assert b.datasets["train"].labels.tolist() == a.datasets["train"].labels.tolist()
    assert (a.train_counts, a.mean, a.std) == (b.train_counts, b.mean, b.std)


def test_skipping_every_image_of_a_multilabel_class_is_refused_when_packed(tmp_path):
    from tests.conftest import write_image

    root = tmp_path / "ml"
    for i in range(4):
        write_image(root / f"img/t{i}.png", seed=i)
        write_image(root / f"img/v{i}.png", seed=10 + i)
    (root / "train.csv").write_text("image,labels\nimg/t0.png,cat\nimg/t1.png,cat dog\nimg/t2.png,cat\n"
                                    "img/t3.png,cat\n")
    (root / "val.csv").write_text("image,labels\nimg/v0.png,dog\n")
    (root / "img/t1.png").write_bytes(b"not an image")  # dog's only training image
    with pytest.raises(DataError, match=re.escape("class 'dog' has no readable training image left: "
                                                  "--skip-bad-images dropped all 1 of its files, e.g. img/t1.png")):
        shards.pack(root, tmp_path / "packed", shard_mb=1, skip_bad=True, say=quiet)
    assert not (tmp_path / "packed" / "index.json").exists()


def test_packs_of_the_other_kinds_hold_no_label_sets(folder, tmp_path):
    import pyarrow.ipc

    shards.pack(folder, tmp_path / "packed", shard_mb=1, say=quiet)
    for name in ("rows.arrow", "train-00000.arrow"):
        with pyarrow.OSFile(str(tmp_path / "packed" / name)) as source:
            assert "labels" not in pyarrow.ipc.open_file(source).schema.names


@pytest.mark.slow
def test_multilabel_from_shards_trains_evaluates_and_predicts_as_from_the_csv_folder(multilabel_folder, tmp_path):
    """Same seed: bitwise the same weights and metrics rows (mAP included), with DataLoader workers; trainer eval
    reads the shards and scores them as the folder; the model predicts."""
    assert run_cli("pack", str(multilabel_folder), str(tmp_path / "packed"), "--shard-mb", "0.004").returncode == 0
    common = ["task=multilabel", "data.image_size=16", "model.name=small_cnn", "train.epochs=2",
              "train.batch_size=8", "data.num_workers=2", "train.progress_bar=false"]
    runs = tmp_path / "runs"  # not in the generated folder's tmp_path / "multilabel"
    for fmt, root in (("multilabel", multilabel_folder), ("shards", tmp_path / "packed")):
        res = run_cli("train", "-", f"data.format={fmt}", f"data.root={root}", f"run.dir={runs / fmt}", *common)
        assert res.returncode == 0, res.stderr[-3000:]
    assert_same_run(tmp_path / "runs" / "multilabel", tmp_path / "runs" / "shards")
    scores = {}
    for fmt in ("multilabel", "shards"):
        out = tmp_path / f"eval-{fmt}.json"
        ev = run_cli("eval", "--model", str(tmp_path / "runs" / fmt), "--output", str(out), "eval.split=test")
        assert ev.returncode == 0, ev.stderr[-2000:]
        scores[fmt] = {k: v for k, v in json.loads(out.read_text()).items() if k not in ("model", "data")}
    assert scores["multilabel"] == scores["shards"] and "map" in scores["shards"]  # all but which model, which data
    pred = run_cli("predict", "--model", str(tmp_path / "runs" / "shards"), str(multilabel_folder / "test"), "--output",
                   str(tmp_path / "preds.csv"))
    assert pred.returncode == 0, pred.stderr[-2000:]
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 4 * 2


def test_a_multilabel_folder_with_its_own_columns_packs_with_data_csv_overrides(multilabel_folder, tmp_path):
    for name in ("train.csv", "val.csv", "test.csv"):
        path = multilabel_folder / name
        lines = path.read_text().splitlines()
        path.write_text("\n".join(["file,tags"] + [line.replace(" ", ";") for line in lines[1:]]) + "\n")
    keys = {"data.csv.image_column": "file", "data.csv.labels_column": "tags", "data.csv.separator": ";"}
    res = run_cli("pack", str(multilabel_folder), str(tmp_path / "packed"), *[f"{k}={v}" for k, v in keys.items()],
                  "--shard-mb", "0.004")  # (argparse takes the positional overrides before an option)
    assert res.returncode == 0, res.stderr[-2000:]
    a = build_data(ml_cfg(multilabel_folder, "multilabel", **keys), seed=0, splits=("train", "val"), log=quiet)
    b = build_data(ml_cfg(tmp_path / "packed", "shards"), seed=0, splits=("train", "val"), log=quiet)
    for split in ("train", "val"):
        assert a.datasets[split].labels.tolist() == b.datasets[split].labels.tolist()
    assert a.datasets["train"].labels.sum(1).max() > 1  # the separator was read: several labels in a row


# ---- --max-side: images stored pre-shrunk ----

def _photo(path: Path, width: int, height: int, orientation: int = 1) -> None:
    """A JPEG whose left half is red and right half blue as stored (an EXIF turn moves them), optionally
    tagged with an EXIF Orientation as phone cameras store photos."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, :width // 2, 0] = 255
    pixels[:, width // 2:, 2] = 255
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95, exif=exif)


@pytest.fixture
def photo_folder(tmp_path):
    root = tmp_path / "photos"
    make_folder(root / "train", ("cat", "dog"), 3, ext=".png", size=(24, 20))  # within --max-side: kept as is
    _photo(root / "train" / "cat" / "wide.jpg", 200, 100)
    _photo(root / "train" / "dog" / "turned.jpg", 120, 60, orientation=6)  # upright: 60 wide, 120 high
    return root


def test_max_side_stores_large_images_shrunk_upright_and_small_ones_byte_for_byte(photo_folder, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from trainer.data.folders import decode_bytes, load_rgb

    index = shards.pack(photo_folder, tmp_path / "packed", say=quiet, max_side=64)
    assert index["shrink"] == {"max_side": 64, "quality": 90}
    pack = shards.read_packed(tmp_path / "packed")
    stored = {pack.paths[row]: pack.shards.image_bytes(row) for row, _ in pack.found["train"]}
    for name in ("cat/0.png", "cat/2.png", "dog/1.png"):
        assert stored[f"train/{name}"] == (photo_folder / "train" / name).read_bytes()
    with Image.open(io.BytesIO(stored["train/cat/wide.jpg"])) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 32))  # longer side 64, aspect 2:1
    turned = stored["train/dog/turned.jpg"]
    with Image.open(io.BytesIO(turned)) as img:
        assert img.size == (32, 64) and img.getexif().get(0x0112, 1) == 1  # stored upright, no tag to apply
    upright = np.asarray(load_rgb(photo_folder / "train" / "dog" / "turned.jpg").resize((32, 64)), dtype=float)
    shrunk = decode_bytes(turned).permute(1, 2, 0).numpy().astype(float)
    assert np.abs(shrunk - upright).mean() < 8  # the upright picture, JPEG's loss aside (values 0-255)
    b = build_data(data_cfg(tmp_path / "packed", "shards"), seed=0, splits=("train",), log=quiet)
    assert b.datasets["train"][0][0].shape == (3, 16, 16)


def test_a_pack_shrunk_with_other_flags_is_not_resumed_nor_redone(photo_folder, tmp_path, monkeypatch):
    real = shards._write_shard

    def dies(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shards, "_write_shard", dies)
    dest = tmp_path / "packed"
    with pytest.raises(KeyboardInterrupt):
        shards.pack(photo_folder, dest, say=quiet, max_side=64)
    monkeypatch.setattr(shards, "_write_shard", real)
    with pytest.raises(DataError, match=r"cut short that was made with --max-side 64 --quality 90, not no "
                                        r"--max-side: run it again with the same flags"):
        shards.pack(photo_folder, dest, say=quiet)
    with pytest.raises(DataError, match="made with --max-side 64 --quality 90, not --max-side 64 --quality 80"):
        shards.pack(photo_folder, dest, say=quiet, max_side=64, quality=80)
    notes = []
    shards.pack(photo_folder, dest, say=notes.append, max_side=64)  # the same flags: it resumes
    assert any("resuming" in n for n in notes) and (dest / "index.json").is_file()
    with pytest.raises(DataError, match="already holds these files packed with --max-side 64 --quality 90, not "
                                        "--max-side 32"):
        shards.pack(photo_folder, dest, say=quiet, max_side=32)
    notes = []
    shards.pack(photo_folder, dest, say=notes.append, max_side=64)
    assert "nothing to do" in notes[-1]


def test_quality_without_max_side_is_refused(photo_folder, tmp_path):
    with pytest.raises(DataError, match="give --max-side too"):
        shards.pack(photo_folder, tmp_path / "packed", say=quiet, quality=80)
    assert not (tmp_path / "packed").exists() or not any((tmp_path / "packed").glob("*.arrow"))


# a bright box (x0, y0, x1, y1: pixel edges) in a 120x80 stored picture, and in its mask
BOX = (12, 8, 36, 24)


def _boxed_pair(root: Path, name: str, size, orientation: int = 1) -> None:
    """A JPEG that is black but for a white BOX, optionally tagged with an EXIF orientation, and its palette
    mask: class 1 on the box, 0 elsewhere, the ignore index 255 on the box's outer ring of pixels; drawn on the
    stored pixels, as masks are."""
    import numpy as np
    from PIL import Image

    width, height = size
    x0, y0, x1, y1 = BOX
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[y0:y1, x0:x1] = 255
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0 - 1:y1 + 1, x0 - 1:x1 + 1] = 255
    mask[y0:y1, x0:x1] = 1
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    for sub in ("images", "masks"):
        (root / "train" / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / "train" / "images" / f"{name}.jpg", quality=95, exif=exif)
    indices = Image.fromarray(mask)
    indices.putpalette([0, 0, 0, 200, 30, 30] + [0, 0, 0] * 253 + [255, 255, 255])  # VOC-like: 255 white
    indices.save(root / "train" / "masks" / f"{name}.png")


def _extent(where) -> tuple:
    """(x0, y0, x1, y1) pixel edges of the True pixels of an (H, W) array."""
    import numpy as np

    ys, xs = np.nonzero(np.asarray(where))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_a_masks_folder_packs_shrunk_with_its_masks_resized_nearest_to_the_upright_image(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    root = tmp_path / "seg"
    _boxed_pair(root, "a-wide", (120, 80))
    _boxed_pair(root, "b-turned", (120, 80), orientation=6)  # upright: 80 wide, 120 high
    _boxed_pair(root, "c-small", (48, 40))  # within --max-side: image and mask keep their bytes
    (root / "classes.txt").write_text("background\nbox\n")
    shards.pack(root, tmp_path / "packed", say=quiet, max_side=60)
    kw = {"task": "segmentation", "data.val_fraction": 0.34}
    a = build_data(data_cfg(root, "masks", **kw), seed=0, splits=("train", "val"), log=quiet)
    b = build_data(data_cfg(tmp_path / "packed", "shards", **kw), seed=0, splits=("train", "val"), log=quiet)
    seen = set()
    for split in ("train", "val"):
        da, db = a.datasets[split], b.datasets[split]
        for i in range(len(db)):
            name = Path(db.paths[i]).stem
            seen.add(name)
            image, mask = db.load(i), db.load_mask(i)
            assert tuple(image.shape[1:]) == tuple(mask.shape)
            stored, row = db.shards.mask_bytes(int(db.rows[i])), int(db.rows[i])
            if name == "c-small":
                assert db.shards.image_bytes(row) == (root / "train" / "images" / "c-small.jpg").read_bytes()
                assert stored == (root / "train" / "masks" / "c-small.png").read_bytes()
                continue
            assert tuple(image.shape[1:]) == ((40, 60) if name == "a-wide" else (60, 40))  # (H, W): longer side 60
            with Image.open(io.BytesIO(stored)) as png:  # a palette PNG still, its palette kept
                assert png.mode == "P" and png.getpalette()[3:6] == [200, 30, 30]
            # the folder's upright mask, resized NEAREST to the shrunk size: the same labels, none blended
            upright = Image.fromarray(da.load_mask(i).numpy().astype(np.uint8))
            expected = np.asarray(upright.resize((image.shape[2], image.shape[1]), Image.Resampling.NEAREST))
            assert (mask.numpy() == expected).all() and set(np.unique(expected)) == {0, 1, 255}
            # the box where the image is bright, within a pixel of where the mask says class 1
            bright = image.float().mean(0).numpy() > 127
            assert np.abs(np.subtract(_extent(bright), _extent(mask.numpy() == 1))).max() <= 1
    assert seen == {"a-wide", "b-turned", "c-small"}


@pytest.mark.parametrize("mode", ["L", "P", "1", "I;16"])
def test_a_shrunk_mask_keeps_its_mode_and_only_its_own_values(mode):
    import io

    import numpy as np
    from PIL import Image

    from trainer.data.masks import read_mask_file

    values = {"L": [0, 3, 255], "P": [0, 3, 255], "1": [0, 1], "I;16": [0, 3, 1000]}[mode]
    mask = np.array(values, dtype=np.uint16)[np.random.default_rng(0).integers(0, len(values), (30, 40))]
    img = Image.fromarray(mask.astype(bool) if mode == "1" else mask.astype(np.uint16 if mode == "I;16" else np.uint8))
    if mode == "P":
        img.putpalette([7, 8, 9] * 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    indices, how = read_mask_file(shards.PackedFile("m.png", buf.getvalue))
    shrunk = shards._shrunk_mask(indices, how, 6, (15, 20))  # turned a quarter (EXIF 6): 30 wide, 40 high
    with Image.open(io.BytesIO(shrunk)) as out:
        assert out.mode == mode and out.size == (15, 20)
        assert mode != "P" or out.getpalette()[:6] == [7, 8, 9, 7, 8, 9]
        got = np.array(out).astype(np.int64)
    upright = Image.fromarray(np.rot90(mask, -1).astype(np.int32))  # what EXIF 6 shows
    expected = np.asarray(upright.resize((15, 20), Image.Resampling.NEAREST))
    assert (got == expected).all() and set(np.unique(got)) <= set(values)


def test_a_mask_not_its_images_size_is_refused_when_packed_shrunk(tmp_path):
    from PIL import Image

    root = tmp_path / "seg"
    _boxed_pair(root, "a", (120, 80))
    (root / "classes.txt").write_text("background\nbox\n")
    mask = root / "train" / "masks" / "a.png"
    Image.new("L", (80, 120)).save(mask)
    with pytest.raises(DataError, match=f"mask {mask} is 80x120 \\(WxH\\) but its image .*a.jpg is 120x80"):
        shards.pack(root, tmp_path / "packed", say=quiet, max_side=60)


def _boxed_coco(root: Path) -> dict:
    """A COCO folder (train/annotations.json) of three JPEGs, black but for a white BOX in their upright frame
    (one of them stored turned, with EXIF orientation 6, as phones store photos), each box annotated four ways:
    bbox + polygon, compressed RLE (a crowd), uncompressed RLE, and with keypoints at two of its corners."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as coco_mask

    images, annotations = [], []
    for k, (name, (width, height), orientation) in enumerate([("a-wide.jpg", (120, 80), 1),
                                                                ("b-turned.jpg", (80, 120), 6),
                                                                ("c-small.jpg", (48, 40), 1)]):
        x0, y0, x1, y1 = BOX
        pixels = np.zeros((height, width, 3), dtype=np.uint8)
        pixels[y0:y1, x0:x1] = 255
        upright = Image.fromarray(pixels)
        exif = Image.Exif()
        if orientation == 6:  # stored a quarter turn anticlockwise; the tag says to turn it back clockwise
            exif[0x0112] = 6
            upright = upright.transpose(Image.Transpose.ROTATE_90)
        (root / "train").mkdir(parents=True, exist_ok=True)
        upright.save(root / "train" / name, quality=95, exif=exif)
        images.append({"id": k + 1, "file_name": name, "width": width, "height": height})
        inside = np.zeros((height, width), dtype=np.uint8)
        inside[y0:y1, x0:x1] = 1
        rle = coco_mask.encode(np.asfortranarray(inside))
        flat = inside.ravel(order="F")  # uncompressed RLE: run lengths down the columns, zeros first
        runs = np.diff(np.r_[0, np.flatnonzero(np.diff(flat)) + 1, flat.size]).tolist()
        bbox = [x0, y0, x1 - x0, y1 - y0]
        common = {"image_id": k + 1, "category_id": 1, "bbox": bbox, "area": float(inside.sum())}
        annotations += [
            {**common, "id": 10 * k + 1, "iscrowd": 0, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
             "keypoints": [x0, y0, 2, x1, y1, 2, 0, 0, 0], "num_keypoints": 2},
            {**common, "id": 10 * k + 2, "iscrowd": 1,
             "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")}},
            {**common, "id": 10 * k + 3, "iscrowd": 0,
             "segmentation": {"size": [height, width], "counts": ([0] if flat[0] else []) + runs}}]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "box", "keypoints": ["top-left", "bottom-right", "unused"]}]}
    (root / "train" / "annotations.json").write_text(json.dumps(coco))
    return coco


def test_a_coco_folder_packs_shrunk_with_its_boxes_masks_keypoints_and_sizes_scaled(tmp_path):
    import numpy as np
    from pycocotools import mask as coco_mask

    from trainer.data.datasets import read_image

    root = tmp_path / "coco"
    before = _boxed_coco(root)
    shards.pack(root, tmp_path / "packed", say=quiet, max_side=60)
    pack = shards.read_packed(tmp_path / "packed")
    notes = []
    coco, rows = shards.read_packed_coco(pack, "train", log=notes.append)
    assert not notes  # no "not the size the annotations state": width and height are the stored image's
    after = json.loads((tmp_path / "packed" / "train-annotations.json").read_text())
    assert [(im["width"], im["height"]) for im in after["images"]] == [(60, 40), (40, 60), (48, 40)]
    assert after["annotations"][-3:] == before["annotations"][-3:]  # c-small's: within --max-side, as they were
    assert pack.shards.image_bytes(int(rows[2])) == (root / "train" / "c-small.jpg").read_bytes()
    by_image = {}
    for ann in after["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    with pytest.raises(DataError, match="already holds these files packed with --max-side 60 --quality 90, not no "
                                        "--max-side"):  # the flags are recorded as for any pack
        shards.pack(root, tmp_path / "packed", say=quiet)
    for i in range(len(coco)):
        image = read_image(pack.shards.image_file(int(rows[i]), coco.paths[i]), True)
        assert (coco.widths[i], coco.heights[i]) == (image.shape[2], image.shape[1])  # the reader's = the decoded
        bright = _extent(image.float().mean(0).numpy() > 127)
        for box in coco.annotations(i).boxes:  # XYXY, as training reads them
            assert np.abs(np.subtract(box, bright)).max() <= 1, (coco.paths[i], box, bright)
        height, width = image.shape[1:]
        for ann in by_image[int(coco.image_ids[i])]:
            segmentation = ann["segmentation"]
            if isinstance(segmentation, list):
                rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
                assert np.abs(np.subtract(ann["keypoints"][:6:3], bright[::2])).max() <= 1  # x of both corners
                assert np.abs(np.subtract(ann["keypoints"][1:6:3], bright[1::2])).max() <= 1  # and their y
            else:
                assert segmentation["size"] == [height, width]
                rle = (segmentation if isinstance(segmentation["counts"], str)  # c-small's uncompressed one is kept
                       else coco_mask.frPyObjects(segmentation, height, width))
            assert np.abs(np.subtract(_extent(coco_mask.decode(rle)), bright)).max() <= 1
            assert ann["area"] == pytest.approx(coco_mask.area(rle), rel=0.1)


def test_a_coco_rle_not_its_images_size_is_refused_when_packed_shrunk(tmp_path):
    root = tmp_path / "coco"
    coco = _boxed_coco(root)
    coco["annotations"][1]["segmentation"]["size"] = [40, 60]
    (root / "train" / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"annotation 2: its segmentation cannot be scaled .*the RLE's size is 60x40 "
                                        r"\(WxH\), its image's 120x80"):
        shards.pack(root, tmp_path / "packed", say=quiet, max_side=60)


def test_a_shrunk_pack_trains(photo_folder, tmp_path):
    assert run_cli("pack", photo_folder, tmp_path / "packed", "--max-side", "48", "--quality", "85").returncode == 0
    res = run_cli("train", "-", "data.format=shards", f"data.root={tmp_path / 'packed'}", "data.val_fraction=0.25",
                  "data.image_size=16", "model.name=small_cnn", "train.epochs=1", "train.batch_size=4",
                  "data.num_workers=0", "train.progress_bar=false", f"run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_multilabel_folder_packs_shrunk_with_its_label_sets(multilabel_folder, tmp_path):
    import io

    from PIL import Image

    shards.pack(multilabel_folder, tmp_path / "packed", say=quiet, max_side=8)  # its images are 16 px
    b = build_data(ml_cfg(tmp_path / "packed", "shards"), seed=0, splits=("train",), log=quiet)
    a = build_data(ml_cfg(multilabel_folder, "multilabel"), seed=0, splits=("train",), log=quiet)
    assert a.datasets["train"].labels.tolist() == b.datasets["train"].labels.tolist()
    with Image.open(io.BytesIO(b.datasets["train"].file_bytes(0))) as img:
        assert (img.format, img.size) == ("JPEG", (8, 8))


def test_a_box_ending_at_its_images_border_ends_at_the_shrunk_border_not_past_it():
    """--max-side scales boxes by new/old: a box reaching the right or bottom edge used to end one float step
    past the new edge for ~1 in 10 images, and every training start then reported it as an overhang it clipped."""
    import numpy as np

    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(2000):
        width, height = int(rng.integers(321, 5000)), int(rng.integers(321, 5000))
        x, y = float(rng.integers(0, width - 1)), float(rng.integers(0, height - 1))
        images.append({"id": i, "width": width, "height": height})
        annotations.append({"id": i, "image_id": i, "bbox": [x, y, width - x, height - y], "area": 1.0})
    sizes = np.array([[im["width"], im["height"]] for im in images])
    coco = json.loads(shards._shrunk_annotations(json.dumps({"images": images, "annotations": annotations}).encode(),
                                                 sizes, 320, "annotations.json"))
    for im, ann in zip(coco["images"], coco["annotations"]):
        x, y, w, h = ann["bbox"]
        assert x + w <= im["width"] and y + h <= im["height"], (im, ann)
        assert x + w > im["width"] - 1e-6 and y + h > im["height"] - 1e-6  # still at the border


def test_a_coco_pack_that_rewrites_sizes_says_what_the_folder_would_have_said(tmp_path):
    """--max-side writes each shrunk image's stored size into the pack's annotations, so training from the pack
    can no longer see that the folder's file stated another (here the photo's unturned size, while its boxes
    are taken in the turned frame): the pack says it, as a training start from the folder does."""
    root = tmp_path / "coco"
    coco = _boxed_coco(root)
    coco["images"][1]["width"], coco["images"][1]["height"] = 120, 80  # b-turned.jpg as stored, not as shown
    (root / "train" / "annotations.json").write_text(json.dumps(coco))
    said = []
    shards.pack(root, tmp_path / "plain", say=said.append)
    assert not any("turned (shown) frame" in line for line in said)  # training from this pack says it itself
    shards.pack(root, tmp_path / "shrunk", say=said.append, max_side=60)
    assert [line for line in said if "b-turned.jpg is 80x120 (WxH), stated 120x80" in line
            and "turned (shown) frame" in line]
