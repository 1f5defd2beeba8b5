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


def test_linear_schedule_with_warmup_from_a_fraction():
    # airbench's shape: 0.2 -> 1 over the first 23% of updates, then linearly down to 0.07
    lrs = [lr_at(u, 100, 2.0, warmup_updates=23, schedule="linear", min_lr_ratio=0.07, warmup_start_ratio=0.2)
           for u in range(100)]
    assert lrs[0] == pytest.approx(0.4) and lrs[23] == pytest.approx(2.0)
    assert all(a < b for a, b in zip(lrs[:23], lrs[1:24]))
    assert lrs[23 + 77 // 2] == pytest.approx(2.0 + (0.14 - 2.0) * (77 // 2) / 77)
    assert all(a > b for a, b in zip(lrs[23:], lrs[24:])) and lrs[-1] == pytest.approx(0.14, abs=0.03)


def test_bias_lr_scale_and_fused():
    model = build_model("small_cnn", 3)
    opt = build_optimizer(model, "sgd", 0.1, 5e-4, bias_lr_scale=64.0, fused=True)
    scales = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert all(scales[id(p)] == (64.0 if p.ndim <= 1 else 1.0) for p in model.parameters())
    assert opt.defaults["fused"]


def test_lookahead_pulls_weights_back_and_restores():
    from trainer.optim import Lookahead

    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.data[:] = 1.0
    la = Lookahead(model)
    model.weight.data[:] = 3.0
    la.step(model, decay=0.75)  # slow = 1 + 0.25 x (3 - 1) = 1.5, and the weights go back to it
    assert torch.equal(model.weight.data, torch.full((1, 2), 1.5))
    saved = {k: v.clone() for k, v in la.state_dict().items()}
    other = Lookahead(torch.nn.Linear(2, 1, bias=False))
    other.load_state_dict(saved)
    assert torch.equal(other.state_dict()["weight"], saved["weight"])
    model.weight.data[:] = 9.0
    la.step(model, decay=1.0)  # the final step: the weights become the slow copy
    assert torch.equal(model.weight.data, torch.full((1, 2), 1.5))


def test_airbench94_bias_rules_norm_biases_at_64x_lr_with_the_weights_decay_per_update():
    """airbench94: BN biases at 64 x lr but decayed by lr x weight_decay per update like the weights; other
    biases (the whitening conv's) at lr with the weights' decay."""
    model = build_model("airbench", 10)
    lr, wd = 1.5, 0.00133
    opt = build_optimizer(model, "sgd", lr, wd, momentum=0.0, bias_lr_scale=64.0, bias_decay=True,
                          bias_lr_scale_scope="norm")
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = group_of[id(p)]
        norm_bias = p.ndim == 1 and name.startswith("features.")
        assert g["lr_scale"] == (64.0 if norm_bias else 1.0), name
        assert g["lr_scale"] * g["weight_decay"] == pytest.approx(wd), name  # decay per update = lr x wd
    # one SGD update with zero gradients: every trained tensor shrinks by the same factor 1 - lr x wd
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for g in opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    opt.step()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.allclose(p.detach(), before[name] * (1 - lr * wd), atol=1e-7), name


def test_default_bias_rules_keep_the_two_groups_of_old():
    model = build_model("airbench", 10)
    opt = build_optimizer(model, "sgd", 0.1, 5e-4, bias_lr_scale=64.0)
    assert [(g["weight_decay"], g["lr_scale"]) for g in opt.param_groups] == [(5e-4, 1.0), (0.0, 64.0)]


def _torch_lrs(make_scheduler, steps: int, lr: float) -> list:
    """The learning rate torch's scheduler gives each of `steps` optimizer steps (read before the step)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_poly_schedule_is_torchs_polynomial_lr_after_the_warm_up():
    """The segmentation reference's schedule: a warm-up, then PolynomialLR (power 0.9) over the rest."""
    total, warmup, peak = 50, 5, 0.02
    ours = [lr_at(u, total, peak, warmup_updates=warmup, schedule="poly") for u in range(total)]
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=total - warmup, power=0.9),
                        total - warmup, peak)
    assert ours[warmup:] == pytest.approx(theirs, rel=1e-9)
    assert ours[:warmup] == pytest.approx([peak * (u + 1) / warmup for u in range(warmup)])
    assert [lr_at(u, 20, 1.0, schedule="poly", poly_power=2.0) for u in (0, 10, 19)] == \
        pytest.approx([1.0, 0.25, (1 / 20) ** 2])


