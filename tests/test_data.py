import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_folder, write_image
from trainer.config import load_config
from trainer.data import build_data, class_balanced_sampler
from trainer.data.folders import imagefolder_splits
from trainer.data.generated import CLASSES, ensure_generated
from trainer.errors import DataError


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("variant", ["binary", "multiclass"])
def test_generated_dataset_is_deterministic_and_a_real_imagefolder(tmp_path, variant):
    counts = {"train": 5, "val": 2}
    a = ensure_generated(tmp_path / "a", variant, 32, seed=3, counts=counts)
    b = ensure_generated(tmp_path / "b", variant, 32, seed=3, counts=counts)
    c = ensure_generated(tmp_path / "c", variant, 32, seed=4, counts=counts)
    assert _digest(a) == _digest(b) != _digest(c)
    assert sorted(p.name for p in (a / "train").iterdir()) == CLASSES[variant]
    img = Image.open(next((a / "val").rglob("*.png")))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert ensure_generated(a, variant, 32, seed=3, counts=counts) == a  # reused, not redrawn
    with pytest.raises(DataError, match="other parameters"):
        ensure_generated(a, variant, 32, seed=9, counts=counts)


def _generate(root):
    ensure_generated(root, "binary", 32, seed=1, counts={"train": 30, "val": 5})


