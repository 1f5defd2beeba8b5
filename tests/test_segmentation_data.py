"""Segmentation data (trainer/data/masks.py, the generated segmentation variant): CPU, tiny files in tmp_path."""
import hashlib
import itertools
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from trainer.data.generated import CLASSES, ensure_generated, plan_scene, render_scene, scene_rng
from trainer.data.masks import (VOC_CLASSES, MaskDataset, check_masks, collate_masks, image_orientation,
                                mask_eval_transform, mask_train_transform, scan_mask_folder, voc_pairs)
from trainer.errors import DataError

IGNORE = 255
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]


def _write(path: Path, arr: np.ndarray, mode=None, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path, **save) if mode else Image.fromarray(arr).save(path, **save)
    return path


def _mask_array(size=(12, 10), seed=0, num_classes=3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, (size[1], size[0])).astype(np.uint8)


def _make_root(root: Path, splits=None, classes=("bg", "cat", "dog"), size=(12, 10), ext=".png") -> Path:
    """ROOT/<split>/images/<i><ext> + masks/<i>.png (mode L) and ROOT/classes.txt."""
    splits = splits or {"train": 6, "val": 2}
    for split, n in splits.items():
        for i in range(n):
            rgb = np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            _write(root / split / "images" / f"{i:03d}{ext}", rgb)
            _write(root / split / "masks" / f"{i:03d}.png", _mask_array(size, seed=i, num_classes=len(classes)))
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# ---- layout ----

def test_layout_is_scanned_into_sorted_pairs(tmp_path):
    root = _make_root(tmp_path / "d", {"train": 5, "val": 2, "test": 1})
    (root / "classes.txt").write_text("  bg \n\ncat\n  \n dog\n")  # spaces and blank lines ignored
    (root / "train" / "images" / ".hidden.png").write_bytes(b"")  # dot files (macOS ._ forks) skipped
    (root / "train" / "images" / "notes.txt").write_text("x")
    classes, splits = scan_mask_folder(root, val_fraction=0.5, split_seed=0)
    assert classes == ["bg", "cat", "dog"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 2, "test": 1}  # val/ exists: no split
    assert splits["train"] == sorted(splits["train"])
    for image, mask in splits["train"]:
        assert Path(image).parent.name == "images" and Path(mask).parent.name == "masks"
        assert Path(image).stem == Path(mask).stem and mask.endswith(".png")
    classes, _ = scan_mask_folder(root, 0.5, 0, class_names=["a", "b", "c", "d"])
    assert classes == ["a", "b", "c", "d"]  # data.class_names wins over classes.txt


def test_split_without_val_is_seeded_and_sorted(tmp_path):
    root = _make_root(tmp_path / "d", {"train": 20})
    _, a = scan_mask_folder(root, 0.25, split_seed=1)
    _, b = scan_mask_folder(root, 0.25, split_seed=1)
    _, c = scan_mask_folder(root, 0.25, split_seed=2)
    assert a == b and a["val"] != c["val"]
    assert len(a["val"]) == 5 and len(a["train"]) == 15
    assert a["train"] == sorted(a["train"]) and a["val"] == sorted(a["val"])
    assert not set(a["train"]) & set(a["val"])
    root_t = _make_root(tmp_path / "t", {"train": 4, "test": 2})
    _, s = scan_mask_folder(root_t, 0.0, 0)
    assert s["val"] == s["test"] and len(s["train"]) == 4  # val_fraction 0: the test split validates


def _no_root(root):
    return root / "absent"


def _no_train(root):
    (root / "train").rename(root / "training")
    return root


def _no_masks_folder(root):
    for f in (root / "train" / "masks").iterdir():
        f.unlink()
    (root / "train" / "masks").rmdir()
    return root


def _image_without_mask(root):
    (root / "train" / "masks" / "002.png").unlink()
    (root / "train" / "masks" / "003.png").unlink()
    return root


def _mask_without_image(root):
    (root / "train" / "images" / "004.png").unlink()
    return root


