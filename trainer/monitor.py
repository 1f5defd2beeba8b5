"""eval.monitor: the metric that picks best/ and may end a run early, which way is better, the best so far.

`raw_<metric>` (with ema.evaluate=both) names the task's <metric> scored on the raw weights, not the EMA's: this
module owns that prefix; the task only ever sees its own metric names. The state (the best so far, the
evaluations without improvement and the value they are measured against) is the run's `LoopState`, so a
checkpoint holds it and a resumed run decides as an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Optional

RAW = "raw_"


def names_raw(monitor: Optional[str]) -> bool:
    """eval.monitor names a metric of the raw weights (raw_<metric>)."""
    return bool(monitor) and monitor.startswith(RAW)


def task_metric(monitor: Optional[str]) -> Optional[str]:
    """The task's own name of the monitored metric (raw_accuracy -> accuracy)."""
    return monitor.removeprefix(RAW) if monitor else monitor


class Monitor:
    """The monitored metric of a run (`name`: eval.monitor, or the task's default), its direction, and the
    early-stopping rule (train.early_stopping: patience evaluations without an improvement larger than
    min_delta; patience 0 = never)."""

    def __init__(self, monitor: Optional[str], stopping, task, loop):
        self.name = monitor or task.default_monitor
        self.sign = 1 if task.higher_is_better(task_metric(self.name)) else -1
        self.stopping, self.loop = stopping, loop
        # eval.monitor changed on a resume: the best so far and early stopping's reference were values of
        # another metric (an accuracy could never beat a best loss of 1.5), so both start afresh here
        self.changed_from = loop.best.get("monitor")
        if self.changed_from in (None, self.name):
            self.changed_from = None
        else:
            loop.best = {"value": None, "update": None, "metrics": None}
            loop.reference, loop.stale_evals = None, 0

    def value(self, logged: dict) -> Optional[float]:
        return logged.get(self.name)

    def new_best(self, logged: dict, update: int) -> bool:
        """After an evaluation: is it the best so far? If so it is remembered (every rank: the metrics agree)."""
        value, best = self.value(logged), self.loop.best["value"]
        if not _finite(value) or (best is not None and self.sign * value <= self.sign * best):
            return False  # a NaN (diverged weights, an fp16 overflow) is never the best
        self.loop.best = {"value": value, "update": update, "metrics": logged, "monitor": self.name}
        return True

    def stop_reason(self, logged: dict) -> Optional[str]:
        """After an evaluation: why the run stops now (early stopping), or None."""
        value, rule, loop = self.value(logged), self.stopping, self.loop
        if not rule.patience or value is None:
            return None
        if _finite(value) and (loop.reference is None or self.sign * (value - loop.reference) > rule.min_delta):
            loop.reference, loop.stale_evals = value, 0
            return None
        loop.stale_evals += 1
        if loop.stale_evals < rule.patience:
            return None
        return (f"early stopping: {self.name} did not improve on {loop.reference:.6g} by more than {rule.min_delta} "
                f"in {rule.patience} evaluation(s)")


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)