def test_concurrent_generation_of_one_dataset_all_succeed(tmp_path):
    """Sweep tasks on several nodes may draw the same dataset at once: all must end with the same good copy."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_generate, args=(tmp_path / "shared",)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    ensure_generated(tmp_path / "single", "binary", 32, seed=1, counts={"train": 30, "val": 5})
    assert _digest(tmp_path / "shared") == _digest(tmp_path / "single")
    assert not list(tmp_path.glob(".shared.tmp-*"))  # no temporary folder left behind


def test_single_folder_split_is_seeded_and_stratified(tmp_path):
    make_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=10)
    classes, splits = imagefolder_splits(tmp_path / "d", 0.2, split_seed=1)
    assert classes == ["a", "b", "c"]
    assert len(splits["train"]) == 24 and len(splits["val"]) == 6
    assert np.bincount([l for _, l in splits["val"]]).tolist() == [2, 2, 2]
    assert not {p for p, _ in splits["train"]} & {p for p, _ in splits["val"]}
    assert imagefolder_splits(tmp_path / "d", 0.2, split_seed=1)[1] == splits
    assert imagefolder_splits(tmp_path / "d", 0.2, split_seed=2)[1]["val"] != splits["val"]


def test_train_val_test_layout_and_class_to_idx(tmp_path):
    make_folder(tmp_path / "d" / "train", classes=("x", "y"), per_class=4)
    make_folder(tmp_path / "d" / "val", classes=("x", "y"), per_class=2)
    make_folder(tmp_path / "d" / "test", classes=("y",), per_class=3)  # a class may be absent from test
    classes, splits = imagefolder_splits(tmp_path / "d", 0.1, 0)
    assert classes == ["x", "y"]
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 4, 3]
    assert {l for _, l in splits["test"]} == {1}


def _data_cfg(root, **kw):
    overrides = ["data.format=imagefolder", f"data.root={root}", "data.image_size=16"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, overrides).data


@pytest.mark.parametrize("make, message", [
    (lambda r: None, "does not exist"),
    (lambda r: r.mkdir(), "no class folders"),
    (lambda r: (make_folder(r, ("a",), 3), (r / "b").mkdir()), "empty class folder"),
    (lambda r: (make_folder(r, ("a",), 3), (r / "b").mkdir(), (r / "b" / "notes.txt").write_text("x")), "empty class folder"),
])
def test_bad_folders_fail_clearly(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as err:
        build_data(_data_cfg(root), seed=0)
    assert "\n" not in str(err.value)


def _with_bad_files(root: Path) -> list:
    make_folder(root, ("a", "b"), 5, ext=".jpg")
    not_image = root / "a" / "fake.jpg"
    not_image.write_text("this is not an image")
    truncated = root / "b" / "truncated.jpg"
    write_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:300])
    return [str(not_image), str(truncated)]


def test_bad_image_names_the_file(tmp_path):
    bad = _with_bad_files(tmp_path / "d")
    with pytest.raises(DataError) as err:
        build_data(_data_cfg(tmp_path / "d"), seed=0)
    assert any(b in str(err.value) for b in bad) and "skip_bad_images" in str(err.value)


def test_bad_images_skipped_and_counted(tmp_path):
    bad = _with_bad_files(tmp_path / "d")
    data = build_data(_data_cfg(tmp_path / "d", **{"data.skip_bad_images": "true", "data.val_fraction": 0.2}),
                      seed=0, log=lambda *_: None)
    assert sorted(data.skipped) == sorted(bad)
    assert len(data.datasets["train"]) + len(data.datasets["val"]) == 10


def test_bad_image_at_load_time_names_the_file(tmp_path):
    bad = _with_bad_files(tmp_path / "d")
    data = build_data(_data_cfg(tmp_path / "d", **{"data.verify_images": "false", "data.val_fraction": 0.2,
                                                    "data.mean": "[0.5,0.5,0.5]", "data.std": "[0.2,0.2,0.2]"}), seed=0)
    found = [(ds, i, p) for ds in data.datasets.values() for i, p in enumerate(ds.paths) if p in bad]
    assert sorted(p for _, _, p in found) == sorted(bad)
    for ds, i, path in found:  # not-an-image and truncated JPEG: both fall through decode_jpeg to PIL's error
        ds.stand_ins = False  # the training split replaces such a file (tested below), with this line as its warning
        with pytest.raises(DataError, match=f"cannot read image {path}"):
            ds[i]


def test_mixed_modes_are_converted_to_rgb(tmp_path):
    root = tmp_path / "d"
    write_image(root / "a" / "gray.png", mode="L")
    write_image(root / "a" / "rgba.png", mode="RGBA")
    write_image(root / "b" / "palette.png", mode="P")
    write_image(root / "b" / "cmyk.jpg", mode="CMYK", fmt="JPEG")
    write_image(root / "b" / "rgb.bmp")
    write_image(root / "a" / "rgb.png")
    data = build_data(_data_cfg(root, **{"data.val_fraction": 0.3}), seed=0)
    for split in ("train", "val"):
        for i in range(len(data.datasets[split])):
            x, _ = data.datasets[split][i]
            assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path):
    make_folder(tmp_path / "d", ("a", "b"), 4)
    ds = build_data(_data_cfg(tmp_path / "d", **{"data.val_fraction": 0.25}), seed=0).datasets["train"]
    torch.manual_seed(123)
    first = ds[2][0]
    torch.manual_seed(999)  # the global RNG does not matter
    assert torch.equal(ds[2][0], first)
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], first)


def test_normalisation_measured_from_training_images(tmp_path):
    root = tmp_path / "d"
    for c in ("a", "b"):
        for i in range(3):
            p = root / c / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), [51, 102, 204], np.uint8)).save(p)
    data = build_data(_data_cfg(root, **{"data.val_fraction": 0.3}), seed=0)
    assert data.mean == pytest.approx([0.2, 0.4, 0.8], abs=1e-3)


def test_weighted_sampler_balances_classes_and_shards_one_draw():
    labels = [0] * 90 + [1] * 10
    sampler = class_balanced_sampler(labels, 2, seed=0)
    draw = list(sampler)
    assert len(draw) == 100 and draw == list(sampler)  # same draw for every process of an epoch
    share = np.mean([labels[i] for i in draw])
    assert 0.35 < share < 0.65
    sampler.set_epoch(1)
    assert list(sampler) != draw


def test_cifar_missing_offline_is_clear(tmp_path):
    cfg = load_config(None, ["data.format=cifar10", f"data.root={tmp_path}"]).data
    with pytest.raises(DataError, match="cifar10 not found.*data.download=true"):
        build_data(cfg, seed=0)


def _fake_cifar10(tmp_path, monkeypatch) -> None:
    """20 images per batch in torchvision's CIFAR-10 layout under tmp_path (integrity check stubbed)."""
    import pickle

    import torchvision

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 255, (20, 3072), dtype=np.uint8),
                         "labels": [i % 10 for i in range(20)]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar_read_offline_from_existing_copy(tmp_path, monkeypatch):
    """A copy in torchvision's layout is read without a download (integrity check stubbed for fake files)."""
    _fake_cifar10(tmp_path, monkeypatch)
    cfg = load_config(None, ["data.format=cifar10", f"data.root={tmp_path}", "data.val_fraction=0.1"]).data
    data = build_data(cfg, seed=0, splits=("train", "val", "test"))
    assert data.classes == [f"c{i}" for i in range(10)]
    assert [len(data.datasets[s]) for s in ("train", "val", "test")] == [90, 10, 20]
    x, y = data.datasets["train"][0]
    assert x.shape == (3, 32, 32)


def test_persistent_workers_see_each_new_epoch():
    """Workers are started once per run; the epoch set in the main process reaches them (shared memory), so
    every epoch's augmentation equals what the dataset gives in-process for that epoch."""
    from torch.utils.data import DataLoader

    from trainer.data.datasets import ArrayDataset, PadCropFlip

    images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    ds = ArrayDataset(images, list(range(6)), PadCropFlip(8, 2, True, [0.5] * 3, [0.25] * 3), seed=1)
    loader = DataLoader(ds, batch_size=6, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        (x, _), = list(loader)
        assert torch.equal(x, torch.stack([ds[i][0] for i in range(6)])), epoch
        seen.append(x)
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])


