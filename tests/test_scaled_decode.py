"""Scaled JPEG decoding (data.scaled_decode, trainer.data.folders.decode_region): the scale choice, the mapping of
a crop into the decoded grid, EXIF orientation, the formats that fall back, determinism, and closeness to the
full decode. Its own file beside test_data.py: the module's tests in one place, quick to run (~5 s)."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from trainer.data.datasets import (FileDataset, eval_transform, normalise_uint8, normalising_tail, run_steps,
                                   train_transform)
from trainer.data.device_decode import upright
from trainer.data.folders import (DCT_SCALES, EXIF_ORIENTATION, JpegHeader, dct_scale, decode_bytes, decode_region,
                                  jpeg_header, stored_box)

SIZE = 48  # output side: small enough that 400x300 photos decode at 1/2 and 1/4


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth photo-like image (a coarse random grid upsampled), with a corner marker so turns show."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
    img = np.array(Image.fromarray(base).resize((width, height), Image.BICUBIC))
    img[: height // 6, : width // 6] = (255, 0, 0)  # top-left red: wrong if a turn is missed
    return Image.fromarray(img)


def jpeg_bytes(img: Image.Image, orientation: int = 1, **save) -> bytes:
    out = io.BytesIO()
    if orientation != 1:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        save["exif"] = exif.tobytes()
    img.save(out, "JPEG", quality=92, **save)
    return out.getvalue()


def write(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def datasets(paths, transform, seed=0):
    """The same files through the full path and through the scaled one."""
    full = FileDataset([(p, 0) for p in paths], transform, seed=seed)
    scaled = FileDataset([(p, 0) for p in paths], transform, seed=seed)
    scaled.scaled_decode = True
    return full, scaled


def rrc(size=SIZE):
    return train_transform(size, [0.5] * 3, [0.25] * 3, hflip=True, crop_padding=0, random_resized_crop=True,
                           rrc_min_scale=0.35, color_jitter=0.0)


def test_the_scale_is_the_largest_that_keeps_the_region_at_the_output_size():
    assert dct_scale(480, 640, 224, 224) == 2  # 240 x 320 still covers 224
    assert dct_scale(447, 640, 224, 224) == 1  # 223.5 rows at 1/2: enlarged, so whole
    assert dct_scale(1792, 1800, 224, 224) == 8 and dct_scale(1791, 1800, 224, 224) == 4
    assert dct_scale(100, 100, 224, 224) == 1  # smaller than the output: never below 1
    rng = np.random.default_rng(0)
    for h, w, oh, ow in rng.integers(1, 3000, (500, 4)).tolist():
        s = dct_scale(h, w, oh, ow)
        assert s in DCT_SCALES
        assert s == 1 or (h / s >= oh and w / s >= ow)  # covers the output
        assert s == 8 or not (h / (2 * s) >= oh and w / (2 * s) >= ow)  # and is the smallest such decode


@pytest.mark.parametrize("size", [(400, 300), (403, 301), (17, 9)])
def test_pillows_draft_decodes_exactly_at_one_over_s(size):
    """decode_region asks Pillow for (W // s, H // s): that must pick 1/s, giving ceil(W/s) x ceil(H/s)."""
    width, height = size
    data = jpeg_bytes(photo(width, height))
    for s in DCT_SCALES:
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (width // s, height // s))
            img.load()
            assert img.size == (math.ceil(width / s), math.ceil(height / s)), s


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_box_is_the_same_pixels_before_the_turn(orientation):
    stored = torch.arange(3 * 7 * 11).reshape(3, 7, 11)
    turned = upright(stored, orientation)
    rng = np.random.default_rng(orientation)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, turned.shape[-2:]))
        top, left = int(rng.integers(0, turned.shape[-2] - h + 1)), int(rng.integers(0, turned.shape[-1] - w + 1))
        t, l, sh, sw = stored_box((top, left, h, w), orientation, 7, 11)
        assert torch.equal(upright(stored[:, t:t + sh, l:l + sw], orientation),
                           turned[:, top:top + h, left:left + w])


