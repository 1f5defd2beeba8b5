"""`trainer export --format onnx`: an exported model (model.safetensors + model.json) as one ONNX file that
ONNX Runtime, TensorRT or a browser can run without this package, checked against PyTorch before it is kept.

What the ONNX graph is (the interface other programs rely on):
- input "input": float32 NCHW, RGB, ALREADY normalised, (pixel / 255 - mean) / std with model.json's mean and
  std, after the resize `trainer predict` does (data/datasets.py `eval_transform`); a dynamic batch axis.
  Classification: H = W = image_size (fixed). Segmentation: H and W dynamic where the exporter keeps them so
  (every model of segment_models.py on torch 2.14), else fixed at image_size; `input_shape` says which.
- output "logits": raw logits, no sigmoid/softmax. Classification (N, num_outputs): a binary model has one
  logit (sigmoid gives P(classes[1])), a multi-class one a logit per class (softmax). Segmentation
  (N, C, H, W): the main head only (an FCN/DeepLabV3 auxiliary head is left out).
- never test-time augmentation: `trainer predict` averages with the mirror image when model.json says
  tta=flip; this graph is one plain forward, so its probabilities equal predict's for models without TTA.

The exporter is torch.onnx's torch.export-based one (dynamo=True, which needs onnxscript): torch's default and
maintained path since 2.9. The TorchScript exporter (dynamo=False) also exported every model here with parity
and is ~10x faster (0.02-1.2 s against 1-12 s a model on this CPU), but torch 2.14 warns that it "will be
removed" (DeprecationWarning), so a command built on it breaks at some torch upgrade; the parity gate below
catches a wrong graph from either.

Every file is checked before it is kept: ONNX Runtime (CPU) runs the written file on a batch of real images
(--images, else a few of the run's data, else a fixed-seed random batch, said so) and on one image alone, and
the file is renamed into place only if its logits match PyTorch's within `tolerance`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from trainer.errors import TrainerError
from trainer.export import find_model_dir, load_exported, read_meta
from trainer.outputs import output_file
from trainer.predict import list_inputs, model_inputs
from trainer.tasks import TASKS, task_from_meta

FORMAT = "cnn-trainer-onnx"
FORMAT_VERSION = 1
# The exporter's own opset (torch's TORCHLIB_OPSET: its op translations are written for 18); a higher one is a
# version conversion after export. Lower ones cannot be had: asked for 17, resnet18 came out 18 anyway (the
# converter failed on ReduceMean's axes and left the model as it was; measured on torch 2.14 / onnxscript 0.7.2).
DEFAULT_OPSET = 18
MIN_OPSET = 18
CHECK_IMAGES = 8  # at most this many images in the batch the parity check runs (plus one alone)
CHECK_SEED = 0  # the random batch when no real image is at hand
# Parity: max |ONNX - PyTorch| over every logit <= ABS + REL x max |PyTorch logit| of that check.
# Both run float32 on a CPU but with different kernels (ONNX Runtime's MLAS convolutions, the optimiser's
# folded constants), so sums are rounded in another order: measured up to 3e-5 on ResNet-50 logits of ~30
# (1e-6 relative), 1e-6 on ResNet-18/ConvNeXt, <1e-6 on our small nets. The bound leaves ~100x headroom over
# that, and is still far below what a real fault gives (a wrong weight, BatchNorm in training mode, a missing
# layer, a different head: differences of the order of the logits themselves). The relative part scales with
# the logits (float32 rounding does); the absolute floor covers logits near 0. In probability a logit error e
# moves sigmoid/softmax by at most e/2.
PARITY_ABS = 1e-4
PARITY_REL = 1e-4
NEEDS = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}  # import name -> PyPI name


def tolerance(reference: torch.Tensor) -> float:
    """The largest |ONNX - PyTorch| logit difference accepted for this reference output."""
    return PARITY_ABS + PARITY_REL * float(reference.abs().max())


def check_export_args(opset: int) -> None:
    """The arguments, checked before a model is loaded: the opset, the dependencies (the output: `export_onnx`)."""
    missing = [pypi for module, pypi in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise TrainerError(f"trainer export --format onnx needs {', '.join(missing)}: "
                           f"pip install -e '.[onnx]' (or pip install {' '.join(missing)})")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise TrainerError(f"--opset must be {MIN_OPSET}..{newest} (the exporter writes {MIN_OPSET} and cannot "
                           f"convert down; onnx {onnx.__version__} knows none newer than {newest}), got {opset}")


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")  # model.onnx -> model.onnx.json


# ---- the inputs of the parity check ----


def read_images(paths: Sequence[str], meta: dict) -> torch.Tensor:
    """(N, 3, S, S) float32, each image decoded, resized and normalised as `trainer predict` does (the same
    trainer.data functions, with the model's exif_orientation and mean/std)."""
    from trainer.data.datasets import Fit, eval_fit_size, eval_transform, read_eval_image

    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"], Fit.from_meta(meta))
    exif = meta.get("exif_orientation", False)  # as predict: older models did not apply it
    # as predict decodes a classifier's inputs (a segmentation model's it decodes whole: either is an input here)
    fit = eval_fit_size(meta)
    return torch.stack([transform(read_eval_image(path, exif, fit)) for path in paths])


def first_images(root: Path, limit: int) -> List[str]:
    """Up to `limit` image files under `root`, in sorted walk order, without listing a whole dataset (an
    ImageNet folder holds a million files; the check needs a handful)."""
    from trainer.data.folders import is_image_file

    found: List[str] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.join(folder, f) for f in sorted(files) if is_image_file(f)][:limit - len(found)]
        if len(found) >= limit:
            break
    return found