def test_decode_rgb_reads_every_format_like_pil(tmp_path):
    """The per-sample, evaluation and predict paths decode JPEGs with torchvision and the rest with PIL: the
    pixels are PIL's (libjpeg-turbo either way, so at most 1 apart for JPEG), always 3-channel uint8."""
    from trainer.data.folders import decode_rgb, load_rgb

    files = [write_image(tmp_path / "rgb.jpg", size=(20, 12)), write_image(tmp_path / "gray.jpg", mode="L"),
             write_image(tmp_path / "rgba.png", mode="RGBA"), write_image(tmp_path / "palette.png", mode="P"),
             write_image(tmp_path / "png-named.jpg", fmt="PNG"),  # chosen by content, not by name
             write_image(tmp_path / "rgb.bmp")]
    for path in files:
        got = decode_rgb(str(path))
        expected = torch.from_numpy(np.array(load_rgb(str(path)))).permute(2, 0, 1)
        assert got.dtype == torch.uint8 and got.shape == expected.shape, path
        assert (got.int() - expected.int()).abs().max() <= 1, path
    cmyk = decode_rgb(str(write_image(tmp_path / "cmyk.jpg", mode="CMYK", fmt="JPEG")))
    assert cmyk.shape == (3, 16, 16) and cmyk.dtype == torch.uint8


def test_pad_crop_flip_is_a_reflect_padded_crop_and_covers_every_offset():
    """Each output is one crop of the reflect-padded image, mirrored or not; over many samples every one of
    the (2p+1)^2 offsets and both flips occur (the index arithmetic against torch's own padding)."""
    from trainer.data.datasets import ArrayDataset, PadCropFlip

    side, pad = 6, 2
    image = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
    ds = ArrayDataset(np.repeat(image, 1000, axis=0), [0] * 1000, PadCropFlip(side, pad, True, [0.0] * 3, [1 / 255] * 3))
    padded = torch.nn.functional.pad(torch.from_numpy(image[0]).permute(2, 0, 1).float()[None], [pad] * 4,
                                     mode="reflect")[0]
    candidates = {(top, left, flip): (padded[:, top:top + side, left:left + side].flip(2) if flip
                                      else padded[:, top:top + side, left:left + side])
                  for top in range(2 * pad + 1) for left in range(2 * pad + 1) for flip in (False, True)}
    seen = set()
    for i in range(len(ds)):
        x = ds[i][0]
        match = [key for key, c in candidates.items() if torch.allclose(x, c, atol=1e-3)]
        assert match, i
        seen.update(match)
    assert len(seen) == len(candidates)


# ---- image modes ----

def _rgb_of(img: Image.Image) -> np.ndarray:
    from trainer.data.folders import to_rgb

    out = to_rgb(img)
    assert out.mode == "RGB"
    return np.asarray(out)


