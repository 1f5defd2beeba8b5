"""Detection models and COCO metrics (trainer/tasks/detect_models.py, detect_metrics.py): CPU, no network."""
import contextlib
import copy
import io
import json
import tempfile
import urllib.request

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from safetensors.torch import save_file

from trainer.errors import ConfigError, TrainerError
from trainer.tasks.detect_metrics import (coco_metrics, evaluate_coco, metrics_from_cocoeval,
                                          precision_recall_curves, to_coco_records, to_xywh)
from trainer.tasks.detect_models import (DETECTION_MODELS, DETECTION_OPTIONS, build_detection_model,
                                         loss_part_names, model_kwargs)

# every model small enough for a quick step where it can be (SSDlite always resizes to 320x320)
SMALL = {name: ({"min_size": 64, "max_size": 96} if "min_size" in model_kwargs(name) else {})
         for name in DETECTION_MODELS}
SLOW = {"fasterrcnn_resnet50_fpn_v2", "fasterrcnn_resnet50_fpn", "ssd300_vgg16"}  # 8.7 s (ssd300: 7.5 s) alone on an idle 2-core CPU (1 thread), > 10 s under load


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A TORCH_HOME that does not exist and every download path refusing: a build that tried to fetch
    weights fails loudly, and one that wrote a cache would create the folder."""
    home = tmp_path / "bogus-torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    yield home
    assert not home.exists(), "something was written to TORCH_HOME"


def _images_and_targets():
    """Two images of different sizes, one with two objects and one with none."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 30.0], [30.0, 20.0, 70.0, 60.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    return images, targets


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- models ----


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in sorted(DETECTION_MODELS)])
def test_every_model_trains_and_predicts(name, offline):
    torch.manual_seed(0)
    model = build_detection_model(name, 3, SMALL[name])
    images, targets = _images_and_targets()
    model.train()
    losses = model(images, targets)
    assert list(losses) == loss_part_names(name)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for img, o in zip(images, out):
        assert set(o) == {"boxes", "scores", "labels"}
        h, w = img.shape[-2:]
        boxes = o["boxes"]
        assert boxes.shape[1:] == (4,) and len(boxes) == len(o["scores"]) == len(o["labels"])
        # boxes in the ORIGINAL image's pixels, whatever the model resized to
        assert bool((boxes[:, 0::2] <= w + 1e-3).all() and (boxes[:, 1::2] <= h + 1e-3).all() and (boxes >= 0).all())
        assert bool(((o["labels"] >= 1) & (o["labels"] <= 2)).all())


@pytest.mark.parametrize("name", sorted(DETECTION_MODELS))
def test_defaults_are_torchvisions(name, offline):
    """The defaults model_kwargs writes into model.json are what the torchvision builder does on its own."""
    from torchvision.models import detection

    kw = model_kwargs(name)
    if name == "retinanet_small":  # our own: its defaults are its definition; check they reach the model
        model = build_detection_model(name, 3)
    else:
        model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3)
    post = model.roi_heads if name.startswith("fasterrcnn") else model
    assert (post.score_thresh, post.nms_thresh, post.detections_per_img) == (
        kw["score_thresh"], kw["nms_thresh"], kw["detections_per_img"])
    if "min_size" in kw:
        assert (model.transform.min_size, model.transform.max_size) == ((kw["min_size"],), kw["max_size"])
    if "anchor_sizes" in kw:
        anchors = model.rpn.anchor_generator if name.startswith("fasterrcnn") else model.anchor_generator
        assert [list(s) for s in anchors.sizes] == kw["anchor_sizes"]
        assert [list(r) for r in anchors.aspect_ratios] == kw["aspect_ratios"]


@pytest.mark.parametrize("name, option, value", [
    ("fcos_resnet50_fpn", "anchor_sizes", [[8]] * 5),
    ("fcos_resnet50_fpn", "aspect_ratios", [1.0]),
    ("ssdlite320_mobilenet_v3_large", "min_size", 128),
    ("ssdlite320_mobilenet_v3_large", "anchor_sizes", [[16]] * 6),
    ("ssdlite320_mobilenet_v3_large", "trainable_backbone_layers", 3),
    ("retinanet_small", "trainable_backbone_layers", 2),
])
def test_option_a_model_cannot_take(name, option, value):
    with pytest.raises(ConfigError, match=f"{name}.*{option}"):
        build_detection_model(name, 3, {option: value})
    assert option not in model_kwargs(name)
    model_kwargs(name, {option: None})  # None means "the model's default": fine for every model


