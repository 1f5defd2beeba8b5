import pytest

from tests.conftest import ROOT, run_cli
from trainer.config import load_config
from trainer.errors import ConfigError


def test_recipes_all_load():
    recipes = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(recipes) >= 5
    for recipe in recipes:
        overrides = ["data.root=/somewhere"]  # recipes for image folders leave the path to the user
        cfg = load_config(str(recipe), overrides)
        assert cfg.run.name == recipe.stem


@pytest.mark.parametrize("override, key", [
    ("train.lrr=0.1", "train.lrr"),
    ("lr=0.1", "lr"),
    ("optim.lr=abc", "optim.lr"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.mixed_precision=fp8", "train.mixed_precision"),
    ("data.format=parquet", "data.format"),
    ("train.batch_size=0", "train.batch_size"),
    ("eval.threshold=1.5", "eval.threshold"),
    ("data.augment.flip_mode=alternating", "data.loader=device"),
    ("data.loader=gpu", "data.loader"),
    ("eval.tta=five_crop", "eval.tta"),
    ("optim.freeze_after_epochs={whiten.bias: -1}", "optim.freeze_after_epochs.whiten.bias"),
    ("optim.bias_lr_scale_scope=biases", "optim.bias_lr_scale_scope"),
    ("train.drop_last=maybe", "train.drop_last"),
    ("optim.lookahead_decay=1.0", "optim.lookahead_decay"),
    ("optim.warmup_start_ratio=2", "optim.warmup_start_ratio"),
    # the regularisation and fine-tuning keys
    ("ema.decay=1.0", "ema.decay"),
    ("ema.decay=abc", "ema.decay"),
    ("ema.every=0", "ema.every"),
    ("ema.evaluate=both", "ema.evaluate"),  # needs ema.decay > 0
    ("ema.evaluate=swa", "ema.evaluate"),
    ("eval.monitor=raw_accuracy", "eval.monitor"),  # needs ema.evaluate=both
    ("data.augment.mixup_alpha=-1", "data.augment.mixup_alpha"),
    ("data.augment.cutmix_alpha=x", "data.augment.cutmix_alpha"),
    ("data.augment.mix_prob=1.5", "data.augment.mix_prob"),
    ("data.augment.mix_switch_prob=-0.1", "data.augment.mix_switch_prob"),
    ("data.augment.auto_augment=randaug", "data.augment.auto_augment"),
    ("data.augment.randaugment_magnitude=31", "data.augment.randaugment_magnitude"),
    ("data.augment.random_erasing=1.5", "data.augment.random_erasing"),
    ("model.drop_path=1", "model.drop_path"),
    ("model.dropout=-0.1", "model.dropout"),
    ("model.sync_bn=maybe", "model.sync_bn"),
    ("model.freeze_backbone_epochs=-1", "model.freeze_backbone_epochs"),
    ("model.freeze_backbone_epochs=10", "model.freeze_backbone_epochs"),  # >= train.epochs
    ("optim.head_lr_scale=0", "optim.head_lr_scale"),
    ("optim.layer_decay=0", "optim.layer_decay"),
    ("optim.layer_decay=1.5", "optim.layer_decay"),
    ("optim.lr=-0.1", "optim.lr"),
    ("train.early_stopping.patience=-1", "train.early_stopping.patience"),
    ("train.early_stopping.min_delta=-1", "train.early_stopping.min_delta"),
    ("train.early_stopping.patiense=3", "train.early_stopping.patiense"),
])
def test_bad_values_name_the_full_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_in_yaml_names_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(str(recipe))


def test_missing_required_value():
    with pytest.raises(ConfigError, match="data.root"):
        load_config(None, ["data.format=imagefolder"])


def test_yaml_no_means_no_and_overrides_win(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  epochs: 3\n")
    cfg = load_config(str(recipe), ["train.epochs=5", "optim.lr=1e-3"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.epochs == 5 and cfg.optim.lr == 0.001
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_cli_config_error_is_one_line_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    res = run_cli("train", "configs/quickstart_multiclass.yaml", "optim.lrr=1", f"run.dir={run_dir}")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "optim.lrr" in lines[0], res.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("overrides, key", [
    (["data.format=generated", "data.generated.variant=segmentation", "data.augment.mixup_alpha=0.2"],
     "data.augment.mixup_alpha"),
    (["data.format=generated", "data.generated.variant=detection", "data.augment.auto_augment=randaugment"],
     "data.augment.auto_augment"),
    (["data.loader=device", "data.augment.random_erasing=0.25"], "data.loader=workers"),
    (["train.early_stopping.patience=2", "eval.every_epochs=0"], "eval.every_epochs"),
    (["data.format=generated", "data.generated.variant=segmentation", "eval.tta=flip_translate"],
     "eval.tta=flip_translate"),
])
def test_regularisation_keys_refuse_data_or_loaders_they_cannot_serve(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_deterministic_training_runs_on_the_cpu_and_may_change_on_resume(tmp_path):
    """train.deterministic switches kernels, not what is trained: a CPU run takes it, and it is resume-safe."""
    from tests.conftest import tiny_overrides
    from trainer.config import config_changes, to_dict

    res = run_cli("train", "-", *tiny_overrides(tmp_path, **{"train.deterministic": True, "train.max_steps": 2}))
    assert res.returncode == 0, res.stderr[-2000:]
    on, off = load_config(None, ["train.deterministic=true"]), load_config(None, [])
    assert config_changes(to_dict(off), to_dict(on)) == []
