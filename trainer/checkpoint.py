"""Training checkpoints with no pickle anywhere: tensors in .safetensors files, everything else in JSON.

A checkpoint is a folder `checkpoints/step-NNNNNNNN/` holding
  model.safetensors      the unwrapped model's state dict
  optimizer.safetensors  the optimizer state flattened to `state.<param index>.<name>` tensors
  rng.safetensors        every rank's torch (and CUDA) RNG state, `rank<r>.torch` / `rank<r>.cuda<i>`
  lookahead.safetensors  (only with optim.lookahead_every) the slow copy of the weights
  state.json             the rest: position in the data (epoch, batch within it), update count, samples seen,
                         best metric, W&B run id, optimizer param groups, grad-scaler state, python/numpy RNG
                         states of every rank, what the model is (architecture, task, classes, shapes)
It is written into a temporary sibling folder, flushed, renamed into place, and only then does
`checkpoints/latest.json` (also replaced atomically) point at it: a crash at any moment leaves the previous
checkpoint loadable. The learning-rate schedule is a pure function of the update count, so the count is
its whole state.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.errors import TrainerError

FORMAT = "cnn-trainer-checkpoint"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
POINTER = "latest.json"
NAME = re.compile(r"^step-(\d{8})$")
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip container


# ---- flattening to tensors + JSON ----

def flatten_optimizer(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, entry in state_dict["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state: Dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> Tuple[Dict[str, torch.Tensor], dict]:
    """This process's RNG states: tensors (torch, CUDA) and JSON (python, numpy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(tensors: Dict[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---- writing ----

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def checkpoint_name(update: int) -> str:
    return f"step-{update:08d}"


