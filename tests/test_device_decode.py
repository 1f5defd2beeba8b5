"""data.decode_device=cuda: the workers read the files, the main process decodes each batch's JPEGs in one call
and augments them on the training device (trainer.data.device_decode).

nvJPEG itself needs a GPU (tests/test_cuda.py runs it there). Everything around it is device-agnostic, so here
the same decoder runs with device=cpu, where torchvision's batched decode is libjpeg-turbo: the batches must
then be bitwise those of the worker path (same files, same transform, same per-sample seeds), on resume too,
with EXIF-turned photos, a PNG among the JPEGs and a JPEG gone bad after the start-up check."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from accelerate.utils import set_seed

from tests import test_checkpoint
from tests.conftest import assert_same_run, make_folder, run_cli
from trainer.data.datasets import FileDataset, train_transform
from trainer.data.device_decode import BatchDecoder, EncodedBatch, upright
from trainer.data.folders import decode_jpeg_rgb, jpeg_bytes_orientation
from trainer.data.loaders import WorkerLoader, build_train_loader
from trainer.distributed import make_accelerator
from trainer.errors import ConfigError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def jpeg(pixels: np.ndarray, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90, exif=exif)
    return out.getvalue()


def pixels(seed: int, size=(20, 14)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_upright_turns_a_photo_as_the_cpu_decoder_does(orientation):
    data = jpeg(pixels(orientation), orientation)
    assert jpeg_bytes_orientation(data) == orientation
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    as_stored = decode_jpeg_rgb(raw, exif_orientation=False)
    assert torch.equal(upright(as_stored, orientation), decode_jpeg_rgb(raw, exif_orientation=True))


def test_a_header_without_exif_or_not_an_image_reads_as_upright():
    assert jpeg_bytes_orientation(jpeg(pixels(0))) == 1
    assert jpeg_bytes_orientation(b"\xff\xd8\xff not a jpeg at all") == 1


def folder(tmp_path, n=14):
    """JPEGs of two classes and two sizes, a photo stored sideways, a PNG among them; the last JPEG of class 0
    is overwritten with garbage after the (simulated) start-up check."""
    samples = []
    for i in range(n):
        label = i % 2
        path = tmp_path / str(label) / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg(pixels(i, (20, 14) if i % 3 else (12, 18)), orientation=6 if i == 3 else 1))
        samples.append((str(path), label))
    png = tmp_path / "1" / "odd.png"
    Image.fromarray(pixels(99)).save(png)
    samples.append((str(png), 1))
    bad = samples[n - 2][0]
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8\xff" + bytes(range(256)) * 4)  # a JPEG's magic, then nothing decodable
    return samples, bad


@pytest.mark.parametrize("augment", ["pad_crop_flip", "v2_chain"])
def test_batches_decoded_by_the_batch_decoder_are_those_of_the_worker_path_and_resume_alike(tmp_path, augment,
                                                                                            capsys):
    samples, bad = folder(tmp_path)
    set_seed(5)  # as the loop does: accelerate's seedable sampler draws its seed from torch's
    acc = make_accelerator("cpu", "no")
    rrc = augment == "v2_chain"
    transform = train_transform(16, MEAN, STD, hflip=True, crop_padding=2, random_resized_crop=rrc,
                                rrc_min_scale=0.3, color_jitter=0.3 if rrc else 0.0)
    datasets, loaders = [], []
    for on_device in (False, True):
        ds = FileDataset(samples, transform, seed=5, stand_ins=True)
        decoder = BatchDecoder(ds, torch.device("cpu")) if on_device else None
        loader = WorkerLoader(ds, 4, seed=5, num_workers=1, prefetch_factor=2, pin_memory=False,
                              first_transform=None, decoder=decoder)
        loader.prepare(acc)
        datasets.append(ds)
        loaders.append(loader)
    epochs = {}
    for which, loader in enumerate(loaders):
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            epochs[which, epoch] = [(x.clone(), y.clone()) for x, y in loader.batches()]
        loader.set_epoch(1)
        epochs[which, "resumed"] = list(loader.batches(start=2 * loader.dealing.chunk))
    for key in (0, 1, "resumed"):
        assert len(epochs[0, key]) == len(epochs[1, key]) > 0
        for (a, b), (c, d) in zip(epochs[0, key], epochs[1, key]):
            assert a.shape == (len(b), 3, 16, 16) and torch.equal(a, c) and torch.equal(b, d)
    assert [len(e) for e in (epochs[1, 1], epochs[1, "resumed"])] == [4, 2]
    assert all(torch.equal(a, c) for (a, _), (c, _) in zip(epochs[1, 1][2:], epochs[1, "resumed"]))
    assert not torch.equal(epochs[1, 0][0][0], epochs[1, 1][0][0])  # epochs differ
    # the bad JPEG: replaced by a file of its class in both paths, as often (once an epoch; the resumed pass
    # skipped its batch), each time named (the decoder's lines: in this process; the workers' go to their stderr)
    assert datasets[0].replaced() == datasets[1].replaced() == 2
    assert capsys.readouterr().err.count(f"cannot read image {bad}") == 2


def test_the_decoder_hands_the_device_decoded_and_labelled_batches_and_leaves_workers_the_reading(tmp_path):
    samples, _ = folder(tmp_path, n=6)
    ds = FileDataset(samples, train_transform(16, MEAN, STD, True, 0, False, 0.3, 0.0), seed=1)
    decoder = BatchDecoder(ds, torch.device("cpu"))
    items = [decoder.samples[i] for i in (0, 3, 6)]  # a JPEG, the sideways photo, the PNG
    assert [i for i, _, _ in items] == [0, 3, 6] and [o for _, _, o in items] == [1, 6, 1]
    assert items[0][1].dim() == 1 and items[1][1].dim() == 1  # bytes: decoded by the main process
    assert items[2][1].shape == (3, 14, 20)  # not a JPEG: decoded in the worker, on the CPU
    batch = EncodedBatch([i for i, _, _ in items], [p for _, p, _ in items], [o for _, _, o in items])
    x, y = decoder(batch)
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 1, 1]


def test_build_train_loader_refuses_gpu_decode_without_a_gpu(tmp_path):
    from trainer.config import load_config

    samples, _ = folder(tmp_path, n=4)
    cfg = load_config(None, ["data.format=imagefolder", f"data.root={tmp_path}", "data.decode_device=cuda"]).data
    with pytest.raises(ConfigError, match=r"data.decode_device=cuda .*\(no CUDA device\)"):
        build_train_loader(FileDataset(samples), cfg, 2, 0, make_accelerator("cpu", "no"), MEAN, STD, 2, False,
                           say=lambda *a: None)


# ---- the whole loop through the decoder ----

def jpeg_folder(root: Path) -> Path:
    """An image folder of 4 classes of JPEGs (train 40, val 13 per class), one training photo stored sideways
    with its EXIF tag."""
    for split, per_class in (("train", 40), ("val", 13)):
        make_folder(root / split, classes=("a", "b", "c", "d"), per_class=per_class, ext=".jpg", size=(40, 28))
    exif = Image.Exif()
    exif[0x0112] = 6
    with Image.open(root / "train" / "a" / "0.jpg") as img:
        img.convert("RGB").save(root / "train" / "a" / "sideways.jpg", exif=exif, quality=95)
    return root


# data.decode_device=cuda with the refusal lifted, in a driver of the test: the decoder then runs on the run's
# device, the CPU, through the real loop (the product itself refuses it there)
CPU_DECODER = r'''
import trainer.data.loaders as _loaders, trainer.session as _session
_loaders.check_decode_device = _session.check_decode_device = lambda *a: None
'''


@pytest.mark.slow
def test_a_run_through_the_decoder_is_the_worker_paths_run_and_resumes_bitwise_after_sigkill(tmp_path, monkeypatch):
    """The decoder's whole path through the loop (workers reading, the main process decoding and augmenting)
    killed at update 7 and resumed by the same command ends bitwise equal to an uninterrupted run of the worker
    path: on the CPU the two decode alike, so any difference would be the path's (order, seeds, resume)."""
    root = jpeg_folder(tmp_path / "jpegs")
    data = {"data.format": "imagefolder", "data.root": str(root), "data.num_workers": 2, "data.image_size": 16}
    ref = run_cli("train", "-", *test_checkpoint.overrides(tmp_path, "ref", **data))
    assert ref.returncode == 0, ref.stderr[-3000:]
    monkeypatch.setattr(test_checkpoint, "DRIVER", CPU_DECODER + test_checkpoint.DRIVER)
    args = test_checkpoint.overrides(tmp_path, "run", **data, **{"data.decode_device": "cuda"})
    killed = test_checkpoint.run_driver(tmp_path, args, "kill_at_update", 7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "decoded and augmented on cpu" in killed.stdout
    resumed = test_checkpoint.run_driver(tmp_path, args, "none", 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    assert_same_run(tmp_path / "ref", tmp_path / "run")