def test_header_is_read_for_scalable_jpegs_only(tmp_path):
    img = photo(64, 48)
    assert jpeg_header(jpeg_bytes(img, 6)) == JpegHeader(64, 48, 6)
    assert jpeg_header(jpeg_bytes(img, 6)).upright_size() == (64, 48)
    assert jpeg_header(jpeg_bytes(img, 6), exif_orientation=False).orientation == 1
    assert jpeg_header(jpeg_bytes(img.convert("L"))) == JpegHeader(64, 48, 1)
    assert jpeg_header(jpeg_bytes(img, progressive=True)) == JpegHeader(64, 48, 1)
    assert jpeg_header(jpeg_bytes(img.convert("CMYK"))) is None  # full path: PIL's CMYK conversion
    png = io.BytesIO()
    img.save(png, "PNG")
    assert jpeg_header(png.getvalue()) is None
    assert jpeg_header(jpeg_bytes(img)[:40]) is None  # a cut header: the full path names the error


def test_at_scale_one_a_sample_is_the_full_paths_bit_for_bit(tmp_path):
    """A crop that cannot shrink (small image) gives exactly the full path's tensor: same draws, same pixels."""
    paths = [write(tmp_path, f"{i}.jpg", jpeg_bytes(photo(80, 60, i), 1 + i % 8)) for i in range(8)]
    full, scaled = datasets(paths, rrc())
    for epoch in (0, 3):
        full.set_epoch(epoch), scaled.set_epoch(epoch)
        for i in range(len(paths)):
            assert torch.equal(full[i][0], scaled[i][0])


def test_scaled_samples_are_close_to_the_full_decode_of_the_same_crop(tmp_path):
    """At 1/2 and 1/4 a sample differs from the full decode of the same (snapped) crop by little: the DCT
    scaling's loss before a shrink the full path makes anyway."""
    paths = [write(tmp_path, f"{i}.jpg", jpeg_bytes(photo(400, 300, i))) for i in range(6)]
    full, scaled = datasets(paths, eval_transform(SIZE, [0.0] * 3, [1 / 255] * 3))  # normalised = 0-255 levels
    scales = set()
    for i, path in enumerate(paths):
        data = open(path, "rb").read()
        header = jpeg_header(data)
        for box in [(0, 0, 300, 400), (40, 100, 200, 260), (8, 16, 100, 100), (8, 16, 60, 70)]:
            s = dct_scale(box[2], box[3], SIZE, SIZE)
            scales.add(s)
            got = decode_region(data, header, box, (SIZE, SIZE)).float()
            snapped = [int(v / s + 0.5) * s for v in (box[0], box[1], box[0] + box[2], box[1] + box[3])]
            want = TF.resized_crop(decode_bytes(data), snapped[0], snapped[1], snapped[2] - snapped[0],
                                   snapped[3] - snapped[1], [SIZE, SIZE], antialias=True).float()
            assert (got - want).abs().mean() < 1.5, (i, box)  # levels of 255
        # evaluation: the whole image at 1/4 (75 x 100 rows and columns cover 48), close to the full decode
        assert scaled.scaled_sample(i) is not None
        assert (full[i][0] - scaled[i][0]).abs().mean() < 1.5
    assert scales == {1, 2, 4}


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied_at_every_scale(tmp_path, orientation):
    img = photo(400, 300)
    path = write(tmp_path, "a.jpg", jpeg_bytes(img, orientation))
    full, scaled = datasets([path], eval_transform(SIZE, [0.0] * 3, [1 / 255] * 3))
    assert jpeg_header(open(path, "rb").read()).orientation == orientation
    assert scaled.scaled_sample(0) is not None
    got, want = scaled[0][0], full[0][0]
    assert (got - want).abs().mean() < 1.5
    stored = TF.resize(torch.from_numpy(np.array(img)).permute(2, 0, 1), [SIZE, SIZE], antialias=True).float()
    assert (got - stored).abs().mean() > 10  # not the stored pixels: the turn was applied
    off = FileDataset([(path, 0)], eval_transform(SIZE, [0.0] * 3, [1 / 255] * 3), exif_orientation=False)
    off.scaled_decode = True
    assert (off[0][0] - stored).abs().mean() < 1.5  # data.exif_orientation=false: as stored


