"""Detection data (trainer/data/coco.py): COCO and VOC reading and checks, layouts, transforms, the generated
shapes written as COCO. CPU, tiny files in tmp_path."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data.coco import (DetectionDataset, check_same_categories, collate_detection, detection_eval_transform,
                               detection_train_transform, find_coco_splits, read_coco, read_coco_splits,
                               voc_detection_split)
from trainer.data.generated import (GENERATED_CATEGORY_IDS, SHAPES, detection_scene_rng, plan_scene, render_scene,
                                    write_generated_coco)
from trainer.data.masks import VOC_CLASSES
from trainer.errors import DataError

CATS = [{"id": 90, "name": "zebra"}, {"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]  # unsorted, with gaps


def _image(path: Path, size=(40, 30), colour=(90, 90, 90), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def _coco(folder: Path, name="annotations.json", images=None, annotations=None, categories=None,
          write_images=True) -> Path:
    """A small COCO file in folder: images 10 (a.png) and 20 (b.png), both 40x30, annotations on a only."""
    images = images if images is not None else [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                                                {"id": 20, "file_name": "b.png", "width": 40, "height": 30}]
    annotations = annotations if annotations is not None else [
        {"id": 11, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 5]},
        {"id": 12, "image_id": 10, "category_id": 90, "bbox": [20, 10, 15, 12], "iscrowd": 1, "area": 50.0},
        {"id": 13, "image_id": 10, "category_id": 1, "bbox": [0, 0, 40, 30]}]
    if write_images:
        for im in images:
            if not (folder / im["file_name"]).exists():
                _image(folder / im["file_name"])
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories if categories is not None else CATS}))
    return path


def _quiet(_msg):
    pass


# ---- reading COCO ----

def test_read_coco_maps_noncontiguous_ids_both_ways_and_keeps_empty_images(tmp_path):
    split = read_coco(_coco(tmp_path), tmp_path, log=_quiet)
    assert split.categories == [(1, "cat"), (3, "dog"), (90, "zebra")]
    assert [split.label_of(c) for c in (1, 3, 90)] == [1, 2, 3]
    assert [split.category_id_of(k) for k in (1, 2, 3)] == [1, 3, 90]
    assert split.class_names == ["cat", "dog", "zebra"] and split.num_classes == 3
    with pytest.raises(DataError, match="category id 2 "):
        split.label_of(2)
    with pytest.raises(DataError, match="label 0 "):
        split.category_id_of(0)  # 0 is background, never a category
    assert len(split) == 2 and split.paths == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert split.image_ids.tolist() == [10, 20] and split.widths.tolist() == [40, 40]
    a, b = split.annotations(0), split.annotations(1)
    assert a.ann_ids.tolist() == [11, 12, 13] and len(b.ann_ids) == 0  # b has none and is kept
    np.testing.assert_array_equal(a.boxes, [[2, 3, 12, 8], [20, 10, 35, 22], [0, 0, 40, 30]])
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64 and b.boxes.shape == (0, 4)
    assert a.labels.tolist() == [2, 3, 1] and a.iscrowd.tolist() == [False, True, False]
    assert a.area.tolist() == [50.0, 50.0, 1200.0]  # w*h when the file gives none


def test_ids_beyond_64_bits_and_crowd_flags_that_are_not_0_or_1_are_one_line_and_null_is_no_crowd(tmp_path):
    annotations = [{"id": 11, "image_id": 10, "category_id": 3, "bbox": [2, 3, 10, 5], "iscrowd": None}]
    split = read_coco(_coco(tmp_path, annotations=annotations), tmp_path, log=_quiet)
    assert split.annotations(0).iscrowd.tolist() == [False]  # some exporters write null for "not a crowd"
    for key, value in (("iscrowd", "no"), ("iscrowd", 2), ("id", 2 ** 63)):
        with pytest.raises(DataError, match=f"annotation .*{key if key != 'id' else 2 ** 63}"):
            read_coco(_coco(tmp_path, annotations=[{**annotations[0], key: value}]), tmp_path, log=_quiet)
    for bad in (2 ** 64, -2 ** 63 - 1):
        with pytest.raises(DataError, match=f"category #0 .*{bad} does not fit in 64 bits"):
            read_coco(_coco(tmp_path, categories=[{"id": bad, "name": "big"}, *CATS]), tmp_path, log=_quiet)


def _rewrite(path: Path, change) -> Path:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def _set(kind, index, key, value):
    def change(data):
        data[kind][index][key] = value
    return change


A11 = r"annotation 11 \(image 10, .*a.png\): "  # how an annotation is named: its id, its image's id and file


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("annotations"), "no 'annotations' key"),
    (lambda d: d.pop("categories"), "no 'categories' key"),
    (_set("annotations", 1, "image_id", 99), "annotation 12: image_id 99 is not among the 2 images"),
    (_set("annotations", 0, "category_id", 4), A11 + "category_id 4 is not among"),
    (_set("annotations", 0, "bbox", [2, 3, 0, 5]), A11 + "box .* zero or negative"),
    (_set("annotations", 2, "bbox", [2, 3, 4, -1]), r"annotation 13 \(image 10, .*a.png\): box .* zero or negative"),
    # 8 px past the right edge of a 40 px image: over max(5% x 40, 2) = 2 px
    (_set("annotations", 0, "bbox", [30, 3, 18, 5]), A11 + "box .* 8 px beyond the right edge .*tolerance 2 px"),
    (_set("annotations", 0, "bbox", [2, -4, 5, 5]), A11 + "box .* 4 px beyond the top edge"),
    (_set("annotations", 0, "bbox", [41, 3, 0.5, 5]), A11 + "box .* lies wholly outside"),  # within 2 px: clipped
    (_set("images", 1, "id", 10), "image id 10 appears 2 times"),
    (_set("categories", 2, "id", 1), "category id 1 appears 2 times"),
    (_set("images", 1, "file_name", "gone.png"), r"missing image file .*gone.png \(image id 20"),
    (_set("annotations", 1, "bbox", [1, 2, 3]), "annotation 12 needs .* bbox"),
    (_set("annotations", 2, "id", 11), "annotation id 11 appears more than once"),
])
def test_bad_coco_raises_one_line_naming_file_and_annotation(tmp_path, change, expected):
    path = _rewrite(_coco(tmp_path), change)
    with pytest.raises(DataError) as err:
        read_coco(path, tmp_path, log=_quiet)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert re.search(expected, msg), msg


def test_not_json_and_not_an_object(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    with pytest.raises(DataError, match=f"{bad} is not JSON"):
        read_coco(bad, tmp_path)
    bad.write_text("[1, 2]")
    with pytest.raises(DataError, match="top level is a list"):
        read_coco(bad, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        read_coco(tmp_path / "none.json", tmp_path)


def test_bad_count_is_reported(tmp_path):
    anns = [{"id": k, "image_id": 10, "category_id": 1, "bbox": [1, 1, 0, 1]} for k in (5, 6, 7)]
    with pytest.raises(DataError, match=r"annotation 5 .* \(and 2 more such annotation\(s\)\)"):
        read_coco(_coco(tmp_path, annotations=anns), tmp_path, log=_quiet)


def test_small_overhang_is_clipped_and_reported_once(tmp_path):
    anns = [{"id": 1, "image_id": 10, "category_id": 1, "bbox": [-1.5, 2, 10, 5]},  # 1.5 px left: within 2 px
            {"id": 2, "image_id": 10, "category_id": 1, "bbox": [35, 25, 6.9, 6]},  # 1.9 px right, 1 px below
            {"id": 3, "image_id": 10, "category_id": 1, "bbox": [5, 5, 5, 5]}]
    said = []
    split = read_coco(_coco(tmp_path, annotations=anns), tmp_path, log=said.append)
    np.testing.assert_allclose(split.annotations(0).boxes, [[0, 2, 8.5, 7], [35, 25, 40, 30], [5, 5, 10, 10]])
    assert len(said) == 1 and "2 box(es)" in said[0] and "annotation 1 " in said[0] and "clipped" in said[0]


def test_real_size_wins_over_the_stated_one_and_exif_turns_it(tmp_path):
    _image(tmp_path / "a.png", size=(40, 30))
    _image(tmp_path / "b.png", size=(50, 20))  # the file says 40x30
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x30, shown turned a quarter: 30x40
    _image(tmp_path / "c.jpg", size=(40, 30), exif=exif)
    images = [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 20, "file_name": "b.png", "width": 40, "height": 30},
              {"id": 30, "file_name": "c.jpg", "width": 40, "height": 30}]
    anns = [{"id": 1, "image_id": 30, "category_id": 1, "bbox": [1, 1, 28, 38]}]  # fits 30x40, not 40x30
    said = []
    split = read_coco(_coco(tmp_path, images=images, annotations=anns), tmp_path, log=said.append)
    assert split.widths.tolist() == [40, 50, 30] and split.heights.tolist() == [30, 20, 40]
    assert len(said) == 1 and "2 image(s)" in said[0] and "b.png is 50x20" in said[0] and "EXIF" in said[0]
    ds = DetectionDataset(split)
    image, target = ds[2]
    assert image.shape == (3, 40, 30) and target["orig_size"] == (40, 30)  # decoded turned, like the sizes
    with pytest.raises(DataError, match=r"annotation 1 \(image 30, .*c.jpg\): .* beyond the bottom edge of its 40x30"):
        read_coco(tmp_path / "annotations.json", tmp_path, log=_quiet, exif_orientation=False)  # stored frame


# ---- finding splits ----

def test_find_plain_roboflow_and_2017_layouts_and_files_override(tmp_path):
    a = tmp_path / "a"
    _coco(a / "train")
    _coco(a / "val")
    assert find_coco_splits(a, ["train", "val"]) == {"train": (a / "train" / "annotations.json", a / "train"),
                                                     "val": (a / "val" / "annotations.json", a / "val")}
    rf = tmp_path / "rf"
    _coco(rf / "train", name="_annotations.coco.json")
    _coco(rf / "valid", name="_annotations.coco.json")
    found = find_coco_splits(rf, ["train", "val"], optional=["test"])
    assert found["val"] == (rf / "valid" / "_annotations.coco.json", rf / "valid") and "test" not in found
    coco = tmp_path / "coco"
    _coco(coco / "annotations", name="instances_train2017.json", write_images=False)
    _coco(coco / "annotations", name="instances_val2017.json", write_images=False)
    for split in ("train2017", "val2017"):
        _image(coco / split / "a.png")
        _image(coco / split / "b.png")
    found = find_coco_splits(coco, ["train", "val"])
    assert found["val"] == (coco / "annotations" / "instances_val2017.json", coco / "val2017")
    splits = read_coco_splits(coco, ["train", "val"], log=_quiet)
    assert splits["val"].paths[0] == str(coco / "val2017" / "a.png")
    own = {"val": {"annotations": str(a / "val" / "annotations.json"), "images": str(a / "val")}}
    assert find_coco_splits(coco, ["train", "val"], files=own)["val"] == (a / "val" / "annotations.json", a / "val")


def test_find_errors_name_layouts_and_ambiguity(tmp_path):
    _coco(tmp_path / "train")
    with pytest.raises(DataError, match="no val split under .*instances_<split>20XX.json"):
        find_coco_splits(tmp_path, ["train", "val"])
    _coco(tmp_path / "val")
    _coco(tmp_path / "valid", name="_annotations.coco.json")
    with pytest.raises(DataError, match="2 annotation files for split val"):
        find_coco_splits(tmp_path, ["train", "val"])
    with pytest.raises(DataError, match=r"data.coco_files names split\(s\) \['tets'\]"):
        find_coco_splits(tmp_path, ["train"], files={"tets": {"annotations": "x", "images": "y"}})
    with pytest.raises(DataError, match="data.coco_files.train.annotations: .*nothing.json does not exist"):
        find_coco_splits(tmp_path, ["train"], files={"train": {"annotations": tmp_path / "nothing.json",
                                                              "images": tmp_path}})
    coco = tmp_path / "c"
    _coco(coco / "annotations", name="instances_val2017.json", write_images=False)
    with pytest.raises(DataError, match="no image folder .*val2017"):
        find_coco_splits(coco, ["val"])


def test_splits_must_share_categories(tmp_path):
    _coco(tmp_path / "train")
    _coco(tmp_path / "val", categories=[{"id": 1, "name": "cat"}, {"id": 3, "name": "wolf"},
                                        {"id": 90, "name": "zebra"}, {"id": 4, "name": "owl"}])
    with pytest.raises(DataError, match="id 3 is 'dog' in train but 'wolf' in val; ids only in val: \\[4\\]"):
        read_coco_splits(tmp_path, ["train", "val"], log=_quiet)
    same = {k: read_coco(tmp_path / "train" / "annotations.json", tmp_path / "train", log=_quiet) for k in "ab"}
    check_same_categories(same)


# ---- dataset and transforms ----

def test_crowd_boxes_never_reach_the_target(tmp_path):
    split = read_coco(_coco(tmp_path), tmp_path, log=_quiet)
    for transform in (detection_train_transform(True, None, False, 0.0), detection_eval_transform()):
        image, target = DetectionDataset(split, transform)[0]
        assert image.dtype == torch.float32 and image.shape == (3, 30, 40) and 0 <= image.min() <= image.max() <= 1
        assert target["labels"].tolist() == [2, 1] and target["boxes"].shape == (2, 4)  # the zebra crowd is gone
        assert target["image_id"] == 0 and target["orig_size"] == (30, 40)
    image, target = DetectionDataset(split)[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    images, targets = collate_detection([DetectionDataset(split)[i] for i in range(2)])
    assert isinstance(images, list) and len(images) == 2 and [t["image_id"] for t in targets] == [0, 1]


def test_a_detection_batch_crosses_from_a_worker_as_three_tensors_and_arrives_as_it_was_made(tmp_path):
    # torch gives every tensor a worker sends its own shared-memory file: per image (pixels, boxes, labels) that
    # was 3 files, and a small-image COCO folder read at a ninth of a masks folder's speed
    import pickle

    from multiprocessing.reduction import ForkingPickler  # with the tensor reducers torch registers

    split = read_coco(_coco(tmp_path), tmp_path, log=_quiet)
    ds = DetectionDataset(split, detection_train_transform(True, (0.5, 1.5), False, 0.0))  # sizes differ
    batch = collate_detection([ds[i] for i in (0, 1, 0)])  # image 1 has no box
    assert len({tuple(x.shape) for x in batch[0]}) > 1
    _, packed = batch.__reduce__()
    assert sum(isinstance(a, torch.Tensor) for a in packed) == 3  # pixels, boxes, labels
    images, targets = pickle.loads(bytes(ForkingPickler.dumps(batch)))
    assert len(images) == len(targets) == 3
    for x, y, t, u in zip(images, batch[0], targets, batch[1]):
        assert x.dtype == y.dtype and torch.equal(x, y)
        assert list(t) == list(u)  # the keys, in their order
        assert all(torch.equal(t[k], u[k]) if isinstance(u[k], torch.Tensor) else t[k] == u[k] for k in u)
    loaded = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_detection))
    inline = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate_detection))
    for (xs, ts), (ys, us) in zip(loaded, inline):
        assert all(torch.equal(x, y) for x, y in zip(xs, ys))
        assert all(torch.equal(t["boxes"], u["boxes"]) and torch.equal(t["labels"], u["labels"])
                   for t, u in zip(ts, us))


RED, BLUE, GREY = (230, 20, 20), (20, 20, 230), (60, 60, 60)


def _two_rectangles():
    """A flat grey 64x48 image with a red [10, 8, 30, 20] and a blue [40, 25, 58, 44] (XYXY) rectangle."""
    arr = np.full((48, 64, 3), GREY, dtype=np.uint8)
    arr[8:20, 10:30] = RED
    arr[25:44, 40:58] = BLUE
    return (torch.from_numpy(arr).permute(2, 0, 1).contiguous(),
            {"boxes": torch.tensor([[10, 8, 30, 20], [40, 25, 58, 44]], dtype=torch.float32),
             "labels": torch.tensor([1, 2])})


def _pixel_box(image: torch.Tensor, colour) -> np.ndarray:
    """XYXY pixel-edge box of the pixels nearer `colour` than the grey (halfway on the channel that differs)."""
    x = (image * 255).numpy()
    c = int(np.argmax(np.abs(np.array(colour) - np.array(GREY))))
    mid = (colour[c] + GREY[c]) / 2
    ys, xs = np.nonzero(x[c] > mid)
    return None if len(xs) == 0 else np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def test_boxes_stay_on_their_objects_through_the_training_transform():
    image, target = _two_rectangles()
    transform = detection_train_transform(hflip=True, scale_jitter=(0.6, 1.7), iou_crop=True, color_jitter=0.0)
    kept, sizes, flipped = 0, set(), 0
    for seed in range(40):
        torch.manual_seed(seed)
        x, t = transform(image, target)
        assert x.dtype == torch.float32 and t["boxes"].dtype == torch.float32 and len(t["boxes"]) == len(t["labels"])
        sizes.add(tuple(x.shape))
        h, w = x.shape[-2:]
        for box, label in zip(t["boxes"], t["labels"]):
            assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
            seen = _pixel_box(x, RED if label == 1 else BLUE)
            assert seen is not None, f"seed {seed}: a box for label {int(label)} with none of its pixels"
            np.testing.assert_allclose(box.numpy(), seen, atol=1.5, err_msg=f"seed {seed}, label {int(label)}")
            kept += 1
            flipped += int(label == 1 and seen[0] > w / 2)  # the red one starts on the left
    assert kept >= 40 and len(sizes) > 10 and flipped > 0  # boxes mostly kept; scales and flips varied


def test_colour_jitter_touches_the_image_only_and_empty_targets_survive():
    image, target = _two_rectangles()
    transform = detection_train_transform(hflip=True, scale_jitter=(0.5, 1.5), iou_crop=True, color_jitter=0.4)
    torch.manual_seed(0)
    x, t = transform(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)})
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and x.dtype == torch.float32
    # boxes cropped away entirely: an image with zero boxes, not a crash
    gone = {"boxes": torch.tensor([[0.0, 0.0, 0.4, 0.4]]), "labels": torch.tensor([1])}
    x, t = detection_train_transform(False, None, False, 0.0)(image, gone)
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    x, t = detection_eval_transform()(image, target)
    assert torch.equal(t["boxes"], target["boxes"]) and x.shape == (3, 48, 64)
    assert torch.allclose(x, image.float() / 255)


def test_augmentation_is_a_pure_function_of_seed_epoch_index(tmp_path):
    write_generated_coco(tmp_path, 32, seed=3, counts={"train": 3})
    split = read_coco(tmp_path / "train" / "annotations.json", tmp_path / "train", log=_quiet)
    transform = detection_train_transform(True, (0.5, 1.5), True, 0.3)

    def item(ds, epoch, index):
        ds.set_epoch(epoch)
        torch.manual_seed(1234 + epoch)  # the global RNG must not matter, nor be moved
        state = torch.get_rng_state()
        out = ds[index]
        assert torch.equal(torch.get_rng_state(), state)
        return out

    a, b = DetectionDataset(split, transform, seed=7), DetectionDataset(split, transform, seed=7)
    for index in range(3):
        (xa, ta), (xb, tb) = item(a, 2, index), item(b, 2, index)
        assert torch.equal(xa, xb) and torch.equal(ta["boxes"], tb["boxes"]) and ta["image_id"] == index
    epochs = [item(a, e, 0) for e in range(4)]
    assert any(x.shape != epochs[0][0].shape or not torch.equal(x, epochs[0][0]) for x, _ in epochs[1:])


# ---- the generated set ----

def test_generated_set_is_deterministic_with_tight_boxes(tmp_path):
    counts = {"train": 6, "val": 2}
    write_generated_coco(tmp_path / "a", 48, seed=5, counts=counts)
    write_generated_coco(tmp_path / "b", 48, seed=5, counts=counts)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 6 + 2 + 2
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    write_generated_coco(tmp_path / "c", 48, seed=6, counts={"train": 1})
    assert (tmp_path / "c/train/00000.png").read_bytes() != (tmp_path / "a/train/00000.png").read_bytes()

    data = json.loads((tmp_path / "a/train/annotations.json").read_text())
    assert [c["id"] for c in data["categories"]] == [GENERATED_CATEGORY_IDS[s] for s in SHAPES]
    checked = 0
    for i in range(counts["train"]):
        boxes = [a for a in data["annotations"] if a["image_id"] == i + 1]
        for a in boxes:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 48 and y + h <= 48
        # the segmentation mask of the same scene marks each kind's pixels: where a kind occurs once in the
        # image, its box is the tight box of that class (within 1 px: two shapes' tie votes may differ)
        plan = plan_scene(48, detection_scene_rng(5, "train", i))
        image, mask = render_scene(plan, 48)
        assert np.asarray(image).tobytes() == np.asarray(Image.open(tmp_path / f"a/train/{i:05d}.png")).tobytes()
        mask = np.asarray(mask)
        kinds = [s.kind for s in plan.shapes]
        for a in boxes:
            kind = next(k for k, cid in GENERATED_CATEGORY_IDS.items() if cid == a["category_id"])
            if kinds.count(kind) != 1:
                continue
            ys, xs = np.nonzero(mask == SHAPES.index(kind) + 1)
            x, y, w, h = a["bbox"]
            np.testing.assert_allclose([x, y, x + w, y + h], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1)
            checked += 1
    assert checked >= 4


def test_read_coco_round_trips_the_generated_folder(tmp_path):
    write_generated_coco(tmp_path, 40, seed=1, counts={"train": 5, "val": 3})
    said = []
    splits = read_coco_splits(tmp_path, ["train", "val"], log=said.append)
    assert said == []  # nothing clipped, every size as stated
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 3}
    data = json.loads((tmp_path / "train/annotations.json").read_text())
    split = splits["train"]
    assert split.categories == [(GENERATED_CATEGORY_IDS[s], s) for s in SHAPES]
    assert split.image_ids.tolist() == [1, 2, 3, 4, 5]
    rows = {a["id"]: a for a in data["annotations"]}
    assert sorted(split.ann_ids.tolist()) == sorted(rows)
    for k, ann_id in enumerate(split.ann_ids.tolist()):
        x, y, w, h = rows[ann_id]["bbox"]
        assert split.boxes[k].tolist() == [x, y, x + w, y + h]
        assert split.category_id_of(int(split.labels[k])) == rows[ann_id]["category_id"]
    image, target = DetectionDataset(split)[0]
    assert image.shape == (3, 40, 40) and len(target["boxes"]) == split.starts[1] - split.starts[0]


def test_ground_truth_dict_scores_its_own_boxes_perfectly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    write_generated_coco(tmp_path, 48, seed=2, counts={"val": 6})
    split = read_coco(tmp_path / "val/annotations.json", tmp_path / "val", log=_quiet)
    gt = split.to_coco_gt()
    assert [im["id"] for im in gt["images"]] == list(range(6))  # the targets' image_id
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(split.boxes) + 1))
    assert {a["category_id"] for a in gt["annotations"]} <= set(GENERATED_CATEGORY_IDS.values())
    coco_gt = COCO()
    coco_gt.dataset = {"info": {}, **gt}
    coco_gt.createIndex()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]]
    ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="bbox")
    ev.evaluate()
    ev.accumulate()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # [iou, recall, class] at area all, 100 detections
    assert np.allclose(precision[precision > -1], 1.0)


# ---- Pascal VOC ----

def _voc_xml(objects, size=(40, 30)) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin>"
                   f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                   for n, d, b in objects)
    return (f"<annotation><filename>x.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


def test_voc_detection_split(tmp_path):
    with pytest.raises(DataError, match="Pascal VOC 2012 not found: looked for .*VOCdevkit/VOC2012.*download"):
        voc_detection_split(tmp_path, "2012", "train")
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000002\n")
    _image(voc / "JPEGImages" / "2008_000001.jpg")
    _image(voc / "JPEGImages" / "2008_000002.jpg")
    (voc / "Annotations" / "2008_000001.xml").write_text(
        _voc_xml([("dog", 0, (5, 6, 20, 25)), ("person", 1, (1, 1, 10, 10))]))
    (voc / "Annotations" / "2008_000002.xml").write_text(_voc_xml([]))
    split = voc_detection_split(tmp_path, "2012", "train", log=_quiet)
    assert split.categories == [(k, name) for k, name in enumerate(VOC_CLASSES) if k > 0]
    assert split.image_ids.tolist() == [2008000001, 2008000002]
    a = split.annotations(0)
    np.testing.assert_array_equal(a.boxes, [[4, 5, 20, 25], [0, 0, 10, 10]])  # 1-based inclusive -> edges
    assert a.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]
    assert a.iscrowd.tolist() == [False, True]  # difficult: ignored, as a crowd box
    assert len(split.annotations(1).boxes) == 0
    _, target = DetectionDataset(split)[0]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog")]
    (voc / "Annotations" / "2008_000002.xml").write_text(_voc_xml([("unicorn", 0, (1, 1, 5, 5))]))
    with pytest.raises(DataError, match="2008_000002.xml: object #0 is a 'unicorn'"):
        voc_detection_split(tmp_path, "2012", "train", log=_quiet)
    (voc / "Annotations" / "2008_000002.xml").write_text(_voc_xml([("cat", 0, (1, 1, 80, 5))]))
    with pytest.raises(DataError, match="object #0 of .*2008_000002.xml: box .* right edge"):
        voc_detection_split(tmp_path, "2012", "train", log=_quiet)
