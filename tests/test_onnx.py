"""`trainer export --format onnx` (trainer/onnx_export.py): every classification model and the U-Net exported
and run by ONNX Runtime with PyTorch's logits; a mismatch refused with nothing written; the CLI end to end,
its probabilities against `trainer predict`'s."""
import csv
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from tests.conftest import ROOT, run_cli, tiny_overrides
from trainer.cli import main
from trainer.errors import TrainerError
from trainer.export import export_model
from trainer.models import OWN_MODELS, build_model, forward_tta
from trainer.onnx_export import DEFAULT_OPSET, PARITY_ABS, PARITY_REL, export_onnx
from trainer.outputs import LEDGER
from trainer.tasks.segment_models import build_segmentation_model

# export takes 4-11 s each on one thread of this CPU for these (against 1-3 s for the rest): in the default
# suite still, but deselectable with -m "not slow"
# ours and the torchvision classifiers the recipes use (tests/test_models.py runs every other one)
CORE = [*OWN_MODELS, "resnet18", "resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
        "convnext_tiny"]
SLOW = {"resnet34", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny"}


def with_real_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm running statistics of the model's own activations (a cumulative mean over a few random
    batches), then eval mode. A fresh model's are 0 and 1, which leaves MobileNet's and EfficientNet's logits
    at ~1e-10 in eval mode, where any difference would pass the check."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            model(torch.randn(8, 3, 32, 32, generator=generator))
    return model.eval()


def save_model(model: torch.nn.Module, folder: Path, name: str, task: str, classes, tta="none") -> Path:
    """`model` as `trainer train` exports it (model.safetensors + model.json)."""
    num_outputs = 1 if task == "binary" else len(classes)
    export_model(model, folder, {"architecture": name, "task": task, "num_outputs": num_outputs,
                                 "classes": list(classes), "image_size": 32, "small_input_stem": True,
                                 "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "tta": tta,
                                 "threshold": 0.5 if task == "binary" else None})
    return folder


def onnx_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])


def props(path: Path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= PARITY_ABS + PARITY_REL * float(want.abs().max())


# ---- every model, built directly (no training) and exported through the module-level function ----


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CORE])
def test_every_classification_model_exports_with_parity(name, tmp_path):
    task = "binary" if name == "binary_cnn" else "multiclass"
    classes = ["no", "yes"] if task == "binary" else ["a", "b", "c"]
    torch.manual_seed(0)
    model = with_real_statistics(build_model(name, 1 if task == "binary" else 3, 32, small_input_stem=True))
    tta = "flip" if name == "small_cnn" else "none"  # one model with TTA: the ONNX graph must leave it out
    folder = save_model(model, tmp_path / "model", name, task, classes, tta)
    out = tmp_path / "out" / "model.onnx"
    sidecar = export_onnx(str(folder), str(out), log=lambda _: None)
    assert sorted(p.name for p in out.parent.iterdir()) == [LEDGER, "model.onnx", "model.onnx.json"]  # no temporary
    assert json.loads((out.parent / "model.onnx.json").read_text()) == json.loads(json.dumps(sidecar))
    check = sidecar["parity"]
    assert check["passed"] and check["real_images"] is False and check["num_inputs"] == 5  # 4 + 1 alone
    assert [c["input_shape"][0] for c in check["checks"]] == [4, 1]
    assert check["checks"][0]["max_abs_logit"] > 1e-2  # the check compared real logits, not ~0 against ~0
    assert sidecar["input_shape"] == ["batch", 3, 32, 32] and sidecar["opset"] == DEFAULT_OPSET
    assert sidecar["output_shape"] == ["batch", 1 if task == "binary" else 3]
    # the written file, on a batch size it has not seen, against the model itself: no TTA even if model.json has it
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    got = onnx_logits(out, x)
    with torch.no_grad():
        assert_close(got, model(x))
        if tta == "flip":
            assert not torch.allclose(got, forward_tta(model, x, "flip"), atol=1e-3)
    meta = props(out)
    assert meta["task"] == task and json.loads(meta["classes"]) == classes and meta["output"] == "logits"
    assert meta["architecture"] == name and json.loads(meta["image_size"]) == 32
    assert json.loads(meta["mean"]) == [0.49, 0.48, 0.45] and json.loads(meta["std"]) == [0.25, 0.24, 0.26]
    assert meta["input_layout"] == "NCHW" and meta["source"] == str(folder.resolve())
    assert meta["tta"] == "none" and meta["model_tta"] == tta