@pytest.mark.parametrize("options, match", [
    ({"min_szie": 64}, "unknown detection option.*min_szie.*valid options: min_size"),
    ({"min_size": 0}, "min_size must be an int >= 1"),
    ({"min_size": 64.5}, "min_size must be an int"),
    ({"score_thresh": 1.5}, "score_thresh must be a number in"),
    ({"trainable_backbone_layers": 7}, "trainable_backbone_layers .* 0..6"),
    ({"anchor_sizes": [[32], [64]]}, "needs 3 entries, one per feature level"),
    ({"anchor_sizes": [[32, 48], [64], [128]]}, "same number of anchors"),
    ({"anchor_sizes": [[32], [64], [-1]]}, "positive numbers"),
])
def test_bad_option_values(options, match):
    with pytest.raises(ConfigError, match=match):
        model_kwargs("fasterrcnn_mobilenet_v3_large_320_fpn", options)


def test_mask_and_keypoint_models_say_why_they_are_not_offered():
    with pytest.raises(ConfigError, match="maskrcnn_resnet50_fpn is not offered: it trains on instance masks"):
        build_detection_model("maskrcnn_resnet50_fpn", 3)


def test_unknown_model_lists_valid_names():
    with pytest.raises(ConfigError, match="valid names: .*retinanet_small"):
        build_detection_model("yolo", 3)
    with pytest.raises(ConfigError, match="num_classes >= 2"):
        build_detection_model("retinanet_small", 1)


def test_aspect_ratios_flat_or_per_level():
    flat = model_kwargs("retinanet_small", {"anchor_sizes": [16, 32, 64], "aspect_ratios": [1.0]})
    assert flat["anchor_sizes"] == [[16], [32], [64]] and flat["aspect_ratios"] == [[1.0]] * 3
    assert set(DETECTION_OPTIONS) >= set(flat)


ROUND_TRIP = {  # options that change the architecture, per model
    "retinanet_small": {"min_size": 96, "max_size": 96, "anchor_sizes": [[12], [24], [48]], "aspect_ratios": [1.0]},
    "fasterrcnn_mobilenet_v3_large_fpn": {"anchor_sizes": [[16, 32]] * 3, "aspect_ratios": [1.0],
                                          "trainable_backbone_layers": 3},
    "fasterrcnn_mobilenet_v3_large_320_fpn": {"trainable_backbone_layers": 0, "score_thresh": 0.01},
    "fasterrcnn_resnet50_fpn_v2": {"trainable_backbone_layers": 2, "anchor_sizes": [16, 32, 64, 128, 256]},
    "retinanet_resnet50_fpn_v2": {"anchor_sizes": [[16, 24]] * 5, "aspect_ratios": [[1.0]] * 5,
                                  "trainable_backbone_layers": 1},
    "fcos_resnet50_fpn": {"trainable_backbone_layers": 4, "min_size": 64, "max_size": 96},
    "ssdlite320_mobilenet_v3_large": {"detections_per_img": 50},
    "fasterrcnn_resnet50_fpn": {"trainable_backbone_layers": 3, "min_size": 64, "max_size": 96},
    "retinanet_resnet50_fpn": {"anchor_sizes": [[16, 24]] * 5, "aspect_ratios": [1.0], "nms_thresh": 0.4},
    "ssd300_vgg16": {"score_thresh": 0.2},
}


@pytest.mark.parametrize("name", sorted(DETECTION_MODELS))
def test_model_kwargs_round_trip_through_json(name, offline):
    assert set(ROUND_TRIP) == set(DETECTION_MODELS)
    kw = model_kwargs(name, ROUND_TRIP[name])
    stored = json.loads(json.dumps(kw, allow_nan=False))
    assert model_kwargs(name, stored) == stored == kw
    first = build_detection_model(name, 4, ROUND_TRIP[name])
    again = build_detection_model(name, 4, stored)
    assert _shapes(first) == _shapes(again)
    post = first.roi_heads if name.startswith("fasterrcnn") else first  # the options reached the model
    assert (post.score_thresh, post.nms_thresh, post.detections_per_img) == (
        kw["score_thresh"], kw["nms_thresh"], kw["detections_per_img"])
    if "min_size" in kw:
        assert (first.transform.min_size, first.transform.max_size) == ((kw["min_size"],), kw["max_size"])
    again.load_state_dict(first.state_dict())  # strict: the same architecture to the last buffer
    assert [p.requires_grad for p in first.parameters()] == [p.requires_grad for p in again.parameters()]


