"""Datasets, transforms and samplers.

Augmentation randomness is a pure function of (seed, epoch, sample index): each `__getitem__` seeds its own
torch RNG, so what a sample looks like never depends on which worker loaded it or how far the loader
prefetched. That is what lets an interrupted run resume bit-for-bit.
"""
from __future__ import annotations

import functools
import io
import math
import sys
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.data.folders import Sample, decode_bytes, decode_fit, decode_region, image_error, jpeg_header
from trainer.errors import ConfigError, DataError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # a fixed mixing of the three numbers into 63 bits (numpy's SeedSequence hashes them well)
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_draws(seed: int, cuda: bool = False) -> None:
    """Seed the global torch generator(s) a sample's transform draws from: the CPU's, and with `cuda` every GPU's
    too (torch.manual_seed). For the CPU alone only its generator: torch.manual_seed also queues a seed for the
    GPUs, recording the Python stack to do so, 0.15-0.2 ms a call on this 2-core VM where the generator's own
    seeding takes ~1 us (2026-12-06); the CPU draws are the same either way."""
    if cuda:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def init_sample(n: int, count: int, seed: int) -> torch.Tensor:
    """Which `count` of `n` training images a data-dependent initialisation sees (airbench's whitening
    filters), in index order: a seeded random sample, the same on every rank, not the first ones, because a
    folder lists its images class by class (the first 5,000 CIFAR-10 files are all airplanes)."""
    gen = torch.Generator().manual_seed(sample_seed(seed, 0xFFFFFFFE, 0))  # an "epoch" no epoch reaches
    return torch.randperm(n, generator=gen)[:count].sort().values


def open_source(source):
    """A binary file object of an image or mask: a path's file, a PackedFile's bytes (shards), or the file's
    bytes already read."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    return source.open() if hasattr(source, "open") else open(source, "rb")


def read_bytes(source, hint: str = "") -> bytes:
    """An image file's bytes (a path, or a PackedFile), or a DataError naming it (a path gone, a shard cut short
    or removed since the start)."""
    try:
        with open_source(source) as fh:
            return fh.read()
    except Exception as err:
        raise DataError(f"cannot read image {source}: {image_error(err)}{hint}") from None


def read_image(source, exif_orientation: bool, hint: str = "") -> torch.Tensor:
    """An image file (a path, or a PackedFile) as a (3, H, W) uint8 RGB tensor (decode_rgb), or a DataError
    naming the file: a bare PIL error says nothing about which one."""
    return decode_named(read_bytes(source, hint), exif_orientation, source, hint)


def read_eval_image(source, exif_orientation: bool, fit=None) -> torch.Tensor:
    """An image file as evaluation reads it: read_image, or with `fit` (what evaluation first resizes to,
    fit_size: (height, width), or (side,) for a shorter-side resize; a model trained with data.scaled_decode)
    a JPEG decoded at the smallest DCT scale that keeps `fit`
    (decode_fit), exactly as the eval splits' `scaled_sample` decodes it: `trainer predict` reproduces eval."""
    if fit is None:
        return read_image(source, exif_orientation)
    data = read_bytes(source)
    header = jpeg_header(data, exif_orientation)
    if header is not None:
        try:
            return decode_fit(data, header, fit, exif_orientation)
        except Exception:  # a damaged file: the full decode below names it
            pass
    return decode_named(data, exif_orientation, source)