def test_segmentation_unet_exports_main_head_with_dynamic_size(tmp_path):
    torch.manual_seed(0)
    net = with_real_statistics(build_segmentation_model("unet", 3, log=lambda *_: None))
    folder = tmp_path / "model"
    export_model(net, folder, {"architecture": "unet", "task": "segmentation", "num_outputs": 3,
                               "classes": ["background", "cat", "dog"], "image_size": 32, "mean": [0.5] * 3,
                               "std": [0.25] * 3, "tta": "flip", "ignore_index": 255})
    out = tmp_path / "unet.onnx"
    sidecar = export_onnx(str(folder), str(out), log=lambda _: None)
    assert sidecar["input_shape"] == ["batch", 3, "height", "width"] and sidecar["dynamic_height_width"]
    assert sidecar["output_shape"][:2] == ["batch", 3]
    assert [c["input_shape"] for c in sidecar["parity"]["checks"]] == [[4, 3, 32, 32], [1, 3, 32, 32],
                                                                       [2, 3, 48, 40]]
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(3))  # another size, not square
    with torch.no_grad():
        assert_close(onnx_logits(out, x), net(x)["out"])
    assert props(out)["task"] == "segmentation"


def test_segmentation_falls_back_to_a_fixed_size_and_exporter_errors_are_one_line(monkeypatch):
    from trainer import onnx_export

    real = onnx_export.to_onnx

    def fixed_only(module, example, opset, dynamic_size):
        if dynamic_size:
            raise RuntimeError("Constraints violated (height)\npages of detail")
        return real(module, example, opset, dynamic_size)

    monkeypatch.setattr(onnx_export, "to_onnx", fixed_only)
    conv = torch.nn.Conv2d(3, 2, 1).eval()
    program, dynamic = onnx_export.export_program(conv, torch.randn(2, 3, 8, 8), 18, True, "conv")
    assert not dynamic and onnx_export.shape_of(program.model_proto.graph.input[0]) == ["batch", 3, 8, 8]
    monkeypatch.setattr(onnx_export, "to_onnx", lambda *_: fixed_only(None, None, None, True))
    with pytest.raises(TrainerError, match=r"^torch.onnx could not export conv \(torch .*\): RuntimeError: "
                                           r"Constraints violated \(height\)$"):
        onnx_export.export_program(conv, torch.randn(2, 3, 8, 8), 18, False, "conv")


def test_a_mismatch_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    """The ONNX graph gets slightly different weights than PyTorch keeps: the check must see it, write nothing
    new and leave an existing file (replaced only with --overwrite) as it was."""
    model = build_model("linear", 3, 32)
    folder = save_model(model, tmp_path / "model", "linear", "multiclass", ["a", "b", "c"])
    real_export = torch.onnx.export

    def perturbed(module, args, *rest, **kwargs):
        module = __import__("copy").deepcopy(module)
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(1.01)  # 1% off: far outside the tolerance, as a wrong weight would be
        return real_export(module, args, *rest, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", perturbed)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(TrainerError, match="differ from PyTorch's by .* nothing written"):
        export_onnx(str(folder), str(out), log=lambda _: None)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    out.parent.mkdir(exist_ok=True)
    out.write_bytes(b"the old model")
    (out.parent / "model.onnx.json").write_text("{}")
    with pytest.raises(TrainerError, match="differ from PyTorch's"):
        export_onnx(str(folder), str(out), overwrite=True, log=lambda _: None)
    assert out.read_bytes() == b"the old model" and (out.parent / "model.onnx.json").read_text() == "{}"
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.json"]


# ---- refusals: one line, before any export ----


def cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as stop:
        main(list(args))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refusals_are_one_line(tmp_path, capsys):
    folder = save_model(build_model("linear", 2, 32), tmp_path / "model", "linear", "multiclass", ["a", "b"])
    out = tmp_path / "model.onnx"
    out.write_bytes(b"x")
    assert "was not written by the trainer (or changed since it was); pass --overwrite" in cli_error(capsys, "export", "--model", str(folder), "--format", "onnx",
                                                   "--output", str(out))
    assert "--opset must be 18.." in cli_error(capsys, "export", "--model", str(folder), "--format", "onnx",
                                                "--output", str(tmp_path / "b.onnx"), "--opset", "17")
    (tmp_path / "empty").mkdir()
    assert "no exported model" in cli_error(capsys, "export", "--model", str(tmp_path / "empty"), "--format",
                                            "onnx", "--output", str(tmp_path / "c.onnx"))
    assert "is a folder" in cli_error(capsys, "export", "--model", str(folder), "--format", "onnx",
                                      "--output", str(tmp_path))
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "model.safetensors").write_bytes(b"")
    (detector / "model.json").write_text(json.dumps({
        "format": "cnn-trainer-model", "architecture": "fasterrcnn_mobilenet_v3_large_fpn", "task": "detection",
        "num_outputs": 3, "classes": ["cat", "dog"], "category_ids": [1, 2], "model_kwargs": {},
        "image_size": 320, "mean": [0.5] * 3, "std": [0.25] * 3}))
    assert "detection models cannot be exported to ONNX" in cli_error(
        capsys, "export", "--model", str(detector), "--format", "onnx", "--output", str(tmp_path / "d.onnx"))
    with pytest.raises(SystemExit):  # argparse: only onnx for now
        main(["export", "--model", str(folder), "--format", "tflite", "--output", str(tmp_path / "e.onnx")])
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    # (the ledger is save_model's: the record of the model folder it wrote)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER, "detector", "empty", "model", "model.onnx"]