def run_data_images(model_dir: Path, limit: int) -> Tuple[List[str], str]:
    """A few images of the data the model was trained on, when `model_dir` sits in a run folder whose
    config.yaml names a data root readable from here; else ([], why not)."""
    config = model_dir.parent / "config.yaml"
    if not config.is_file():
        return [], f"{model_dir} is not in a run folder (no config.yaml beside it)"
    from omegaconf import OmegaConf

    try:
        root = OmegaConf.load(config).get("data", {}).get("root")
    except Exception as err:  # a config of another version, a hand-edited one: the check falls back
        return [], f"cannot read {config}: {type(err).__name__}"
    if not root or not Path(str(root)).is_dir():
        return [], f"the run's data.root ({root}) is not a folder here"
    found = first_images(Path(str(root)), limit)
    return found, ("" if found else f"no image files under the run's data.root {root}")


def check_inputs(model_dir: Path, meta: dict, images: Optional[Sequence[str]]) -> Tuple[torch.Tensor, str, str]:
    """The batch the parity check runs: (N >= 2 images, where they came from, why no real image was used:
    "" when they are real). One real image is paired with its mirror image, so that the batch axis is still
    exercised with N >= 2."""
    if images:
        from trainer.predict import list_images  # files, folders searched recursively, @list.txt: as predict

        paths, why_not = list_images(images)[:CHECK_IMAGES], ""
        source = f"{len(paths)} image(s) from --images"
    else:
        paths, why_not = run_data_images(model_dir, min(4, CHECK_IMAGES))
        source = f"{len(paths)} image(s) of the run's data"
    if paths:
        batch = read_images(paths, meta)
        if len(batch) == 1:
            batch = torch.cat([batch, batch.flip(3)])
            source += " and its mirror image"
        return batch, source, ""
    size = meta["image_size"]
    batch = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(CHECK_SEED))
    return batch, f"4 random standard-normal images (seed {CHECK_SEED})", why_not


# ---- the export ----


class TaskLogits(nn.Module):
    """What goes into the ONNX graph: the task's own forward without test-time augmentation, so the logits are
    those `trainer predict` turns into probabilities (classification: the model's output; segmentation: the
    "out" map of the model's dict, the auxiliary head left out)."""

    def __init__(self, net: nn.Module, task):
        super().__init__()
        self.net, self.task = net, task

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.task.forward(self.net, (images,), "none")


def to_onnx(module: nn.Module, example: torch.Tensor, opset: int, dynamic_size: bool):
    """The ONNX program of `module`, its batch axis dynamic and, with `dynamic_size`, its H and W too."""
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # our stdout is our own lines
        warnings.simplefilter("ignore")  # the exporter's notes on internals (deprecations of its own helpers)
        return torch.onnx.export(module, (example,), None, dynamo=True, dynamic_shapes=(axes,),
                                 input_names=["input"], output_names=["logits"], opset_version=opset,
                                 verbose=False)


