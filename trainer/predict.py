"""`trainer predict`: class probabilities for image files, from an exported model alone (no config, no pickle)."""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from trainer.data.datasets import eval_transform
from trainer.data.folders import decode_rgb, is_image_file
from trainer.errors import TrainerError
from trainer.export import load_exported
from trainer.models import forward_tta
from trainer.tasks import Task


def list_images(inputs: Iterable[str]) -> List[str]:
    """Files as given, folders searched recursively for image files (sorted); `@list.txt` reads one path per line."""
    found: List[str] = []
    for item in inputs:
        if item.startswith("@"):
            listing = Path(item[1:])
            if not listing.is_file():
                raise TrainerError(f"list file does not exist: {listing}")
            found += list_images(line.strip() for line in listing.read_text().splitlines() if line.strip())
            continue
        p = Path(item)
        if p.is_dir():
            files = sorted(str(Path(d) / f) for d, _, names in os.walk(p, followlinks=True) for f in names
                           if is_image_file(f))
            if not files:
                raise TrainerError(f"no image files in folder {p}")
            found += files
        elif p.is_file():
            found.append(str(p))
        else:
            raise TrainerError(f"input does not exist: {p}")
    if not found:
        raise TrainerError("no input images given")
    return found


@torch.no_grad()
def predict_files(model_path: str, inputs: List[str], output: str, batch_size: int = 64,
                  threshold: Optional[float] = None, device: str = "cpu") -> int:
    model, meta = load_exported(model_path)
    model.to(device)
    classes = meta["classes"]
    task = Task(meta["task"], len(classes))
    threshold = (meta.get("threshold") or 0.5) if threshold is None else threshold
    positive_index = classes.index(meta["positive_class"]) if meta.get("positive_class") else 1
    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"])
    paths = list_images(inputs)
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = []
        for path in chunk:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    images.append(transform(decode_rgb(path)))  # as training's evaluation reads it
            except Exception as err:
                raise TrainerError(f"cannot read image {path}: {type(err).__name__}: {err}") from None
        # the model's test-time augmentation (model.json), as in training's evaluation and `trainer eval`
        probs = task.probabilities(forward_tta(model, torch.stack(images).to(device), meta.get("tta", "none"))).cpu()
        labels = task.predict(probs, threshold, positive_index)
        for path, p, label in zip(chunk, probs.tolist(), labels.tolist()):
            rows.append([path, classes[label]] + [repr(v) for v in p])  # exact: parses back to the same number
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:  # written whole, then renamed: never half a CSV
        writer = csv.writer(fh)
        writer.writerow(["path", "label"] + [f"prob_{c}" for c in classes])
        writer.writerows(rows)
    os.replace(tmp, out)
    return len(rows)