def test_custom_anchor_count_resizes_the_head(offline):
    model = build_detection_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3,
                                  {"min_size": 64, "max_size": 96, "anchor_sizes": [[16, 32]] * 3,
                                   "aspect_ratios": [1.0]})
    assert model.rpn.head.cls_logits.out_channels == 2 and model.rpn.head.bbox_pred.out_channels == 8
    images, targets = _images_and_targets()
    losses = model(images, targets)
    sum(losses.values()).backward()
    model = build_detection_model("retinanet_small", 3, {"anchor_sizes": [[12], [24], [48]], "aspect_ratios": [1.0]})
    assert model.head.classification_head.cls_logits.out_channels == 3
    assert model.head.regression_head.bbox_reg.out_channels == 4


def test_trainable_backbone_layers_freezes_like_torchvision(offline):
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = build_detection_model("fcos_resnet50_fpn", 3, {"trainable_backbone_layers": 2})
    body = model.backbone.body
    for name, p in body.named_parameters():
        assert p.requires_grad == name.startswith(("layer3", "layer4")), name
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer2[0].bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer3[0].bn1, torch.nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.head.parameters())
    # mobilenet: 6 stages; 0 freezes the whole body, 6 (the default) nothing
    frozen = build_detection_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, {"trainable_backbone_layers": 0})
    assert not any(p.requires_grad for p in frozen.backbone.body.parameters())
    assert all(p.requires_grad for p in frozen.backbone.fpn.parameters())
    free = build_detection_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3)
    assert all(p.requires_grad for p in free.parameters())


def test_loss_part_names():
    assert loss_part_names("fasterrcnn_resnet50_fpn_v2") == ["loss_classifier", "loss_box_reg", "loss_objectness",
                                                              "loss_rpn_box_reg"]
    assert loss_part_names("fcos_resnet50_fpn") == ["classification", "bbox_regression", "bbox_ctrness"]
    assert loss_part_names("retinanet_small") == ["classification", "bbox_regression"]


def test_retinanet_small_overfits_two_images():
    """A learning check, not a benchmark: 40 AdamW steps on two images cut the loss well down."""
    torch.manual_seed(0)
    model = build_detection_model("retinanet_small", 3, {"min_size": 96, "max_size": 96})
    images, targets = _images_and_targets()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = sum(model(images, targets).values())
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---- local pretrained weights ----


def test_detector_checkpoint_loads_by_name(tmp_path, offline):
    torch.manual_seed(0)
    source = build_detection_model("retinanet_small", 3)
    path = tmp_path / "det.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    messages = []
    same = build_detection_model("retinanet_small", 3, pretrained_path=str(path), log=messages.append)
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in source.state_dict().items())
    other = build_detection_model("retinanet_small", 6, pretrained_path=str(path), log=messages.append)
    assert "head.classification_head.cls_logits" in messages[-1]  # another class count: that conv is fresh
    first_conv = "backbone.stages.0.0.0.weight"
    assert torch.equal(other.state_dict()[first_conv], source.state_dict()[first_conv])


def test_classification_backbone_file_fills_the_body(tmp_path, offline):
    from torchvision.models import mobilenet_v3_large

    classifier = mobilenet_v3_large(weights=None)
    path = tmp_path / "mnv3.pth"
    torch.save(classifier.state_dict(), path)
    messages = []
    model = build_detection_model("fasterrcnn_mobilenet_v3_large_320_fpn", 3, pretrained_path=str(path),
                                  log=messages.append)
    body = model.backbone.body.state_dict()
    for key, value in classifier.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(body[key.removeprefix("features.")], value), key
    assert messages and messages[0].startswith("backbone weights: loaded")
    with pytest.raises(ConfigError, match="matches no tensor"):
        build_detection_model("retinanet_small", 3, pretrained_path=str(path))


# ---- COCO metrics ----