def _gray(values) -> np.ndarray:
    """The RGB image a grayscale one must become: the value in all three channels."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=-1)


def test_sixteen_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    from trainer.data.folders import decode_rgb

    v = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)  # a full-range gradient
    Image.fromarray(v).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # what the Pillow in use opens it as
    got = decode_rgb(str(tmp_path / "g16.png")).permute(1, 2, 0).numpy()
    assert np.array_equal(got, _gray(np.rint(v / 257)))
    assert (got == 255).mean() < 0.01 and got.min() == 0  # PIL's convert("RGB") gives 99% white here


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L", "I;16N"])
def test_sixteen_bit_byte_orders(mode):
    v = np.array([[0, 128, 129, 257, 385, 386], [32767, 32896, 65278, 65534, 65535, 1000]], np.uint16)
    order = ">u2" if mode == "I;16B" else "<u2"  # I;16 and I;16L are little-endian; I;16N native (x86: little)
    if mode == "I;16N":
        order = "=u2"
    img = Image.frombytes(mode, (6, 2), v.astype(order).tobytes())
    # v / 257 rounded: 128 -> 0.498 -> 0, 129 -> 0.502 -> 1, 385 -> 1.498 -> 1, 386 -> 2
    expected = [[0, 0, 1, 1, 1, 2], [127, 128, 254, 255, 255, 4]]
    assert np.array_equal(_rgb_of(img), _gray(expected))


def test_thirty_two_bit_int_is_read_as_sixteen_bit_and_clipped(tmp_path):
    from trainer.data.folders import load_rgb

    v = np.array([[-5, 0, 257, 65535, 70000, 2 ** 31 - 1]], np.int32)
    img = Image.fromarray(v)
    assert img.mode == "I"
    assert np.array_equal(_rgb_of(img), _gray([[0, 0, 1, 255, 255, 255]]))
    img.save(tmp_path / "i32.tif")  # and from a file
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "i32.tif")), _gray([[0, 0, 1, 255, 255, 255]]))


@pytest.mark.parametrize("values, expected", [
    ([0.0, 0.25, 0.5, 1.0, float("nan")], [0, 64, 128, 255, 0]),  # within [0,1]: x 255 (63.75 -> 64)
    ([0.0, 1.5, 100.4, 255.0, float("nan")], [0, 2, 100, 255, 0]),  # within [0,255]: as is, rounded
    ([0.0, 257.0, 32896.0, 65535.0, float("nan")], [0, 1, 128, 255, 0]),  # 16-bit range: / 257
    ([-1000.0, 0.5, 1e9, float("inf"), float("-inf")], [0, 0, 255, 255, 0]),  # beyond: / 257, clipped
])
def test_float_images_by_range(values, expected):
    img = Image.fromarray(np.array([values], np.float32))
    assert img.mode == "F"
    assert np.array_equal(_rgb_of(img), _gray([expected]))


def test_low_bit_depth_and_colour_modes():
    pal = [10, 20, 30, 200, 100, 50] + [0] * 762
    p = Image.new("P", (2, 1))
    p.putpalette(pal)
    p.putpixel((1, 0), 1)
    assert np.array_equal(_rgb_of(p), [[[10, 20, 30], [200, 100, 50]]])  # palette looked up
    p.info["transparency"] = 0
    assert np.array_equal(_rgb_of(p), [[[10, 20, 30], [200, 100, 50]]])  # transparency dropped, colour kept
    assert np.array_equal(_rgb_of(p.convert("PA")), [[[10, 20, 30], [200, 100, 50]]])
    assert np.array_equal(_rgb_of(Image.new("LA", (1, 1), (77, 10))), _gray([[77]]))
    assert np.array_equal(_rgb_of(Image.new("L", (1, 1), 77)), _gray([[77]]))
    assert np.array_equal(_rgb_of(Image.new("RGBA", (1, 1), (1, 2, 3, 0))), [[[1, 2, 3]]])
    one = Image.new("1", (2, 1))
    one.putpixel((1, 0), 1)
    assert np.array_equal(_rgb_of(one), _gray([[0, 255]]))
    assert np.array_equal(_rgb_of(Image.new("CMYK", (1, 1), (255, 0, 55, 0))), [[[0, 255, 200]]])
    hsv = Image.new("HSV", (1, 1), (0, 0, 90))  # anything else: PIL's own convert
    assert np.array_equal(_rgb_of(hsv), np.asarray(hsv.convert("RGB")))


def test_modes_read_from_files_through_decode_rgb(tmp_path):
    from trainer.data.folders import decode_rgb

    v = np.array([[0, 257, 65535]], np.uint16)
    Image.frombytes("I;16B", (3, 1), v.astype(">u2").tobytes()).save(tmp_path / "be16.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "float.tif")
    Image.new("LA", (1, 1), (77, 10)).save(tmp_path / "la.png")
    cases = {"be16.tif": _gray([[0, 1, 255]]), "float.tif": _gray([[0, 128, 255]]), "la.png": _gray([[77]])}
    for name, expected in cases.items():
        assert np.array_equal(decode_rgb(str(tmp_path / name)).permute(1, 2, 0).numpy(), expected), name


# ---- EXIF orientation ----

def _oriented(path: Path, orientation: int, fmt: str, size=(24, 16)) -> Path:
    """A non-square image saved with an EXIF Orientation tag, as phone cameras store photos."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(_pixels(orientation, size)).save(path, format=fmt, exif=exif,
                                                     **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _pixels(seed: int, size=(24, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def _pil_pixels(path, upright: bool) -> torch.Tensor:
    from PIL import ImageOps

    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img) if upright else img.copy()
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


@pytest.mark.parametrize("fmt, orientation", [("JPEG", o) for o in range(1, 9)] + [("PNG", 6), ("TIFF", 6), ("TIFF", 3)])
def test_exif_orientation_is_applied_by_default_and_can_be_turned_off(tmp_path, fmt, orientation):
    from trainer.data.folders import decode_rgb

    path = str(_oriented(tmp_path / f"photo.{fmt.lower()}", orientation, fmt))
    upright, raw = decode_rgb(path), decode_rgb(path, exif_orientation=False)
    assert tuple(raw.shape) == (3, 16, 24)
    assert tuple(upright.shape) == ((3, 24, 16) if orientation >= 5 else (3, 16, 24))  # 5-8 swap the sides
    assert (upright.int() - _pil_pixels(path, True).int()).abs().max() <= 1  # libjpeg-turbo either way
    # the stored pixels: PIL's plain decode of the JPEG; for lossless files the array written (Pillow 13 turns
    # TIFFs upright on load whatever it is asked, which decode_rgb then undoes)
    stored = (_pil_pixels(path, False) if fmt == "JPEG" else
              torch.from_numpy(_pixels(orientation)).permute(2, 0, 1))
    assert (raw.int() - stored.int()).abs().max() <= 1
    assert torch.equal(upright, raw) == (orientation == 1)


@pytest.mark.parametrize("exif_orientation", [True, False])
def test_device_decode_applies_exif_orientation_like_the_per_sample_path(tmp_path, exif_orientation):
    from torchvision.transforms.v2 import functional as TF

    from trainer.data.datasets import FileDataset
    from trainer.data.device import decode_split

    paths = [_oriented(tmp_path / f"{o}.jpg", o, "JPEG") for o in (1, 3, 6, 8)] + [
        _oriented(tmp_path / "6.png", 6, "PNG")]  # the file-by-file path of decode_split too
    ds = FileDataset([(str(p), 0) for p in paths], exif_orientation=exif_orientation)
    out = decode_split(ds, 16)
    for i, path in enumerate(paths):
        expected = TF.resize(_pil_pixels(path, exif_orientation), [16, 16], antialias=True)
        assert (out[i].int() - expected.int()).abs().max() <= 2, path  # decode within 1, then the same resize
        assert torch.equal(out[i], TF.resize(ds.load(i), [16, 16], antialias=True)), path
    rotated = FileDataset([(str(paths[2]), 0)], exif_orientation=not exif_orientation)
    assert not torch.equal(decode_split(rotated, 16)[0], out[2])


def test_build_data_passes_exif_orientation_to_every_split(tmp_path):
    make_folder(tmp_path / "d", ("a", "b"), 4)
    for flag in (True, False):
        data = build_data(_data_cfg(tmp_path / "d", **{"data.val_fraction": 0.25, "data.exif_orientation": flag}),
                          seed=0, splits=("train", "val"), log=lambda *_: None)
        assert [ds.exif_orientation for ds in data.datasets.values()] == [flag, flag]


# ---- folder walks: symlinks ----

def _linked_tree(tmp_path: Path) -> Path:
    """Class folders with every kind of link a user can make: loops, a second path to a folder and to a
    file, a link into the other class, a broken link, and a real dataset linked in from outside."""
    root = make_folder(tmp_path / "d", ("a", "b"), 3)
    make_folder(tmp_path / "outside", ("more",), 2)
    a = root / "a"
    (a / "self").symlink_to(".")  # a loop: a/self/self/self/...
    (a / "up").symlink_to("..")  # a loop through the split folder, which holds b too
    (a / "sib").symlink_to("../b")  # the other class's folder: its files stay b's, once
    (a / "broken").symlink_to("../nowhere")
    (a / "more").symlink_to(tmp_path / "outside" / "more")  # a linked-in folder: followed
    (a / "again").symlink_to(tmp_path / "outside" / "more")  # a second path to it: not entered again
    (a / "0-copy.png").symlink_to("0.png")  # a second path to a file: a sample of its own
    (a / "z.png").symlink_to("../b/0.png")  # a file of class b linked into a: a sample of a, as b/0.png is of b
    return root


@pytest.mark.timeout(30)
def test_scan_follows_linked_folders_once_and_never_loops(tmp_path):
    from trainer.data.folders import scan_split

    root = _linked_tree(tmp_path)
    skipped = []
    samples = scan_split(root, ["a", "b"], skipped)
    a_files = [Path(p).relative_to(root).as_posix() for p, label in samples if label == 0]
    b_files = [Path(p).relative_to(root).as_posix() for p, label in samples if label == 1]
    # 'again' < 'more': the first path met to the linked-in folder is walked
    assert a_files == ["a/0-copy.png", "a/0.png", "a/1.png", "a/2.png", "a/again/0.png", "a/again/1.png", "a/z.png"]
    assert b_files == ["b/0.png", "b/1.png", "b/2.png"]
    assert sorted((Path(s.path).name, s.why) for s in skipped) == [
        ("broken", "broken"), ("more", "folder_seen"), ("self", "folder_seen"), ("sib", "folder_seen"),
        ("up", "folder_seen")]  # every folder loop and second path to a folder cut; no file path dropped
    assert scan_split(root, ["a", "b"]) == samples  # deterministic


@pytest.mark.timeout(30)
def test_build_data_reports_skipped_links_in_one_line(tmp_path):
    root = _linked_tree(tmp_path)
    lines = []
    data = build_data(_data_cfg(root, **{"data.val_fraction": 0.2}), seed=0, log=lines.append)
    assert len(data.datasets["train"]) + len(data.datasets["val"]) == 10  # 8 real files, 2 more paths to them
    notes = [line for line in lines if "skipped" in line]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "skipped 5 path(s)" in notes[0] and "4 symlinked folder(s) already visited" in notes[0]
    assert "1 broken link(s)" in notes[0] and " -> " in notes[0]


@pytest.mark.timeout(30)
def test_predict_lists_linked_folders_once_and_says_what_it_skipped(tmp_path, capsys):
    from trainer.predict import list_images

    root = _linked_tree(tmp_path)
    files = list_images([str(root)])
    assert len(files) == 10 and len({Path(p).resolve() for p in files}) == 8  # every path, links to files too
    assert files == sorted(files) == list_images([str(root)])
    err = capsys.readouterr().err
    assert err.count("skipped") == 2 and err.count("\n") == 2  # one line per call, two calls
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "x.jpg").write_bytes(b"")
    (tmp_path / "loop" / "me").symlink_to("../loop")
    assert list_images([str(tmp_path / "loop")]) == [str(tmp_path / "loop" / "x.jpg")]


