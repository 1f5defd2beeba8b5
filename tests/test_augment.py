"""Classification regularisers in the data path: mixup/CutMix of collated batches (both training loaders, exact
on resume, per rank), the loss against their soft targets, and the per-sample policies and random erasing
(a pure function of seed, epoch and index)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import make_folder
from trainer.config import load_config
from trainer.data import build_data
from trainer.data.datasets import POLICIES, ArrayDataset, PadCropFlip, init_sample, train_transform
from trainer.data.device import DeviceLoader
from trainer.data.loaders import WorkerLoader, build_train_loader
from trainer.data.mixing import BatchMixer, build_mixer, mixed_targets
from trainer.tasks import Task

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
CLASSES = 5


def images(n=24, side=8, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def device_loader(n=24, batch=4, mixer=None, **kw) -> DeviceLoader:
    x = torch.from_numpy(images(n)).permute(0, 3, 1, 2).contiguous()
    return DeviceLoader(x, [i % CLASSES for i in range(n)], batch, MEAN, STD, seed=3, padding=2, mixer=mixer, **kw)


def mixer(mixup=0.4, cutmix=1.0, **kw) -> BatchMixer:
    return BatchMixer(CLASSES, mixup, cutmix, seed=3, **kw)


def data_cfg(**overrides):
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()]).data


# ---- mixup / CutMix ----

def test_mixup_mixes_each_image_with_the_flipped_batch_and_soft_targets_sum_to_one():
    mix = mixer(cutmix=0.0)
    x, y = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    lam, box = mix.plan(0, 5, 8, 8)
    assert box is None and 0 < lam < 1
    out, soft = mix(x.clone(), y, epoch=0, batch=5)
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert soft.dtype == torch.float32 and soft.shape == (7, CLASSES)
    assert torch.allclose(soft.sum(1), torch.ones(7))
    expected = lam * F.one_hot(y, CLASSES) + (1 - lam) * F.one_hot(y.flip(0), CLASSES)
    assert torch.allclose(soft, expected.float())


def test_cutmix_takes_one_box_from_the_partner_whose_area_is_one_minus_lambda():
    mix = mixer(mixup=0.0)
    n, h, w = 6, 12, 10  # not square: the box's rows and columns are drawn against the right sides
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).contiguous()  # image i is all i
    y = torch.arange(n) % CLASSES
    at_border = 0
    for batch in range(40):
        lam, (top, bottom, left, right) = mix.plan(1, batch, h, w)
        out, soft = mix(x.clone(), y, epoch=1, batch=batch)
        from_partner = out != x  # partner i is image n-1-i, never i itself (n even)
        assert torch.equal(out[from_partner], x.flip(0)[from_partner])
        area = from_partner[:, 0].float().mean(dim=(1, 2))  # fraction of each image's pixels
        assert torch.allclose(area, torch.full((n,), 1 - lam), atol=1e-6), batch
        assert from_partner[:, :, top:bottom, left:right].all() and int(from_partner.sum()) == \
            n * 3 * (bottom - top) * (right - left)
        assert torch.allclose(soft.sum(1), torch.ones(n))
        assert torch.allclose(soft, mixed_targets(y, CLASSES, lam))
        at_border += top == 0 or left == 0 or bottom == h or right == w
    assert at_border > 0  # boxes clipped by the image occur, and lambda is corrected for them too


def test_both_alphas_switch_between_cutmix_and_mixup_by_switch_prob():
    kinds = [mixer(switch_prob=0.5).plan(0, b, 8, 8)[1] is None for b in range(200)]
    assert 60 < sum(kinds) < 140  # about half mixup
    assert all(mixer(switch_prob=1.0).plan(0, b, 8, 8)[1] is not None for b in range(50))
    assert all(mixer(switch_prob=0.0).plan(0, b, 8, 8)[1] is None for b in range(50))


def test_mix_prob_zero_leaves_batches_unchanged_and_partial_prob_mixes_some():
    plain = device_loader()
    unmixed = device_loader(mixer=mixer(mix_prob=0.0))
    for dl in (plain, unmixed):
        dl.set_epoch(1)
    for (a, b), (c, d) in zip(plain.batches(), unmixed.batches()):
        assert torch.equal(a, c) and torch.equal(b, d) and d.dtype == torch.long
    mixed = [mixer(mix_prob=0.5).plan(0, b, 8, 8) is not None for b in range(200)]
    assert 60 < sum(mixed) < 140


def test_mixing_never_draws_from_the_global_rng():
    state = torch.get_rng_state()
    dl = device_loader(mixer=mixer())
    dl.set_epoch(0)
    list(dl.batches())
    assert torch.equal(torch.get_rng_state(), state)


def test_ranks_mix_differently_and_epochs_too():
    plans = {(rank, epoch): [mixer(rank=rank).plan(epoch, b, 8, 8) for b in range(10)]
             for rank in (0, 1) for epoch in (0, 1)}
    assert plans[(0, 0)] != plans[(1, 0)]
    assert plans[(0, 0)] != plans[(0, 1)]
    assert plans[(0, 0)] == [mixer(rank=0).plan(0, b, 8, 8) for b in range(10)]  # and a pure function of them


def test_device_loader_mixes_and_resume_at_batch_k_mixes_batch_k_alike():
    dl = device_loader(mixer=mixer(), channels_last=True)
    dl.set_epoch(2)
    full = list(dl.batches())
    assert all(y.dtype == torch.float32 and y.shape[1] == CLASSES for _, y in full)  # mix_prob=1: all soft
    assert full[0][0].is_contiguous(memory_format=torch.channels_last)  # mixing keeps the memory format
    kinds = {dl.mixer.plan(2, b, 8, 8)[1] is None for b in range(len(full))}
    assert kinds == {True, False}  # this epoch has both mixup and CutMix batches
    tail = list(dl.batches(start=3 * dl.dealing.chunk))
    assert len(tail) == len(full) - 3
    for (a, b), (c, d) in zip(full[3:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)
    unmixed = device_loader()
    unmixed.set_epoch(2)
    assert not torch.equal(next(iter(unmixed.batches()))[0], full[0][0])


def test_device_loader_ranks_mix_their_own_slices_differently():
    ranks = [device_loader(batch=4, world=2, rank=r, mixer=mixer(rank=r)) for r in (0, 1)]
    lams = []
    for dl in ranks:
        dl.set_epoch(0)
        lams.append([dl.mixer.plan(0, b, 8, 8) for b in range(len(dl))])
    assert lams[0] != lams[1]


def test_worker_loader_from_the_config_mixes_and_resumes_exactly():
    from trainer.distributed import make_accelerator

    acc = make_accelerator("cpu", "no")
    cfg = data_cfg(**{"data.num_workers": 0, "data.image_size": 8, "data.augment.mixup_alpha": 0.4,
                      "data.augment.cutmix_alpha": 1.0})
    ds = ArrayDataset(images(30), [i % CLASSES for i in range(30)], PadCropFlip(8, 2, True, MEAN, STD), seed=3)
    loader = build_train_loader(ds, cfg, 4, 3, acc, MEAN, STD, CLASSES, False, say=lambda *a: None)
    assert isinstance(loader, WorkerLoader) and loader.mixer is not None and loader.mixer.rank == acc.process_index
    loader.prepare(acc)
    loader.set_epoch(1)
    full = [(x.clone(), y.clone()) for x, y in loader.batches()]
    assert len(full) == 8 and all(y.is_floating_point() for _, y in full)
    assert all(torch.allclose(y.sum(1), torch.ones(len(y))) for _, y in full)
    loader.set_epoch(1)  # as a resumed run does (accelerate's seedable sampler moves on after each pass)
    tail = list(loader.batches(start=3 * loader.dealing.chunk))
    assert len(tail) == len(full) - 3
    for (a, b), (c, d) in zip(full[3:], tail):
        assert torch.equal(a, c) and torch.equal(b, d)
    first = loader.first(4)  # data-dependent init: unmixed, unaugmented
    assert first.shape == (4, 3, 8, 8)


def test_device_loader_from_the_config_gets_the_mixer():
    from trainer.distributed import make_accelerator

    acc = make_accelerator("cpu", "no")
    cfg = data_cfg(**{"data.loader": "device", "data.augment.cutmix_alpha": 1.0})
    ds = ArrayDataset(images(16), [i % CLASSES for i in range(16)], seed=3)
    loader = build_train_loader(ds, cfg, 4, 3, acc, MEAN, STD, CLASSES, False, say=lambda *a: None)
    assert isinstance(loader, DeviceLoader) and loader.mixer is not None
    sample = init_sample(16, 3, 3)  # the seeded init sample, not the first (class-sorted) images
    assert torch.equal(loader.first(3), (loader.images[sample].float() - loader.mean) / loader.std)  # never mixed
    assert build_mixer(data_cfg().augment, CLASSES, 0, 0) is None  # both alphas 0: no mixer at all


# ---- the loss against soft targets ----

def test_soft_one_hot_targets_give_the_integer_label_loss():
    torch.manual_seed(0)
    logits, labels = torch.randn(9, 3), torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    onehot = F.one_hot(labels, 3).float()
    for task in (Task("multiclass", 3, label_smoothing=0.1), Task("multiclass", 3, weights=[0.5, 1.0, 2.0]),
                 Task("multiclass", 3, label_smoothing=0.2, weights=[0.5, 1.0, 2.0])):
        for reduction in ("mean", "none"):
            assert torch.allclose(task.loss(logits, onehot, reduction), task.loss(logits, labels, reduction),
                                  atol=1e-6)
    binary_logits, binary_labels = torch.randn(9, 1), torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0])
    onehot = F.one_hot(binary_labels, 2).float()
    for task in (Task("binary", 2, pos_weight=3.0), Task("binary", 2, weights=[0.75, 1.5]),
                 Task("binary", 2, pos_weight=2.0, weights=[0.75, 1.5])):
        for reduction in ("mean", "none"):
            assert torch.allclose(task.loss(binary_logits, onehot, reduction),
                                  task.loss(binary_logits, binary_labels, reduction), atol=1e-6)


def test_mixed_targets_loss_is_the_mix_of_the_two_losses():
    """Cross-entropy and BCE are linear in the target: the loss against lam x a + (1 - lam) x b is lam x the
    loss against a plus (1 - lam) x the loss against b, label smoothing and pos_weight included."""
    torch.manual_seed(1)
    lam = 0.3
    labels = torch.tensor([0, 1, 2, 1, 0, 2])
    soft = mixed_targets(labels, 3, lam)
    task = Task("multiclass", 3, label_smoothing=0.1)
    logits = torch.randn(6, 3)
    expected = lam * task.loss(logits, labels, "none") + (1 - lam) * task.loss(logits, labels.flip(0), "none")
    assert torch.allclose(task.loss(logits, soft, "none"), expected, atol=1e-6)
    binary = Task("binary", 2, pos_weight=2.5)
    labels2, logits2 = torch.tensor([1, 0, 0, 1, 1, 0]), torch.randn(6, 1)
    expected = lam * binary.loss(logits2, labels2, "none") + (1 - lam) * binary.loss(logits2, labels2.flip(0), "none")
    assert torch.allclose(binary.loss(logits2, mixed_targets(labels2, 2, lam), "none"), expected, atol=1e-6)
    weighted = Task("multiclass", 3, weights=[1.0, 2.0, 4.0])
    w = soft @ torch.tensor([1.0, 2.0, 4.0])  # each sample weighs its target's expected class weight
    per = F.cross_entropy(logits, soft, reduction="none")
    assert torch.allclose(weighted.loss(logits, soft), (per * w).sum() / w.sum(), atol=1e-6)


# ---- policies and random erasing (per sample, DataLoader path) ----

def policy_dataset(**kw) -> ArrayDataset:
    transform = train_transform(32, MEAN, STD, hflip=False, crop_padding=0, random_resized_crop=False,
                                rrc_min_scale=0.35, color_jitter=0.0, **kw)
    return ArrayDataset(images(6, side=32), [0] * 6, transform, seed=7)


@pytest.mark.parametrize("kw", [{"auto_augment": name} for name in sorted(POLICIES)]
                         + [{"auto_augment": "randaugment", "randaugment_num_ops": 3, "randaugment_magnitude": 15},
                            {"random_erasing": 1.0}])
def test_policies_and_erasing_are_a_function_of_seed_epoch_index(kw):
    ds = policy_dataset(**kw)
    assert not isinstance(ds.transform, PadCropFlip)  # the v2 chain, seeded per sample by __getitem__
    plain = policy_dataset()  # pad 0, no flip: the normalised image itself
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = [ds[i][0] for i in range(len(ds))]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG neither used nor moved
    torch.manual_seed(999)
    assert all(torch.equal(ds[i][0], first[i]) for i in range(len(ds)))
    assert any(not torch.allclose(first[i], plain[i][0]) for i in range(len(ds)))  # it does something
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i][0], first[i]) for i in range(len(ds)))
    ds.set_epoch(0)
    assert all(torch.equal(ds[i][0], first[i]) for i in range(len(ds)))


def test_random_erasing_fills_a_rectangle_with_normal_noise_after_normalisation():
    ds, plain = policy_dataset(random_erasing=1.0), policy_dataset()
    x, ref = ds[0][0], plain[0][0]
    changed = ((x - ref).abs() > 1e-4).any(0)  # (the v2 chain and PadCropFlip normalise alike up to rounding)
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.float().mean() > 0.99 and 0.02 * 32 * 32 * 0.9 <= box.numel() <= 0.34 * 32 * 32  # one rectangle
    noise = x[:, changed]
    assert abs(float(noise.mean())) < 0.3 and 0.7 < float(noise.std()) < 1.3  # N(0, 1) in normalised units
    assert all(torch.equal(policy_dataset(random_erasing=0.0)[i][0], plain[i][0]) for i in range(3))


def test_build_data_passes_the_policy_keys_to_the_training_transform(tmp_path):
    make_folder(tmp_path / "d", ("a", "b"), 4, size=(16, 16))
    cfg = data_cfg(**{"data.format": "imagefolder", "data.root": tmp_path / "d", "data.image_size": 16,
                      "data.val_fraction": 0.25, "data.augment.auto_augment": "randaugment",
                      "data.augment.randaugment_num_ops": 3, "data.augment.randaugment_magnitude": 5,
                      "data.augment.random_erasing": 0.25})
    data = build_data(cfg, seed=0)
    steps = data.datasets["train"].transform.transforms
    policy = next(t for t in steps if type(t).__name__ == "RandAugment")
    erasing = next(t for t in steps if type(t).__name__ == "RandomErasing")
    assert (policy.num_ops, policy.magnitude) == (3, 5) and erasing.p == 0.25 and erasing.value is None
    assert steps.index(policy) < [type(t).__name__ for t in steps].index("Normalize") < steps.index(erasing)
    assert not any(type(t).__name__ in ("RandAugment", "RandomErasing")
                   for t in data.datasets["val"].transform.transforms)  # evaluation is never augmented


def test_on_a_gpu_the_worker_loader_normalises_uint8_batches_only_where_it_gives_the_same_floats():
    """build_train_loader leaves normalisation to the device (uint8 samples) on CUDA, for a chain that ends by
    normalising; with mixup/CutMix the batches mixed after it are the float path's (run here on the CPU)."""
    from types import SimpleNamespace

    cuda = SimpleNamespace(device=torch.device("cuda"), process_index=0, num_processes=1)
    cfg = data_cfg(**{"data.num_workers": 0, "data.image_size": 8})
    rrc = train_transform(8, MEAN, STD, True, 0, True, 0.35, 0.0)
    chains = {"rrc": rrc, "pad_crop_flip": PadCropFlip(8, 2, True, MEAN, STD),
              "erasing": train_transform(8, MEAN, STD, True, 0, True, 0.35, 0.0, random_erasing=0.5)}
    for name, transform in chains.items():
        ds = ArrayDataset(images(8), [i % CLASSES for i in range(8)], transform, seed=3)
        loader = build_train_loader(ds, cfg, 4, 3, cuda, MEAN, STD, CLASSES, False, say=lambda *a: None)
        assert (loader.normalise is not None) == ds.uint8_samples == (name == "rrc"), name
    cpu = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    ds = ArrayDataset(images(8), [i % CLASSES for i in range(8)], rrc, seed=3)
    assert build_train_loader(ds, cfg, 4, 3, cpu, MEAN, STD, CLASSES, False, say=lambda *a: None).normalise is None
    batches = []
    for normalise in (None, (tuple(MEAN), tuple(STD))):
        ds = ArrayDataset(images(30), [i % CLASSES for i in range(30)], rrc, seed=3)
        loader = WorkerLoader(ds, 4, 3, 0, 2, False, None, mixer=mixer(), normalise=normalise)
        loader.set_epoch(1)
        batches.append(list(loader.batches()))
    assert len(batches[0]) == len(batches[1]) == 8
    for (a, y), (b, z) in zip(*batches):
        assert torch.equal(a, b) and torch.equal(y, z)