def write_checkpoint(ckpt_root: Path, update: int, model_state: dict, optimizer_state: dict,
                     rng_per_rank: List[Tuple[Dict[str, torch.Tensor], dict]], state: dict,
                     extra: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> Path:
    """Main process only. Returns the checkpoint folder; `latest.json` names it once it is complete.
    `extra`: more named tensor sets (e.g. lookahead), each written as <name>.safetensors."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    target = ckpt_root / checkpoint_name(update)
    tmp = ckpt_root / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors = {f"rank{r}.{k}": v.contiguous() for r, (tensors, _) in enumerate(rng_per_rank)
                   for k, v in tensors.items()}
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    for name, tensors in (extra or {}).items():
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
    full_state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state, "update": update,
                  "optimizer": opt_meta, "rng": [states for _, states in rng_per_rank], "extra": sorted(extra or {}),
                  "model_shapes": {k: list(v.shape) for k, v in model_state.items()}}
    _write_json(tmp / "state.json", full_state)
    for name in list(FILES[:3]) + [f"{n}.safetensors" for n in extra or {}]:  # safetensors' writer does not fsync
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if target.exists():  # the same step saved again (e.g. the end of training right after a periodic save)
        shutil.rmtree(target)
    os.rename(tmp, target)
    _fsync_dir(ckpt_root)
    pointer_tmp = ckpt_root / f".{POINTER}.tmp-{os.getpid()}"
    _write_json(pointer_tmp, {"checkpoint": target.name, "update": update})
    os.replace(pointer_tmp, ckpt_root / POINTER)  # the pointer moves last
    _fsync_dir(ckpt_root)
    return target


def rotate(ckpt_root: Path, keep_last: int, keep: Optional[str] = None) -> List[str]:
    """Delete all but the newest `keep_last` checkpoints, never the one `latest.json` names nor `keep`
    (the best). Leftover temporary folders of interrupted saves go too. Returns the names deleted."""
    latest = read_pointer(ckpt_root)
    names = sorted(p.name for p in ckpt_root.iterdir() if NAME.match(p.name))
    protected = set(names[-keep_last:] if keep_last > 0 else []) | {latest, keep}
    deleted = [n for n in names if n not in protected]
    for name in deleted:
        shutil.rmtree(ckpt_root / name, ignore_errors=True)
    for leftover in ckpt_root.glob(".step-*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return deleted


# ---- reading ----

def read_pointer(ckpt_root: Path) -> Optional[str]:
    pointer = ckpt_root / POINTER
    if not pointer.is_file():
        return None
    name = json.loads(pointer.read_text())["checkpoint"]
    return name if (ckpt_root / name).is_dir() else None


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    name = read_pointer(run_dir / "checkpoints")
    return run_dir / "checkpoints" / name if name else None


def find_resume(run_dir: Path, resume: Optional[str], overwrite: bool) -> Optional[Path]:
    """The checkpoint to resume from: `resume` (a checkpoint folder, or a run folder meaning its latest), else
    the run directory's latest unless starting over was asked for, else None."""
    if resume:
        p = Path(resume)
        if (p / "checkpoints").is_dir():
            latest = latest_checkpoint(p)
            if latest is None:
                raise TrainerError(f"run.resume: {p} has no complete checkpoint")
            return latest
        if p.is_file():
            _refuse_pickle(p)
            raise TrainerError(f"run.resume: {p} is a file; give a checkpoint folder (checkpoints/step-...) or a run folder")
        if not p.is_dir():
            raise TrainerError(f"run.resume: {p} does not exist")
        return p
    return None if overwrite else latest_checkpoint(Path(run_dir))


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if any(head.startswith(m) for m in PICKLE_MAGIC):
        raise TrainerError(f"{path} is a pickle (torch.save) file; loading it could run code, so it is refused. "
                           f"Checkpoints here are safetensors + JSON only")


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint folder without executing anything; every file is checked for pickle first."""
    path = Path(path)
    if not path.is_dir():
        raise TrainerError(f"checkpoint not found: {path}")
    for f in path.iterdir():
        if f.is_file():
            _refuse_pickle(f)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise TrainerError(f"{path} is not a complete checkpoint (missing {', '.join(missing)})")
    try:
        state = json.loads((path / "state.json").read_text())
    except ValueError as err:
        raise TrainerError(f"{path / 'state.json'} is not valid JSON: {err}") from None
    if state.get("format") != FORMAT:
        raise TrainerError(f"{path} is not a {FORMAT} checkpoint")
    rng_all = load_file(str(path / "rng.safetensors"))
    rng = {}
    for key, value in rng_all.items():
        rank, name = key.split(".", 1)
        rng.setdefault(int(rank.removeprefix("rank")), {})[name] = value
    extra = {}
    for name in state.get("extra", []):
        if not (path / f"{name}.safetensors").is_file():
            raise TrainerError(f"{path} is not a complete checkpoint (missing {name}.safetensors)")
        extra[name] = load_file(str(path / f"{name}.safetensors"))
    return {"path": path, "state": state, "model": load_file(str(path / "model.safetensors")),
            "optimizer": unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]),
            "rng_tensors": rng, "extra": extra}


def check_compatible(ckpt: dict, architecture: str, task: str, classes: List[str], model: torch.nn.Module) -> None:
    """Say exactly what differs between the checkpoint and the model the config builds."""
    s = ckpt["state"]
    problems = []
    if s["architecture"] != architecture:
        problems.append(f"architecture {s['architecture']} vs {architecture}")
    if s["task"] != task:
        problems.append(f"task {s['task']} vs {task}")
    if len(s["classes"]) != len(classes):
        problems.append(f"{len(s['classes'])} classes vs {len(classes)}")
    elif s["classes"] != classes:
        problems.append(f"classes {s['classes']} vs {classes}")
    own = model.state_dict()
    shapes = [f"{k}: {list(v.shape)} vs {list(own[k].shape)}" for k, v in ckpt["model"].items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(ckpt["model"]))
    unexpected = sorted(set(ckpt["model"]) - set(own))
    if shapes:
        problems.append("shapes differ: " + "; ".join(shapes[:3]) + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    if missing or unexpected:
        problems.append(f"keys missing {missing[:3]}, unexpected {unexpected[:3]}")
    if problems:
        raise TrainerError(f"checkpoint {ckpt['path']} does not match this config (checkpoint vs config): "
                           + ", ".join(problems))