def test_two_class_folders_that_are_one_folder_fail(tmp_path):
    root = make_folder(tmp_path / "d", ("a",), 2)
    (root / "b").symlink_to("a")
    with pytest.raises(DataError, match="same folder"):
        build_data(_data_cfg(root), seed=0)


def _dvc_like(tmp_path: Path, how: str) -> Path:
    """Class folders as DVC checks them out of its cache (`cache.type` hardlink or symlink): each file is a
    link to the cache's one copy of its content, so equal images are links to one file. a: 0.png, 1.png, and
    0-again.png equal to 0.png; b: 0.png, and a-twin.png equal to a/1.png; c: one image, equal to a/0.png
    (dropping second paths to a file emptied it). 9 paths, 4 contents."""
    cache = tmp_path / "cache"
    contents = {key: write_image(cache / key[:2] / key[2:], seed=seed, fmt="PNG")
                for seed, key in enumerate(["a0aaaa", "a1bbbb", "b0cccc", "zzzzzz"])}
    layout = {"a/0.png": "a0aaaa", "a/1.png": "a1bbbb", "a/0-again.png": "a0aaaa", "b/0.png": "b0cccc",
              "b/a-twin.png": "a1bbbb", "b/zz.png": "zzzzzz", "c/only.png": "a0aaaa", "a/sub/deep.png": "zzzzzz",
              "c/sub/1.png": "a1bbbb"}
    root = tmp_path / "d"
    for path, key in layout.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        if how == "hardlink":
            os.link(contents[key], root / path)
        else:
            (root / path).symlink_to(contents[key])
    return root


