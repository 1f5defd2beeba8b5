"""eval.monitor's bookkeeping (trainer/monitor.py), in-process: what becomes the best, what early stopping
measures against, and what a resume under another monitor keeps. The runs end to end are in test_ema.py and
test_checkpoint.py."""
from __future__ import annotations

from types import SimpleNamespace

from trainer.monitor import Monitor
from trainer.state import LoopState


class _Task:
    default_monitor = "loss"

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return metric != "loss"


def _monitor(name, loop, patience=0, min_delta=0.0):
    return Monitor(name, SimpleNamespace(patience=patience, min_delta=min_delta), _Task(), loop)


def test_a_nan_evaluation_is_never_the_best_nor_earlys_stoppings_reference():
    """Diverged weights (or an fp16 overflow in evaluation) score NaN: it must not become best/ (every later
    comparison with NaN is False, so it stayed the best for good), nor reset early stopping's count."""
    loop = LoopState()
    monitor = _monitor("loss", loop, patience=2)
    assert monitor.new_best({"loss": 0.5}, 10) and monitor.stop_reason({"loss": 0.5}) is None
    assert not monitor.new_best({"loss": float("nan")}, 20)
    assert monitor.stop_reason({"loss": float("nan")}) is None and loop.stale_evals == 1
    assert monitor.new_best({"loss": 0.4}, 30)
    assert loop.best["update"] == 30 and loop.best["monitor"] == "loss"
    first = LoopState()
    assert not _monitor("loss", first).new_best({"loss": float("inf")}, 1) and first.best["value"] is None


def test_a_resume_under_another_monitor_starts_best_and_early_stopping_afresh():
    """A run resumed with eval.monitor changed from loss to accuracy: the best loss (1.48) is no accuracy, and an
    accuracy could never beat it, so best/ froze; the best and early stopping's reference now start afresh."""
    loop = LoopState()
    assert _monitor("loss", loop, patience=3).new_best({"loss": 1.48, "accuracy": 0.2}, 10)
    loop.reference, loop.stale_evals = 1.48, 2
    saved = LoopState.from_checkpoint({**loop.to_json(1, 0, False), "rng": []})
    resumed = _monitor("accuracy", saved, patience=3)
    assert resumed.changed_from == "loss"
    assert saved.best["value"] is None and saved.reference is None and saved.stale_evals == 0
    assert resumed.new_best({"loss": 1.5, "accuracy": 0.21}, 20) and saved.best["monitor"] == "accuracy"
    same = LoopState.from_checkpoint({**loop.to_json(1, 0, False), "rng": []})
    assert _monitor("loss", same).changed_from is None and same.best["value"] == 1.48  # unchanged: kept