# ---- the CLI end to end on a tiny trained run, against trainer predict ----


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """variant -> (run folder, data root): one binary and one multi-class run of 2 updates, via the CLI."""
    runs = {}
    for variant in ("binary", "multiclass"):
        tmp = tmp_path_factory.mktemp(variant)
        overrides = tiny_overrides(tmp, variant, **{
            "train.max_steps": 2, "data.generated.train_per_class": 20, "data.generated.val_per_class": 5,
            "data.generated.test_per_class": 5})
        res = run_cli("train", str(ROOT / f"configs/quickstart_{variant}.yaml"), *overrides)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[variant] = (tmp / "run", tmp / f"gen-{variant}")
    return runs


@pytest.mark.parametrize("variant", ["binary", "multiclass"])
def test_cli_export_matches_trainer_predict(trained, variant, tmp_path):
    from trainer.data.datasets import eval_transform
    from trainer.data.folders import decode_rgb
    from trainer.predict import list_images

    run_dir, data_root = trained[variant]
    images = data_root / "val"
    out = tmp_path / "model.onnx"
    res = run_cli("export", "--model", str(run_dir), "--format", "onnx", "--output", str(out),
                  "--images", str(images))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "parity with PyTorch" in res.stdout and "random" not in res.stdout
    preds = tmp_path / "preds.csv"
    main(["predict", "--model", str(run_dir), str(images), "--output", str(preds)])  # in-process: 3 s less
    rows = list(csv.DictReader(preds.open()))
    meta = json.loads((run_dir / "model" / "model.json").read_text())
    classes = meta["classes"]
    # what another program does with the file: read, resize, normalise with the stored mean/std, run, softmax
    info = props(out)
    assert json.loads(info["classes"]) == classes and info["task"] == variant and info["output"] == "logits"
    transform = eval_transform(json.loads(info["image_size"]), json.loads(info["mean"]), json.loads(info["std"]))
    paths = [r["path"] for r in rows]
    assert sorted(paths) == sorted(list_images([str(images)]))
    x = torch.stack([transform(decode_rgb(p, exif_orientation=meta.get("exif_orientation", False))) for p in paths])
    logits = onnx_logits(out, x).double()
    if variant == "binary":
        assert logits.shape == (len(paths), 1)
        p1 = torch.sigmoid(logits[:, 0])
        probs = torch.stack([1 - p1, p1], dim=1)
    else:
        assert logits.shape == (len(paths), len(classes))
        probs = torch.softmax(logits, dim=1)
    expected = np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows])
    assert np.abs(probs.numpy() - expected).max() <= 1e-5
    sidecar = json.loads((tmp_path / "model.onnx.json").read_text())
    check = sidecar["parity"]
    assert check["passed"] and check["real_images"] and check["inputs"] == "8 image(s) from --images"
    assert check["num_inputs"] == 9 and check["max_abs_diff"] <= 1e-4
    assert sidecar["versions"]["onnxruntime"] == onnxruntime.__version__ and sidecar["opset"] == DEFAULT_OPSET
    assert sidecar["source"] == str((run_dir / "model").resolve())


def test_without_images_the_runs_own_data_is_checked_and_one_image_is_paired(trained, tmp_path):
    run_dir, data_root = trained["binary"]
    said = []
    sidecar = export_onnx(str(run_dir / "best"), str(tmp_path / "best.onnx"), log=said.append)
    assert said == []  # nothing to warn about: real images were found
    assert sidecar["parity"]["real_images"] and sidecar["parity"]["inputs"] == "4 image(s) of the run's data"
    assert sidecar["source"] == str((run_dir / "best").resolve())
    one = sorted((data_root / "val" / "square").iterdir())[0]
    sidecar = export_onnx(str(run_dir), str(tmp_path / "one.onnx"), images=[str(one)], log=said.append)
    check = sidecar["parity"]
    assert check["inputs"] == "1 image(s) from --images and its mirror image" and check["num_inputs"] == 3
