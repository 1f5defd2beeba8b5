"""The training loader behind one face, whichever path feeds it: per-sample decoding in DataLoader workers
(`WorkerLoader`, any data and augmentation), or the whole split held on the device and augmented in batches
(`trainer.data.device.DeviceLoader`). With data.decode_device=cuda the workers only read the files, and each
batch is decoded and augmented on the GPU (`trainer.data.device_decode`). Both offer:

    set_epoch(epoch)   the order and augmentation of that epoch (pure functions of seed and epoch)
    steps(start)       (position after the step, this process's batch) of each micro-step of the epoch from
                       global sample position `start` of the epoch's one order (trainer/data/order.py: a
                       resume on any process count continues the order); with mixup/CutMix on
                       (data.augment), each batch mixed after collation (trainer.data.mixing), seeded by
                       (seed, epoch, micro-step index, rank)
    batches(start)     the batches alone
    len(loader)        micro-steps per epoch, per process
    first(count)       the first `count` training images, normalised, unaugmented (data-dependent init)
    prepare(acc)       the device batches go to

`build_train_loader` chooses from `data.loader`; the loop never asks which it got.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from trainer.data import class_balanced_sampler
from trainer.data.datasets import Fit, eval_transform, init_sample, normalise_uint8, normalising_tail
from trainer.data.device import to_device_loader
from trainer.data.detection_order import detection_sampler
from trainer.data.device_decode import BatchDecoder, collate_encoded
from trainer.data.mixing import BatchMixer, build_mixer
from trainer.data.order import Dealing, EpochSteps, rank_batches, shuffled_order
from trainer.errors import ConfigError


class WorkerLoader(EpochSteps):
    """A DataLoader over the training split whose batches this process deals itself (trainer/data/order.py:
    the epoch's one global order, from any position, for any process count), with the dataset's per-sample
    augmentation seeds and an optional class-balanced sampler's draw moved to each epoch; `mixer` (mixup/CutMix,
    optional) mixes each collated batch; `decoder` (data.decode_device=cuda): the workers read the files and it
    decodes and augments each batch. Not prepared by accelerate (whose sharding counts batches per process):
    `prepare` only says where batches go."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int, prefetch_factor: int, pin_memory: bool,
                 first_transform, sampler=None, drop_last: bool = False, collate=None,
                 mixer: Optional[BatchMixer] = None, decoder: Optional[BatchDecoder] = None, rank: int = 0,
                 processes: int = 1, resizer=None, normalise: Optional[tuple] = None):
        self.dataset, self.sampler, self.first_transform, self.mixer = dataset, sampler, first_transform, mixer
        # (mean, std): the workers' samples stay uint8 and each (images, targets) batch is normalised where it
        # goes (normalise_uint8, the floats the samples would have held): a quarter of the bytes to collate,
        # pin and copy (build_train_loader: on a GPU)
        self.normalise = normalise
        if normalise is not None:
            dataset.uint8_samples = True
        self.resizer = resizer  # detection's multi-scale training (trainer/data/scale.py), or None
        self.decoder, self.seed, self.rank = decoder, seed, rank
        self.epoch = 0
        self.dealing = Dealing(len(sampler) if sampler is not None else len(dataset), batch_size, processes, drop_last)
        self.batch_sampler = _DealtBatches(self)
        if decoder is not None:
            dataset, collate = decoder.samples, collate_encoded
        # persistent: workers are started once (the epoch reaches them through shared memory, see datasets.py)
        self.dl = DataLoader(dataset, batch_sampler=self.batch_sampler, collate_fn=collate,
                             # its own generator: worker seeds never draw from the global RNG (exact resume)
                             generator=torch.Generator().manual_seed(seed),
                             num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0,
                             prefetch_factor=prefetch_factor if num_workers > 0 else None)
        self.device, self.non_blocking = torch.device("cpu"), False

    def prepare(self, accelerator) -> None:
        self.device, self.non_blocking = accelerator.device, self.dl.pin_memory

    def __len__(self) -> int:
        return self.dealing.steps_per_epoch()

    def close(self) -> None:
        # The persistent workers' iterator, shut down now rather than by the garbage collector at teardown
        # (accelerate's free_memory runs gc.collect): shut down from inside a collection, the worker did not exit
        # and the DataLoader waited out its 5 s join timeout before killing it (the bench's 8-image run with 1
        # worker: 5.5 s at teardown, 0.06 s when closed here). torch has no public close for persistent workers.
        iterator, self.dl._iterator = getattr(self.dl, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch  # the order's and the mixer's seeds
        self.dataset.set_epoch(epoch)  # per-sample augmentation seeds
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def order(self) -> Sequence[int]:
        """This epoch's global order of dataset indices: the class-balanced draw, or the shuffle."""
        if self.sampler is not None:
            return self.sampler.draw()
        return shuffled_order(len(self.dataset), self.seed, self.epoch).tolist()

    def steps(self, start: int = 0):
        """(position after the step, this process's batch) of each micro-step of the epoch from global position
        `start` (trainer/data/order.py)."""
        self.batch_sampler.start = start
        ends = [stop for _, stop in self.dealing.steps(start)]
        batches = (send_to_device(b, self.device, non_blocking=self.non_blocking) for b in self.dl)
        if self.normalise is not None:
            batches = ((normalise_uint8(x, *self.normalise), y) for x, y in batches)
        if self.decoder is not None:
            batches = map(self.decoder, batches)
        if self.resizer is not None:  # one size per micro-step, seeded by its first global position: any rank
            firsts = [first for first, _ in self.dealing.steps(start)]
            batches = (self.resizer(b, self.epoch, first) for b, first in zip(batches, firsts))
        if self.mixer is not None:
            batches = self._mixed(batches, start)
        return self.stepping(zip(ends, batches), len(ends))

    def batches(self, start: int = 0):
        return (batch for _, batch in self.steps(start))

    def _mixed(self, batches, start: int):
        # mixing is classification's and multi-label's ((images, labels or multi-hot rows) batches): the config
        # refuses it for any other task (ClassificationSpec.check_config). Seeded by the micro-step's index within
        # the epoch (on the process count that started the epoch: a resume there mixes as the original did)
        for index, (x, y) in enumerate(batches, start=start // self.dealing.chunk):
            yield self.mixer(x, y, self.epoch, index)

    def first(self, count: int) -> torch.Tensor:
        """Up to `count` training images, normalised as for evaluation (`init_sample`: which)."""
        return torch.stack([self.first_transform(self.dataset.load(i))
                            for i in init_sample(len(self.dataset), count, self.seed).tolist()])


class _DealtBatches:
    """The DataLoader's batch sampler: this rank's dataset indices of each micro-step of the loader's epoch, from
    the loader's start position (set before each epoch's iterator is made; read in the main process, where
    the DataLoader asks for indices, so persistent workers need nothing)."""

    def __init__(self, loader: WorkerLoader):
        self.loader, self.start = loader, 0

    def __iter__(self):
        lo = self.loader
        return (mine for _, mine in rank_batches(lo.order(), lo.dealing, lo.rank, lo.epoch, self.start))

    def __len__(self) -> int:
        return len(self.loader.dealing.steps(self.start))


def build_train_loader(dataset, data_cfg, batch_size: int, seed: int, accelerator, mean, std, num_classes: int,
                       channels_last: bool, say=print, drop_last: bool = False, collate=None, resizer=None,
                       global_batch: int = 1):
    """The loader `data.loader` asks for (`data_cfg` is the `data` section). `drop_last`, `collate`: the task's
    (segmentation drops a last batch of one image, which would break BatchNorm in DeepLabV3's pooling branch;
    detection batches lists of images of different sizes); `resizer`: the task's per-batch resize (detection's
    multi-scale training), called with (batch, epoch, first global position of the micro-step); `global_batch`:
    detection's aspect-ratio groups are of that many images."""
    aug = data_cfg.augment
    mixer = build_mixer(aug, num_classes, seed, accelerator.process_index)  # None unless mixup/CutMix is on
    if mixer is not None:
        say(f"[trainer] mixup (alpha {aug.mixup_alpha}) / CutMix (alpha {aug.cutmix_alpha}) on {aug.mix_prob:.0%} "
            f"of training batches: the training loss is against the mixed targets")
    if data_cfg.loader == "device":  # the whole split decoded once onto the device; batched augmentation there
        start = time.time()
        loader = to_device_loader(dataset, data_cfg.image_size, accelerator.device, batch_size, mean, std, seed,
                                  accelerator.process_index, accelerator.num_processes, aug.crop_padding,
                                  aug.flip_mode, aug.hflip, channels_last, mixer=mixer, drop_last=drop_last)
        say(f"[trainer] data.loader=device: {len(dataset)} training images decoded to a uint8 tensor on "
            f"{accelerator.device} ({loader.images.numel() / 2**20:.0f} MiB) in {time.time() - start:.1f} s")
        return loader
    sampler = class_balanced_sampler(dataset.labels, num_classes, seed) if data_cfg.sampler == "weighted" else None
    if data_cfg.aspect_ratio_group_factor or data_cfg.repeat_factor_threshold is not None:  # detection's (config)
        sampler = detection_sampler(dataset.split, seed, data_cfg.aspect_ratio_group_factor, global_batch,
                                    data_cfg.repeat_factor_threshold, say)
    decoder = None
    check_decode_device(data_cfg.decode_device, accelerator.device)
    if data_cfg.decode_device == "cuda":  # the config allows it for image folders and their shards only
        decoder = BatchDecoder(dataset, accelerator.device)
        say(f"[trainer] data.decode_device=cuda: the workers read the training files; their JPEGs are decoded "
            f"and augmented on {accelerator.device}")
    # on a GPU, batches of a chain that ends by normalising leave the workers as uint8 and are normalised there:
    # a 64 x 224-px float32 batch took 33 ms to collate into a worker's shared memory, a uint8 one 8.7 ms, and
    # the normalisation is then the GPU's (this 2-core VM, 2026-12-06; BENCHMARKS.md, "After the decode"). On the
    # CPU the main process normalising a batch (22 ms) would cost more than the workers do sample by sample (6 ms)
    normalise = None
    if accelerator.device.type == "cuda" and decoder is None and resizer is None and collate is None:
        normalise = normalising_tail(dataset.transform)
    return WorkerLoader(dataset, batch_size, seed, data_cfg.num_workers, data_cfg.prefetch_factor,
                        pin_memory=accelerator.device.type == "cuda",
                        first_transform=eval_transform(data_cfg.image_size, mean, std, Fit.from_cfg(data_cfg)),
                        sampler=sampler,
                        drop_last=drop_last, collate=collate, mixer=mixer, decoder=decoder,
                        rank=accelerator.process_index, processes=accelerator.num_processes, resizer=resizer,
                        normalise=normalise)


def check_decode_device(decode_device: str, device: torch.device) -> None:
    """data.decode_device=cuda on a run without a GPU: one line, at start-up (trainer.loop checks it before any
    data is read; build_train_loader again for its other callers)."""
    if decode_device == "cuda" and device.type != "cuda":
        raise ConfigError(f"data.decode_device=cuda decodes JPEGs with nvJPEG on the GPU, and this run is on "
                          f"{device.type} (no CUDA device); set data.decode_device=cpu")