@pytest.mark.timeout(30)
@pytest.mark.parametrize("how", ["hardlink", "symlink"])
def test_every_path_to_a_file_is_a_sample_as_dvc_caches_link_equal_images(tmp_path, how):
    """As torchvision's ImageFolder: a hardlink, or a symlink to a file, is a sample of the class folder it is
    in, even when it leads to a file listed already, in its class or in another."""
    from trainer.data.folders import scan_split

    root = _dvc_like(tmp_path, how)
    skipped = []
    samples = scan_split(root, ["a", "b", "c"], skipped)
    assert [(Path(p).relative_to(root).as_posix(), label) for p, label in samples] == [
        ("a/0-again.png", 0), ("a/0.png", 0), ("a/1.png", 0), ("a/sub/deep.png", 0),
        ("b/0.png", 1), ("b/a-twin.png", 1), ("b/zz.png", 1), ("c/only.png", 2), ("c/sub/1.png", 2)]
    assert skipped == []
    data = build_data(_data_cfg(root, **{"data.val_fraction": 0.3}), seed=0)
    labels = [int(y) for split in ("train", "val") for y in data.datasets[split].labels]
    assert np.bincount(labels).tolist() == [4, 3, 2]  # every path, in train or held out for val


@pytest.mark.timeout(30)
def test_a_symlink_to_a_file_of_another_class_or_split_is_a_sample_where_it_is(tmp_path):
    """root/train and root/val: a val file that is a symlink to a training file, and a training file that is a
    symlink into another class, are samples of their own split and class."""
    root = tmp_path / "d"
    make_folder(root / "train", ("a", "b"), 2)
    make_folder(root / "val", ("a", "b"), 1)
    (root / "train" / "b" / "from-a.png").symlink_to("../a/0.png")
    (root / "val" / "a" / "seen.png").symlink_to(root / "train" / "a" / "1.png")
    data = build_data(_data_cfg(root), seed=0)
    assert data.train_counts == [2, 3]
    val = data.datasets["val"]
    assert sorted(Path(val.paths[i]).name for i in range(len(val))) == ["0.png", "0.png", "seen.png"]


# ---- splits that cannot be empty or lose a class ----

def test_empty_held_out_val_split_fails_naming_it(tmp_path):
    make_folder(tmp_path / "d", ("a", "b"), 3)
    with pytest.raises(DataError, match=r"the val split of .* is empty: data.val_fraction=0.01 holds out 0 of "
                                        r"every class; raise data.val_fraction or add a val/ folder") as err:
        build_data(_data_cfg(tmp_path / "d", **{"data.val_fraction": 0.01}), seed=0)
    assert "\n" not in str(err.value)


