"""`trainer predict`: predictions for image files, from an exported model alone (no config, no pickle); what
is written (classification: a CSV of labels and probabilities) is the model's task's."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from trainer.data.datasets import eval_transform
from trainer.data.folders import decode_rgb, is_image_file
from trainer.errors import TrainerError
from trainer.export import load_exported
from trainer.files import disk_error
from trainer.models import forward_tta
from trainer.tasks import task_from_meta


def list_images(inputs: Iterable[str]) -> List[str]:
    """Files as given, folders searched recursively for image files (sorted; symlinked folders followed, each
    real folder and file once: walk_image_files); `@list.txt` reads one path per line."""
    import sys

    from trainer.data.folders import describe_skipped, walk_image_files

    found: List[str] = []
    skipped = []
    for item in inputs:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise TrainerError(f"list file does not exist: {listing}")
            found += list_images(line.strip() for line in listing.read_text().splitlines() if line.strip())
            continue
        p = Path(item)
        if p.is_dir():
            files, passed = walk_image_files([p])
            skipped += passed
            if not files:
                raise TrainerError(f"no image files in folder {p}")
            found += files
        elif p.is_file():
            found.append(str(p))
        else:
            raise TrainerError(f"input does not exist: {p}")
    if skipped:  # once per call, not once per link: a loop must not pass silently, nor flood the terminal
        print(f"predict: {describe_skipped(skipped)}", file=sys.stderr)
    if not found:
        raise TrainerError("no input images given")
    return found


def check_predict_args(output: str, batch_size: int, threshold: Optional[float], device: str,
                       inputs: List[str]) -> Path:
    """Every argument checked before a model is loaded or an image read; returns the output path."""
    if batch_size < 1:
        raise TrainerError(f"--batch-size must be >= 1, got {batch_size}")
    if threshold is not None and not 0.0 < threshold < 1.0:  # NaN fails this too
        raise TrainerError(f"--threshold must be in (0, 1), got {threshold}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TrainerError(f"--device {device} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainerError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
    out = Path(output)
    if out.is_dir():
        raise TrainerError(f"--output {output} is a folder; give a CSV file path, e.g. {out / 'preds.csv'}")
    if is_image_file(out) or any(Path(i).resolve() == out.resolve() for i in inputs if not i.startswith("@")):
        raise TrainerError(f"--output {output} would overwrite an input image; give a CSV file path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainerError(f"--output {output}: {parent} is a file, not a folder")
            break
    return out


@torch.no_grad()
def predict_files(model_path: str, inputs: List[str], output: str, batch_size: int = 64,
                  threshold: Optional[float] = None, device: str = "cpu") -> int:
    out = check_predict_args(output, batch_size, threshold, device, inputs)
    model, meta = load_exported(model_path)
    model.to(device)
    classes = meta["classes"]
    if threshold is not None and meta["task"] != "binary":
        raise TrainerError(f"--threshold applies to binary models only; this one is {meta['task']} "
                           f"({len(classes)} classes, predicted by the highest probability)")
    task = task_from_meta(meta)
    if threshold is not None:
        task.threshold = threshold
    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])
    exif = meta.get("exif_orientation", False)  # as the model was trained (older models: not applied)
    paths = list_images(inputs)
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = []
        for path in chunk:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    images.append(transform(decode_rgb(path, exif_orientation=exif)))  # as training's eval reads it
            except Exception as err:
                raise TrainerError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
        # the model's test-time augmentation (model.json), as in training's evaluation and `trainer eval`
        rows += task.prediction_rows(chunk, forward_tta(model, torch.stack(images).to(device), meta.get("tta", "none")))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise disk_error(err, out.parent) from None
    task.write_predictions(out, rows)  # written whole, then renamed: never half a file, no temporary left
    return len(rows)