def _no_classes(root):
    (root / "classes.txt").unlink()
    return root


def _one_class(root):
    (root / "classes.txt").write_text("only\n\n")
    return root


def _jpeg_mask(root):
    _write(root / "train" / "masks" / "009.jpg", _mask_array())
    return root


def _two_images_one_name(root):
    _write(root / "train" / "images" / "001.jpg", np.zeros((10, 12, 3), np.uint8))
    return root


@pytest.mark.parametrize("make, message", [
    (_no_root, r"does not exist.*absent.*ROOT/<split>/images"),
    (_no_train, r"no training split: .*d/train is missing \(expected ROOT/<split>/images"),
    (_no_masks_folder, r"missing folder .*train/masks: expected ROOT/<split>/images/<name>"),
    (_image_without_mask, r"train: 2 image\(s\) without a mask and 0 mask\(s\) without an image "
                          r"\(e\.g\. .*images/002\.png has no .*masks/002\.png"),
    (_mask_without_image, r"train: 0 image\(s\) without a mask and 1 mask\(s\) without an image "
                          r"\(e\.g\. .*masks/004\.png"),
    (_no_classes, r"classes\.txt is missing; write it .* or pass data\.class_names"),
    (_one_class, r"need at least 2 classes, found 1 .*classes\.txt"),
    (_jpeg_mask, r"mask .*masks/009\.jpg is not a PNG"),
    (_two_images_one_name, r"two files named 001\.\* in .*train/images"),
])
def test_bad_layouts_fail_naming_the_file(tmp_path, make, message):
    root = make(_make_root(tmp_path / "d"))
    with pytest.raises(DataError, match=message):
        scan_mask_folder(root, 0.1, 0)


def test_ignore_index_may_not_be_a_class(tmp_path):
    root = _make_root(tmp_path / "d")
    with pytest.raises(DataError, match=r"data.ignore_index=1 is the index of class 'cat'"):
        scan_mask_folder(root, 0.1, 0, ignore_index=1)
    scan_mask_folder(root, 0.1, 0, ignore_index=-1)  # never a mask value: fine


# ---- checking masks ----

def _pair(tmp_path, mask: np.ndarray, mode=None, name="a", image_size=None, **save):
    w, h = image_size or (mask.shape[1], mask.shape[0])
    image = _write(tmp_path / "images" / f"{name}.png", np.zeros((h, w, 3), np.uint8))
    return str(image), str(_write(tmp_path / "masks" / f"{name}.png", mask, mode, **save))


def test_check_masks_counts_pixels_per_class_leaving_ignored_out(tmp_path):
    a = np.array([[0, 0, 1], [2, IGNORE, 1]], np.uint8)
    b = np.array([[2, 2], [2, IGNORE]], np.uint8)
    pairs = [_pair(tmp_path, a, name="a"), _pair(tmp_path, b, name="b")]
    assert check_masks(pairs, num_classes=3, ignore_index=IGNORE) == [2, 2, 4]
    assert check_masks(pairs, num_classes=4, ignore_index=IGNORE, threads=1) == [2, 2, 4, 0]


def test_an_image_cut_short_is_found_at_start_up_and_a_camera_trailer_is_not_refused(tmp_path):
    """The start-up check reads image headers only; a copy cut short keeps its header, so the end marker is
    looked for too (as for image folders), and a file without one is decoded before it is called bad."""
    mask = np.zeros((24, 32), np.uint8)
    image = tmp_path / "images" / "a.jpg"
    pair = _pair(tmp_path, mask)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(image, quality=90)
    whole = image.read_bytes()
    pair = (str(image), pair[1])
    image.write_bytes(whole + b"camera trailer after the end-of-image marker")
    assert check_masks([pair], 3, IGNORE) == [24 * 32, 0, 0]
    image.write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(DataError, match="cannot read image .*a.jpg"):
        check_masks([pair], 3, IGNORE)


