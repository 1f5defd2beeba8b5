"""Scale augmentation both ways for segmentation and detection, and detection's multi-scale training.

`scale_crop_steps` (data.augment.scale_range): each training image resized by a factor drawn uniformly from
[min, max] of the training frame, then padded where it came out smaller than the training size and randomly
cropped back to it: below 1 it zooms out (the whole image, smaller, on a padded canvas), above 1 it zooms in.
torchvision's segmentation reference does this with RandomResize(0.5 x base, 2 x base) + RandomCrop(crop,
pad_if_needed); its detection reference's "lsj" preset with ScaleJitter + FixedSizeCrop. Padding goes to the
right and bottom, as both references pad (`pad_if_smaller`, FixedSizeCrop), so the crop always holds the
whole padded image when it is smaller; masks are padded with the ignore index, images with the mean colour;
boxes follow the pixels, and the detection chain then clips them and drops those under 1 px (trainer/data/coco.py).
Like every per-sample augmentation here, the draws come from the torch RNG the dataset seeds with (seed, epoch,
sample index): exact under resume.

`MultiScale` (data.augment.multiscale_sizes, detection): each micro-step's images resized so that their short
side is one size drawn from the list (the long side capped at the detector's max_size), as the detection
reference's "multiscale" preset (RandomShortestSize over 480-800) with the model's own resize skipped in
training (the reference's `_skip_resize`); evaluation resizes to model.detection.min_size. The draw is one per
micro-step, the same on every rank, seeded by (seed, epoch, the global position of the micro-step's first
sample in the epoch's order): a resume continues with the same sizes.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.errors import DataError

# an extra word in each multi-scale seed, so that no draw shares its seed with the per-sample augmentation's
# [seed, epoch, index] or mixing's [seed, epoch, batch, rank, stream] (numpy pads short entropy with zeros)
MULTISCALE_STREAM = 0x5CA1E


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from `scale_range` of a frame of `size` x `size` pixels: `fit` False
    (segmentation, whose training frame is the square S x S) gives a square of round(factor x S); `fit` True
    (detection) keeps the image's aspect ratio, scaled to fit inside the square first (torchvision's
    ScaleJitter: factor x min(S / h, S / w)). Masks are resized nearest (v2 never interpolates a Mask)."""

    def __init__(self, size: int, scale_range: Tuple[float, float], fit: bool):
        super().__init__()
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= hi:
            raise DataError(f"scale range {scale_range} must be (min, max) with 0 < min <= max")
        self.size, self.scale_range, self.fit = int(size), (lo, hi), fit

    def make_params(self, flat_inputs):
        lo, hi = self.scale_range
        factor = lo + float(torch.rand(1)) * (hi - lo)
        if not self.fit:
            side = max(1, int(round(self.size * factor)))
            return dict(size=[side, side])
        h, w = v2.query_size(flat_inputs)
        r = factor * min(self.size / h, self.size / w)
        return dict(size=[max(1, int(round(h * r))), max(1, int(round(w * r)))])

    def transform(self, inpt, params):
        return self._call_kernel(TF.resize, inpt, size=params["size"], antialias=True)


class PadToSize(v2.Transform):
    """Pad on the right and bottom to at least `size` x `size` (nothing where the image is as large already):
    images with `image_fill` (per channel, on the uint8 scale), masks with `mask_fill` (the ignore index);
    boxes keep their coordinates on the larger canvas."""

    def __init__(self, size: int, image_fill: Sequence[int], mask_fill: int = 0):
        super().__init__()
        self.size, self.image_fill, self.mask_fill = int(size), [int(v) for v in image_fill], int(mask_fill)

    def make_params(self, flat_inputs):
        h, w = v2.query_size(flat_inputs)
        return dict(padding=[0, 0, max(0, self.size - w), max(0, self.size - h)])  # left, top, right, bottom

    def transform(self, inpt, params):
        if not any(params["padding"]):
            return inpt
        fill = self.mask_fill if isinstance(inpt, tv_tensors.Mask) else self.image_fill
        return self._call_kernel(TF.pad, inpt, padding=params["padding"], fill=fill, padding_mode="constant")


def scale_crop_steps(size: int, scale_range: Sequence[float], fit: bool, image_fill: Sequence[int],
                     mask_fill: int = 0) -> list:
    """The v2 steps of data.augment.scale_range (module docstring): scale, pad to the training size, random crop
    to it. Flips and colour come after, from the caller."""
    return [RandomScale(size, (scale_range[0], scale_range[1]), fit), PadToSize(size, image_fill, mask_fill),
            v2.RandomCrop(size)]


class MultiScale:
    """Detection's multi-scale training (module docstring): called on each collated training batch (list of
    images float [3, H, W], list of targets with "boxes" XYXY) with its epoch and the global position of its
    first sample; returns the batch with every image resized to the drawn short side and its boxes scaled."""

    def __init__(self, sizes: Sequence[int], max_size: int, seed: int):
        if not sizes or any(int(s) < 1 for s in sizes):
            raise DataError(f"multi-scale sizes {list(sizes)} must be one or more sides in pixels")
        self.sizes, self.max_size, self.seed = [int(s) for s in sizes], int(max_size), seed

    def size_for(self, epoch: int, first: int) -> int:
        """The short side of the micro-step starting at global position `first` of epoch `epoch`."""
        rng = np.random.default_rng([self.seed, epoch, first, MULTISCALE_STREAM])
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def __call__(self, batch, epoch: int, first: int):
        images, targets = batch
        side = self.size_for(epoch, first)
        out_images, out_targets = [], []
        for image, target in zip(images, targets):
            h, w = (int(v) for v in image.shape[-2:])
            scale = min(side / min(h, w), self.max_size / max(h, w))  # GeneralizedRCNNTransform's rule
            new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
            out_images.append(TF.resize(image, [new_h, new_w], antialias=True))
            ratios = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=target["boxes"].dtype,
                                  device=target["boxes"].device)
            out_targets.append({**target, "boxes": target["boxes"] * ratios})
        return type(batch)((out_images, out_targets))
