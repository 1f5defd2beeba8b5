"""JPEG decoding on the training GPU (data.decode_device=cuda), for the DataLoader path.

The DataLoader workers only read: each training file's bytes and, from its header, its EXIF orientation.
The main process decodes a batch's JPEGs in one call to torchvision's `decode_jpeg` on the GPU (nvJPEG),
turns each upright as the CPU decoder would, and augments each on the GPU with the same transform and the
same per-sample seed as the worker path (`SeededDataset.augment`: (seed, epoch, index)). So the order of an
epoch, its augmentation draws, exact resume and the stand-ins for files gone bad are the worker path's.

Why: at ImageNet sizes a worker's work per training image is the decode and the crop's resize
(bench/input_pipeline.py times each), and a GPU node has few CPU cores per GPU. Here both run on the GPU and
the workers only read; the decode is one batched call (torchvision's decode_jpeg documentation: a list is
decoded faster than one call per file on CUDA).

What differs from decoding on the CPU: nvJPEG's pixels are not libjpeg-turbo's (its IDCT and chroma
upsampling differ by a few levels), so a run decoded on the GPU is not bitwise the run decoded on the CPU; it
is reproducible on its own, and it resumes exactly. Evaluation, predict and the data-dependent init still
decode on the CPU. Files that are not JPEGs (PNG, ...) are decoded in the workers, on the CPU, as the worker
path does; a JPEG the GPU refuses goes to the worker path's reader in the main process, which decodes what
PIL can, names a file nothing can read, or (training) replaces it by another file of its class.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from trainer.data.folders import JPEG_MAGIC, jpeg_bytes_orientation
from trainer.errors import DataError

def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as stored, turned as its EXIF `orientation` says (PIL's ImageOps.exif_transpose, which
    the CPU decoder matches: equal pixels, tested); values outside 2-8 leave it as it is."""
    if orientation == 2:
        return image.flip(-1)  # mirrored left to right
    if orientation == 3:
        return image.flip(-2, -1)  # turned half a turn
    if orientation == 4:
        return image.flip(-2)  # mirrored top to bottom
    if orientation == 5:
        return image.transpose(-2, -1)  # mirrored along the main diagonal
    if orientation == 6:
        return image.transpose(-2, -1).flip(-1)  # stored a quarter turn anticlockwise: turned clockwise
    if orientation == 7:
        return image.transpose(-2, -1).flip(-2, -1)  # mirrored along the other diagonal
    if orientation == 8:
        return image.transpose(-2, -1).flip(-2)  # stored a quarter turn clockwise: turned anticlockwise
    return image


@dataclass
class EncodedBatch:
    """What the workers hand the main process: per sample its index in the split and either its JPEG bytes (a
    1-D uint8 tensor, with its EXIF orientation) or its image already decoded on the CPU (a (3, H, W) uint8
    tensor: not a JPEG, or unreadable). No `.to`: accelerate leaves it on the CPU, where nvJPEG reads it."""
    indices: List[int]
    payloads: List[torch.Tensor]
    orientations: List[int]


def collate_encoded(items: Sequence[Tuple[int, torch.Tensor, int]]) -> EncodedBatch:
    return EncodedBatch([i for i, _, _ in items], [p for _, p, _ in items], [o for _, _, o in items])


class EncodedSamples(Dataset):
    """The DataLoader's view of a training split (a FileDataset or ShardDataset) when the GPU decodes: sample
    `index` is (index, its JPEG bytes, their EXIF orientation), or (index, the decoded image, 1) for a file
    that is not a JPEG or cannot be read (the split's own reader decodes it, names it or stands in for it)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[int, torch.Tensor, int]:
        try:
            data = self.dataset.file_bytes(index)
        except (OSError, DataError):
            data = b""  # gone since the start-up check: load() below names it, or stands in for it
        if data[:3] != JPEG_MAGIC:
            return index, self.dataset.load(index), 1
        orientation = jpeg_bytes_orientation(data) if self.dataset.exif_orientation else 1
        return index, torch.frombuffer(bytearray(data), dtype=torch.uint8), orientation


class BatchDecoder:
    """Turns an EncodedBatch into the training batch (images stacked, labels) on `device`: the JPEGs decoded
    there in one call, each turned upright, then each augmented there as sample `index` of the epoch."""

    def __init__(self, dataset, device: torch.device):
        self.dataset, self.device = dataset, torch.device(device)
        self.samples = EncodedSamples(dataset)
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long)

    def __call__(self, batch: EncodedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        images: List[Optional[torch.Tensor]] = list(batch.payloads)
        jpegs = [k for k, payload in enumerate(images) if payload.dim() == 1]
        if jpegs:
            decoded = self._decode([images[k] for k in jpegs])
            for k, image in zip(jpegs, decoded):
                # None: refused here; the split's reader decodes it on the CPU (PIL), or names or replaces it
                images[k] = (upright(image, batch.orientations[k]) if image is not None
                             else self.dataset.load(batch.indices[k]))
        x = torch.stack([self.dataset.augment(image.to(self.device, non_blocking=True), index)
                         for image, index in zip(images, batch.indices)])
        y = self.labels[torch.as_tensor(batch.indices)].to(self.device, non_blocking=True)
        return x, y

    def _decode(self, data: List[torch.Tensor]) -> List[Optional[torch.Tensor]]:
        """Every JPEG decoded to RGB on the device in one call; if that call fails (one bad file fails all of
        it), file by file, None for each one refused."""
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            # A host barrier first: torchvision's CUDA decoder allocates its outputs on this stream but writes
            # them from a private stream that does not wait for this one, so it can be handed a block freed by
            # the previous training step (the last batch, activations) while that step's queued kernels still
            # read it, and overwrite it under them. Reported with a reproducer in pytorch/vision PR #9606
            # (2026: corruption in 134 of 200 iterations on an H100 with torchvision 0.28; none once the
            # caller's stream is drained first). Cost: the GPU idles while this batch's decode and
            # augmentation are submitted (not measured yet: gpu_check's gpu_decode part times the loader alone).
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                pass
            out: List[Optional[torch.Tensor]] = []
            for one in data:
                try:
                    out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    out.append(None)
            return out