def decode_named(data: bytes, exif_orientation: bool, name, hint: str = "") -> torch.Tensor:
    """An image file's bytes as decode_rgb decodes them, or a DataError naming the file (`name`: its path, or
    where it is packed). PIL's warnings (e.g. a large or odd file) stay quiet here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_bytes(data, exif_orientation)
    except Exception as err:
        raise DataError(f"cannot read image {name}: {image_error(err)}{hint}") from None


class SeededDataset(Dataset):
    """The base of every dataset of trainer/data (image folders, arrays, masks, boxes, shards): a sample is
    `load(index)` through `transform`, its random draws seeded by (seed, epoch, index), so augmentation does not
    depend on which worker or process loads it, and a resumed epoch repeats it."""

    def __init__(self, transform, seed: int):
        self.transform = transform
        self.seed = seed
        # in shared memory: persistent DataLoader workers (forked once) read the epoch the main process sets
        # before each epoch's first index reaches them, so they need not be started again every epoch
        self._epoch = torch.zeros(1, dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = epoch

    def load(self, index: int) -> torch.Tensor:
        """The image as a (3, H, W) uint8 RGB tensor; every transform below takes that."""
        raise NotImplementedError

    # data.scaled_decode: a JPEG whose transform starts with a crop-and-resize is decoded at the smallest DCT
    # scale that keeps the crop's pixels at the output size (`scaled_sample`); set by build_data
    scaled_decode = False
    # uint8 samples: a transform ending with the normalisation (normalising_tail) stops before it, and the
    # training loader normalises each batch on the GPU instead (WorkerLoader's `normalise`); set by it
    uint8_samples = False

    def __getitem__(self, index: int):
        if self.scaled_decode:
            image = self.scaled_sample(index)
            if image is not None:
                return image, self.labels[index]
        return self.augment(self.load(index), index), self.labels[index]

    def scaled_sample(self, index: int):
        """Sample `index` with its JPEG decoded at a reduced DCT scale (trainer.data.folders.decode_region), or
        None where the full path (load, then augment) must make it: no file bytes, not a JPEG Pillow can scale,
        a transform that does not start with a crop-and-resize (first_resize), or a decoder error (the full path
        then names the file, or stands another file in for it).

        The crop is drawn from the header's size before anything is decoded, by the transform's own first step
        under the same seed as `augment` (the global torch RNG seeded by (seed, epoch, index)), and the rest of
        the transform draws on after it: the draws are those of the full path, so what a sample is stays a pure
        function of (seed, epoch, index), and where the scale is 1 the pixels are the full path's, bit for bit."""
        first = first_resize(self.transform)
        if first is None or not hasattr(self, "file_bytes"):
            return None
        try:
            data = self.file_bytes(index)
        except (OSError, DataError):
            return None
        exif = getattr(self, "exif_orientation", True)
        header = jpeg_header(data, exif)
        if header is None:
            return None
        if not isinstance(first, v2.RandomResizedCrop):  # evaluation's Resize: the whole image, then the chain
            try:
                image = decode_fit(data, header, first.size, exif)
            except Exception:  # Pillow's errors for a damaged file: the full path says what is wrong
                return None
            return self.augment(image, index)
        height, width = header.upright_size()
        with torch.random.fork_rng(devices=[]):
            seed_draws(sample_seed(self.seed, self.epoch, index))
            # its draw needs only the size: a tensor of 0 channels holds no pixel
            p = first.make_params([torch.empty(0, height, width, dtype=torch.uint8)])
            try:
                image = decode_region(data, header, (p["top"], p["left"], p["height"], p["width"]), first.size,
                                      exif, first.interpolation, first.antialias)
            except Exception:  # Pillow's errors for a damaged file: the full path says what is wrong
                return None
            return run_steps(self.transform.transforms[1:], image, self.uint8_samples)

    def augment(self, image: torch.Tensor, index: int) -> torch.Tensor:
        """The transform of sample `index` in this epoch, on `image` wherever it is (the DataLoader workers' CPU,
        or the GPU that decoded it: trainer.data.device_decode), its random draws seeded by (seed, epoch, index)."""
        if getattr(self.transform, "takes_rng", False):  # draws from its own generator: no global RNG to guard
            return self.transform(image, np.random.default_rng([self.seed, self.epoch, index]))
        # torchvision's v2 transforms draw their parameters on the CPU generator, AugMix its weights on the
        # image's device: both are seeded here, and both restored after
        with torch.random.fork_rng(devices=[image.device] if image.is_cuda else []):
            seed_draws(sample_seed(self.seed, self.epoch, index), image.is_cuda)
            if isinstance(self.transform, v2.Compose):
                return run_steps(self.transform.transforms, image, self.uint8_samples)
            return self.transform(image) if self.transform is not None else image


