import dataclasses
import math
import typing

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT, run_cli
from trainer.config import Config, check_ranges, load_config
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


# ---- ranges: every number in the schema is refused outside its declared range, at load ----

# Fields typed Any that hold no numbers (so need no range): data.coco_files maps splits to file paths.
NOT_NUMBERS = {"data.coco_files"}


def _schema_fields(cls=Config, prefix=""):
    """(full key, dataclasses.Field, resolved type) of every leaf field of the schema."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _schema_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def _holds(tp, kinds) -> bool:
    """Does type `tp` hold a value of `kinds`, itself or inside Optional, List, Dict? (bool is not an int here)"""
    return tp in kinds or any(_holds(arg, kinds) for arg in typing.get_args(tp))


def test_every_numeric_key_declares_its_range():
    """A number added to the schema later cannot slip through without one (Any: a range, or listed above)."""
    numeric = [key for key, f, tp in _schema_fields() if _holds(tp, (int, float)) or _holds(tp, (typing.Any,))]
    assert len(numeric) > 60
    missing = [key for key, f, tp in _schema_fields()
               if (_holds(tp, (int, float)) or _holds(tp, (typing.Any,)) and key not in NOT_NUMBERS)
               and "range" not in f.metadata]
    assert not missing, f"numeric keys without a declared range: {missing}"


def test_defaults_lie_in_their_ranges():
    check_ranges(Config())


def _outside(key: str, values, tp) -> list:
    """(override, key its error names) for values just outside each finite bound of `values`, and nan and inf
    for floats, in the field's shape: a number, a one-entry list or a one-key mapping."""
    integer = _holds(tp, (int,)) and not _holds(tp, (float,))
    step = 1 if integer else 0.5
    bad = [values.low - (step if values.with_low else 0)]
    if not math.isinf(values.high):
        bad.append(values.high + (step if values.with_high else 0))
    bad = [int(v) for v in bad] if integer else bad + [math.nan, math.inf]
    shape = {typing.get_origin(a) for a in (tp, *typing.get_args(tp))}  # Optional[List[float]]: {Union, list}
    if dict in shape:
        return [(f"{key}={{a: {v}}}", f"{key}.a") for v in bad]
    return [(f"{key}=[{v}]" if list in shape else f"{key}={v}", key) for v in bad]


OUTSIDE = [case for key, f, tp in _schema_fields() if "range" in f.metadata
           for case in _outside(key, f.metadata["range"], tp)]


@pytest.mark.parametrize("override, key", OUTSIDE, ids=[o for o, _ in OUTSIDE])
def test_every_ranged_key_refuses_values_outside_its_range(override, key):
    """Just below the floor, just above the ceiling, nan and inf: one line naming the key and the range."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.startswith(f"{key} ") and " must be " in message and "\n" not in message, message


@pytest.mark.parametrize("override, message", [
    # found accepted (issue 36): each silently trained wrongly or crashed later
    ("train.clip_grad_norm=-1", "train.clip_grad_norm must be > 0, got -1.0"),  # gradient ascent
    ("optim.step_gamma=-1", "optim.step_gamma must be in (0, 1], got -1.0"),  # negative learning rates
    ("optim.min_lr_ratio=-1", "optim.min_lr_ratio must be in [0, 1], got -1.0"),
    ("optim.momentum=-0.5", "optim.momentum must be in [0, 1), got -0.5"),
    ("optim.momentum=2", "optim.momentum must be in [0, 1), got 2.0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs must be >= 0, got -1.0"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.lr=nan", "optim.lr must be finite and > 0, got nan"),
    ("optim.lr=inf", "optim.lr must be finite and > 0, got inf"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("seed=-5", "seed must be in [0, 4294967295], got -5"),
    ("data.augment.crop_padding=-1", "data.augment.crop_padding must be >= 0, got -1"),
    ("data.augment.color_jitter=-0.5", "data.augment.color_jitter must be >= 0, got -0.5"),
    ("eval.every_epochs=-1", "eval.every_epochs must be >= 0, got -1"),
    # others: the ceilings, lists, mappings, nested lists
    ("seed=4294967296", "seed must be in [0, 4294967295], got 4294967296"),  # numpy seeds are 32-bit
    ("optim.momentum=1", "optim.momentum must be in [0, 1), got 1.0"),
    ("optim.step_gamma=1.5", "optim.step_gamma must be in (0, 1], got 1.5"),
    ("data.ignore_index=256", "data.ignore_index must be in [0, 255], got 256"),
    ("data.mean=[123.7,116.3,103.5]", "data.mean entries must be in [0, 1], got [123.7, 116.3, 103.5]"),  # 0-255 scale
    ("data.std=[0.2,nan,0.2]", "data.std entries must be finite and in (0, 1], got [0.2, nan, 0.2]"),
    ("optim.betas=[0.9,1.0]", "optim.betas entries must be in [0, 1), got [0.9, 1.0]"),
    ("optim.step_milestones=[-1]", "optim.step_milestones entries must be >= 0, got [-1.0]"),
    ("optim.freeze_after_epochs={whiten.bias: -1}", "optim.freeze_after_epochs.whiten.bias must be >= 0, got -1"),
    ("model.detection.anchor_sizes=[[16],[-8]]", "model.detection.anchor_sizes entries must be > 0, got [[16], [-8]]"),
])
def test_out_of_range_values_are_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("override", [
    "optim.momentum=0", "optim.momentum=0.999", "optim.step_gamma=1", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1",
    "optim.weight_decay=0", "optim.warmup_epochs=0", "optim.lr=1e-6", "train.clip_grad_norm=0.01",
    "train.clip_grad_norm=null", "data.num_workers=0", "seed=0", "seed=4294967295", "data.augment.crop_padding=0",
    "data.augment.color_jitter=0", "eval.every_epochs=0", "data.ignore_index=0", "data.mean=[0,0.5,1]",
    "data.std=[1,1,1]", "optim.betas=[0,0.999]", "eval.topk=[1,5]", "optim.layer_decay=1", "ema.decay=0.9999",
    "data.generated.test_per_class=0", "optim.step_milestones=[0,30.5]", "optim.freeze_after_epochs={whiten.bias: 0}",
])
def test_values_on_the_edge_of_their_range_are_accepted(override):
    key = override.split("=", 1)[0]
    loaded = OmegaConf.select(OmegaConf.structured(load_config(None, [override])), key)
    assert loaded == OmegaConf.select(OmegaConf.from_dotlist([override]), key)