def test_skipping_bad_images_never_drops_a_class_silently(tmp_path):
    root = tmp_path / "d"
    make_folder(root / "train", ("a",), 3)
    make_folder(root / "val", ("a", "b"), 1)
    bad = [root / "train" / "b" / f"{i}.png" for i in range(2)]
    for path in bad:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an image")
    with pytest.raises(DataError, match=rf"class 'b' has no readable training image left.*{bad[0]}"):
        build_data(_data_cfg(root, **{"data.skip_bad_images": "true"}), seed=0, log=lambda *_: None)


def _with_bad_val_file(root: Path) -> Path:
    make_folder(root / "train", ("a", "b"), 3, ext=".jpg")
    make_folder(root / "val", ("a", "b"), 2, ext=".jpg")
    truncated = root / "val" / "b" / "truncated.jpg"
    write_image(truncated, size=(64, 64), fmt="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:300])
    return truncated


def test_bad_eval_image_fails_at_start_even_without_verify_images(tmp_path):
    truncated = _with_bad_val_file(tmp_path / "d")
    bad_train = tmp_path / "d" / "train" / "a" / "bad.jpg"
    bad_train.write_text("not an image")  # the training split stays governed by data.verify_images
    cfg = _data_cfg(tmp_path / "d", **{"data.verify_images": "false", "data.mean": "[0.5,0.5,0.5]",
                                        "data.std": "[0.2,0.2,0.2]"})
    with pytest.raises(DataError, match=f"cannot read image {truncated}"):
        build_data(cfg, seed=0)
    data = build_data(cfg, seed=0, splits=("train",))  # not checked: found only when loaded
    assert str(bad_train) in data.datasets["train"].paths
    with pytest.raises(DataError, match=f"cannot read image {truncated}"):
        build_data(cfg, seed=0, splits=("val",))  # `trainer eval` on val: checked too


def test_bad_eval_image_is_skipped_and_counted_with_skip_bad_images(tmp_path):
    truncated = _with_bad_val_file(tmp_path / "d")
    data = build_data(_data_cfg(tmp_path / "d", **{"data.skip_bad_images": "true"}), seed=0, log=lambda *_: None)
    assert data.skipped == [str(truncated)] and len(data.datasets["val"]) == 4


def test_generated_data_is_not_verified(tmp_path, monkeypatch):
    import trainer.data

    def fail(*_, **__):
        raise AssertionError("generated files were verified")

    monkeypatch.setattr(trainer.data, "verify_images", fail)
    cfg = load_config(None, ["data.format=generated", f"data.root={tmp_path / 'g'}", "data.generated.train_per_class=3",
                             "data.generated.val_per_class=1", "data.generated.test_per_class=0"]).data
    data = build_data(cfg, seed=0, log=lambda *_: None)
    assert len(data.datasets["val"]) > 0


def test_empty_cifar_val_split_fails_naming_it(tmp_path, monkeypatch):
    _fake_cifar10(tmp_path, monkeypatch)  # 10 training images per class: 0.01 of them rounds to none
    cfg = load_config(None, ["data.format=cifar10", f"data.root={tmp_path}", "data.val_fraction=0.01"]).data
    with pytest.raises(DataError, match="the val split of cifar10 is empty: data.val_fraction=0.01 holds out 0"):
        build_data(cfg, seed=0)


def _damaged_and_odd_files(folder: Path) -> dict:
    """name -> (path, whether a full decode reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, fmt in (("ok.jpg", "JPEG"), ("ok.png", "PNG")):
        files[name] = (write_image(folder / name, size=(24, 24), fmt=fmt), True)
    trailer = write_image(folder / "trailer.jpg", size=(24, 24), fmt="JPEG")
    trailer.write_bytes(trailer.read_bytes() + b"camera maker's trailer")  # valid: bytes after the end marker
    files["trailer.jpg"] = (trailer, True)
    for name, fmt in (("cut.jpg", "JPEG"), ("cut.png", "PNG")):
        path = write_image(folder / name, size=(64, 64), fmt=fmt)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        files[name] = (path, False)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    files["empty.jpg"], files["text.png"] = (folder / "empty.jpg", False), (folder / "text.png", False)
    return files


def test_the_header_check_finds_what_a_full_decode_finds_and_refuses_no_valid_file(tmp_path):
    from trainer.data.folders import verify_images

    files = _damaged_and_odd_files(tmp_path / "f")
    samples = [(str(path), 0) for path, _ in files.values()]
    readable = sorted(str(path) for path, ok in files.values() if ok)
    for full in (True, False):
        good, bad = verify_images(samples, skip_bad=True, full=full)
        assert sorted(p for p, _ in good) == readable, full
        assert sorted(bad) == sorted(str(path) for path, ok in files.values() if not ok), full


def test_the_header_check_does_not_decode_files_that_end_as_they_should(tmp_path, monkeypatch):
    import trainer.data.folders as folders

    files = _damaged_and_odd_files(tmp_path / "f")
    decoded = []
    real = folders._check_one
    monkeypatch.setattr(folders, "_check_one", lambda path: decoded.append(Path(path).name) or real(path))
    folders.verify_images([(str(p), 0) for p, _ in files.values()], skip_bad=True, full=False)
    assert sorted(decoded) == ["cut.jpg", "cut.png", "trailer.jpg"]  # only those without their end marker


@pytest.mark.parametrize("given, mode", [("true", "full"), ("false", "off"), ("header", "header"), ("full", "full"),
                                         ("off", "off")])
def test_verify_images_modes_and_the_old_booleans(given, mode):
    assert load_config(None, [f"data.verify_images={given}"]).data.verify_images == mode


def test_verify_images_default_is_the_header_check_and_a_wrong_mode_names_the_key():
    from trainer.errors import ConfigError

    assert load_config(None, []).data.verify_images == "header"
    with pytest.raises(ConfigError, match="data.verify_images must be one of header, full, off"):
        load_config(None, ["data.verify_images=decode"])


def _private_mib() -> float:
    """This process's memory that no other process shares (Private_Clean + Private_Dirty), in MiB."""
    text = Path("/proc/self/smaps_rollup").read_text()
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty"))) / 1024


class _Touch(torch.utils.data.Dataset):
    """What a DataLoader worker reads of a FileDataset per sample (its path and label), without decoding;
    the last index answers with how much private memory reading them all cost the worker."""

    def __init__(self, paths, labels):
        self.paths, self.labels = paths, labels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if i == 0:
            self.start = _private_mib()
        _ = len(self.paths[i]) + int(self.labels[i])
        return _private_mib() - self.start if i == len(self) - 1 else 0.0


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux's /proc/self/smaps_rollup")
def test_a_workers_memory_does_not_grow_with_the_sample_table():
    """100,000 samples read once by a forked worker: the dataset's tables (a PathTable and a numpy array) stay
    shared with the parent, where lists of Python objects get copied page by page (their reference counts
    are written on every read). The list case is measured too, so this test can tell the two apart."""
    from trainer.data.datasets import FileDataset

    samples = [(f"/data/imagenet/train/n{i % 1000:08d}/n{i % 1000:08d}_{i:07d}.JPEG", i % 1000) for i in range(100_000)]
    table = FileDataset(samples)
    as_lists = ([p for p, _ in samples], [label for _, label in samples])

    def growth(paths, labels) -> float:
        loader = torch.utils.data.DataLoader(_Touch(paths, labels), batch_size=10_000, num_workers=1)
        return max(float(batch.max()) for batch in loader)

    lists_mib, table_mib = growth(*as_lists), growth(table.paths, table.labels)
    # measured here: lists 15.6 MiB, tables 2.3 MiB (the worker's own allocations while batching, the same
    # for both: a table's growth does not depend on its length)
    assert lists_mib > 10, lists_mib  # what the tables avoid: ~15 MiB per 100 k paths per worker
    assert table_mib < lists_mib / 4, (table_mib, lists_mib)


def _corrupt_in_place(path: Path) -> None:
    """Garbage over the first bytes, the size kept: what a file rewritten under its own name looks like (its
    folder's mtime does not change, so a cached scan stays valid)."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.write(b"\0" * min(size, 64))


def test_an_unreadable_training_file_is_replaced_by_one_of_its_class_the_same_on_every_read(tmp_path):
    from trainer.data.datasets import FileDataset, read_image, replaced_images

    make_folder(tmp_path / "d", ("cat", "dog"), 5)
    samples = [(str(p), 0 if p.parent.name == "cat" else 1) for p in sorted((tmp_path / "d").rglob("*.png"))]
    bad = 6  # dog/1.png
    _corrupt_in_place(Path(samples[bad][0]))
    ds = FileDataset(samples, seed=3, stand_ins=True)
    dogs = {i: read_image(p, True) for i, (p, label) in enumerate(samples) if label == 1 and i != bad}
    first = ds.load(bad)
    assert any(torch.equal(first, image) for image in dogs.values())  # another dog, never a cat
    assert torch.equal(ds.load(bad), first) and replaced_images(ds) == 2  # deterministic; counted each time
    picks = set()
    for epoch in range(6):  # a draw per epoch: (seed, epoch, index) decide it, not the worker or the clock
        ds.set_epoch(epoch)
        picks.add(next(i for i, image in dogs.items() if torch.equal(ds.load(bad), image)))
    assert len(picks) > 1
    strict = FileDataset(samples, seed=3)  # evaluation splits: a file that fails is an error naming it
    with pytest.raises(DataError, match="cannot read image .*1.png"):
        strict.load(bad)
    for i in dogs:  # every other dog unreadable too: an error naming the first, not an endless search
        _corrupt_in_place(Path(samples[i][0]))
    with pytest.raises(DataError, match=r"1.png: .*10 other files of its class .* unreadable too"):
        ds.load(bad)