def _case():
    """Non-contiguous category ids (3, 7, 90) plus one (12) absent from the ground truth; image 5 has no GT;
    a crowd box on image 1."""
    gt = {
        "images": [{"id": 1, "width": 100, "height": 80}, {"id": 2, "width": 64, "height": 64},
                   {"id": 5, "width": 50, "height": 50}],
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}, {"id": 90, "name": "cross"},
                       {"id": 12, "name": "absent"}],
        "annotations": [],
    }
    boxes = [(1, 3, [10, 10, 20, 20], 0), (1, 7, [40, 30, 30, 40], 0), (1, 90, [5, 50, 10, 10], 0),
             (1, 3, [70, 5, 25, 25], 1),  # crowd: neither found nor missed
             (2, 3, [0, 0, 40, 40], 0), (2, 90, [30, 30, 30, 30], 0), (2, 7, [2, 40, 12, 20], 0)]
    for i, (image, cat, box, crowd) in enumerate(boxes, start=1):
        gt["annotations"].append({"id": i, "image_id": image, "category_id": cat, "bbox": box,
                                  "area": box[2] * box[3], "iscrowd": crowd})
    dets = [
        {"image_id": 1, "category_id": 3, "bbox": [11, 9, 20, 21], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [72, 6, 20, 20], "score": 0.8},  # on the crowd box
        {"image_id": 1, "category_id": 7, "bbox": [40, 35, 30, 30], "score": 0.7},
        {"image_id": 1, "category_id": 90, "bbox": [60, 60, 10, 10], "score": 0.95},  # false positive
        {"image_id": 2, "category_id": 3, "bbox": [2, 1, 36, 40], "score": 0.6},
        {"image_id": 2, "category_id": 90, "bbox": [31, 29, 28, 30], "score": 0.5},
        {"image_id": 2, "category_id": 7, "bbox": [0, 0, 10, 10], "score": 0.4},  # wrong place
        {"image_id": 5, "category_id": 7, "bbox": [1, 1, 20, 20], "score": 0.3},  # on an image without GT
    ]
    return gt, dets


def _pycocotools(gt, dets, tmp_path):
    """The reference run, the way the acceptance check does it: files on disk, loadRes, the default params."""
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(tmp_path / "gt.json"))
        ev = COCOeval(coco_gt, coco_gt.loadRes(str(tmp_path / "dt.json")), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def test_coco_metrics_equal_pycocotools(tmp_path, capsys):
    gt, dets = _case()
    before = copy.deepcopy((gt, dets))
    m = coco_metrics(gt, dets)
    assert (gt, dets) == before  # loadRes writes into its records: ours got copies
    assert capsys.readouterr().out == ""  # pycocotools' prints silenced
    ref = _pycocotools(gt, dets, tmp_path)
    keys = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
            "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]
    assert [m[k] for k in keys] == [None if s == -1 else float(s) for s in ref.stats]
    assert 0 < m["map"] < 1 and m["map_large"] is None  # no GT of 96^2 px or more: -1 in COCOeval
    # per class as summarize() averages: entries > -1 of precision[:, :, k, area all, maxDets 100] (IoU rows 0
    # and 5 are 0.50 and 0.75), and of recall[:, k, area all, maxDets 100]
    assert list(ref.params.iouThrs[[0, 5]]) == [0.5, 0.75]
    for k, cat in enumerate(ref.params.catIds):
        name = {c["id"]: c["name"] for c in gt["categories"]}[cat]
        p, r = ref.eval["precision"][:, :, k, 0, 2], ref.eval["recall"][:, k, 0, 2]
        if name == "absent":
            assert m["per_class"][name] == {"ap": None, "ap50": None, "ap75": None, "recall": None}
        else:
            assert m["per_class"][name] == {"ap": float(np.mean(p[p > -1])), "ap50": float(np.mean(p[0][p[0] > -1])),
                                            "ap75": float(np.mean(p[5][p[5] > -1])), "recall": float(np.mean(r))}
    # and the table adds up to COCO's own summary: each present class has all its entries defined, so the
    # mean over classes of a column is the summary number (pycocotools' stats[0], [1], [2], [8])
    present = [row for name, row in m["per_class"].items() if name != "absent"]
    for column, stat in (("ap", 0), ("ap50", 1), ("ap75", 2), ("recall", 8)):
        assert np.mean([row[column] for row in present]) == pytest.approx(ref.stats[stat], abs=1e-12), column
    assert m["absent_classes"] == ["absent"]
    assert (m["num_images"], m["num_detections"]) == (3, 8)
    json.dumps(m, allow_nan=False)


def test_perfect_and_no_detections():
    gt, _ = _case()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    m = coco_metrics(gt, perfect)
    assert m["map"] == m["map_50"] == m["map_75"] == m["mar_100"] == 1.0
    assert all(v["ap"] == 1.0 for k, v in m["per_class"].items() if k != "absent")
    none = coco_metrics(gt, [])  # pycocotools' loadRes([]) would raise
    assert none["map"] == none["map_50"] == none["mar_100"] == 0.0 and none["num_detections"] == 0
    assert none["per_class"]["circle"] == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "recall": 0.0}
    assert none["per_class"]["absent"]["ap"] is None
    assert none["map_large"] is None
    json.dumps(none, allow_nan=False)


