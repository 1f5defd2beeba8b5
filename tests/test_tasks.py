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

def _tiny_batch(task, n=6, side=16):
    torch.manual_seed(0)
    return torch.randn(n, 3, side, side), torch.randint(0, len(task.classes), (n,))


@pytest.mark.parametrize("name", sorted(__import__("trainer.tasks", fromlist=["TASKS"]).TASKS))
def test_every_task_keeps_the_contract(name, tmp_path):
    """Built from classes, counts and its config sections; a loss to backpropagate; an evaluator whose finish
    gives metrics naming what eval.monitor may name; a report and model.json fields; rebuilt from model.json."""
    from trainer.config import Config
    from trainer.distributed import make_accelerator
    from trainer.evaluation import evaluate
    from trainer.models import build_model
    from trainer.tasks import build_task, task_from_meta

    cfg = Config()
    classes = ["a", "b"] if name == "binary" else ["a", "b", "c"]
    task = build_task(name, classes, [4] * len(classes), cfg.loss, cfg.eval)
    assert task.name == name and task.classes == classes
    model = build_model("small_cnn", task.num_outputs, image_size=16)
    batch = _tiny_batch(task)
    loss, n = task.train_loss(model, batch)
    assert loss.ndim == 0 and n == 6
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    dataset = list(zip(*_tiny_batch(task, n=7)))  # (image, label) pairs: an odd-sized split
    acc = make_accelerator("cpu", "no")
    metrics, outputs = evaluate(model, dataset, task, acc, batch_size=3)
    assert metrics["num_samples"] == 7
    assert cfg.eval.monitor in task.metric_names() and set(task.metric_names()) <= set(metrics)
    task.write_report(tmp_path, metrics, outputs)
    assert (tmp_path / "eval.json").is_file()
    meta = task.export_meta(metrics)
    assert meta["task"] == name and meta["classes"] == classes and meta["num_outputs"] == task.num_outputs
    again = task_from_meta(meta)
    assert again.name == name and again.classes == classes and again.num_outputs == task.num_outputs
    assert isinstance(task.summary(metrics), str) and task.higher_is_better("accuracy")
    acc.end_training()


def test_task_options_are_checked_against_the_data():
    from trainer.config import Config
    from trainer.tasks import build_task

    cfg = Config()
    cfg.loss.label_smoothing = 0.1
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_task("auto", ["a", "b"], [1, 1], cfg.loss, cfg.eval)
    cfg = Config()
    cfg.eval.monitor = "f1"
    with pytest.raises(ConfigError, match="eval.monitor"):
        build_task("auto", ["a", "b", "c"], [1, 1, 1], cfg.loss, cfg.eval)
