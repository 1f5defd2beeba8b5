"""Detection's epoch orders: aspect-ratio grouping and repeat-factor sampling, as the epoch's ONE global order.

Both are written as the list of dataset indices an epoch trains, a pure function of (seed, epoch), the same on
every process: trainer/data/order.py deals it to the ranks from any position, so a resume (on any process
count) continues it exactly, and the sample trace proves every position trained once.

Repeat factors (data.repeat_factor_threshold = t; LVIS, Gupta et al. 2019; Detectron2's
RepeatFactorTrainingSampler): a category in a fraction f_c of the training images has r_c = max(1,
sqrt(t / f_c)); an image takes the largest r_c of its categories (1 without boxes; crowd boxes do not count,
they are never trained). Each epoch an image appears floor(r) times, plus once more with probability frac(r)
(stochastic rounding), then the list is shuffled. Unlike Detectron2, where each image is rounded on its own and
an epoch's length varies, the extra appearances are drawn by systematic sampling so that every epoch has the
same length, round(sum of r): the schedule counts updates per epoch, and a checkpoint's position must mean
the same thing in every epoch. Each image's chance of its extra appearance stays frac(r) (scaled by at most
round(S) / S, S the sum of the fractions, and capped at 1).

Aspect-ratio grouping (data.aspect_ratio_group_factor = k; torchvision's create_aspect_ratio_groups and
GroupedBatchSampler): images fall into the 2k + 2 groups that the 2k + 1 edges 2^linspace(-1, 1, 2k + 1) cut
width / height into. The epoch's order (the shuffle, or the repeat-factor list) is walked once; an image joins
its group's open block, and a block of `block` images is emitted to the order when full; at the end the blocks
left open follow, sorted by group (only those batches mix groups). Every index keeps its number of
appearances: the order is a reordering, not a new draw. The block is the global batch (per-process batch x
processes x accumulation), not torchvision's per-process batch: the order must not depend on the process
count (a resume on another one continues it), and the global batch is what stays; every micro-step of an
update then takes consecutive positions of one block, so every process's batch holds one group (stricter
than the reference, whose ranks group apart), on any process count.
"""
from __future__ import annotations

import bisect
from typing import List, Optional, Sequence

import numpy as np

from trainer.data.order import shuffled_order

# an extra word in the repeat-factor draw's seed, so that it shares no seed with another draw ([seed, epoch]
# padded with zeros would be any other stream's)
REPEAT_STREAM = 0x4E9EA7


def aspect_ratio_groups(widths: Sequence[int], heights: Sequence[int], k: int) -> List[int]:
    """The group of each image: torchvision's _quantize of width / height on the edges 2^linspace(-1, 1, 2k+1)."""
    edges = sorted((2 ** np.linspace(-1, 1, 2 * k + 1)).tolist())
    return [bisect.bisect_right(edges, float(w) / float(h)) for w, h in zip(widths, heights)]


