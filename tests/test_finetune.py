"""Stochastic depth and head dropout (trainer/models.py), the backbone/head split, layer-wise lr and freezing
(trainer/finetune.py, trainer/optim.py). Small inputs (16-32 px) and batches of 4: CPU, seconds."""
import pytest
import torch
from torch import nn
from torchvision.ops import StochasticDepth

from trainer.config import OptimCfg
from trainer.errors import ConfigError
from trainer.finetune import BackboneFreeze, parameter_depths
from trainer.models import DROP_PATH_MODELS, OWN_MODELS, build_model
from trainer.optim import build_optimizer, optimizer_from, param_groups

TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
               "convnext_tiny")
OURS = sorted(OWN_MODELS)


def forward_with_seed(model, x, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


# ---- stochastic depth and head dropout ----

def test_resnet_drop_path_is_random_in_training_and_plain_in_eval():
    torch.manual_seed(0)
    model = build_model("resnet18", 3, image_size=32, drop_path=0.5, dropout=0.3)
    plain = build_model("resnet18", 3, image_size=32)
    plain.load_state_dict(model.state_dict(), strict=True)  # the same names
    probs = [m.drop_path for m in model.modules() if hasattr(m, "drop_path")]
    assert probs == pytest.approx([0.5 * i / 7 for i in range(8)])  # 8 blocks, 0 -> 0.5 linearly
    x = torch.randn(4, 3, 32, 32)

    model.train()
    assert not torch.allclose(forward_with_seed(model, x, 0), forward_with_seed(model, x, 1))
    assert torch.equal(forward_with_seed(model, x, 0), forward_with_seed(model, x, 0))
    plain.train()  # the randomness is the drop path's: the plain net in train mode is deterministic
    assert torch.equal(forward_with_seed(plain, x, 0), forward_with_seed(plain, x, 1))

    model.eval(), plain.eval()
    plain.load_state_dict(model.state_dict(), strict=True)  # the BN statistics the train-mode passes moved
    assert torch.equal(forward_with_seed(model, x, 0), forward_with_seed(model, x, 1))
    assert torch.equal(forward_with_seed(model, x, 0), forward_with_seed(plain, x, 0))


def test_resnet_drop_path_survives_sync_batchnorm_conversion():
    # the conversion replaces every BN module: a forward hook on bn2 would be lost with it
    model = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("resnet18", 3, image_size=16, drop_path=0.5)).train()
    x = torch.randn(4, 3, 16, 16)
    assert not torch.allclose(forward_with_seed(model, x, 0), forward_with_seed(model, x, 1))


@pytest.mark.parametrize("name", TORCHVISION)
def test_drop_path_and_dropout_keep_the_state_dict_names(name):
    torch.manual_seed(0)
    drop_path = 0.3 if name in DROP_PATH_MODELS else None
    model = build_model(name, 3, image_size=32, drop_path=drop_path, dropout=0.25)
    plain = build_model(name, 3, image_size=32)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(forward_with_seed(model.eval(), x, 0), forward_with_seed(plain.eval(), x, 1))
    depth = [m.p for m in model.modules() if isinstance(m, StochasticDepth)]
    if name == "convnext_tiny":  # torchvision: p x block / (blocks - 1)
        assert max(depth) == pytest.approx(0.3) and min(depth) == 0
    elif name == "efficientnet_b0":  # torchvision: p x block / blocks
        assert 0.25 < max(depth) < 0.3 and min(depth) == 0
    if name.startswith(("mobilenet", "efficientnet")):
        assert [m.p for m in model.classifier if isinstance(m, nn.Dropout)] == [0.25]


def test_drop_path_zero_turns_torchvisions_own_off_and_none_keeps_it():
    depth = lambda model: {m.p for m in model.modules() if isinstance(m, StochasticDepth)}  # noqa: E731
    assert depth(build_model("efficientnet_b0", 3, drop_path=0.0)) == {0.0}
    assert max(depth(build_model("efficientnet_b0", 3))) > 0  # torchvision's 0.2


