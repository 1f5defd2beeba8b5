"""The exported model: `model.safetensors` (weights) + `model.json` (everything needed to predict), no pickle.

Written into a staging folder and renamed into place (the write gate), so a reader never sees a half-written
model.
Reading checks model.json field by field and refuses anything but safetensors as weights.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Tuple

import torch
from safetensors.torch import save_file

from trainer.errors import TrainerError
from trainer.files import load_safetensors, safetensors_os_errors
from trainer.models import TTA_MODES
from trainer.tasks import TASKS, task_from_meta

FORMAT = "cnn-trainer-model"
FORMAT_VERSION = 1


def model_card(cfg, mean, std, small_input_stem: bool, fit=None) -> dict:
    """The fields of model.json that are not the task's (trainer/tasks: `export_meta`): what the network is
    and how images are read, resized (`fit`: trainer.data.datasets.Fit, for the classifiers) and normalised, so
    that `trainer eval`, `trainer predict` and the ONNX export read them as the training did."""
    return {"architecture": cfg.model.name, "image_size": cfg.data.image_size, "small_input_stem": small_input_stem,
            "mean": list(mean), "std": list(std),
            **(fit.meta(cfg.data.image_size) if fit is not None else {}),
            "tta": cfg.eval.tta,  # applied by `trainer eval` and `trainer predict` too
            "exif_orientation": cfg.data.exif_orientation,
            # JPEGs decoded at a reduced DCT scale before evaluation's resize (trainer.data.folders.decode_fit)
            "scaled_decode": cfg.data.scaled_decode}


def write_model(model: torch.nn.Module, folder: Path, meta: dict) -> None:
    """model.safetensors + model.json into `folder`, a staging folder of the write gate (the caller's
    `Folder.replacing`: a reader never sees half a model, a failure leaves the old one). `model` must be
    unwrapped (no DDP); `meta` holds architecture, task, classes, input and normalisation."""
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    with safetensors_os_errors(folder / "model.safetensors"):  # a full disk: the gate's one line, not a traceback
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.json").write_text(json.dumps(info, indent=1))


def export_model(model: torch.nn.Module, target: Path, meta: dict, by: str = "train") -> None:
    """A model folder `target` on its own (model.safetensors + model.json), replaced in one rename through the
    write gate (the folder holding it is the gate's record of what it wrote)."""
    from trainer.outputs import Folder

    target = Path(target)
    with Folder(target.parent, by, option=str(target)).replacing(target.name, fsync=True) as tmp:
        write_model(model, tmp, meta)


def find_model_dir(path: str) -> Path:
    """Accept an exported model folder or a run folder (whose final model is in model/)."""
    p = Path(path)
    for candidate in (p, p / "model"):
        if (candidate / "model.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    if not p.exists():
        raise TrainerError(f"model path does not exist: {path}")
    raise TrainerError(f"no exported model in {path} (expected model.json + model.safetensors, or a run folder with model/)")


REQUIRED = {"architecture": str, "task": str, "num_outputs": int, "classes": list, "image_size": int,
            "mean": list, "std": list}


def read_meta(model_dir: Path) -> dict:
    """model.json, checked: every field `load_exported` and predict rely on, with one line for what is off."""
    path = model_dir / "model.json"
    try:
        meta = json.loads(path.read_text())
    except ValueError as err:
        raise TrainerError(f"{path} is not valid JSON: {err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise TrainerError(f"cannot read {path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TrainerError(f"{path} is not a {FORMAT} file")
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise TrainerError(f"{path} is incomplete: missing {', '.join(missing)}")
    wrong = [k for k, t in REQUIRED.items() if not isinstance(meta[k], t) or isinstance(meta[k], bool)]
    if wrong:
        raise TrainerError(f"{path}: {', '.join(f'{k} is not a {REQUIRED[k].__name__}' for k in wrong)}")
    classes, kind = meta["classes"], meta["task"]
    if kind not in TASKS:
        names = list(TASKS)
        raise TrainerError(f"{path}: task '{kind}' is not {', '.join(names[:-1])} or {names[-1]}")
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise TrainerError(f"{path}: classes must be 2 or more distinct names, got {classes}")
    TASKS[kind].check_meta(meta, path)  # its own fields, and its classes against its outputs
    if meta["image_size"] <= 0:
        raise TrainerError(f"{path}: image_size must be > 0, got {meta['image_size']}")
    for key in ("mean", "std"):
        if len(meta[key]) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in meta[key]):
            raise TrainerError(f"{path}: {key} must be 3 numbers, got {meta[key]}")
    if min(meta["std"]) <= 0:
        raise TrainerError(f"{path}: std must be > 0, got {meta['std']}")
    from trainer.data.datasets import CROP_MODES, INTERPOLATIONS

    if meta.get("crop_mode", "squash") not in CROP_MODES:
        raise TrainerError(f"{path}: crop_mode '{meta['crop_mode']}' is not one of {', '.join(CROP_MODES)}")
    crop_pct = meta.get("crop_pct", 1.0)
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise TrainerError(f"{path}: crop_pct must be a number in (0, 1], got {crop_pct}")
    if meta.get("interpolation", "bilinear") not in INTERPOLATIONS:
        raise TrainerError(f"{path}: interpolation '{meta['interpolation']}' is not one of "
                           f"{', '.join(INTERPOLATIONS)}")
    if meta.get("tta", "none") not in TTA_MODES:
        raise TrainerError(f"{path}: tta '{meta['tta']}' is not one of {', '.join(TTA_MODES)}")
    return meta


def load_exported(path: str, detection_options: Optional[dict] = None) -> Tuple[torch.nn.Module, dict]:
    """The model and its model.json; `detection_options` override a detector's own (e.g. its score threshold)."""
    model_dir = find_model_dir(path)
    meta = read_meta(model_dir)
    if detection_options:
        meta = {**meta, "model_kwargs": {**meta["model_kwargs"], **detection_options}}
    try:
        model = task_from_meta(meta).build_model(meta["architecture"], meta["image_size"],
                                                 meta.get("small_input_stem"), log=lambda *_: None)
    except TrainerError as err:
        raise TrainerError(f"{model_dir / 'model.json'}: {err}") from None
    state = load_safetensors(model_dir / "model.safetensors", "model weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TrainerError(f"{model_dir}: weights do not match architecture {meta['architecture']}: "
                           f"{str(err).splitlines()[0]}") from None
    model.eval()
    return model, meta
