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
checkpoint loadable. state.json holds the checksum (XXH3-128) of every other file and of itself; a resume
takes the newest checkpoint that verifies, and moves a damaged newer one aside (`step-N.corrupt`), never
deleting it. The learning-rate schedule is a pure function of the update count, so the count is its whole
state.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import TrainerError
from trainer.files import CHECKSUM, checksum_bytes, checksum_file, is_pickle, safetensors_os_errors

if TYPE_CHECKING:
    from trainer.outputs import Folder

FORMAT = "cnn-trainer-checkpoint"
FORMAT_VERSION = 1
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
# what a resume reads from state.json; a checkpoint lacking one is damaged, not a KeyError later
REQUIRED_STATE_KEYS = ("update", "epoch", "samples_seen", "metrics_rows", "optimizer", "rng", "architecture", "task",
                       "classes", "model_shapes", "done")
# the position within the epoch: global samples (trainer/data/order.py), or in checkpoints before that this
# process's batch index (its name before "step" meant updates: step_in_epoch), converted by state.sample_position
POSITION_KEYS = ("sample_in_epoch", "batch_in_epoch", "step_in_epoch")


def _absent(state: dict) -> List[str]:
    absent = [k for k in REQUIRED_STATE_KEYS if k not in state]
    return absent + ([POSITION_KEYS[0]] if not any(k in state for k in POSITION_KEYS) else [])
POINTER = "latest.json"
CHECKPOINTS = "checkpoints"  # the folder of a run that holds them
NAME = re.compile(r"^step-(\d{8})$")


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

def checkpoint_name(update: int) -> str:
    return f"step-{update:08d}"


def _state_digest(state: dict) -> str:
    """The checksum state.json carries of itself: of its canonical JSON without this field."""
    body = {k: v for k, v in state.items() if k != "state_checksum"}
    return checksum_bytes(json.dumps(body, sort_keys=True, default=str).encode())


def write_checkpoint(out: "Folder", update: int, model_state: dict, optimizer_state: dict,
                     rng_per_rank: List[Tuple[Dict[str, torch.Tensor], dict]], state: dict,
                     extra: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> Path:
    """Main process only, into the run's folder `out` (the write gate). Returns the checkpoint folder;
    `latest.json` names it once it is complete. `extra`: more named tensor sets (e.g. lookahead), each written
    as <name>.safetensors.

    Every file's checksum goes into state.json (and state.json carries its own), so bit rot is found on load
    instead of surfacing later as a diverging loss. A failure (a full disk) removes the temporary folder
    and leaves every earlier checkpoint and the pointer as they were."""
    rel = f"{CHECKPOINTS}/{checkpoint_name(update)}"
    tensor_files = {"model.safetensors": {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}}
    opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
    tensor_files["optimizer.safetensors"] = opt_tensors
    tensor_files["rng.safetensors"] = {f"rank{r}.{k}": v.contiguous() for r, (tensors, _) in enumerate(rng_per_rank)
                                       for k, v in tensors.items()}
    for name, tensors in (extra or {}).items():
        tensor_files[f"{name}.safetensors"] = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        with out.replacing(rel, fsync=True) as tmp:  # fsynced: safetensors' writer does not
            digests = {}
            for name, tensors in tensor_files.items():
                with safetensors_os_errors(tmp / name):  # a full disk: one line below, not a traceback
                    save_file(tensors, str(tmp / name))
                digests[name] = checksum_file(tmp / name)  # read back from the page cache
            full_state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state, "update": update,
                          "optimizer": opt_meta, "rng": [states for _, states in rng_per_rank],
                          "extra": sorted(extra or {}),
                          "model_shapes": {k: list(v.shape) for k, v in model_state.items()},
                          "checksums": {"algorithm": CHECKSUM, "files": digests}}
            full_state["state_checksum"] = _state_digest(full_state)
            (tmp / "state.json").write_text(json.dumps(full_state, indent=1))
        out.write_json(f"{CHECKPOINTS}/{POINTER}", {"checkpoint": checkpoint_name(update), "update": update},
                       fsync=True)
    except TrainerError as err:  # a file-system error, already one line
        previous = read_pointer(out.root / CHECKPOINTS)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise TrainerError(f"checkpoint at update {update} not saved ({err}); {kept}") from None
    return out.root / rel


def rotate(out: "Folder", keep_last: int, keep: Optional[str] = None) -> List[str]:
    """Delete all but the newest `keep_last` checkpoints, never the one `latest.json` names nor `keep` (the
    best); checkpoints moved aside as damaged (`step-N.corrupt`) are never touched. Only the trainer's files
    go: a file of the user's in a checkpoint folder stays, and its folder with it. Returns the names deleted."""
    ckpt_root = out.root / CHECKPOINTS
    latest = read_pointer(ckpt_root)
    names = sorted(p.name for p in checkpoint_folders(ckpt_root))
    protected = set(names[-keep_last:] if keep_last > 0 else []) | {latest, keep}
    deleted = [n for n in names if n not in protected]
    for name in deleted:
        out.remove_tree(f"{CHECKPOINTS}/{name}")
    return deleted


# ---- finding and verifying ----