@pytest.mark.parametrize("name", OURS + ["mobilenet_v3_small"])
def test_models_without_stochastic_depth_refuse_it_in_one_line(name):
    with pytest.raises(ConfigError) as err:
        build_model(name, 3, image_size=32, drop_path=0.1)
    message = str(err.value)
    assert "\n" not in message and "model.drop_path" in message and name in message and "works with the resnet, resnext" in message
    build_model(name, 3, image_size=32, drop_path=0.0)  # 0 = off is fine


@pytest.mark.parametrize("name", OURS)
def test_our_nets_take_head_dropout(name):
    torch.manual_seed(0)
    model = build_model(name, 3, image_size=32, dropout=0.5)
    plain = build_model(name, 3, image_size=32)
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32)
    assert not torch.equal(forward_with_seed(model.train(), x, 0), forward_with_seed(model, x, 1))
    plain.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(forward_with_seed(model.eval(), x, 0), forward_with_seed(plain.eval(), x, 0))


def test_an_exported_model_rebuilt_without_them_predicts_the_same(tmp_path):
    from trainer.export import export_model, load_exported

    torch.manual_seed(0)
    model = build_model("resnet18", 3, image_size=32, drop_path=0.2, dropout=0.5).train()
    model(torch.randn(4, 3, 32, 32))  # moves the BN statistics off their initial values
    export_model(model, tmp_path / "model", {
        "architecture": "resnet18", "task": "multiclass", "num_outputs": 3, "classes": ["a", "b", "c"],
        "image_size": 32, "small_input_stem": True, "mean": [0.5] * 3, "std": [0.25] * 3})
    loaded, _ = load_exported(str(tmp_path / "model"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(forward_with_seed(loaded, x, 0), forward_with_seed(model.eval(), x, 1))


def test_classification_task_passes_them_on():
    from trainer.tasks.classify import Classification

    task = Classification.from_meta({"task": "multiclass", "classes": ["a", "b", "c"]})
    model = task.build_model("resnet18", 32, None, None, log=lambda *_: None, drop_path=0.4, dropout=0.1)
    assert max(getattr(m, "drop_path", 0) for m in model.modules()) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="model.drop_path"):
        task.build_model("small_cnn", 32, drop_path=0.4)


# ---- parameter groups: head lr and layer-wise decay ----

def old_groups(model, weight_decay, bias_lr_scale):
    """The two groups of before fine-tuning existed (a copy of the old `param_groups`)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": bias_lr_scale}]


def same_groups(a, b) -> bool:
    return len(a) == len(b) and all(
        [id(p) for p in x["params"]] == [id(p) for p in y["params"]]
        and {k: v for k, v in x.items() if k != "params"} == {k: v for k, v in y.items() if k != "params"}
        for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["resnet18", "small_cnn", "airbench"])
def test_default_config_gives_exactly_the_old_two_groups(name):
    model = build_model(name, 3, image_size=32)
    assert same_groups(param_groups(model, 5e-4, 2.0), old_groups(model, 5e-4, 2.0))
    assert same_groups(param_groups(model, 5e-4, 2.0, model_name=name), old_groups(model, 5e-4, 2.0))
    opt = optimizer_from(model, OptimCfg(), fused=False, model_name=name)
    old = torch.optim.SGD([g for g in old_groups(model, 5e-4, 1.0) if g["params"]], lr=0.05, momentum=0.9)
    assert opt.state_dict() == old.state_dict()  # so the optimizer states of existing runs still load


def scales_by_name(model, groups) -> dict:
    by_id = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in by_id  # every parameter in one group only
            by_id[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = {n: by_id[id(p)] for n, p in model.named_parameters() if p.requires_grad}
    assert len(by_id) == len(named)  # ... and nothing else
    return named


def test_head_lr_scale_multiplies_the_heads_lr():
    model = build_model("resnet18", 3, image_size=32)
    scales = scales_by_name(model, param_groups(model, 5e-4, bias_lr_scale=2.0, head_lr_scale=10.0,
                                                model_name="resnet18"))
    assert scales["fc.weight"] == (10.0, 5e-4) and scales["fc.bias"] == (20.0, 0.0)
    assert scales["layer4.1.conv2.weight"] == (1.0, 5e-4) and scales["bn1.weight"] == (2.0, 0.0)
    assert len(param_groups(model, 5e-4, 2.0, 10.0, model_name="resnet18")) == 4  # merged by (decay, scale)


def test_layer_decay_on_resnet18():
    model = build_model("resnet18", 3, image_size=32)
    opt = optimizer_from(model, OptimCfg(name="adamw", weight_decay=0.05, layer_decay=0.5), fused=False,
                         model_name="resnet18")
    scales = scales_by_name(model, opt.param_groups)
    assert scales["fc.weight"] == (1.0, 0.05) and scales["fc.bias"] == (1.0, 0.0)
    assert scales["conv1.weight"] == (0.5 ** 5, 0.05) and scales["bn1.bias"] == (0.5 ** 5, 0.0)
    assert scales["layer1.0.conv1.weight"][0] == 0.5 ** 4 and scales["layer4.1.bn2.weight"] == (0.5, 0.0)


def test_layer_decay_and_head_lr_on_every_classification_model():
    # and three torchvision families split by their top-level children (the generic rule)
    for name in OURS + list(TORCHVISION) + ["regnet_y_400mf", "densenet121", "vit_b_16"]:
        model = build_model(name, 3, image_size=32)
        depths = parameter_depths(model, name, "optim.layer_decay")
        top = max(depths.values())
        scales = scales_by_name(model, param_groups(model, 5e-4, 1.0, 3.0, 0.9, model_name=name))
        for n, (scale, _) in scales.items():
            assert scale == pytest.approx((3.0 if depths[n] == top else 1.0) * 0.9 ** (top - depths[n])), (name, n)


def test_models_without_a_split_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="optim.layer_decay: model unet has no backbone/head split"):
        param_groups(nn.Linear(2, 2), 0.0, layer_decay=0.5, model_name="unet")
    with pytest.raises(ConfigError, match="model.freeze_backbone_epochs: model fasterrcnn"):
        BackboneFreeze(nn.Linear(2, 2), "fasterrcnn_resnet50_fpn")


# ---- freezing the backbone ----

def backbone_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc.")}


def train_steps(model, opt, freeze, steps, x, y):
    for _ in range(steps):
        model.eval(), model.train()  # what an evaluation in between leaves behind
        if freeze is not None:
            freeze.before_forward(model)
        nn.functional.cross_entropy(model(x), y).backward()
        if freeze is not None:
            freeze.before_step(model)
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_backbone_keeps_weights_and_statistics_bitwise(optimizer):
    torch.manual_seed(0)
    model = build_model("resnet18", 3, image_size=16).train()
    opt = build_optimizer(model, optimizer, 0.1, weight_decay=0.05, momentum=0.9, nesterov=True,
                          head_lr_scale=10.0, model_name="resnet18")
    freeze = BackboneFreeze(nn.DataParallel(model), "resnet18")  # a wrapped model is accepted ...
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    before, head = backbone_state(model), model.fc.weight.clone()
    train_steps(model, opt, freeze, 3, x, y)  # ... and so is the plain one
    after = backbone_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running_mean/var, num_batches_tracked too
    assert not torch.equal(model.fc.weight, head)
    frozen = {id(p) for n, p in model.named_parameters() if not n.startswith("fc.")}
    assert not any(id(p) in frozen for p in opt.state)  # no momentum / Adam moments for the backbone
    assert model.layer1[0].bn1.training is False

    freeze.release(model)
    assert all(m.training for m in model.modules())
    train_steps(model, opt, None, 1, x, y)
    trained = backbone_state(model)
    assert not torch.equal(trained["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(trained["bn1.running_mean"], before["bn1.running_mean"])
    assert trained["bn1.num_batches_tracked"] == before["bn1.num_batches_tracked"] + 1


def test_release_leaves_an_evaluating_model_in_eval():
    model = build_model("small_cnn", 3, image_size=16)
    freeze = BackboneFreeze(model, "small_cnn")
    freeze.before_forward(model)
    model.eval()
    freeze.release(model)
    assert not any(m.training for m in model.modules())
    with pytest.raises(ValueError, match="another model"):
        freeze.before_step(build_model("small_cnn", 3, image_size=16))


def test_freezing_our_nets_keeps_only_their_last_linear():
    model = build_model("tutorial_cnn", 3, image_size=32)
    frozen = {id(p) for p in BackboneFreeze(model, "tutorial_cnn").params}
    assert [n for n, p in model.named_parameters() if id(p) not in frozen] == ["classifier.5.weight",
                                                                               "classifier.5.bias"]


# ---- end to end: fine-tuning a trained model with its backbone frozen for the first epoch ----

def test_a_frozen_backbone_leaves_weights_and_bn_statistics_as_loaded_for_the_frozen_epochs(tmp_path):
    from safetensors.torch import load_file

    from tests.conftest import run_cli, tiny_overrides

    source = tmp_path / "source"
    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{"run.dir": str(source)}))
    assert res.returncode == 0, res.stderr[-2000:]
    tuned = tmp_path / "tuned"
    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{
        "run.dir": str(tuned), "model.pretrained_path": str(source / "model" / "model.safetensors"),
        "model.freeze_backbone_epochs": 1, "train.epochs": 2, "optim.head_lr_scale": 10.0,
        "checkpoint.keep_last": 5}))
    assert res.returncode == 0, res.stderr[-2000:]
    loaded = load_file(str(source / "model" / "model.safetensors"))
    after_frozen = load_file(str(sorted((tuned / "checkpoints").glob("step-*"))[0] / "model.safetensors"))
    final = load_file(str(tuned / "model" / "model.safetensors"))
    depths = parameter_depths(build_model("small_cnn", 4, image_size=32), "small_cnn", "test")
    head = {k for k, d in depths.items() if d == max(depths.values())}
    assert head and all(not torch.equal(after_frozen[k], loaded[k]) for k in head if k.endswith("weight"))
    for k in loaded.keys() - head:  # conv weights, BN weights and running statistics, num_batches_tracked
        assert torch.equal(after_frozen[k], loaded[k]), f"{k} moved while frozen"
    assert any(not torch.equal(final[k], loaded[k]) for k in loaded.keys() - head)  # then the backbone trains


def test_freeze_after_epochs_stops_a_named_parameter_and_names_a_typo():
    from trainer.finetune import FreezeAfter

    model = build_model("airbench", 10)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          weight_decay=1e-3)
    retire = FreezeAfter(model, {"whiten.bias": 1})
    x = torch.randn(4, 3, 32, 32)
    for epoch, should_move in ((0, True), (1, False), (2, False)):
        bias, head = model.whiten.bias.detach().clone(), model.head.weight.detach().clone()
        model(x).square().mean().backward()
        retire.before_step(model, epoch)
        opt.step()  # momentum and weight decay would move it too: they must not
        opt.zero_grad(set_to_none=True)
        assert (not torch.equal(model.whiten.bias, bias)) == should_move, epoch
        assert not torch.equal(model.head.weight, head)  # everything else trains on
    with pytest.raises(ConfigError, match="optim.freeze_after_epochs: no parameter is named 'whiten.bais'"):
        FreezeAfter(model, {"whiten.bais": 3})


def test_a_run_keeps_a_parameter_frozen_from_epoch_0_at_its_initial_value(tmp_path):
    """The loop applies optim.freeze_after_epochs: airbench's whitening bias starts at zero and, frozen from
    the first epoch, is still zero in the exported model, while the BN biases have trained (with decay)."""
    from tests.conftest import run_cli, tiny_overrides, weights

    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{
        "model.name": "airbench", "data.loader": "device", "optim.name": "sgd", "optim.lr": 0.2,
        "optim.bias_decay": True, "optim.bias_lr_scale": 4.0, "optim.bias_lr_scale_scope": "norm",
        "optim.freeze_after_epochs": "{whiten.bias: 0}", "train.epochs": 2}))
    assert res.returncode == 0, res.stderr[-2000:]
    w = weights(tmp_path / "run")
    assert torch.equal(w["whiten.bias"], torch.zeros(24))
    assert w["features.2.bias"].abs().sum() > 0
