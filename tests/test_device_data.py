"""Device-resident data: decoding the split once, batched augmentation that equals the per-sample
definition, an order that does not depend on the process count, and exact positions for resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_folder, write_image
from trainer.data.datasets import ArrayDataset, FileDataset
from trainer.data.device import DeviceLoader, decode_split
from trainer.data.folders import load_rgb, scan_split
from trainer.errors import DataError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def loader(n=37, side=8, batch=4, world=1, rank=0, **kw):
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, side, side), dtype=np.uint8))
    return DeviceLoader(images, list(range(n)), batch, MEAN, STD, seed=3, rank=rank, world=world, **kw)


def reference(dl: DeviceLoader, index: int, offsets, flips) -> torch.Tensor:
    """One sample by the textbook definition: reflect-pad, crop at the offset, mirror, normalise."""
    p = dl.padding
    a = dl.images[index].numpy()
    if p:
        a = np.pad(a, ((0, 0), (p, p), (p, p)), mode="reflect")
    side = dl.images.shape[-1]
    dy, dx = offsets[index].tolist()
    a = a[:, dy:dy + side, dx:dx + side]
    if flips[index]:
        a = a[:, :, ::-1]
    x = torch.from_numpy(a.astype(np.float32))
    return (x - dl.mean[0]) / dl.std[0]


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_batched_augmentation_equals_the_per_sample_definition(padding):
    dl = loader(padding=padding)
    dl.set_epoch(1)
    order, offsets, flips = dl.epoch_plan()
    assert flips.any() and not flips.all()
    if padding:
        assert set(offsets.flatten().tolist()) == set(range(2 * padding + 1))  # every shift is drawn
    for x, y in dl.batches():
        for row, label in zip(x, y.tolist()):  # labels are the image indices here
            assert torch.allclose(row, reference(dl, label, offsets, flips), atol=1e-5)


def test_each_image_once_per_epoch_new_order_each_epoch_same_for_same_seed():
    dl = loader(n=40, batch=8)
    seen = []
    for epoch in (0, 1):
        dl.set_epoch(epoch)
        seen.append(torch.cat([y for _, y in dl.batches()]).tolist())
    assert sorted(seen[0]) == sorted(seen[1]) == list(range(40))
    assert seen[0] != seen[1]
    again = loader(n=40, batch=8)
    again.set_epoch(1)
    assert torch.cat([y for _, y in again.batches()]).tolist() == seen[1]


@pytest.mark.parametrize("n", [40, 37, 33])  # even split, a last batch every rank shares, one too small to share
def test_two_ranks_see_the_batches_of_one_process_with_twice_the_batch(n):
    one = loader(n=n, batch=8, padding=2)
    ranks = [loader(n=n, batch=4, world=2, rank=r, padding=2) for r in (0, 1)]
    for dl in (one, *ranks):
        dl.set_epoch(2)
    assert len(ranks[0]) == len(ranks[1])  # the same step count on every rank: no rank waits in a collective
    batches = list(one.batches())
    per_rank = [list(r.batches()) for r in ranks]
    g = 8
    if n % g and n % g < 2:  # a remainder of 1 cannot give both ranks an image: dropped on both
        batches = batches[:-1]
    assert len(per_rank[0]) == len(batches)
    for (x, y), (x0, y0), (x1, y1) in zip(batches, *per_rank):
        assert torch.equal(torch.cat([y0, y1]), y[: len(y0) + len(y1)])
        assert torch.equal(torch.cat([x0, x1]), x[: len(y0) + len(y1)])


def test_resume_at_batch_k_continues_the_same_epoch():
    dl = loader(padding=2, flip="alternating")
    dl.set_epoch(3)
    full = list(dl.batches())
    tail = list(dl.batches(start=4 * dl.dealing.chunk))  # global position after 4 batches
    assert len(tail) == len(full) - 4
    for (a, b), (c, d) in zip(full[4:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_alternating_flip_mirrors_each_image_on_every_other_epoch():
    dl = loader(n=64, flip="alternating")
    flips = []
    for epoch in range(3):
        dl.set_epoch(epoch)
        flips.append(dl.epoch_plan()[2])
    assert 16 < int(flips[0].sum()) < 48  # a random half first
    assert torch.equal(flips[1], ~flips[0]) and torch.equal(flips[2], flips[0])
    no_flip = loader(n=64, hflip=False)
    assert not no_flip.epoch_plan()[2].any()


def test_last_batch_ends_the_dataloader_for_gradient_accumulation():
    dl = loader(n=20, batch=8)  # 8 + 8 + 4
    ends = []
    for _ in dl.batches():
        ends.append(dl.end_of_dataloader)
    assert ends == [False, False, True]


def test_channels_last_output():
    x, _ = next(iter(loader(channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_decode_matches_pil_for_jpeg_and_png_and_resizes(tmp_path):
    root = make_folder(tmp_path / "jpg", per_class=3, ext=".jpg", size=(12, 12))
    make_folder(tmp_path / "jpg", classes=("bird",), per_class=2, ext=".png", size=(12, 12))
    write_image(tmp_path / "jpg" / "bird" / "gray.jpg", size=(12, 12), mode="L")
    samples = scan_split(root, ["bird", "cat", "dog"])
    ds = FileDataset(samples)
    out = decode_split(ds, 12)
    assert out.dtype == torch.uint8 and out.shape == (len(samples), 3, 12, 12)
    for i, (path, _) in enumerate(samples):
        expected = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        assert (out[i].int() - expected.int()).abs().max() <= 1, path  # libjpeg-turbo either way
    assert decode_split(ds, 6).shape[-1] == 6


def test_cifar_arrays_are_used_as_they_are():
    arr = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    out = decode_split(ArrayDataset(arr, [0] * 5), 8)
    assert torch.equal(out, torch.from_numpy(arr).permute(0, 3, 1, 2))


def test_an_unreadable_file_is_named(tmp_path):
    root = make_folder(tmp_path / "bad", per_class=2, ext=".jpg")
    broken = root / "cat" / "1.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(DataError, match="1.jpg"):
        decode_split(FileDataset(scan_split(root, ["cat", "dog"])), 16)


def test_padding_must_be_smaller_than_the_image():
    with pytest.raises(DataError, match="crop_padding"):
        loader(side=4, padding=4)


def test_a_file_removed_after_the_scan_is_named(tmp_path):
    root = make_folder(tmp_path / "gone", per_class=2, ext=".jpg")
    ds = FileDataset(scan_split(root, ["cat", "dog"]))
    (root / "dog" / "0.jpg").unlink()
    with pytest.raises(DataError, match="dog/0.jpg"):
        decode_split(ds, 16)


def test_drop_last_keeps_full_batches_only():
    for world in (1, 2):
        dl = loader(n=37, batch=4, world=world, drop_last=True)
        assert len(dl) == 37 // (4 * world)
        assert all(len(y) == 4 for _, y in dl.batches())


def test_initialisation_sample_spans_a_class_sorted_folder_and_is_seeded():
    n = 60
    images = torch.zeros((n, 3, 4, 4), dtype=torch.uint8)
    labels = [i // 20 for i in range(n)]  # class by class, as a folder lists them
    for i in range(n):
        images[i] = labels[i] * 100  # the pixel value says the class
    dl = DeviceLoader(images, labels, 4, [0, 0, 0], [1, 1, 1], seed=5)
    first = dl.first(15)
    assert first.shape == (15, 3, 4, 4)
    classes = {round(float(v)) for v in first[:, 0, 0, 0] * 255 / 100}
    assert classes == {0, 1, 2}
    again = DeviceLoader(images, labels, 4, [0, 0, 0], [1, 1, 1], seed=5)
    assert torch.equal(again.first(15), first)
