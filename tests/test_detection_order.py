"""Detection's epoch orders (trainer/data/detection_order.py): aspect-ratio grouping as torchvision's
GroupedBatchSampler groups, repeat factors as LVIS / Detectron2 define them, both one global order per epoch
that is a pure function of (seed, epoch) and that Dealing deals to any process count."""
import math

import numpy as np
import pytest

from trainer.data.detection_order import (DetectionSampler, RepeatFactorOrder, aspect_ratio_groups, grouped,
                                          repeat_factors)
from trainer.data.order import Dealing


def test_groups_are_torchvisions_quantised_aspect_ratios():
    # factor 3: edges 2^linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2 -> groups 0..7
    widths, heights = [100, 100, 640, 480, 300, 1000], [300, 150, 480, 640, 300, 400]
    assert aspect_ratio_groups(widths, heights, 3) == [0, 2, 5, 2, 4, 7]


def test_grouping_reorders_into_blocks_of_one_group_and_keeps_every_index():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 3, size=103).tolist()
    order = rng.permutation(103).tolist()
    out = grouped(order, groups, block=8)
    assert sorted(out) == list(range(103))
    full = [out[i:i + 8] for i in range(0, len(out), 8)]
    mixed = [b for b in full if len({groups[i] for i in b}) > 1]
    assert len(mixed) <= 2  # only among the blocks left open at the end (3 groups: at most 3 x 7 images)
    assert all(len({groups[i] for i in b}) == 1 for b in full[:-3])


def test_repeat_factors_are_lvis_and_an_epoch_has_a_fixed_length_and_the_expected_repeats():
    # category 1 in every image, category 2 in 1 of 10: with t = 0.5, r_2 = sqrt(0.5 / 0.1) = 2.236, r_1 = 1
    cats = [[1]] * 9 + [[1, 2]]
    r = repeat_factors(cats, 0.5)
    assert r.tolist() == pytest.approx([1.0] * 9 + [math.sqrt(5)])
    assert repeat_factors([[], [3]], 0.9).tolist() == pytest.approx([1.0, math.sqrt(0.9 / 0.5)])
    factors = np.array([1.0, 1.5, 2.25, 1.1, 3.0, 1.7])
    order = RepeatFactorOrder(factors, seed=5)
    assert order.length == 1 + 1 + 2 + 1 + 3 + 1 + round(0.5 + 0.25 + 0.1 + 0.7)
    counts = np.zeros(len(factors))
    epochs = 3000
    for epoch in range(epochs):
        drawn = order.draw(epoch)
        assert len(drawn) == order.length and drawn == RepeatFactorOrder(factors, seed=5).draw(epoch)
        counts += np.bincount(drawn, minlength=len(factors))
    # stochastic rounding: the mean count is r, to within the length's rounding (1.55 extras scaled to 2)
    assert counts / epochs == pytest.approx(factors + (factors % 1) * (2 / 1.55 - 1), abs=0.04)


def test_the_order_is_one_per_epoch_whatever_the_process_count_and_every_position_is_dealt_once():
    groups = [i % 4 for i in range(50)]
    factors = np.where(np.arange(50) % 7 == 0, 2.6, 1.0)
    sampler = DetectionSampler(50, seed=1, groups=groups, block=8, factors=factors)
    sampler.set_epoch(3)
    order = sampler.draw()
    assert len(order) == len(sampler) == 50 + 8 + round(8 * 0.6)  # 8 images at 2.6: one more each, 4.8 -> 5 extras
    again = DetectionSampler(50, seed=1, groups=groups, block=8, factors=factors)
    again.set_epoch(3)
    assert again.draw() == order
    for processes, batch in ((1, 8), (2, 4), (4, 2)):  # the global batch of 8 on 1, 2 and 4 processes
        dealing = Dealing(len(order), batch, processes, drop_last=False)
        dealt = []
        for first, stop in dealing.steps():
            for rank in range(processes):
                part = dealing.rank_slice(first, stop, rank)
                mine = order[part.start:part.stop]
                dealt += mine
                if stop - first == 8 and first + 8 <= len(order) - 3 * 8:  # a full block: one group per batch
                    assert len({groups[i] for i in mine}) == 1
        assert dealt == order[:dealing.end]


@pytest.mark.parametrize("overrides, message", [
    (["data.generated.variant=segmentation", "data.aspect_ratio_group_factor=3"],
     "data.aspect_ratio_group_factor is a detection sampler"),
    (["data.generated.variant=multiclass", "data.repeat_factor_threshold=0.001"],
     "data.repeat_factor_threshold is a detection sampler"),
    (["data.generated.variant=detection", "data.sampler=weighted"], "detection data has no one label per image"),
    (["data.generated.variant=detection", "data.repeat_factor_threshold=0"], "must be in \\(0, 1\\]"),
])
def test_the_sampler_keys_are_refused_where_they_mean_nothing(overrides, message):
    from trainer.config import load_config
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)