def export_program(module: nn.Module, example: torch.Tensor, opset: int, any_size: bool, architecture: str):
    """(ONNX program, whether H/W are dynamic). A network that takes any input size (`any_size`: segmentation's)
    tries dynamic H/W first and falls back to the fixed training size if the exporter cannot keep them free."""
    attempts = [True, False] if any_size else [False]
    for dynamic_size in attempts:
        try:
            return to_onnx(module, example, opset, dynamic_size), dynamic_size
        except Exception as err:  # the exporter's own errors are many kinds, each with pages of detail
            if dynamic_size:
                continue
            first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise TrainerError(f"torch.onnx could not export {architecture} (torch {torch.__version__}): "
                               f"{type(err).__name__}: {first}") from None
    raise AssertionError("unreachable")


def shape_of(value_info) -> list:
    """An ONNX input/output shape: ints for fixed axes, names for dynamic ones."""
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def model_properties(meta: dict, task_fields: dict, source: Path, input_shape: list, output_shape: list) -> dict:
    """What a program needs to use the ONNX file without model.json: the same fields in the ONNX file's
    metadata_props (as strings) and in the sidecar JSON. `task_fields`: the task's own (`onnx_fields`), how to
    read the logits as "probabilities" among them."""
    task_fields = dict(task_fields)
    props = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "task": meta["task"], "architecture": meta["architecture"], "classes": list(meta["classes"]),
        "num_outputs": meta["num_outputs"], "image_size": meta["image_size"],
        "mean": list(meta["mean"]), "std": list(meta["std"]),
        "input": _input_text(meta),
        **({key: meta[key] for key in FIT_KEYS if key in meta}),  # the resize and crop of `input`, as model.json
        "input_layout": "NCHW", "input_dtype": "float32", "input_shape": input_shape,
        "output": "logits", "output_shape": output_shape,
        "probabilities": task_fields.pop("probabilities"),
        "tta": "none",  # one plain forward, whatever model.json says
        "model_tta": meta.get("tta", "none"),  # what `trainer predict` applies; not in this graph
        "exif_orientation": meta.get("exif_orientation", False),
        "source": str(source),
    }
    return {**props, **task_fields}


FIT_KEYS = ("crop_mode", "crop_pct", "interpolation", "resize_size")  # model.json's (datasets.Fit.meta)


def _input_text(meta: dict) -> str:
    """How an image becomes the graph's input, in words: model.json's resize and crop (trainer.data's Fit)."""
    from trainer.data.datasets import Fit

    return (f"float32 RGB, {Fit.from_meta(meta).describe(meta['image_size'])} (antialiased unless nearest), "
            f"then (pixel / 255 - mean) / std")


def run_onnx(session, batch: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(["logits"], {"input": batch.numpy()})[0])


def parity(session, module: nn.Module, checks: Sequence[torch.Tensor]) -> dict:
    """Max |ONNX Runtime - PyTorch| over each check batch, against that check's tolerance."""
    from trainer.evaluation import evaluation_threads

    worst, results = 0.0, []
    for batch in checks:
        with torch.no_grad(), evaluation_threads("cpu"):  # as predict computes
            reference = module(batch).float()
        got = run_onnx(session, batch)
        if got.shape != reference.shape:
            raise TrainerError(f"the ONNX model returns shape {list(got.shape)} for input {list(batch.shape)}; "
                               f"PyTorch gives {list(reference.shape)}")
        diff = float((got - reference).abs().max()) if torch.isfinite(got).all() else float("inf")
        allowed = tolerance(reference)
        results.append({"input_shape": list(batch.shape), "max_abs_diff": diff, "tolerance": allowed,
                        "max_abs_logit": float(reference.abs().max()), "passed": diff <= allowed})
        worst = max(worst, diff)
    return {"passed": all(r["passed"] for r in results), "max_abs_diff": worst, "checks": results}


def describe(output: str, sidecar: dict) -> str:
    """The lines `trainer export` prints: what was written, what it takes and returns, how it was checked."""
    check = sidecar["parity"]
    tta = sidecar["model_tta"]
    return "\n".join([
        f"[export] {output} (+ {output}.json): {sidecar['architecture']} {sidecar['task']}, opset {sidecar['opset']}",
        f"[export] input: float32 NCHW {sidecar['input_shape']}, normalised with mean {sidecar['mean']} std "
        f"{sidecar['std']}; output: logits {sidecar['output_shape']} ({sidecar['probabilities']})",
        f"[export] parity with PyTorch: max |diff| {check['max_abs_diff']:.2g} ({check['tolerance']}) on "
        f"{check['num_inputs']} inputs from {check['inputs']}, {check['runtime']}"]
        + ([f"[export] note: the model uses tta={tta} in trainer predict/eval; the ONNX graph does not "
            f"(one plain forward)"] if tta != "none" else []))


def versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("torch", "onnx", "onnxruntime", "onnxscript")}


def export_onnx(model_path: str, output: str, images: Optional[Sequence[str]] = None, opset: int = DEFAULT_OPSET,
                overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write `output` (ONNX) and `output`.json (the sidecar) for the exported model at `model_path` (a run
    folder or a model folder), after ONNX Runtime reproduced PyTorch's logits; returns the sidecar's content.
    Nothing is written when the check fails (an existing file stays as it was)."""
    check_export_args(opset)
    model_dir = find_model_dir(model_path)
    inputs = model_inputs(model_dir)  # the model, its run's data, the images of the check: never written
    if images:
        inputs.extend(list_inputs(images).protected)
    folder, name = output_file(output, "export", "--output", inputs, overwrite,
                               companions=[sidecar_path(Path(output)).name])
    out = folder.root / name
    meta = read_meta(model_dir)
    spec = TASKS[meta["task"]]
    task_fields = spec.onnx_fields(meta)  # a task whose models cannot be exported says so here
    import onnx
    import onnxruntime

    model, meta = load_exported(str(model_dir))
    module = TaskLogits(model.float().eval(), task_from_meta(meta)).eval()
    batch, source, why_not_real = check_inputs(model_dir, meta, images)
    if why_not_real:
        log(f"[export] no real images for the parity check ({why_not_real}): checking on {source}; "
            f"give --images for a check on real data")
    program, dynamic_size = export_program(module, batch[:2], opset, not spec.fixed_input_size, meta["architecture"])
    proto = program.model_proto
    got_opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got_opset != opset:
        raise TrainerError(f"the exporter wrote opset {got_opset}, not the requested {opset}; try --opset "
                           f"{DEFAULT_OPSET}")
    input_shape, output_shape = shape_of(proto.graph.input[0]), shape_of(proto.graph.output[0])
    if input_shape[0] != "batch":
        raise TrainerError(f"the exporter fixed the batch axis of {meta['architecture']} at {input_shape[0]}")
    props = model_properties(meta, task_fields, model_dir.resolve(), input_shape, output_shape)
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in props.items()})

    checks = [batch, batch[:1]]  # the dynamic batch axis at N >= 2, and a single image
    if dynamic_size:  # and the free H, W at another, non-square size
        size = meta["image_size"]
        checks.append(torch.nn.functional.interpolate(batch[:2], size=(size + 16, size + 8), mode="bilinear",
                                                      align_corners=False))
    with folder.staged() as stage:  # both files placed only once the check passes; a failure leaves none
        tmp = stage / name
        tmp.write_bytes(proto.SerializeToString())
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # like predict on a CPU: one thread, the same sums every time
        try:
            session = onnxruntime.InferenceSession(str(tmp), options, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise TrainerError(f"onnxruntime {onnxruntime.__version__} cannot load the exported model (opset "
                               f"{opset}): {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        check = parity(session, module, checks)
        if not check["passed"]:
            bad = next(r for r in check["checks"] if not r["passed"])
            raise TrainerError(f"the ONNX model's logits differ from PyTorch's by {bad['max_abs_diff']:.3g} "
                               f"(allowed {bad['tolerance']:.3g}) on input {bad['input_shape']} ({source}); "
                               f"nothing written")
        sidecar = {**props, "onnx_file": out.name, "opset": opset, "dynamic_height_width": dynamic_size,
                   "exporter": "torch.onnx.export(dynamo=True)", "versions": versions(),
                   "parity": {"passed": True, "inputs": source, "real_images": not why_not_real,
                              **({"why_not_real_images": why_not_real} if why_not_real else {}),
                              "num_inputs": sum(len(c) for c in checks), "max_abs_diff": check["max_abs_diff"],
                              "tolerance": f"max |onnx - torch| <= {PARITY_ABS:g} + {PARITY_REL:g} x max |torch logit|",
                              "runtime": f"onnxruntime {onnxruntime.__version__} CPUExecutionProvider",
                              "checks": check["checks"]}}
        (stage / sidecar_path(out).name).write_text(json.dumps(sidecar, indent=1, default=str) + "\n")
    return sidecar