class PathTable:
    """A read-only sequence of paths held as one UTF-8 buffer and an array of offsets (numpy), not as a list
    of Python strings.

    Why: a forked DataLoader worker that reads a list of a million str objects writes each one's reference
    count, so page by page it gets its own copy of the whole list (66 MiB per worker after reading a million
    entries, measured by bench/data_scale.py; times workers times ranks). Reading from two numpy arrays
    writes nothing: the pages stay shared. Each access builds a fresh str."""

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    @classmethod
    def from_buffers(cls, buffer: np.ndarray, offsets: np.ndarray) -> "PathTable":
        """A table over an existing UTF-8 buffer and its len + 1 offsets (e.g. an Arrow string column's)."""
        table = cls.__new__(cls)
        table._buffer, table._offsets = np.ascontiguousarray(buffer, dtype=np.uint8), offsets.astype(np.int64)
        return table

    def arrays(self):
        """The UTF-8 buffer and the int64 offsets (what a file stores: trainer.data.manifest)."""
        return self._buffer, self._offsets

    def take(self, indices: Sequence[int]) -> "PathTable":
        """The paths at `indices`, in that order, as a new table (no str made per path)."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self._offsets[indices], self._offsets[indices + 1]
        data = self._buffer.tobytes()
        joined = b"".join([data[a:b] for a, b in zip(starts.tolist(), ends.tolist())])
        offsets = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        return PathTable.from_buffers(np.frombuffer(joined, dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"path index {index} out of range ({len(self)})")
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._buffer[start:end].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return iter(self.tolist())

    def tolist(self) -> List[str]:
        """Every path as a str, decoded in one pass (~0.2 us each; indexing one by one costs ~5 us)."""
        data, bounds = self._buffer.tobytes(), self._offsets.tolist()
        return [data[a:b].decode("utf-8", "surrogateescape") for a, b in zip(bounds[:-1], bounds[1:])]

    def __eq__(self, other) -> bool:
        return list(self) == list(other)


# a training file that cannot be read is replaced by another of its class (FileDataset.stand_ins); tries before
# giving up (each draws another file: a class of unreadable files, or one of one file, still ends in an error)
STAND_IN_TRIES = 10
WORKER_SLOTS = 256  # counters of replaced files: one per DataLoader worker (slot 0: the main process)


class FileDataset(SeededDataset):
    """Images listed as (path, label) pairs; any image mode is converted to RGB, and the EXIF orientation
    applied when `exif_orientation` (data.exif_orientation; the device loader's batched decode reads it too).
    The paths are a PathTable and the labels an int64 array: memory that does not grow with the workers.

    `stand_ins` (the training split): a file that cannot be read when it is needed (changed since the start-up
    check, or one the header check passed) does not end hours of training. It is replaced by another file of
    the same class, drawn by a generator seeded by (seed, epoch, index): the same one on a resume, in any
    worker, so exact resume holds. Each replacement prints one line naming both files and is counted
    (`replaced()`; the training rows of metrics.jsonl carry the count as replaced_images)."""

    def __init__(self, samples: List[Sample], transform=None, seed: int = 0, exif_orientation: bool = True,
                 stand_ins: bool = False):
        super().__init__(transform, seed)
        self.paths = PathTable([p for p, _ in samples])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.exif_orientation = exif_orientation
        self.stand_ins = stand_ins
        # shared memory, one slot per worker (each writes only its own: no lost increments between processes)
        self._replaced = torch.zeros(WORKER_SLOTS, dtype=torch.long).share_memory_() if stand_ins else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        try:
            return read_image(self.paths[index], self.exif_orientation,
                              hint=" (data.verify_images=header or full finds bad files at start-up)")
        except DataError as err:
            if not self.stand_ins:
                raise
            return self._stand_in(index, err)

    def file_bytes(self, index: int) -> bytes:
        """The file as stored (data.decode_device=cuda decodes it on the GPU); OSError when it cannot be read."""
        with open(self.paths[index], "rb") as fh:
            return fh.read()

    def _stand_in(self, index: int, err: DataError) -> torch.Tensor:
        # the samples with the same targets: one class, or (multi-label rows) the same label set
        labels = self.labels.reshape(len(self.labels), -1)
        same = np.flatnonzero((labels == labels[index]).all(1))
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for _ in range(STAND_IN_TRIES):
            other = int(same[rng.integers(len(same))])
            if other == index:
                continue
            try:
                image = read_image(self.paths[other], self.exif_orientation)
            except DataError:
                continue
            worker = get_worker_info()
            self._replaced[(worker.id + 1 if worker is not None else 0) % WORKER_SLOTS] += 1
            print(f"[trainer] warning: {err}; trained on {self.paths[other]} (same class) in its place this time",
                  file=sys.stderr, flush=True)
            return image
        raise DataError(f"{err}; and {STAND_IN_TRIES} other files of its class drawn to stand in for it were "
                        f"unreadable too") from None

    def replaced(self) -> int:
        """Unreadable files replaced so far by this process and its workers (each time one was read)."""
        return int(self._replaced.sum()) if self._replaced is not None else 0


def replaced_images(dataset) -> int:
    """How many unreadable files `dataset` has replaced so far (FileDataset.stand_ins); 0 for any other kind."""
    return dataset.replaced() if isinstance(dataset, FileDataset) else 0


class ArrayDataset(SeededDataset):
    """Images held in memory as a uint8 (N, H, W, 3) array (CIFAR)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform=None, seed: int = 0):
        super().__init__(transform, seed)
        self.images = images
        self.labels = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.images[index]).permute(2, 0, 1)