def repeat_factors(categories_per_image: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """r of each image (module docstring): max over its categories of max(1, sqrt(threshold / f_c))."""
    n = len(categories_per_image)
    images_with: dict = {}
    for cats in categories_per_image:
        for c in set(int(c) for c in cats):
            images_with[c] = images_with.get(c, 0) + 1
    r_cat = {c: max(1.0, float(np.sqrt(threshold / (count / n)))) for c, count in images_with.items()}
    return np.array([max((r_cat[int(c)] for c in cats), default=1.0) for cats in categories_per_image])


def _systematic_extras(p: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly `count` distinct indices, index i with probability p_i (rescaled to sum to `count`, each capped
    at 1): systematic sampling over a random permutation, one uniform offset."""
    if count <= 0:
        return np.zeros(0, dtype=np.int64)
    p = p.astype(np.float64).copy()
    for _ in range(len(p)):  # rescale the uncapped part until none passes 1
        capped = p >= 1.0
        rest = count - capped.sum()
        free = p[~capped].sum()
        if free <= 0:
            break
        p[~capped] *= rest / free
        if (p <= 1.0 + 1e-12).all():
            break
    p = np.minimum(p, 1.0)
    perm = rng.permutation(len(p))
    edges = np.cumsum(p[perm])
    points = rng.random() + np.arange(count)
    picked = np.unique(perm[np.minimum(np.searchsorted(edges, points, side="right"), len(p) - 1)])
    if len(picked) < count:  # float rounding at an interval's edge: the likeliest images not yet picked
        taken = set(picked.tolist())
        rest = [i for i in np.argsort(-p, kind="stable").tolist() if i not in taken]
        picked = np.union1d(picked, np.array(rest[:count - len(picked)], dtype=np.int64))
    return picked


class RepeatFactorOrder:
    """The epoch's list of repeated indices (module docstring), shuffled; `len` is the same every epoch."""

    def __init__(self, factors: np.ndarray, seed: int):
        self.factors, self.seed = np.asarray(factors, dtype=np.float64), seed
        self.whole = np.floor(self.factors).astype(np.int64)
        self.fraction = self.factors - self.whole
        self.extras = int(round(self.fraction.sum()))
        self.length = int(self.whole.sum()) + self.extras

    def draw(self, epoch: int) -> List[int]:
        rng = np.random.default_rng([self.seed, epoch, REPEAT_STREAM])
        counts = self.whole.copy()
        counts[_systematic_extras(self.fraction, self.extras, rng)] += 1
        indices = np.repeat(np.arange(len(counts)), counts)
        if len(indices) != self.length:  # float rounding in the systematic draw: never silently another length
            raise AssertionError(f"repeat-factor epoch of {len(indices)} indices, planned {self.length}")
        return indices[rng.permutation(len(indices))].tolist()


def grouped(order: Sequence[int], groups: Sequence[int], block: int) -> List[int]:
    """`order` reordered into blocks of `block` indices of one group (module docstring)."""
    open_blocks: dict = {}
    out: List[int] = []
    for i in order:
        g = groups[i]
        buf = open_blocks.setdefault(g, [])
        buf.append(i)
        if len(buf) == block:
            out += buf
            open_blocks[g] = []
    for g in sorted(open_blocks):
        out += open_blocks[g]
    return out


class DetectionSampler:
    """The loaders' sampler face (`len`, `set_epoch`, `draw`: trainer/data/loaders.py) for repeat factors and/or
    aspect-ratio grouping; `groups` None = no grouping, `factors` None = every image once (the usual shuffle)."""

    def __init__(self, n: int, seed: int, groups: Optional[Sequence[int]] = None, block: int = 1,
                 factors: Optional[np.ndarray] = None):
        self.n, self.seed, self.groups, self.block = n, seed, groups, block
        self.repeat = RepeatFactorOrder(factors, seed) if factors is not None else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.repeat.length if self.repeat is not None else self.n

    def draw(self) -> List[int]:
        order = (self.repeat.draw(self.epoch) if self.repeat is not None
                 else shuffled_order(self.n, self.seed, self.epoch).tolist())
        return grouped(order, self.groups, self.block) if self.groups is not None else order

    def __iter__(self):
        return iter(self.draw())


def detection_sampler(split, seed: int, group_factor: int, block: int,
                      repeat_threshold: Optional[float], say=print) -> Optional[DetectionSampler]:
    """data.aspect_ratio_group_factor / data.repeat_factor_threshold over a CocoSplit (None when both are off);
    `block`: the global batch."""
    if not group_factor and repeat_threshold is None:
        return None
    n = len(split)
    groups = aspect_ratio_groups(split.widths, split.heights, group_factor) if group_factor else None
    factors = None
    if repeat_threshold is not None:
        cats = [split.labels[s:e][~split.iscrowd[s:e]] for s, e in zip(split.starts[:-1], split.starts[1:])]
        factors = repeat_factors(cats, repeat_threshold)
        say(f"[trainer] repeat-factor sampling (threshold {repeat_threshold}): {int((factors > 1).sum())} of {n} "
            f"training images repeated (up to x{factors.max():.2f}); an epoch is {int(round(factors.sum()))} images")
    if groups is not None:
        sizes = np.bincount(groups, minlength=2 * group_factor + 2)
        say(f"[trainer] aspect-ratio grouping (factor {group_factor}): batches of {block} from one of "
            f"{int((sizes > 0).sum())} groups of width/height (images per group: {sizes.tolist()})")
    return DetectionSampler(n, seed, groups, block, factors)