def read_pointer(ckpt_root: Path) -> Optional[str]:
    """The checkpoint `latest.json` names, if that file is readable and the folder exists; None otherwise
    (the pointer is a hint: `find_checkpoint` looks at every folder)."""
    try:
        name = json.loads((ckpt_root / POINTER).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and NAME.match(name) and (ckpt_root / name).is_dir() else None


def checkpoint_folders(ckpt_root: Path) -> List[Path]:
    """Every checkpoint folder, newest update first: named as one and holding one of its files at least (what a
    rotation leaves of one, a user's file kept in it, is not a checkpoint)."""
    if not ckpt_root.is_dir():
        return []
    return sorted((p for p in ckpt_root.iterdir() if NAME.match(p.name) and p.is_dir() and not p.is_symlink()
                   and any((p / f).exists() for f in FILES)), key=lambda p: p.name, reverse=True)


def verify_checkpoint(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint folder, in a few words, or None when every file is there, no file
    is a pickle, state.json has every key it needs and every file matches its stored checksum."""
    try:
        for f in path.iterdir():
            if f.is_file() and is_pickle(f):
                return f"{f.name} is a pickle"
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            return f"missing {', '.join(missing)}"
        try:
            state = json.loads((path / "state.json").read_text())
        except ValueError:
            return "state.json is not valid JSON"
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            return f"state.json is not a {FORMAT} state"
        absent = _absent(state)
        if absent:
            return f"state.json lacks {', '.join(absent)}"
        if "state_checksum" in state and state["state_checksum"] != _state_digest(state):
            return "state.json does not match its checksum"
        sums = state.get("checksums") or {}
        if sums and sums.get("algorithm") != CHECKSUM:
            return f"unknown checksum algorithm {sums.get('algorithm')}"
        names = list(FILES[:3]) + [f"{n}.safetensors" for n in state.get("extra", [])]
        for name in names:
            if not (path / name).is_file():
                return f"missing {name}"
            expected = sums.get("files", {}).get(name)
            if expected is not None:
                if checksum_file(path / name) != expected:
                    return f"{name} does not match its checksum"
            else:  # written before checksums existed: at least its header and size must be right
                problem = _safetensors_problem(path / name)
                if problem:
                    return f"{name}: {problem}"
    except OSError as err:
        return f"unreadable ({err.strerror or err})"
    return None


def find_checkpoint(ckpt_root: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest checkpoint that verifies, and the newer ones that did not with what is wrong with each.
    `latest.json` is not trusted: a folder only gets its final name once complete, so the newest folder that
    verifies is the one to resume from, whatever the pointer says (missing, garbage, or naming a deleted
    folder)."""
    damaged = []
    for folder in checkpoint_folders(ckpt_root):
        problem = verify_checkpoint(folder)
        if problem is None:
            return folder, damaged
        damaged.append((folder, problem))
    return None, damaged


def move_aside(out: "Folder", folder: Path) -> Path:
    """Rename a damaged checkpoint to `step-N.corrupt` (`.corrupt-2`, ... if taken): never deleted, never
    resumed from, never rotated away."""
    for i in range(1, 1000):
        target = folder.with_name(folder.name + (".corrupt" if i == 1 else f".corrupt-{i}"))
        if not os.path.lexists(target):
            out.move(f"{CHECKPOINTS}/{folder.name}", f"{CHECKPOINTS}/{target.name}")
            return target
    raise TrainerError(f"cannot move {folder} aside: too many damaged copies beside it")


def resolve_resume(resume: str) -> Path:
    """`run.resume`: a checkpoint folder, or a run folder meaning its newest checkpoint that verifies."""
    p = Path(resume)
    if (p / "checkpoints").is_dir():
        found, damaged = find_checkpoint(p / "checkpoints")
        if found is None:
            why = "; ".join(f"{f.name}: {problem}" for f, problem in damaged) or "no checkpoint folders"
            raise TrainerError(f"run.resume: {p} has no loadable checkpoint ({why})")
        return found
    if p.is_file():
        _refuse_pickle(p)
        raise TrainerError(f"run.resume: {p} is a file; give a checkpoint folder (checkpoints/step-...) or a run folder")
    if not p.is_dir():
        raise TrainerError(f"run.resume: {p} does not exist")
    problem = verify_checkpoint(p)
    if problem is not None:
        raise TrainerError(f"run.resume: {p} is not a loadable checkpoint: {problem}")
    return p


def _refuse_pickle(path: Path) -> None:
    if is_pickle(path):
        raise TrainerError(f"{path} is a pickle (torch.save) file; loading it could run code, so it is refused. "
                           f"Checkpoints here are safetensors + JSON only")


def _safetensors_problem(path: Path) -> Optional[str]:
    """A safetensors file's header parses and the file is as long as the header says (truncation check)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "truncated"
        n = int.from_bytes(head, "little")
        if n > size - 8:
            return "truncated or not a safetensors file"
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            return "not a safetensors file"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) > size:
        return "truncated"
    return None


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint folder without executing anything (see `verify_checkpoint` for the checks; the
    caller has verified it, or reads one it wrote itself)."""
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
    absent = _absent(state)
    if absent:
        raise TrainerError(f"{path / 'state.json'} lacks {', '.join(absent)}")
    try:
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
    except SafetensorError as err:
        raise TrainerError(f"{path}: a file is damaged ({err})") from None


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
