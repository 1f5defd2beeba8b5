"""The exported model: `model.safetensors` (weights) + `model.json` (everything needed to predict), no pickle.

Written into a temporary sibling folder and renamed into place, so a reader never sees a half-written model.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Tuple

import torch
from safetensors.torch import load_file, save_file

from trainer.errors import TrainerError
from trainer.models import build_model

FORMAT = "cnn-trainer-model"
FORMAT_VERSION = 1


def write_dir_atomically(target: Path, write) -> None:
    """Call write(tmp_dir), then swap tmp_dir into `target` (replacing an older version)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def export_model(model: torch.nn.Module, target: Path, meta: dict) -> None:
    """`model` must be unwrapped (no DDP); `meta` holds architecture, task, classes, input and normalisation."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}

    def write(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "model.json").write_text(json.dumps(info, indent=1))

    write_dir_atomically(target, write)


def find_model_dir(path: str) -> Path:
    """Accept an exported model folder or a run folder (whose final model is in model/)."""
    p = Path(path)
    for candidate in (p, p / "model"):
        if (candidate / "model.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    if not p.exists():
        raise TrainerError(f"model path does not exist: {path}")
    raise TrainerError(f"no exported model in {path} (expected model.json + model.safetensors, or a run folder with model/)")


def load_exported(path: str) -> Tuple[torch.nn.Module, dict]:
    model_dir = find_model_dir(path)
    meta = json.loads((model_dir / "model.json").read_text())
    if meta.get("format") != FORMAT:
        raise TrainerError(f"{model_dir / 'model.json'} is not a {FORMAT} file")
    model = build_model(meta["architecture"], meta["num_outputs"], image_size=meta["image_size"],
                        small_input_stem=meta.get("small_input_stem"), verbose=lambda *_: None)
    state = load_file(str(model_dir / "model.safetensors"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TrainerError(f"{model_dir}: weights do not match architecture {meta['architecture']}: "
                           f"{str(err).splitlines()[0]}") from None
    model.eval()
    return model, meta
