import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import make_folder, write_image
from trainer.config import load_config
from trainer.data import build_data, class_balanced_sampler
from trainer.data.folders import imagefolder_splits, stratified_split
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
    overrides = [f"data.format=imagefolder", f"data.root={root}", "data.image_size=16"] + [f"{k}={v}" for k, v in kw.items()]
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
                      seed=0, verbose=lambda *_: None)
    assert sorted(data.skipped) == sorted(bad)
    assert len(data.datasets["train"]) + len(data.datasets["val"]) == 10


def test_bad_image_at_load_time_names_the_file(tmp_path):
    bad = _with_bad_files(tmp_path / "d")
    data = build_data(_data_cfg(tmp_path / "d", **{"data.verify_images": "false", "data.val_fraction": 0.2,
                                                    "data.mean": "[0.5,0.5,0.5]", "data.std": "[0.2,0.2,0.2]"}), seed=0)
    found = [(ds, i, p) for ds in data.datasets.values() for i, p in enumerate(ds.paths) if p in bad]
    assert sorted(p for _, _, p in found) == sorted(bad)
    for ds, i, path in found:  # not-an-image and truncated JPEG: both fall through decode_jpeg to PIL's error
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


def test_cifar_read_offline_from_existing_copy(tmp_path, monkeypatch):
    """A copy in torchvision's layout is read without a download (integrity check stubbed for fake files)."""
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