def test_summary_text_and_pr_curves():
    gt, dets = _case()
    ev = evaluate_coco(gt, dets)
    assert ev.summary_text.count("Average Precision") == 6 and "maxDets=100" in ev.summary_text
    assert metrics_from_cocoeval(ev) == coco_metrics(gt, dets)
    curves = precision_recall_curves(ev)
    assert set(curves) == {"circle", "square", "cross", "absent"} and curves["absent"] is None
    assert len(curves["circle"]["recall"]) == len(curves["circle"]["precision"]) == 101
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    assert all(p == 1.0 for p in precision_recall_curves(evaluate_coco(gt, perfect))["square"]["precision"])


def test_the_report_holds_the_per_class_table_and_pr_curves_of_pycocotools(tmp_path):
    """eval.json's per-class table, the printed one and pr_curves.png, from pycocotools' own arrays (the oracle:
    precision[IoU 0.5, :, k, area all, maxDets 100] is each class's curve)."""
    from tests.test_reports import assert_valid_png
    from trainer.tasks.detect_reports import format_detection_summary, write_detection_report

    gt, dets = _case()
    ref = _pycocotools(gt, dets, tmp_path)
    ev = evaluate_coco(gt, dets)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    curves = precision_recall_curves(ev)
    for k, cat in enumerate(ref.params.catIds):
        if names[cat] != "absent":
            assert curves[names[cat]]["precision"] == ref.eval["precision"][0, :, k, 0, 2].tolist()
    metrics = metrics_from_cocoeval(ev)
    write_detection_report(tmp_path / "report", metrics, {"curves": curves, "samples": []}, list(names.values()))
    saved = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert saved["per_class"] == metrics["per_class"] and set(saved["per_class"]["circle"]) == {"ap", "ap50", "ap75",
                                                                                                 "recall"}
    assert_valid_png(tmp_path / "report" / "plots" / "pr_curves.png")
    table = format_detection_summary(metrics).splitlines()
    assert table[2].split() == ["class", "ap", "ap50", "ap75", "recall"]
    circle = metrics["per_class"]["circle"]
    assert table[3].split() == ["circle", *(f"{circle[c]:.4f}" for c in ("ap", "ap50", "ap75", "recall"))]
    assert "absent" in table[-1]


def test_bad_inputs_are_named():
    gt, dets = _case()
    bad = copy.deepcopy(gt)
    bad["annotations"][0]["id"] = 0  # COCOeval would count it as a miss
    with pytest.raises(TrainerError, match="ids must be unique ints >= 1"):
        coco_metrics(bad, dets)
    with pytest.raises(TrainerError, match="image ids not in the ground truth: \\[99\\]"):
        coco_metrics(gt, dets + [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.1}])
    with pytest.raises(TrainerError, match="category ids not in the ground truth: \\[4\\]"):
        coco_metrics(gt, dets + [{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 0.1}])
    bad = copy.deepcopy(gt)
    del bad["annotations"][0]["iscrowd"]
    with pytest.raises(TrainerError, match="lacks \\['iscrowd'\\]"):
        coco_metrics(bad, dets)


def test_box_conversions():
    xyxy = torch.tensor([[1.0, 2.0, 11.0, 7.0]])
    assert to_xywh(xyxy).tolist() == [[1.0, 2.0, 10.0, 5.0]] and torch.is_tensor(to_xywh(xyxy))
    assert to_xywh(np.array([[0, 0, 4, 4]])).tolist() == [[0, 0, 4, 4]]
    records = to_coco_records(5, xyxy, torch.tensor([0.5]), torch.tensor([2]), category_ids=[3, 7, 90])
    assert records == [{"image_id": 5, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 5.0], "score": 0.5}]
    with pytest.raises(TrainerError, match="1..3"):
        to_coco_records(5, xyxy, torch.tensor([0.5]), torch.tensor([0]), category_ids=[3, 7, 90])


