"""The Python API, for notebooks and other programs: the `trainer train` command as two functions.

    from trainer import load_config, train
    summary = train("configs/quickstart_multiclass.yaml", {"train.epochs": 2, "run.dir": "runs/nb"})

`config` is a recipe YAML path, a dict of keys (nested, as a recipe holds them) or a loaded `Config`; `overrides`
are `key=value` strings (as on the command line) or a dict of dotted keys. The checks are the CLI's: a mistake
raises the same `trainer.errors.ConfigError` (its message is the CLI's `error: ...` line) before anything is
written. Unlike the CLI, the API installs no SIGTERM/SIGUSR1 handlers: the host program keeps its own.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Dict, List, Mapping, Union

if TYPE_CHECKING:  # the package's face imports no torch: these are imported when called
    from trainer.config import Config

Overrides = Union[List[str], Mapping[str, object], None]


def _as_strings(overrides: Overrides) -> List[str]:
    """`key=value` strings; a dict's values written as JSON, which YAML reads back as the same value (null, true,
    numbers, quoted strings, lists)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return [str(item) for item in overrides]


def load_config(config: Union[str, Dict, "Config", None] = None, overrides: Overrides = None) -> "Config":
    """The typed, checked config: schema defaults <- `config` (a YAML path or a dict) <- `overrides`."""
    from trainer.config import Config, load_config as load, to_dict

    if isinstance(config, Config):
        return load(base=to_dict(config), overrides=_as_strings(overrides))
    if isinstance(config, Mapping):
        return load(base=dict(config), overrides=_as_strings(overrides))
    return load(config, _as_strings(overrides))


def train(config: Union[str, Dict, "Config", None] = None, overrides: Overrides = None) -> Dict:
    """Train (or resume: the same call continues a run directory) and return the run's summary, the dict the
    CLI's run ends with (final metrics, best value, seconds, run directory)."""
    from trainer.distributed import check_launch
    from trainer.loop import train as run

    cfg = load_config(config, overrides)
    check_launch()
    return run(cfg)
