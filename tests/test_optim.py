import math

import pytest
import torch

from trainer.models import build_model
from trainer.optim import build_optimizer, lr_at


def test_no_weight_decay_on_norm_and_bias():
    model = build_model("small_cnn", 3)
    opt = build_optimizer(model, "adamw", 1e-3, weight_decay=0.05)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


def test_sgd_nesterov():
    opt = build_optimizer(build_model("linear", 2), "sgd", 0.1, 5e-4, momentum=0.9, nesterov=True)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]


def test_warmup_then_cosine():
    lrs = [lr_at(u, 100, 1.0, warmup_updates=10) for u in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] < 0.001


def test_step_schedule():
    assert [lr_at(u, 30, 1.0, schedule="step", milestones=[10, 20]) for u in (0, 10, 25)] == pytest.approx([1, 0.1, 0.01])
