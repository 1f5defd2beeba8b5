"""Device-resident training data: the whole split as one uint8 tensor on the training device, augmented in
batches there, with no DataLoader workers (the airbench / hlb-CIFAR10 data path).

Why: for CIFAR-size data the per-sample path (decode, pad, crop, flip, collate in workers) costs more than
the model on a fast GPU, and on this 2-core CPU it competes with the model for the same cores. Decoding
once (CIFAR-10 train: 50,000 JPEGs in ~3 s, 150 MB as uint8) and augmenting a whole batch with one gather
removes that cost.

Order and augmentation are pure functions of (seed, epoch): one permutation and one set of crop offsets
and flips per epoch, drawn by a generator seeded from them, indexed by position in the epoch. Every rank
holds the whole uint8 split and takes its own slice of each global batch (trainer/data/order.py deals them:
rank r gets positions [r x B, (r + 1) x B) of it), so the batches seen are the same on 1 process with batch 2B
as on 2 processes with batch B, and a resume continues from the epoch's sample position on any process count.
Mixup/CutMix (trainer.data.mixing), when on, mixes each rank's batch on the device, seeded by (seed, epoch,
micro-step index, rank).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from trainer.data.datasets import ArrayDataset, FileDataset, init_sample, sample_seed
from trainer.data.folders import decode_jpeg_rgb
from trainer.data.mixing import BatchMixer
from trainer.data.order import Dealing, EpochSteps, rank_batches
from trainer.data.shards import ShardDataset
from trainer.errors import DataError

DECODE_CHUNK = 1024  # files per batched decode_jpeg call (a list call is ~10x faster than one file at a time)
# concurrent file reads while decoding: uncached reads are latency-bound (5,000 uncached CIFAR files: 2.4 s with
# 4 threads, 0.7 s with 16, 0.6 s with 64 on this VM's disk); cached ones take ~0.3 s per 10,000 either way
READ_THREADS = 16


def _resized(x: torch.Tensor, image_size: int) -> torch.Tensor:
    # the antialiased uint8 tensor resize that evaluation's transform (eval_transform) applies too
    if tuple(x.shape[-2:]) == (image_size, image_size):
        return x
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(x, [image_size, image_size], antialias=True)


def decode_split(dataset, image_size: int) -> torch.Tensor:
    """The whole split as a (N, 3, S, S) uint8 tensor on the CPU, in dataset order.

    JPEGs go through torchvision's batched decode_jpeg; other formats, and any chunk holding a JPEG it
    refuses, file by file through the dataset's own reader (`FileDataset.load`: PIL for what decode_jpeg
    refuses), which also names a file that nothing can read. Both apply the EXIF orientation as the
    dataset says (`dataset.exif_orientation`), so the images are those the per-sample path gives.
    """
    if isinstance(dataset, ArrayDataset):  # CIFAR arrays: (N, H, W, 3) uint8 already in memory
        x = torch.from_numpy(np.ascontiguousarray(dataset.images)).permute(0, 3, 1, 2)
        return _resized(x, image_size).contiguous()
    if isinstance(dataset, ShardDataset):  # packed: read by row from memory-mapped shards, no file to open
        out = torch.empty((len(dataset), 3, image_size, image_size), dtype=torch.uint8)
        for i in range(len(dataset)):
            out[i] = _resized(dataset.load(i), image_size)
        return out
    if not isinstance(dataset, FileDataset):
        raise DataError(f"data.loader=device cannot load a {type(dataset).__name__}")
    out = torch.empty((len(dataset.paths), 3, image_size, image_size), dtype=torch.uint8)
    jpegs = [i for i, p in enumerate(dataset.paths) if p.lower().endswith((".jpg", ".jpeg"))]
    others = sorted(set(range(len(dataset.paths))) - set(jpegs))
    # Reading many small files is latency-bound when they are not in the page cache (50,000 CIFAR files: 85 s
    # one at a time on this VM's disk, ~3 s with 4 threads); threads overlap the reads (reads release the GIL).
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        for start in range(0, len(jpegs), DECODE_CHUNK):
            idx = jpegs[start:start + DECODE_CHUNK]
            paths = [dataset.paths[i] for i in idx]
            raw = [b for part in pool.map(_read_files, [paths[k:k + 64] for k in range(0, len(paths), 64)])
                   for b in part]
            try:
                images = decode_jpeg_rgb(raw, dataset.exif_orientation)  # a list: one batched call
            except RuntimeError:  # one bad file fails the whole call: redo this chunk file by file
                others += idx
                continue
            for i, image in zip(idx, images):
                out[i] = _resized(image, image_size)
    for i in others:
        out[i] = _resized(dataset.load(i), image_size)  # the per-sample path's reader: names a bad file
    return out


def _read_files(paths) -> list:
    """Several files per task: one future per file costs more than reading a cached 1 KB file."""
    out = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                out.append(torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8))
        except OSError as err:  # removed or unreadable since the folder was scanned
            raise DataError(f"cannot read image {path}: {err.strerror or err}") from None
    return out


class DeviceLoader(EpochSteps):
    """Batches of (normalised float images, labels) from a uint8 split held on `device`.

    Per epoch: a permutation, a crop offset in [0, 2 x padding] per axis and a flip bit per image, all drawn
    at once from a generator seeded by (seed, epoch). A batch is one gather from the uint8 tensor whose row
    and column indices already include the reflect padding, the crop and the flip; then it is converted to
    float and normalised, and mixed by `mixer` (mixup/CutMix) when there is one. The last, smaller global
    batch is kept when every rank gets at least one image from it, unless `drop_last` (order.Dealing).
    """

    def __init__(self, images: torch.Tensor, labels, batch_size: int, mean, std, seed: int, rank: int = 0,
                 world: int = 1, padding: int = 0, flip: str = "random", hflip: bool = True,
                 channels_last: bool = False, mixer: Optional[BatchMixer] = None, drop_last: bool = False):
        if padding >= images.shape[-1]:
            raise DataError(f"data.augment.crop_padding={padding} must be smaller than the image side {images.shape[-1]}")
        self.images = images  # (N, 3, S, S) uint8, on the training device
        self.labels = torch.as_tensor(list(labels), dtype=torch.long, device=images.device)
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world, seed
        self.padding, self.flip, self.hflip, self.mixer = padding, flip, hflip, mixer
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        scale = torch.tensor([255.0], device=images.device)
        self.mean = (torch.tensor(mean, dtype=torch.float32, device=images.device) * scale).view(1, 3, 1, 1)
        self.std = (torch.tensor(std, dtype=torch.float32, device=images.device) * scale).view(1, 3, 1, 1)
        self.epoch = 0
        n = len(self.labels)
        self.dealing = Dealing(n, batch_size, world, drop_last)
        # alternating flip: which images start mirrored, fixed for the whole run (not per epoch)
        base = torch.Generator().manual_seed(sample_seed(seed, -1 & 0xFFFFFFFF, 0))
        self.flip_base = torch.rand(n, generator=base) < 0.5

    def __len__(self) -> int:
        return self.dealing.steps_per_epoch()

    def prepare(self, accelerator) -> None:
        """Nothing for accelerate to wrap: already on the device and sharded (trainer.data.loaders)."""

    def first(self, count: int) -> torch.Tensor:
        """`count` images of the split (`init_sample`: which), normalised, unaugmented (data-dependent
        initialisation)."""
        index = init_sample(len(self.labels), count, self.seed).to(self.images.device)
        return (self.images[index].float() - self.mean) / self.std

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_plan(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, offsets (N, 2), flips (N,)) of this epoch; offsets and flips are per dataset index."""
        n = len(self.labels)
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, 0))
        order = torch.randperm(n, generator=gen)
        offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=gen)
        coin = torch.rand(n, generator=gen) < 0.5
        if not self.hflip:
            flips = torch.zeros(n, dtype=torch.bool)
        elif self.flip == "alternating":  # airbench: a random half in epoch 0, then every image on alternate epochs
            flips = self.flip_base ^ bool(self.epoch % 2)
        else:
            flips = coin
        return order, offsets, flips

    def _indices(self, index: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor):
        """Row (B, S) and column (B, S) source indices: crop offset minus padding, reflected at the border,
        columns reversed for flipped images."""
        side = self.images.shape[-1]
        pos = torch.arange(side)
        rows = pos[None, :] + offsets[index, 0:1] - self.padding
        cols = pos[None, :] + offsets[index, 1:2] - self.padding
        cols = torch.where(flips[index, None], cols.flip(1), cols)

        def reflect(v):  # -1 -> 1, side -> side - 2 (numpy/torch "reflect" padding, edge not repeated)
            v = v.abs()
            return torch.where(v >= side, 2 * (side - 1) - v, v)

        return reflect(rows), reflect(cols)

    def steps(self, start: int = 0) -> Iterator[Tuple[int, Tuple[torch.Tensor, torch.Tensor]]]:
        """(position after the step, this rank's batch) of each micro-step of the epoch from global position
        `start` (trainer/data/order.py)."""
        order, offsets, flips = self.epoch_plan()
        return self.stepping(self._dealt(order, offsets, flips, start), len(self.dealing.steps(start)))

    def batches(self, start: int = 0) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        return (batch for _, batch in self.steps(start))

    def _dealt(self, order, offsets, flips, start: int):
        dev = self.images.device
        for b, (stop, mine) in enumerate(rank_batches(order.tolist(), self.dealing, self.rank, self.epoch, start),
                                         start=start // self.dealing.chunk):
            index = torch.tensor(mine, dtype=torch.long)
            rows, cols = self._indices(index, offsets, flips)
            index_d, rows_d, cols_d = (t.to(dev, non_blocking=True) for t in (index, rows, cols))
            x = self.images[index_d[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                            rows_d[:, None, :, None], cols_d[:, None, None, :]]
            x = ((x.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)
            y = self.labels[index_d]
            if self.mixer is not None:  # b: the micro-step's index within the epoch
                x, y = self.mixer(x, y, self.epoch, b)
            yield stop, (x, y)

    def __iter__(self):
        return self.batches()


def to_device_loader(dataset, image_size: int, device, batch_size: int, mean, std, seed: int, rank: int,
                     world: int, padding: int, flip: str, hflip: bool, channels_last: bool,
                     mixer: Optional[BatchMixer] = None, drop_last: bool = False) -> DeviceLoader:
    images = decode_split(dataset, image_size).to(device)
    return DeviceLoader(images, dataset.labels, batch_size, mean, std, seed, rank, world, padding, flip, hflip,
                        channels_last, mixer, drop_last)