def test_palette_masks_are_read_as_indices_not_colours(tmp_path):
    indices = np.array([[0, 1, 2], [IGNORE, 1, 0]], np.uint8)
    img = Image.fromarray(indices, "P")
    palette = [0] * 768
    palette[3:9] = [128, 0, 0, 0, 128, 0]  # VOC's colours for 1 and 2
    palette[3 * 255:3 * 256] = [224, 224, 192]  # VOC's void colour
    img.putpalette(palette)
    (tmp_path / "masks").mkdir()
    img.save(tmp_path / "masks" / "p.png")
    image = _write(tmp_path / "images" / "p.jpg", np.zeros((2, 3, 3), np.uint8))
    pair = (str(image), str(tmp_path / "masks" / "p.png"))
    assert Image.open(pair[1]).mode == "P"
    assert check_masks([pair], 3, IGNORE) == [2, 2, 1]
    mask = MaskDataset([pair]).load_mask(0)
    assert mask.dtype == torch.int64 and mask.tolist() == indices.tolist()


def test_sixteen_bit_masks_are_read_as_indices(tmp_path):
    mask = np.array([[0, 300], [299, 65535]], np.uint16)  # 300 classes; 65535 marks void
    pair = _pair(tmp_path, mask)  # uint16: PIL writes a 16-bit grey PNG
    assert Image.open(pair[1]).mode in ("I;16", "I")
    counts = check_masks([pair], 301, ignore_index=65535)
    assert counts[0] == counts[299] == counts[300] == 1 and sum(counts) == 3
    assert MaskDataset([pair]).load_mask(0).tolist() == [[0, 300], [299, 65535]]
    with pytest.raises(DataError, match=r"has value 65535.*too few names"):
        check_masks([pair], 301, ignore_index=IGNORE)


def test_mask_value_outside_the_classes_names_value_and_file(tmp_path):
    good = _pair(tmp_path, np.array([[0, 1]], np.uint8), name="good")
    bad = _pair(tmp_path, np.array([[0, 7], [IGNORE, 5]], np.uint8), name="bad")
    worse = _pair(tmp_path, np.array([[9]], np.uint8), name="worse")
    with pytest.raises(DataError, match=r"mask .*masks/bad\.png has value 7, neither a class index \(0-2\) nor "
                                        r"data\.ignore_index=255 .*classes\.txt or data\.class_names\) has too few "
                                        r"names: 3 for mask values up to 7 \(and 1 more bad mask"):
        check_masks([good, bad, worse], 3, IGNORE)
    assert check_masks([good], 3, IGNORE) == [1, 1, 0]


def test_colour_masks_are_refused(tmp_path):
    for mode in ("RGB", "RGBA"):
        arr = np.zeros((2, 2, len(mode)), np.uint8)
        pair = _pair(tmp_path, arr, name=mode)
        with pytest.raises(DataError, match=rf"mask .*{mode}\.png is a colour image \(mode {mode}\): masks must be "
                                            r"single-channel PNGs of class indices \(mode L or P\); convert a colour "
                                            r"mask to indices first"):
            check_masks([pair], 3, IGNORE)


def test_mask_of_another_size_than_its_image_names_both(tmp_path):
    pair = _pair(tmp_path, np.zeros((4, 6), np.uint8), image_size=(6, 5))
    with pytest.raises(DataError, match=r"mask .*masks/a\.png is 6x4 \(WxH\) but its image .*images/a\.png is 6x5"):
        check_masks([pair], 2, IGNORE)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def test_a_sample_reads_its_image_file_once_for_the_pixels_and_the_masks_turn(tmp_path, monkeypatch):
    # each open is a metadata operation on cluster storage: the image is decoded, and its EXIF orientation (which
    # turns the mask) read, from one read of the file, as a packed row is one positioned read
    import builtins

    mask = np.arange(24, dtype=np.uint8).reshape(4, 6) % 3
    image = _write(tmp_path / "o.jpg", np.zeros((4, 6, 3), np.uint8), exif=_exif(6), format="JPEG")
    m = _write(tmp_path / "m.png", mask)
    opened, real_open = [], builtins.open

    def counting_open(file, *args, **kwargs):
        if str(file).startswith(str(tmp_path)):
            opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    image_t, mask_t = MaskDataset([(str(image), str(m))])[0]
    assert sorted(opened) == sorted([str(image), str(m)])
    assert tuple(image_t.shape) == (3, 6, 4) and mask_t.tolist() == np.rot90(mask, -1).tolist()