class EpochWeightedSampler(Sampler):
    """Draws `num_samples` indices with replacement by weight, from a generator seeded by (seed, epoch).

    Every process draws the same list, the epoch's one order (trainer/data/order.py deals it to the ranks),
    so the weighting holds however many processes there are, and a resume anywhere continues the draw.
    """

    def __init__(self, weights: Sequence[float], num_samples: int, seed: int):
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draw(self) -> list:
        gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1 & 0xFFFFFFFF))
        return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=gen).tolist()

    def __iter__(self):
        return iter(self.draw())

    def __len__(self) -> int:
        return self.num_samples


# ---- transforms ----

def first_resize(transform):
    """The first step of a v2 chain when it is what `scaled_sample` can draw before decoding: RandomResizedCrop,
    or evaluation's Resize of the whole image (Fit.steps): to a fixed (height, width) (squash, with or without
    a centre crop after it), or of the shorter side to a length, aspect kept (center); None otherwise
    (PadCropFlip, a Resize with max_size...). Its interpolation is the Resize's own: the scaled decode only
    reduces by a DCT scale that keeps the Resize's output size, and the same Resize then applies."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, v2.Compose) or not steps:
        return None
    first = steps[0]
    if isinstance(first, v2.RandomResizedCrop) or (type(first) is v2.Resize and first.max_size is None
                                                   and len(first.size) in (1, 2)):
        return first
    return None


def fit_size(transform):
    """The size an evaluation transform first resizes the whole image to, when `scaled_sample` decodes its JPEGs
    at a reduced scale for it (first_resize): (height, width) for a fixed-size Resize, (side,) for a shorter-side
    one (decode_fit keeps the shorter side >= side); None when it decodes them whole. `trainer predict` and the
    ONNX check ask this of the transform they apply (eval_fit_size), so that they decode as the eval splits did."""
    first = first_resize(transform)
    return None if first is None or isinstance(first, v2.RandomResizedCrop) else tuple(first.size)


def eval_fit_size(meta: dict):
    """The `fit` read_eval_image takes for an exported model's inputs: fit_size of its evaluation transform
    (model.json's image_size, mean, std and Fit), or None when its evaluation decoded whole (no
    data.scaled_decode recorded). `trainer predict` and the ONNX check both take it from here."""
    if not meta.get("scaled_decode"):
        return None
    return fit_size(eval_transform(meta["image_size"], meta["mean"], meta["std"], Fit.from_meta(meta)))


def _to_normalised_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


def run_steps(steps: Sequence, image: torch.Tensor, uint8: bool = False) -> torch.Tensor:
    """A v2 chain's `steps` applied in order to `image`, as v2.Compose applies them, except that the closing
    ToImage, ToDtype(float32, scale=True), Normalize of a CPU uint8 image (_to_normalised_tensor) run as the
    three tensor operations they amount to (normalise_uint8): the same floats, bit for bit
    (tests/test_scaled_decode.py), in 0.047 ms against 0.106 ms for a 224-px sample, the v2 dispatch being most
    of their cost (this 2-core VM, 2026-12-06, issue 34). The result is then a plain tensor, not a
    tv_tensors.Image (a batch is one either way: default_collate's stack unwraps it). With `uint8` the image
    stops before them, still uint8: its batch is normalised on the device (WorkerLoader's `normalise`)."""
    steps = list(steps)
    tail = normalising_tail(steps)
    for step in steps[:-3] if tail is not None else steps:
        image = step(image)
    if tail is None:
        return image
    if image.dtype == torch.uint8:
        if uint8:
            return image
        if not image.is_cuda:
            return normalise_uint8(image, *tail)
    for step in steps[-3:]:  # on the GPU (data.decode_device=cuda augments there): v2's own steps
        image = step(image)
    return image


def normalising_tail(steps) -> Optional[tuple]:
    """(mean, std) when a v2 chain (its steps, or the Compose) ends with exactly _to_normalised_tensor's three
    steps, which normalise_uint8 computes; None otherwise (a chain ending with RandomErasing, PadCropFlip...)."""
    if isinstance(steps, v2.Compose):
        steps = steps.transforms
    steps = list(steps) if isinstance(steps, (list, tuple)) else []
    if len(steps) >= 3:
        to_image, to_dtype, normalize = steps[-3:]
        if (type(to_image) is v2.ToImage and type(to_dtype) is v2.ToDtype and to_dtype.dtype is torch.float32
                and to_dtype.scale and type(normalize) is v2.Normalize and not normalize.inplace
                and all(normalize.std)):  # a std of 0: v2's Normalize raises its error
            return tuple(normalize.mean), tuple(normalize.std)
    return None


def normalise_uint8(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A uint8 (..., C, H, W) image or batch as float32 (x / 255 - mean) / std, computed as torchvision's
    ToDtype(scale=True) then Normalize compute it (multiply by 1 / 255, subtract the mean, divide by the std,
    each rounded to float32), so a sample and a batch normalised here or there hold the same floats."""
    mean_t, std_t = _channel_constants(tuple(mean), tuple(std), image.device)
    return image.to(torch.float32).mul_(1.0 / 255).sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple, std: tuple, device: torch.device):
    # built once per (mean, std, device): torch.as_tensor on every sample costs a few us each
    return (torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1))


CROP_MODES = ("squash", "center")  # timm's crop_mode names (its third, border, pads: not offered here)
INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC,
                  "nearest": v2.InterpolationMode.NEAREST}


@dataclass(frozen=True)
class Fit:
    """How an image becomes the square `image_size` network input in evaluation, `trainer predict`, the ONNX
    export's check and training's plain resize (data.crop_mode, data.crop_pct, data.interpolation; model.json
    records them). The defaults are the trainer's behaviour before pretrained weights brought their own: squash
    both sides to image_size, bilinear (antialiased), no crop.

    squash: both sides resized to image_size / crop_pct, then the centre image_size x image_size kept;
    center: the shorter side resized to image_size / crop_pct (aspect kept), then the centre crop. The resized
    side is floor(image_size / crop_pct) as in timm's transforms_imagenet_eval (plus 1e-6, so that torchvision's
    224 / (224 / 232) gives its own 232 and not 231 through float rounding)."""
    crop_mode: str = "squash"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def resize_size(self, image_size: int) -> int:
        return math.floor(image_size / self.crop_pct + 1e-6)

    def steps(self, image_size: int) -> list:
        """torchvision v2 transforms doing this fit on a uint8 (3, H, W) tensor (CPU or GPU)."""
        side, mode = self.resize_size(image_size), INTERPOLATIONS[self.interpolation]
        antialias = self.interpolation != "nearest"  # antialiasing applies to bilinear and bicubic only
        if self.crop_mode == "center":
            return [v2.Resize(side, interpolation=mode, antialias=antialias), v2.CenterCrop(image_size)]
        resize = v2.Resize((side, side), interpolation=mode, antialias=antialias)
        return [resize] if side == image_size else [resize, v2.CenterCrop(image_size)]

    def is_default(self) -> bool:
        return self == Fit()

    def meta(self, image_size: int) -> dict:
        """model.json's fields (resize_size derived: what a program reading the ONNX sidecar resizes to)."""
        return {"crop_mode": self.crop_mode, "crop_pct": self.crop_pct, "interpolation": self.interpolation,
                "resize_size": self.resize_size(image_size)}

    def describe(self, image_size: int) -> str:
        side = self.resize_size(image_size)
        what = ("shorter side" if self.crop_mode == "center" else "both sides") + f" resized to {side} px"
        crop = f", centre crop {image_size} px" if self.crop_mode == "center" or side != image_size else ""
        return f"{what} ({self.interpolation}){crop}"

    @classmethod
    def from_cfg(cls, data_cfg) -> "Fit":
        """The data section's keys, each null meaning today's default (the run's start fills them from
        pretrained weights first: trainer.session)."""
        own = cls()
        return cls(data_cfg.crop_mode or own.crop_mode,
                   data_cfg.crop_pct if data_cfg.crop_pct is not None else own.crop_pct,
                   data_cfg.interpolation or own.interpolation)

    @classmethod
    def from_meta(cls, meta: dict) -> "Fit":
        """model.json's fit; a model exported before these fields existed was squashed, bilinear."""
        own = cls()
        return cls(meta.get("crop_mode", own.crop_mode), meta.get("crop_pct", own.crop_pct),
                   meta.get("interpolation", own.interpolation))


def set_split_transforms(datasets: dict, aug, image_size: int, mean, std, fit: Fit = Fit()) -> None:
    """Each split's transform: the training split's augmentation (`aug`: the data.augment section), `fit` and
    normalise for the others."""
    for split, ds in datasets.items():
        ds.transform = (train_transform(image_size, mean, std, aug.hflip, aug.crop_padding, aug.random_resized_crop,
                                        aug.rrc_min_scale, aug.color_jitter, aug.auto_augment,
                                        aug.randaugment_num_ops, aug.randaugment_magnitude, aug.random_erasing,
                                        fit=fit)
                        if split == "train" else eval_transform(image_size, mean, std, fit))


def eval_transform(image_size: int, mean, std, fit: Fit = Fit()):
    """`fit` to the square network input and normalise; the same for eval, predict and the exported model."""
    return v2.Compose(fit.steps(image_size) + _to_normalised_tensor(mean, std))


class PadCropFlip:
    """The usual small-image augmentation (resize if needed, reflect-pad, random crop, random horizontal flip,
    normalise) on a uint8 image tensor with a per-sample numpy generator. The same operations as the
    torchvision v2 chain, about 4x cheaper per image here (bench/input_pipeline.py), which is what limited the
    loader. The pad, crop and flip are one pair of index selections: no padded copy is built."""

    takes_rng = True

    def __init__(self, image_size: int, padding: int, hflip: bool, mean, std, fit: Fit = Fit()):
        self.size, self.padding, self.hflip = image_size, padding, hflip
        # a fit other than the plain squash (pretrained weights' resize + centre crop) runs first, as in eval
        self.fit = None if fit.is_default() else v2.Compose(fit.steps(image_size))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        # reflect padding as indices: position j of the padded axis reads source row/column reflect[j]
        # (torch's and numpy's "reflect": the edge pixel is not repeated)
        s, p = image_size, padding
        if p >= s:
            raise DataError(f"data.augment.crop_padding={p} must be smaller than the image side {s}")
        j = np.abs(np.arange(-p, s + p))
        self.reflect = torch.from_numpy(np.where(j > s - 1, 2 * (s - 1) - j, j))

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        if self.fit is not None:
            image = self.fit(image)
        elif tuple(image.shape[-2:]) != (self.size, self.size):
            image = TF.resize(image, [self.size, self.size], antialias=True)
        reflect, mean, std = self._on(image.device)
        rows = cols = reflect[self.padding:self.padding + self.size]
        if self.padding > 0:
            top, left = (int(v) for v in rng.integers(0, 2 * self.padding + 1, size=2))
            rows = reflect[top:top + self.size]
            cols = reflect[left:left + self.size]
        if self.hflip and rng.random() < 0.5:
            cols = cols.flip(0)
        x = image.index_select(1, rows).index_select(2, cols).float().div_(255)
        return x.sub_(mean).div_(std)

    def _on(self, device: torch.device):
        """The index and normalisation tensors on the image's device (a GPU that decoded it): copied once."""
        if device.type == "cpu":
            return self.reflect, self.mean, self.std
        if getattr(self, "_device", None) != device:
            self._device, self._copies = device, tuple(t.to(device) for t in (self.reflect, self.mean, self.std))
        return self._copies


# data.augment.auto_augment -> its torchvision v2 policy, on the uint8 image; torchvision's defaults apart from
# RandAugment's two numbers. Each draws only from the global torch RNG, which __getitem__ seeds per sample.
POLICIES = {
    "randaugment": lambda num_ops, magnitude: v2.RandAugment(num_ops=num_ops, magnitude=magnitude),
    "trivialaugment": lambda num_ops, magnitude: v2.TrivialAugmentWide(),
    "autoaugment": lambda num_ops, magnitude: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
    "augmix": lambda num_ops, magnitude: v2.AugMix(),
}


def augment_policy(name: str, num_ops: int, magnitude: int):
    if name not in POLICIES:
        raise ConfigError(f"data.augment.auto_augment={name} is not a policy; choose none or one of {sorted(POLICIES)}")
    return POLICIES[name](num_ops, magnitude)


def train_transform(image_size: int, mean, std, hflip: bool, crop_padding: int, random_resized_crop: bool,
                    rrc_min_scale: float, color_jitter: float, auto_augment: str = "none",
                    randaugment_num_ops: int = 2, randaugment_magnitude: int = 9, random_erasing: float = 0.0,
                    fit: Fit = Fit()):
    """The classification training augmentation: `PadCropFlip` when it is only pad, crop and flip; otherwise
    torchvision's v2 chain: crop, flip, the `auto_augment` policy (uint8), colour jitter, normalisation, then
    random erasing with probability `random_erasing` (a rectangle of per-pixel N(0, 1) noise in normalised
    units: timm's default --remode pixel). Without the random resized crop, the image is first `fit` as
    evaluation fits it; with it, the crop takes `fit`'s interpolation."""
    if not random_resized_crop and color_jitter <= 0 and auto_augment == "none" and random_erasing <= 0:
        return PadCropFlip(image_size, crop_padding, hflip, mean, std, fit)
    steps = []
    if random_resized_crop:
        steps.append(v2.RandomResizedCrop(image_size, scale=(rrc_min_scale, 1.0), antialias=True,
                                          interpolation=INTERPOLATIONS[fit.interpolation]))
    else:
        steps += fit.steps(image_size)
        if crop_padding > 0:
            steps.append(v2.RandomCrop(image_size, padding=crop_padding, padding_mode="reflect"))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment != "none":  # right after the crop and flip, as in timm (which would drop the jitter below)
        steps.append(augment_policy(auto_augment, randaugment_num_ops, randaugment_magnitude))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += _to_normalised_tensor(mean, std)
    if random_erasing > 0:  # timm's area (2%-33%) and aspect ratios (0.3-3.3, log-uniform): torchvision's defaults
        steps.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(steps)


def measure_mean_std(dataset: SeededDataset, image_size: int, max_images: int = 2000, seed: int = 0):
    """Per-channel mean and std in [0,1] over up to `max_images` training images (a seeded subset)."""
    n = len(dataset)
    idx = np.random.default_rng(seed).permutation(n)[:max_images] if n > max_images else np.arange(n)
    resize = v2.Compose([v2.Resize((image_size, image_size), antialias=True), v2.ToImage(),
                         v2.ToDtype(torch.float64, scale=True)])
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for i in idx:
        x = resize(dataset.load(int(i)))
        total += x.mean(dim=(1, 2))
        total_sq += (x ** 2).mean(dim=(1, 2))
    mean = total / len(idx)
    std = (total_sq / len(idx) - mean ** 2).clamp_min(1e-12).sqrt()
    return [round(float(v), 6) for v in mean], [round(max(float(v), 1e-3), 6) for v in std]
