import pytest
import torch
import torch.nn.functional as F

from trainer.errors import ConfigError
from trainer.tasks import Task, class_weights, resolve_task


def test_binary_is_one_logit_bce_and_sigmoid_threshold():
    task = Task("binary", 2, pos_weight=3.0)
    assert task.num_outputs == 1
    logits = torch.tensor([[2.0], [-1.0], [0.1]])
    labels = torch.tensor([1, 0, 0])
    expected = F.binary_cross_entropy_with_logits(logits.view(-1), labels.float(), pos_weight=torch.tensor(3.0))
    assert torch.allclose(task.loss(logits, labels), expected)
    probs = task.probabilities(logits)
    assert torch.allclose(probs[:, 1], torch.sigmoid(logits.view(-1)))
    assert torch.allclose(probs.sum(1), torch.ones(3))
    assert task.predict(probs, 0.5).tolist() == [1, 0, 1]
    assert task.predict(probs, 0.6).tolist() == [1, 0, 0]


def test_multiclass_is_cross_entropy_and_softmax():
    task = Task("multiclass", 3, label_smoothing=0.1)
    logits = torch.randn(5, 3)
    labels = torch.tensor([0, 1, 2, 1, 0])
    assert torch.allclose(task.loss(logits, labels), F.cross_entropy(logits, labels, label_smoothing=0.1))
    assert torch.allclose(task.probabilities(logits), torch.softmax(logits, 1))
    assert torch.equal(task.predict(task.probabilities(logits)), logits.argmax(1))


def test_class_weights_match_cross_entropy_weighting():
    counts = [30, 10]
    w = class_weights(counts)
    assert w == pytest.approx([40 / 60, 40 / 20])
    task = Task("multiclass", 2, weights=w)
    logits, labels = torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 0, 1])
    assert torch.allclose(task.loss(logits, labels), F.cross_entropy(logits, labels, weight=torch.tensor(w)))


def test_resolve_task():
    assert resolve_task("auto", 2) == "binary"
    assert resolve_task("auto", 5) == "multiclass"
    assert resolve_task("multiclass", 2) == "multiclass"
    with pytest.raises(ConfigError):
        resolve_task("binary", 3)


# ---- the task protocol: one contract, checked for every entry of TASKS ----

@pytest.mark.parametrize("name", sorted(__import__("trainer.tasks", fromlist=["TASKS"]).TASKS))
def test_every_task_keeps_the_contract(name, tmp_path):
    """Built from classes, counts and its config sections; a model of its own; a loss to backpropagate; an
    evaluator whose finish gives metrics naming what eval.monitor may name; a report and model.json fields;
    rebuilt from model.json; a writer of predictions. Each task gives its own tiny case (`example`)."""
    from trainer.config import Config
    from trainer.distributed import make_accelerator
    from trainer.evaluation import evaluate
    from trainer.outputs import Inputs
    from trainer.prediction_files import Given
    from trainer.tasks import TASKS, build_task, implementation, task_from_meta

    example = implementation(TASKS[name]).example(name, tmp_path)
    classes, model_name = example.classes, example.model
    cfg = Config()
    cfg.model.name = model_name
    for key, value in example.config.items():
        *path, last = key.split(".")
        section = cfg
        for part in path:
            section = getattr(section, part)
        setattr(section, last, value)
    task = build_task(name, classes, [4] * len(classes), cfg.loss, cfg.eval, cfg.data, cfg.model,
                      example.category_ids)
    assert task.name == name and task.classes == classes
    model = task.build_model(model_name, 16)
    batch, dataset, x = example.batch, example.dataset, example.inputs
    loss, n, parts = task.train_loss(model, batch)
    assert loss.ndim == 0 and n == 6 and set(parts) == set(task.loss_parts(model_name))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    acc = make_accelerator("cpu", "no")
    metrics, outputs = evaluate(model, dataset, task, acc, batch_size=3)
    assert metrics.get("num_samples", metrics.get("num_images")) == 7
    monitor = cfg.eval.monitor or task.default_monitor
    assert monitor in task.metric_names() and set(task.metric_names()) <= set(metrics)
    task.write_report(tmp_path, metrics, outputs)
    assert (tmp_path / "eval.json").is_file()
    meta = task.export_meta(metrics)
    assert meta["task"] == name and meta["classes"] == classes and meta["num_outputs"] == task.num_outputs
    again = task_from_meta(meta)
    assert again.name == name and again.classes == classes and again.num_outputs == task.num_outputs
    assert isinstance(task.summary(metrics), str)
    assert task.higher_is_better(monitor) and not task.higher_is_better("loss")
    output = example.output
    found = Given([(str(tmp_path / "in" / "p.png"), str(tmp_path / "in")),
                   (str(tmp_path / "in" / "q.png"), str(tmp_path / "in"))], [str(tmp_path / "in")], [],
                  Inputs([("the input folder", tmp_path / "in")]))
    writer = task.prediction_writer(str(tmp_path / output), found)
    images = [torch.zeros(3, 10, 12, dtype=torch.uint8), torch.zeros(3, 9, 9, dtype=torch.uint8)]
    writer.add(found.images, task.forward(model.eval(), (x[:2],)), [(10, 12), (9, 9)], images)
    assert writer.close() == 2
    acc.end_training()


def test_task_options_are_checked_against_the_data():
    from trainer.config import Config
    from trainer.tasks import build_task

    cfg = Config()
    cfg.loss.label_smoothing = 0.1
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_task("auto", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data)
    cfg = Config()
    cfg.eval.monitor = "f1"
    with pytest.raises(ConfigError, match="eval.monitor"):
        build_task("auto", ["a", "b", "c"], [1, 1, 1], cfg.loss, cfg.eval, cfg.data)
    cfg = Config()
    cfg.data.format = "masks"
    with pytest.raises(ConfigError, match="task=segmentation"):
        build_task("multiclass", ["a", "b", "c"], [1, 1, 1], cfg.loss, cfg.eval, cfg.data)
    cfg.eval.monitor = "accuracy"
    with pytest.raises(ConfigError, match="not a segmentation metric"):
        build_task("auto", ["a", "b", "c"], [1, 1, 1], cfg.loss, cfg.eval, cfg.data)
    cfg = Config()
    cfg.loss.name = "dice"
    with pytest.raises(ConfigError, match="loss.name=dice is for segmentation"):
        build_task("auto", ["a", "b", "c"], [1, 1, 1], cfg.loss, cfg.eval, cfg.data)


def test_a_detector_takes_its_size_from_the_data_unless_its_size_is_fixed():
    """data.image_size becomes the detector's min_size (max_size x 1333/800); SSDlite, fixed at 320, ignores the
    derived sizes but refuses one given explicitly."""
    from trainer.config import Config
    from trainer.tasks import build_task

    cfg = Config()
    cfg.data.format, cfg.data.image_size, cfg.model.name = "coco", 96, "retinanet_small"
    task = build_task("detection", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data, cfg.model, [1, 2])
    assert task.resolved("retinanet_small")["min_size"] == 96 and task.resolved("retinanet_small")["max_size"] == 160
    cfg.model.name = "ssdlite320_mobilenet_v3_large"
    task = build_task("detection", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data, cfg.model, [1, 2])
    assert "min_size" not in task.resolved(cfg.model.name)
    cfg.model.detection.min_size = 64
    with pytest.raises(ConfigError, match="min_size"):
        build_task("detection", ["a", "b"], [1, 1], cfg.loss, cfg.eval, cfg.data, cfg.model, [1, 2])