def test_masks_are_checked_and_turned_with_their_images_exif_orientation(tmp_path):
    # a 6x4 stored image tagged "turn 90 degrees": the mask is drawn on the stored pixels (6x4), and loads turned
    mask = np.arange(24, dtype=np.uint8).reshape(4, 6) % 3
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        image = _write(tmp_path / f"o.{ext}", np.zeros((4, 6, 3), np.uint8), exif=_exif(6), format=fmt)
        m = _write(tmp_path / f"m{ext}.png", mask)
        assert image_orientation(str(image)) == 6
        check_masks([(str(image), str(m))], 3, IGNORE)
        ds = MaskDataset([(str(image), str(m))])
        assert tuple(ds.load(0).shape) == (3, 6, 4)
        assert ds.load_mask(0).tolist() == np.rot90(mask, -1).tolist()  # 6 = clockwise, as the image turns
        assert MaskDataset([(str(image), str(m))], exif_orientation=False).load_mask(0).tolist() == mask.tolist()
        # a mask drawn on the turned image (4x6) does not match the stored pixels: say so
        turned = _write(tmp_path / f"t{ext}.png", np.ascontiguousarray(np.rot90(mask, -1)))
        with pytest.raises(DataError, match=r"is 4x6 \(WxH\) but its image .* is 6x4 as stored \(its EXIF orientation"):
            check_masks([(str(image), str(turned))], 3, IGNORE)
    plain = _write(tmp_path / "plain.png", np.zeros((4, 6, 3), np.uint8))
    info = PngInfo()
    info.add_text("Comment", "a text chunk that is no orientation")
    text = _write(tmp_path / "text.png", np.zeros((4, 6, 3), np.uint8), pnginfo=info)
    assert image_orientation(str(plain)) == image_orientation(str(text)) == 1


@pytest.mark.parametrize("fmt, orientation", [("PNG", o) for o in range(1, 9)] + [("TIFF", 3), ("TIFF", 6)])
def test_mask_turns_exactly_as_the_image_for_every_orientation(tmp_path, fmt, orientation):
    # image pixels encode their stored (row, col); the mask encodes the same: after loading they must agree
    h, w = 4, 6
    rows, cols = np.mgrid[0:h, 0:w]
    code = (rows * w + cols).astype(np.uint8)
    image = _write(tmp_path / f"i.{fmt.lower()}", np.stack([code * 10, code, code], -1), exif=_exif(orientation),
                   format=fmt)
    m = _write(tmp_path / "m.png", code)
    check_masks([(str(image), str(m))], 24, IGNORE)  # stored sizes agree, whatever the orientation
    ds = MaskDataset([(str(image), str(m))])
    assert torch.equal(ds.load(0)[1].long(), ds.load_mask(0))
    assert ds.load_mask(0).shape == ((w, h) if orientation >= 5 else (h, w))


def test_check_masks_stops_on_interrupt_without_decoding_the_rest(tmp_path, monkeypatch):
    import trainer.data.masks as masks

    pairs = [_pair(tmp_path, np.zeros((2, 2), np.uint8), name=str(i)) for i in range(200)]
    calls = []
    order = itertools.count()  # next() is atomic: exactly one worker gets 2 (len(calls) could skip 3 under a race)
    real = masks._check_pair

    def slow(pair, *args):
        calls.append(pair)
        n = next(order)
        time.sleep(0.01)
        if n == 2:
            raise KeyboardInterrupt  # what a stop signal raises in the main thread, simulated in a worker
        return real(pair, *args)

    monkeypatch.setattr(masks, "_check_pair", slow)
    with pytest.raises(KeyboardInterrupt):
        check_masks(pairs, 2, IGNORE, threads=2)
    assert len(calls) < 200  # the queued pairs were cancelled


