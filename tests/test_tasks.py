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