def test_scaled_samples_are_bitwise_deterministic_and_a_function_of_seed_epoch_index(tmp_path):
    paths = [write(tmp_path, f"{i}.jpg", jpeg_bytes(photo(400, 300, i), 1 + i % 8)) for i in range(4)]
    _, a = datasets(paths, rrc(), seed=5)
    _, b = datasets(paths, rrc(), seed=5)
    _, other = datasets(paths, rrc(), seed=6)
    for epoch in (0, 1):
        for ds in (a, b, other):
            ds.set_epoch(epoch)
        for i in reversed(range(len(paths))):  # order of reads does not matter
            assert torch.equal(a[i][0], b[i][0])
            assert not torch.equal(a[i][0], other[i][0])
    a.set_epoch(0)
    first = a[0][0]
    a.set_epoch(1)
    assert not torch.equal(first, a[0][0])
    a.set_epoch(0)
    assert torch.equal(first, a[0][0])


def test_formats_it_does_not_cover_take_the_full_path_bit_for_bit(tmp_path):
    img = photo(400, 300)
    png = io.BytesIO()
    img.save(png, "PNG")
    paths = [write(tmp_path, "a.png", png.getvalue()), write(tmp_path, "b.jpg", jpeg_bytes(img.convert("CMYK")))]
    full, scaled = datasets(paths, rrc())
    for i in range(len(paths)):
        assert torch.equal(full[i][0], scaled[i][0])
    # pad-crop-flip (the small-image augmentation) decodes whole whatever the format
    _, pcf = datasets([write(tmp_path, "c.jpg", jpeg_bytes(img))], train_transform(
        SIZE, [0.5] * 3, [0.25] * 3, hflip=True, crop_padding=4, random_resized_crop=False, rrc_min_scale=0.35,
        color_jitter=0.0))
    assert pcf.scaled_sample(0) is None


