"""`trainer predict`: predictions for image files, from an exported model alone (no config, no pickle); what
is written (classification: a CSV of labels and probabilities; segmentation: one PNG of class indices per
image) is the model's task's (`prediction_writer`)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, List, Optional

import torch

from trainer import host_memory
from trainer.data.datasets import eval_fit_size, read_eval_image
from trainer.data.folders import describe_skipped, walk_image_files
from trainer.errors import TrainerError
from trainer.evaluation import evaluation_threads
from trainer.export import find_model_dir, load_exported, read_meta
from trainer.files import disk_error, read_lines
from trainer.outputs import Inputs
from trainer.prediction_files import Given
from trainer.tasks import task_from_meta


def list_images(inputs: Iterable[str]) -> List[str]:
    """Files as given, folders searched recursively for image files (sorted; every path to a file, links
    included; symlinked folders followed, each real folder once: walk_image_files); `@list.txt` reads one path
    per line."""
    return [path for path, _ in list_inputs(inputs).images]


def list_inputs(inputs: Iterable[str]) -> Given:
    """Each image with the folder it was found under (a given folder, or a given file's own folder), so that
    per-image outputs can keep the path below the folder given; the folders and list files given; and all of
    them as inputs, which nothing is ever written over or into."""
    found = Given([], [], [], Inputs())
    skipped = []

    def add(items: Iterable[str]) -> None:
        for item in items:
            if item.startswith("@"):
                listing = Path(item[1:])
                if not listing.is_file():
                    raise TrainerError(f"list file does not exist: {listing}")
                found.lists.append(str(listing))
                found.protected.add("the list file", listing)
                add(read_lines(listing, "list file"))
                continue
            p = Path(item)
            if p.is_dir():
                files, passed = walk_image_files([p])
                skipped.extend(passed)
                if not files:
                    raise TrainerError(f"no image files in folder {p}")
                found.images.extend((f, str(p)) for f in files)
                found.folders.append(str(p))
                found.protected.add("the input folder", p)
            elif p.is_file():
                found.images.append((str(p), str(p.parent)))
                found.protected.add("the input image", p)
            else:
                raise TrainerError(f"input does not exist: {p}")

    add(inputs)
    if skipped:  # once per call, not once per link: a loop must not pass silently, nor flood the terminal
        print(f"predict: {describe_skipped(skipped)}", file=sys.stderr)
    if not found.images:
        raise TrainerError("no input images given")
    return found


def model_inputs(model_dir: Path) -> Inputs:
    """What reading a model reads: its folder, and, for a model inside a run, the data that run trained on (its
    config's data.root and data.coco_files), so that no output lands in them either."""
    inputs = Inputs([("the model folder", model_dir)])
    config = model_dir.parent / "config.yaml"
    if config.is_file():
        from trainer.config import load_yaml
        from trainer.data import data_inputs
        from omegaconf import OmegaConf

        try:
            data = OmegaConf.to_container(load_yaml(config, "run config")).get("data") or {}
            inputs.extend(data_inputs(OmegaConf.create({"format": data.get("format"), "root": data.get("root"),
                                                        "coco_files": data.get("coco_files"),
                                                        "generated": data.get("generated"),
                                                        "image_size": data.get("image_size")})))
        except Exception:  # a run's config the model does not need: what cannot be read protects nothing more
            pass
    return inputs


def check_predict_args(output: str, batch_size: int, threshold: Optional[float], device: str) -> None:
    """The arguments every task shares, checked before a model is loaded or an image read (the output itself
    is checked by the model's task: a CSV file, or a folder of masks)."""
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
    for parent in Path(output).parents:
        if parent.exists():
            if not parent.is_dir():
                raise TrainerError(f"--output {output}: {parent} is a file, not a folder")
            break


@torch.no_grad()
def predict_files(model_path: str, inputs: List[str], output: str, batch_size: int = 64,
                  threshold: Optional[float] = None, device: str = "cpu", overlay: bool = False,
                  draw: Optional[str] = None, score_threshold: Optional[float] = None, overwrite: bool = False,
                  keep_freed_memory: bool = True) -> int:
    """Predictions for every input image, written as the model's task writes them; returns the image count.
    keep_freed_memory: as training's key of that name (trainer/host_memory.py), for this call."""
    check_predict_args(output, batch_size, threshold, device)
    if score_threshold is not None and not 0.0 <= score_threshold <= 1.0:  # NaN fails this too
        raise TrainerError(f"--score-threshold must be in [0, 1], got {score_threshold}")
    task = task_from_meta(read_meta(find_model_dir(model_path)))
    task.check_predict_options(threshold, draw, score_threshold)  # those of another task's models, refused
    found = list_inputs(inputs)
    found.protected.extend(model_inputs(find_model_dir(model_path)))
    # checked here, before the model is loaded: never over an input or a file predict did not write
    writer = task.prediction_writer(output, found, overlay, draw, overwrite)
    try:
        with host_memory.kept(keep_freed_memory):
            return predict_all(model_path, found, writer, task, batch_size, threshold, device, score_threshold)
    except OSError as err:
        writer.abort()
        raise disk_error(err, output) from None
    except BaseException:
        writer.abort()  # nothing half-written: --output stays as it was
        raise


def predict_all(model_path: str, found: Given, writer, task, batch_size: int, threshold: Optional[float],
                device: str, score_threshold: Optional[float]) -> int:
    """The model loaded and run over `found`'s images batch by batch into `writer`; returns the image count."""
    model, meta = load_exported(model_path,
                                {"score_thresh": score_threshold} if score_threshold is not None else None)
    if threshold is not None:
        task.threshold = threshold
    model.to(device)
    exif = meta.get("exif_orientation", False)  # as the model was trained (older models: not applied)
    tta = meta.get("tta", "none")  # the model's test-time augmentation, as in training's evaluation
    # a JPEG decoded at the scale its evaluation decoded it (data.scaled_decode), for the tasks whose images
    # are only resized to the input (the others map their outputs back onto the image as stored)
    # (model.json's Fit: its resize and crop, as evaluation's transform and predict_batch apply them)
    fit = eval_fit_size(meta) if getattr(task, "decodes_to_fit", False) else None
    for start in range(0, len(found.images), batch_size):
        chunk = found.images[start:start + batch_size]
        raw = [read_eval_image(path, exif, fit) for path, _ in chunk]  # as training's evaluation reads it
        batch = task.predict_batch(raw, meta, device)  # resized and normalised as the task's evaluation does
        with evaluation_threads(device):  # as evaluation computes, so predictions reproduce eval.json
            outputs = task.forward(model, batch, tta)
        writer.add(chunk, outputs, [tuple(image.shape[-2:]) for image in raw], raw)
    return writer.close()