# ---- transforms ----

COLOURS = np.array([[250, 10, 10], [10, 250, 10], [10, 10, 250], [240, 240, 20]], np.uint8)  # class = colour


def _blocks(h=40, w=56, block=8, seed=0):
    """An image of big blocks of pure colours and its mask: the class of a pixel is which colour it has."""
    grid = np.random.default_rng(seed).integers(0, len(COLOURS), (h // block + 1, w // block + 1))
    mask = np.kron(grid, np.ones((block, block), np.int64))[:h, :w]
    return torch.from_numpy(COLOURS[mask]).permute(2, 0, 1).contiguous(), torch.from_numpy(mask)


def _colour_class(x: torch.Tensor):
    """Undo the normalisation and name each pixel's nearest pure colour; with the distance to it."""
    rgb = (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    d = ((rgb.permute(1, 2, 0)[:, :, None, :] - torch.tensor(COLOURS, dtype=torch.float32)) ** 2).sum(-1).sqrt()
    dist, cls = d.min(-1)
    return cls, dist


@pytest.mark.parametrize("rrc, padding, hflip, jitter", [
    (False, 0, True, 0.0), (False, 6, True, 0.0), (True, 0, True, 0.0), (True, 0, False, 0.0), (False, 6, True, 0.3)])
def test_image_and_mask_stay_aligned_through_training_transforms(rrc, padding, hflip, jitter):
    image, mask = _blocks()
    t = mask_train_transform(32, MEAN, STD, hflip=hflip, crop_padding=padding, random_resized_crop=rrc,
                             rrc_min_scale=0.3, color_jitter=jitter, ignore_index=IGNORE)
    seen_pad = False
    for seed in range(40):
        torch.manual_seed(seed)
        x, y = t(image, mask)
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
        assert y.shape == (32, 32) and y.dtype == torch.int64 and type(y) is torch.Tensor
        assert set(y.unique().tolist()) <= {0, 1, 2, 3, IGNORE}  # nearest: never a blend of two classes
        # pixels away from block borders: their mask is the colour they show (jitter moves colours: skip them)
        inner = torch.ones_like(y, dtype=torch.bool)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                inner &= y == torch.roll(y, (dy, dx), (0, 1))
        inner[[0, -1], :] = inner[:, [0, -1]] = False
        labelled = inner & (y != IGNORE)
        assert labelled.sum() > 100
        if jitter == 0:
            cls, dist = _colour_class(x)
            assert torch.equal(cls[labelled], y[labelled]), seed
            assert dist[labelled].max() < 40
        padded = y == IGNORE
        # padding: the mask there is ignore_index, the image the mean colour (0 once normalised)
        if padded.any() and jitter == 0:
            seen_pad = True
            assert x[:, padded].abs().max() < 0.05
    assert seen_pad == (padding > 0 and jitter == 0)


def test_colour_jitter_changes_the_image_only():
    image, mask = _blocks()
    plain = mask_train_transform(32, MEAN, STD, False, 0, False, 0.3, 0.0)
    jitter = mask_train_transform(32, MEAN, STD, False, 0, False, 0.3, 0.5)
    torch.manual_seed(0)
    x0, y0 = plain(image, mask)
    torch.manual_seed(0)
    x1, y1 = jitter(image, mask)
    assert torch.equal(y0, y1) and not torch.allclose(x0, x1)


def test_eval_transform_resizes_the_image_and_keeps_the_mask_at_its_original_size():
    image, mask = _blocks(40, 56)
    x, y = mask_eval_transform(32, MEAN, STD)(image, mask)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
    assert torch.equal(y, mask) and y.dtype == torch.int64


def test_collate_stacks_equal_masks_and_lists_different_ones():
    same = [(torch.zeros(3, 8, 8), torch.zeros(8, 8, dtype=torch.long)) for _ in range(3)]
    images, masks = collate_masks(same)
    assert images.shape == (3, 3, 8, 8) and masks.shape == (3, 8, 8)
    mixed = [(torch.zeros(3, 8, 8), torch.zeros(h, w, dtype=torch.long)) for h, w in ((5, 7), (8, 8), (6, 4))]
    images, masks = collate_masks(mixed)
    assert images.shape == (3, 3, 8, 8) and isinstance(masks, list) and [tuple(m.shape) for m in masks] == [
        (5, 7), (8, 8), (6, 4)]


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    root = _make_root(tmp_path / "d", {"train": 4}, size=(20, 16))
    _, splits = scan_mask_folder(root, 0.25, 0)
    t = mask_train_transform(16, MEAN, STD, True, 3, True, 0.3, 0.2)

    def items(seed, epoch, order):
        ds = MaskDataset(splits["train"], transform=t, seed=seed)
        ds.set_epoch(epoch)
        torch.manual_seed(123 + len(order))  # the global RNG state must not matter
        return {i: ds[i] for i in order}

    a, b = items(0, 1, [0, 1, 2]), items(0, 1, [2, 0, 1])
    for i in range(3):
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
    other_epoch, other_seed = items(0, 2, [0, 1, 2]), items(1, 1, [0, 1, 2])
    assert any(not torch.equal(a[i][0], other_epoch[i][0]) for i in range(3))
    assert any(not torch.equal(a[i][0], other_seed[i][0]) for i in range(3))
    ds = MaskDataset(splits["train"])
    assert ds.paths == [p for p, _ in splits["train"]] and ds.mask_paths == [m for _, m in splits["train"]]
    image, mask = ds[0]  # no transform: the loaded pair
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 20) and mask.shape == (16, 20)


def test_unreadable_image_and_mismatched_pair_at_load_name_the_file(tmp_path):
    root = _make_root(tmp_path / "d", {"train": 2, "val": 1})
    _, splits = scan_mask_folder(root, 0.5, 0)
    image, mask = splits["train"][0]
    Path(image).write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"cannot read image .*000\.png"):
        MaskDataset(splits["train"])[0]
    _write(Path(splits["train"][1][1]), np.zeros((3, 3), np.uint8))
    with pytest.raises(DataError, match=r"mask .*001\.png is 3x3 \(WxH\) but its image .*001\.png is 12x10"):
        MaskDataset(splits["train"])[1]


# ---- Pascal VOC ----

def _fake_voc(root: Path, year="2012"):
    voc = root / "VOCdevkit" / f"VOC{year}"
    ids = {"train": ["2007_000001", "2007_000002"], "val": ["2007_000003"]}
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for split, names in ids.items():
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for i, name in enumerate(names):
            _write(voc / "JPEGImages" / f"{name}.jpg", np.full((6, 8, 3), 40 * i, np.uint8))
            idx = np.zeros((6, 8), np.uint8)
            idx[1:3, 2:6] = 15  # person
            idx[0, :] = IGNORE
            img = Image.fromarray(idx, "P")
            img.putpalette([v for c in range(256) for v in (c, 255 - c, 0)])
            (voc / "SegmentationClass").mkdir(exist_ok=True)
            img.save(voc / "SegmentationClass" / f"{name}.png")
    return root


def test_voc_read_offline_from_a_fake_tree(tmp_path):
    root = _fake_voc(tmp_path / "voc")
    train = voc_pairs(root, "2012", "train")
    assert [Path(i).name for i, _ in train] == ["2007_000001.jpg", "2007_000002.jpg"]
    assert all(Path(m).parent.name == "SegmentationClass" for _, m in train)
    assert len(voc_pairs(root, "2012", "val")) == 1
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"
    counts = check_masks(train, len(VOC_CLASSES), IGNORE)
    assert counts[15] == 2 * 8 and counts[0] == 2 * (48 - 8 - 8) and sum(counts) == 80  # row 0 is void
    assert MaskDataset(train).load_mask(0)[1, 2].item() == 15  # the palette index, not a colour


def test_voc_missing_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"Pascal VOC 2012 not found: looked for .*VOCdevkit/VOC2012 under "
                                        r"data\.root=.*data\.download is not supported for VOC.*internet"):
        voc_pairs(tmp_path / "nothing", "2012", "train")
    root = _fake_voc(tmp_path / "voc")
    with pytest.raises(DataError, match=r"no trainval split list: .*trainval\.txt is missing"):
        voc_pairs(root, "2012", "trainval")
    (root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(DataError, match=r"train: 1 listed file\(s\) missing, e\.g\. .*JPEGImages/2007_000002\.jpg"):
        voc_pairs(root, "2012", "train")
    with pytest.raises(DataError, match=r"Pascal VOC: .*year"):
        voc_pairs(root, "1999", "train")


# ---- the generated segmentation variant ----

def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def test_generated_segmentation_is_a_deterministic_masks_folder(tmp_path):
    counts = {"train": 3, "val": 1}
    a = ensure_generated(tmp_path / "a", "segmentation", 32, seed=3, counts=counts)
    b = ensure_generated(tmp_path / "b", "segmentation", 32, seed=3, counts=counts)
    c = ensure_generated(tmp_path / "c", "segmentation", 32, seed=4, counts=counts)
    assert _digest(a) == _digest(b) != _digest(c)
    assert ensure_generated(a, "segmentation", 32, seed=3, counts=counts) == a  # reused, not redrawn
    with pytest.raises(DataError, match="other parameters"):
        ensure_generated(a, "segmentation", 32, seed=9, counts=counts)
    classes, splits = scan_mask_folder(a, 0.1, 0)
    assert classes == CLASSES["segmentation"] == ["background", "circle", "cross", "square", "triangle"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 4}  # count x 4 images per split
    pixels = check_masks(splits["train"] + splits["val"], len(classes), IGNORE)
    assert sum(pixels) == 16 * 32 * 32 and all(p > 0 for p in pixels)
    image, mask = Image.open(splits["train"][0][0]), Image.open(splits["train"][0][1])
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (32, 32)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_generated_masks_agree_with_the_images(tmp_path):
    for i in range(20):
        plan = plan_scene(32, scene_rng(0, "train", i))
        assert 1 <= len(plan.shapes) <= 4
        image, mask = render_scene(plan, 32)
        clean, clean_mask = render_scene(plan, 32, noise=False)
        backdrop, empty = render_scene(plan, 32, shapes=False, noise=False)
        m = np.asarray(mask)
        assert np.array_equal(m, np.asarray(clean_mask)) and not np.asarray(empty).any()
        noise = np.asarray(image, np.float64) - np.asarray(clean, np.float64)
        assert 10 < noise.std() < 16  # the noise, std 14 before clipping
        # pixels whose 5x5 neighbourhood is one class (past the partly covered edge pixel and most of the
        # Lanczos filter's ringing, which reaches 3 pixels): background ones show the backdrop unchanged
        pad = np.pad(m, 2, mode="edge")
        inner = np.all([pad[2 + dy:34 + dy, 2 + dx:34 + dx] == m for dy in range(-2, 3) for dx in range(-2, 3)], axis=0)
        diff = np.abs(np.asarray(clean, np.float64) - np.asarray(backdrop, np.float64)).max(-1)
        assert diff[inner & (m == 0)].max() <= 6
        # a shape class's interior shows the colour of a shape of that kind (not all of it: where two shapes of one
        # kind touch, the mask has no edge but the colours blend)
        fills = {k: [s.fill for s in plan.shapes if CLASSES["segmentation"].index(s.kind) == k] for k in range(1, 5)}
        for k in np.unique(m[inner & (m > 0)]):
            px = np.asarray(clean, np.float64)[inner & (m == k)]
            nearest = np.min([np.abs(px - np.array(f)).max(-1) for f in fills[k]], axis=0)
            assert (nearest <= 6).mean() > 0.9, (i, k)
        if len(plan.shapes) == 1:  # exactly its class shows (more shapes may cover one another)
            assert set(np.unique(m)) == {0, CLASSES["segmentation"].index(plan.shapes[0].kind)}