def test_the_validation_loss_is_scored_only_on_request():
    """eval.detection_loss: off (the default), an evaluation runs each image once and reports no loss, and
    eval.monitor=loss is refused at start-up; on, the loss and its parts are there (their mean per image summed),
    and the detections and COCO numbers are the same either way. Refused for the other tasks."""
    from trainer.config import Config, load_config
    from trainer.distributed import make_accelerator
    from trainer.evaluation import evaluate
    from trainer.tasks import build_task
    from trainer.tasks.detect import Detection

    cfg = Config()
    cfg.task, cfg.data.format, cfg.eval.monitor, cfg.model.name = "detection", "coco", "loss", "retinanet_small"
    with pytest.raises(ConfigError, match="eval.monitor=loss needs .* eval.detection_loss=true"):
        build_task("detection", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data, cfg.model, [1, 2])
    cfg.eval.detection_loss = True
    assert build_task("detection", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data, cfg.model, [1, 2]).validation_loss
    with pytest.raises(ConfigError, match="eval.detection_loss is for detection"):
        load_config(None, ["task=multiclass", "eval.detection_loss=true"])

    with tempfile.TemporaryDirectory() as tmp:
        example = Detection.example("retinanet_small", tmp)  # 7 generated images of 32 px
        task = Detection(example.classes, list(example.category_ids))
        torch.manual_seed(0)
        model = task.build_model("retinanet_small", 32, log=lambda *_: None)
        acc = make_accelerator("cpu", "no")
        plain, _ = evaluate(model, example.dataset, task, acc, 4)
        task.validation_loss = True
        scored, _ = evaluate(model, example.dataset, task, acc, 4)
    parts = loss_part_names("retinanet_small")
    assert "loss" not in plain and not set(parts) & set(plain) and "loss" in task.metric_names()
    assert scored["loss"] == pytest.approx(sum(scored[p] for p in parts), abs=1e-12) and scored["loss"] > 0
    assert {k: v for k, v in scored.items() if k != "loss" and k not in parts} == plain


def test_faster_coco_eval_gives_pycocotools_numbers():
    """eval.coco_backend=faster_coco_eval against pycocotools (the oracle) on the hand-made case and on a
    synthetic split of 200 images x 100 detections: every number to 1e-12 and every undefined one (None) alike
    (its C++ accumulation may round an entry differently in the last bits: 2e-16 measured)."""
    pytest.importorskip("faster_coco_eval")
    rng = np.random.default_rng(0)  # 200 images of 640 px, 1-5 boxes each, 100 detections: near hits and guesses
    big = {"images": [{"id": i, "width": 640, "height": 640} for i in range(200)], "annotations": [],
           "categories": [{"id": c, "name": f"c{c}"} for c in (1, 3, 7, 9)]}
    guesses = []
    for i in range(200):
        for _ in range(int(rng.integers(1, 6))):
            box, cat = [*rng.uniform(0, 450, 2), *rng.uniform(16, 190, 2)], int(rng.choice([1, 3, 7, 9]))
            big["annotations"].append({"id": len(big["annotations"]) + 1, "image_id": i, "category_id": cat,
                                       "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
            guesses.append({"image_id": i, "category_id": cat, "score": float(rng.uniform()),
                            "bbox": [v + rng.normal(0, 4) for v in box]})
        guesses += [{"image_id": i, "category_id": int(rng.choice([1, 3, 7, 9])), "score": float(rng.uniform()),
                     "bbox": [*rng.uniform(0, 500, 2), *rng.uniform(8, 128, 2)]} for _ in range(95)]
    gt, dets = _case()
    for case in ((gt, dets), (gt, []), (big, guesses)):
        ref, fast = evaluate_coco(*case), evaluate_coco(*case, backend="faster_coco_eval")
        a, b = metrics_from_cocoeval(ref), metrics_from_cocoeval(fast)
        assert a.keys() == b.keys() and a["per_class"].keys() == b["per_class"].keys()
        for key in set(a) - {"per_class"}:  # None where undefined; counts and names equal; floats to the last bits
            assert (a[key] == b[key] if not isinstance(a[key], float) else a[key] == pytest.approx(b[key], abs=1e-12)), (key, a[key], b[key])
        for name, row in a["per_class"].items():
            assert row.keys() == b["per_class"][name].keys()
            for col, v in row.items():
                assert (v is None) == (b["per_class"][name][col] is None)
                assert v is None or v == pytest.approx(b["per_class"][name][col], abs=1e-12)
        assert np.allclose(ref.eval["precision"], fast.eval["precision"], rtol=0, atol=1e-12)
        assert fast.summary_text.count("Average Precision") == 6  # its summary is printed, and kept, alike
    from trainer.config import load_config
    with pytest.raises(ConfigError, match="eval.coco_backend scores detections"):
        load_config(None, ["task=multiclass", "eval.coco_backend=faster_coco_eval"])