@pytest.mark.parametrize("anneal", ["cos", "linear"])
def test_one_cycle_schedule_is_torchs_one_cycle_lr(anneal):
    total, peak = 37, 0.1  # a total that pct_start does not divide: the phase end falls between updates
    kw = dict(pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    ours = [lr_at(u, total, peak, schedule="one_cycle", one_cycle_pct_start=kw["pct_start"],
                  one_cycle_div_factor=kw["div_factor"], one_cycle_final_div_factor=kw["final_div_factor"],
                  one_cycle_anneal=anneal) for u in range(total)]
    theirs = _torch_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=peak, total_steps=total, anneal_strategy=anneal, cycle_momentum=False, **kw), total, peak)
    assert ours == pytest.approx(theirs, rel=1e-9)
    assert ours[0] == pytest.approx(peak / 10) and ours[-1] == pytest.approx(peak / 10 / 100)


@pytest.mark.parametrize("schedule", ["poly", "one_cycle"])
def test_new_schedules_continue_across_a_resume_and_a_changed_global_batch(schedule):
    """Through `Schedule` as a run uses it: a checkpoint's schedule restored as JSON gives the same rates, and
    stretched over twice the updates (global batch halved at update 40 of 100) it follows the samples: update
    40 + 2k stands where update 40 + k stood, and the run still ends at the planned end."""
    from trainer.optim import Schedule

    kwargs = {"total_updates": 100, "peak_lr": 0.5, "warmup_updates": 0 if schedule == "one_cycle" else 10,
              "schedule": schedule, "poly_power": 0.9, "one_cycle_pct_start": 0.3}
    planned = Schedule(kwargs, 100)
    restored = Schedule.from_json(planned.to_json())
    assert [lr_at(restored.position(u), **restored.kwargs) for u in range(100)] == \
        [lr_at(u, **kwargs) for u in range(100)]
    halved = planned.stretched(40, 160)
    for k in range(0, 60, 7):
        assert lr_at(halved.position(40 + 2 * k), **kwargs) == pytest.approx(lr_at(40 + k, **kwargs))
    assert halved.position(159) == pytest.approx(99.5)


def test_one_cycle_refuses_a_separate_warm_up():
    from trainer.config import load_config
    from trainer.errors import ConfigError

    assert load_config(overrides=["optim.schedule=poly", "optim.poly_power=1.5"]).optim.poly_power == 1.5
    with pytest.raises(ConfigError, match="optim.warmup_epochs=1.0 with optim.schedule=one_cycle"):
        load_config(overrides=["optim.schedule=one_cycle", "optim.warmup_epochs=1"])
    with pytest.raises(ConfigError, match="optim.one_cycle_pct_start"):
        load_config(overrides=["optim.schedule=one_cycle", "optim.one_cycle_pct_start=1.5"])


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_one_cycle_cycles_the_momentum_as_torchs_one_cycle_lr(name):
    """cycle_momentum, torch's default: SGD's momentum or AdamW's beta1, 0.95 -> 0.85 at the peak -> 0.95,
    set on every group by the loop through `momentum_at` and `set_momentum`."""
    from trainer.optim import momentum_at, set_momentum

    total, kw = 23, dict(one_cycle_pct_start=0.4, one_cycle_anneal="cos", one_cycle_momentum=[0.85, 0.95])
    param = torch.nn.Parameter(torch.zeros(1))
    opt = (torch.optim.SGD([param], lr=0.1, momentum=0.9) if name == "sgd"
           else torch.optim.AdamW([param], lr=0.1, betas=(0.9, 0.999)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.4)
    ours = build_optimizer(build_model("linear", 2), name, 0.1, 0.0)
    for u in range(total):
        theirs = opt.param_groups[0]["momentum" if name == "sgd" else "betas"]
        for group in ours.param_groups:
            set_momentum(group, momentum_at(u, total, "one_cycle", **kw))
        mine = ours.param_groups[0]["momentum" if name == "sgd" else "betas"]
        assert mine == pytest.approx(theirs, rel=1e-9), u
        opt.step()
        sched.step()
    assert momentum_at(5, total, "cosine", **kw) is None and momentum_at(5, total, "one_cycle") is None
