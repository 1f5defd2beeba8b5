"""The Python API (trainer/api.py): `from trainer import train, load_config` trains the quick start and refuses
what the CLI refuses, with the CLI's words."""
import json

import pytest

from trainer import load_config, train
from trainer.errors import ConfigError

from .conftest import run_cli


def test_train_runs_the_quick_start_recipe_and_returns_its_summary(tmp_path, tiny):
    overrides = dict(item.split("=", 1) for item in tiny(**{"train.max_steps": 6}))
    overrides["data.num_workers"] = 0  # a dict's values are typed: an int, not the string "0"
    summary = train("configs/quickstart_multiclass.yaml", overrides)
    run = tmp_path / "run"
    assert summary["run_dir"] == str(run) and summary["updates"] == 6 and not summary.get("stopped")
    assert json.loads((run / "model" / "model.json").read_text())["architecture"] == "small_cnn"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["type"] == "eval" and summary["final"]["accuracy"] == pytest.approx(last["accuracy"])


def test_load_config_takes_a_dict_and_dotted_overrides():
    cfg = load_config({"model": {"name": "resnet18"}, "train": {"epochs": 3}}, {"optim.lr": 0.05, "run.dir": None})
    assert (cfg.model.name, cfg.train.epochs, cfg.optim.lr, cfg.run.dir) == ("resnet18", 3, 0.05, None)


def test_a_mistake_is_the_clis_error_and_writes_nothing(tmp_path):
    args = [f"run.dir={tmp_path / 'run'}", "optim.lr=-1"]
    with pytest.raises(ConfigError) as err:
        train("configs/quickstart_multiclass.yaml", args)
    cli = run_cli("train", "configs/quickstart_multiclass.yaml", *args)
    assert cli.returncode == 2 and cli.stderr.strip() == f"error: {err.value}"
    assert not (tmp_path / "run").exists()