def test_a_damaged_jpeg_still_fails_naming_the_file(tmp_path):
    from trainer.errors import DataError

    data = jpeg_bytes(photo(400, 300))
    path = write(tmp_path, "cut.jpg", data[: len(data) // 3] + b"\x00" * 10)
    _, scaled = datasets([path], rrc())
    with pytest.raises(DataError, match="cut.jpg"):
        scaled[0]


def test_build_data_sets_the_key_on_every_split(tmp_path):
    from trainer.config import load_config
    from trainer.data import build_data

    for cls in ("a", "b"):
        for i in range(3):
            (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / cls / f"{i}.jpg").write_bytes(jpeg_bytes(photo(64, 48, i)))
    for on in (True, False):
        cfg = load_config(None, [f"data.root={tmp_path / 'd'}", "data.format=imagefolder", "data.val_fraction=0.34",
                                 f"data.scaled_decode={str(on).lower()}", "data.cache_dir=off"])
        data = build_data(cfg.data, seed=0, log=lambda *_: None)
        assert {split: ds.scaled_decode for split, ds in data.datasets.items()} == {"train": on, "val": on}


def test_predicts_read_is_the_eval_splits_bit_for_bit(tmp_path):
    """`trainer predict` of a model trained with data.scaled_decode decodes as its evaluation split did
    (read_eval_image with the model's image size), so its probabilities reproduce eval.json."""
    from trainer.data.datasets import fit_size, read_eval_image

    paths = [write(tmp_path, f"{i}.jpg", jpeg_bytes(photo(400, 300, i), 1 + 2 * i)) for i in range(4)]
    transform = eval_transform(SIZE, [0.5] * 3, [0.25] * 3)
    assert fit_size(transform) == (SIZE, SIZE) and fit_size(rrc()) is None
    _, scaled = datasets(paths, transform)
    for i, path in enumerate(paths):
        assert torch.equal(scaled[i][0], transform(read_eval_image(path, True, fit_size(transform))))
    assert torch.equal(read_eval_image(paths[0], True), decode_bytes(open(paths[0], "rb").read()))  # fit None: whole


def test_dataloader_workers_give_the_main_processs_batches(tmp_path):
    """Which worker decodes a sample, and when, changes nothing (exact resume relies on it)."""
    paths = [write(tmp_path, f"{i}.jpg", jpeg_bytes(photo(400, 300, i), 1 + i % 8)) for i in range(6)]
    _, scaled = datasets(paths, rrc(), seed=1)
    scaled.set_epoch(2)
    batches = [torch.cat([x for x, _ in torch.utils.data.DataLoader(scaled, batch_size=2, num_workers=w)])
               for w in (0, 2)]
    assert torch.equal(*batches)


def test_packed_shards_decode_their_jpeg_bytes_at_the_same_scale_as_the_folder(tmp_path):
    from trainer.config import load_config
    from trainer.data import build_data, shards

    for split, n in (("train", 3), ("val", 1)):
        for cls in ("a", "b"):
            (tmp_path / "d" / split / cls).mkdir(parents=True)
            for i in range(n):
                (tmp_path / "d" / split / cls / f"{i}.jpg").write_bytes(jpeg_bytes(photo(400, 300, i), 1 + 3 * i))
    shards.pack(tmp_path / "d", tmp_path / "packed", say=lambda *_: None)

    def data(root, fmt):
        cfg = load_config(None, [f"data.root={root}", f"data.format={fmt}", f"data.image_size={SIZE}",
                                 "data.augment.random_resized_crop=true", "data.cache_dir=off"])
        return build_data(cfg.data, seed=0, log=lambda *_: None)

    a, b = data(tmp_path / "d", "imagefolder"), data(tmp_path / "packed", "shards")
    for split in ("train", "val"):
        da, db = a.datasets[split], b.datasets[split]
        assert da.scaled_decode and db.scaled_decode
        for i in range(len(da)):
            assert db.scaled_sample(i) is not None  # the shard's bytes took the scaled path
            assert torch.equal(da[i][0], db[i][0])


@pytest.mark.parametrize("kind", ["grayscale", "progressive"])
def test_grayscale_and_progressive_jpegs_decode_at_a_reduced_scale_too(tmp_path, kind):
    img = photo(400, 300)
    data = jpeg_bytes(img.convert("L")) if kind == "grayscale" else jpeg_bytes(img, progressive=True)
    path = write(tmp_path, "a.jpg", data)
    full, scaled = datasets([path], eval_transform(SIZE, [0.0] * 3, [1 / 255] * 3))
    assert jpeg_header(data) is not None and scaled.scaled_sample(0) is not None  # not the full path's fallback
    assert (full[0][0] - scaled[0][0]).abs().mean() < 1.5  # at 1/4: 75 x 100 covers 48


# ---- every Fit of the pretrained weights' preprocessing (data.crop_mode, data.crop_pct, data.interpolation) ----

FITS = [  # (crop_mode, crop_pct, interpolation), the size its evaluation first resizes the whole image to
    (("squash", 1.0, "bilinear"), (SIZE, SIZE)),  # the plain squash: a fixed (h, w) Resize
    (("squash", 0.75, "bicubic"), (64, 64)),  # squash to 64 x 64, then the centre 48
    (("center", 0.75, "bilinear"), (64,)),  # the shorter side to 64, aspect kept, then the centre 48
    (("center", 0.875, "bicubic"), (54,)),
    (("center", 1.0, "nearest"), (SIZE,)),
]


@pytest.mark.parametrize("fit, first", FITS)
def test_every_fit_decodes_at_the_largest_scale_that_keeps_its_first_resize(tmp_path, fit, first):
    """The scale only reduces by a DCT factor that keeps the first Resize's output size (for a shorter-side
    Resize: the image's shorter side >= its side, so the scale follows the header's size), never more; the
    transform's own Resize (whatever its interpolation) and crop then apply, close to the full decode's pixels."""
    from trainer.data.datasets import Fit, fit_size
    from trainer.data.folders import decode_fit

    transform = eval_transform(SIZE, [0.0] * 3, [1 / 255] * 3, Fit(*fit))
    assert fit_size(transform) == first
    need = (first[0], first[0]) if len(first) == 1 else first
    for width, height, orientation in [(400, 300, 1), (300, 400, 1), (400, 300, 6), (1000, 130, 1), (90, 700, 8)]:
        data = jpeg_bytes(photo(width, height), orientation)
        header = jpeg_header(data)
        up_h, up_w = header.upright_size()
        image = decode_fit(data, header, first)
        s = round(up_w / image.shape[-1])
        assert image.shape[-2:] == (math.ceil(up_h / s), math.ceil(up_w / s))
        assert min(image.shape[-2:]) >= min(need) and image.shape[-2] >= need[0] and image.shape[-1] >= need[1]
        assert s == 8 or up_h / (2 * s) < need[0] or up_w / (2 * s) < need[1]  # the next scale would not keep it
        full, scaled = datasets([write(tmp_path, f"{width}_{orientation}.jpg", data)], transform)
        assert scaled.scaled_sample(0) is not None and scaled[0][0].shape == (3, SIZE, SIZE)
        assert (full[0][0] - scaled[0][0]).abs().mean() < 4  # the same content: only the decode's scale differs


def test_a_shorter_side_fit_keeps_the_shorter_side_not_the_area():
    """crop_mode=center on a 1000 x 130 panorama: the shorter side (130) is what Resize(64) maps to 64, so
    only 1/2 keeps it (65 rows), though 1/8 would keep 125 x 17 pixels' worth of area."""
    from trainer.data.folders import decode_fit

    data = jpeg_bytes(photo(1000, 130))
    assert decode_fit(data, jpeg_header(data), (64,)).shape[-2:] == (65, 500)
    assert decode_fit(data, jpeg_header(data), (66,)).shape[-2:] == (130, 1000)  # 1/2 would give 65 < 66: whole


@pytest.mark.parametrize("fit", [f for f, _ in FITS])
def test_predict_is_the_eval_split_under_every_fit(tmp_path, fit):
    """`trainer predict` (and the ONNX check: the same eval_fit_size and read_eval_image) of a model trained with
    data.scaled_decode and a centre crop or shorter-side fit gives its eval split's inputs bit for bit: the
    split built by build_data from the config, predict's from model.json alone (Fit.from_meta)."""
    from trainer.config import load_config
    from trainer.data import build_data
    from trainer.data.datasets import Fit, eval_fit_size, read_eval_image
    from trainer.tasks.classify import Classification

    for cls in ("a", "b"):
        for i in range(3):
            (tmp_path / "d" / cls).mkdir(parents=True, exist_ok=True)
            (tmp_path / "d" / cls / f"{i}.jpg").write_bytes(jpeg_bytes(photo(400 - 90 * i, 300, i), 1 + 3 * i))
    mode, pct, interp = fit
    cfg = load_config(None, [f"data.root={tmp_path / 'd'}", "data.format=imagefolder", "data.val_fraction=0.5",
                             f"data.image_size={SIZE}", f"data.crop_mode={mode}", f"data.crop_pct={pct}",
                             f"data.interpolation={interp}", "data.cache_dir=off"])
    data = build_data(cfg.data, seed=0, log=lambda *_: None)
    val = data.datasets["val"]
    meta = {"image_size": SIZE, "mean": data.mean, "std": data.std, "scaled_decode": True,
            **Fit.from_cfg(cfg.data).meta(SIZE)}
    fit = eval_fit_size(meta)
    assert fit is not None and eval_fit_size({**meta, "scaled_decode": False}) is None
    for i in range(len(val)):
        assert val.scaled_sample(i) is not None  # the eval split took the scaled path
        batch, = Classification.predict_batch([read_eval_image(val.paths[i], val.exif_orientation, fit)], meta, "cpu")
        assert torch.equal(batch[0], val[i][0])


@pytest.mark.parametrize("chain", ["rrc", "eval", "jitter", "erasing"])
def test_run_steps_gives_v2_composes_floats_bit_for_bit(chain):
    """run_steps computes the closing ToImage, ToDtype, Normalize as plain tensor operations: the same floats as
    v2.Compose, with the same draws (a chain that does not end with them runs step by step)."""
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    transform = {"rrc": rrc(), "eval": eval_transform(SIZE, mean, std),
                 "jitter": train_transform(SIZE, mean, std, True, 0, True, 0.35, 0.4),
                 "erasing": train_transform(SIZE, mean, std, True, 0, True, 0.35, 0.0, random_erasing=1.0)}[chain]
    for seed in range(4):
        image = torch.from_numpy(np.array(photo(90, 70, seed))).permute(2, 0, 1)
        torch.manual_seed(seed)
        want = transform(image)
        torch.manual_seed(seed)
        got = run_steps(transform.transforms, image)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        tail = normalising_tail(transform)
        assert (tail is None) == (chain == "erasing")  # RandomErasing after it: the chain normalises per sample
        if tail is not None:  # the uint8 sample, normalised as a batch would be: the same floats
            torch.manual_seed(seed)
            raw = run_steps(transform.transforms, image, uint8=True)
            assert raw.dtype == torch.uint8 and torch.equal(normalise_uint8(raw[None], *tail)[0], want)


def test_a_loader_that_normalises_batches_gives_the_per_sample_floats(tmp_path):
    """WorkerLoader's `normalise` (build_train_loader's on a GPU; here on the CPU): uint8 samples from the
    workers, batches normalised after collation, equal to the float samples' batches, scaled or not."""
    from trainer.data.loaders import WorkerLoader

    paths = [write(tmp_path, f"{i}.jpg", jpeg_bytes(photo(200, 150, i))) for i in range(10)]
    transform = rrc()
    batches = []
    for normalise in (None, normalising_tail(transform)):
        _, ds = datasets(paths, transform, seed=3)
        loader = WorkerLoader(ds, 4, seed=3, num_workers=0, prefetch_factor=2, pin_memory=False,
                              first_transform=None, normalise=normalise)
        loader.set_epoch(1)
        batches.append(list(loader.batches()))
        assert ds.uint8_samples == (normalise is not None)
    assert len(batches[0]) == len(batches[1]) == 3
    for (a, y), (b, z) in zip(*batches):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(y, z)


def _tiff_orientation(orientation: int, endian: str = "<", long: bool = False) -> bytes:
    """An Exif APP1 payload holding only the Orientation tag, as a SHORT (the standard) or a LONG."""
    import struct
    value = struct.pack(endian + "I", orientation) if long else struct.pack(endian + "HH", orientation, 0)
    entry = struct.pack(endian + "HHI", EXIF_ORIENTATION, 4 if long else 3, 1) + value
    return (b"Exif\x00\x00" + (b"II" if endian == "<" else b"MM") + struct.pack(endian + "HI", 42, 8)
            + struct.pack(endian + "H", 1) + entry + struct.pack(endian + "I", 0))


def _with_app1(data: bytes, payloads) -> bytes:
    import struct
    return data[:2] + b"".join(b"\xff\xe1" + struct.pack(">H", len(p) + 2) + p for p in payloads) + data[2:]


XMP_ORIENTATION_6 = (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf="
                     b"'http://www.w3.org/1999/02/22-rdf-syntax-ns#'><rdf:Description xmlns:tiff="
                     b"'http://ns.adobe.com/tiff/1.0/' tiff:Orientation='6'/></rdf:RDF></x:xmpmeta>")


@pytest.mark.parametrize("case", ["xmp-before-exif", "long-tag", "xmp-only"])
def test_every_decode_of_a_jpeg_turns_it_by_one_rule(tmp_path, case):
    """A JPEG's EXIF Orientation read one way everywhere (folders.jpeg_orientation): torchvision's own reader
    missed an Exif segment after an XMP one and a tag stored as a LONG, while the header of the scaled decode
    read them, so a crop drawn on the turned size was cut from the unturned image (up to 96% of a sample zero
    padding); PIL's exif_transpose, which trainer pack used, also took XMP's orientation, which nothing else did."""
    from trainer.data.folders import decode_fit, decode_jpeg_rgb, jpeg_bytes_orientation, load_rgb
    from trainer.data.masks import image_orientation

    plain = jpeg_bytes(photo(400, 300))
    data, want = {"xmp-before-exif": (_with_app1(plain, [XMP_ORIENTATION_6, _tiff_orientation(6)]), 6),
                  "long-tag": (_with_app1(plain, [_tiff_orientation(8, ">", long=True)]), 8),
                  "xmp-only": (_with_app1(plain, [XMP_ORIENTATION_6]), 1)}[case]
    assert jpeg_header(data).orientation == jpeg_bytes_orientation(data) == image_orientation(data) == want
    as_stored = decode_jpeg_rgb(torch.frombuffer(bytearray(data), dtype=torch.uint8), False)
    whole = decode_bytes(data)
    assert torch.equal(whole, upright(as_stored, want))  # torchvision's decode, turned by the rule
    assert load_rgb(io.BytesIO(data)).size == (whole.shape[2], whole.shape[1])  # PIL's (trainer pack's) alike
    header = jpeg_header(data)
    assert decode_fit(data, header, (75, 75)).shape[-2:] == tuple(s // 4 for s in whole.shape[-2:])  # 1/4, turned
    # every training sample, on both paths, as from the same pixels with the tag written the standard way
    standard = jpeg_bytes(photo(400, 300), want)
    odd = datasets([write(tmp_path, "odd.jpg", data)], rrc(SIZE))
    same = datasets([write(tmp_path, "standard.jpg", standard)], rrc(SIZE))
    for epoch in range(12):  # crops whose scale is 1 and crops decoded smaller
        for got, expected in zip(odd, same):
            got.set_epoch(epoch)
            expected.set_epoch(epoch)
            assert torch.equal(got[0][0], expected[0][0]), epoch


def test_an_eval_decode_is_not_stretched_by_the_last_partial_block():
    """decode_fit at 1/8 of a 1801-px-wide image: the last decoded column stands for one stored column only.
    Kept, it stretched the image by 7/8 of a decoded pixel towards the right; dropped, a sharp edge at 90% of
    the width lies where the full decode puts it, within a fifth of an output pixel."""
    from trainer.data.folders import decode_fit

    pixels = np.zeros((1801, 1801, 3), np.uint8)
    pixels[:, 1621:] = 255  # 1621 = 90% of the width
    data = jpeg_bytes(Image.fromarray(pixels))
    header = jpeg_header(data)
    scaled = decode_fit(data, header, (224, 224))
    assert scaled.shape[-2:] == (225, 225)  # 1/8: 225.125 -> 225, not ceil's 226
    edge = []
    for image in (decode_bytes(data), scaled):
        out = TF.resize(image, [224, 224], antialias=True).float().mean((0, 1))
        edge.append(224 - float((out / 255).sum()))  # where the bright band starts, in output pixels
    assert abs(edge[0] - edge[1]) < 0.2
