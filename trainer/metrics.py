"""What every task's metrics share: the single-number ones (for metrics.jsonl, W&B and model.json) and a
one-line headline of them for logs. Each task computes its own metrics (trainer/tasks/*_metrics.py).
"""
from __future__ import annotations

import math


def is_number(value, finite: bool = False) -> bool:
    """An int or a float, not a bool (which Python counts as an int); with `finite`, not nan or inf either."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (not finite or math.isfinite(value))


def scalar_metrics(metrics: dict) -> dict:
    """The single-number metrics (None where undefined), for metrics.jsonl, W&B and model.json."""
    return {k: v for k, v in metrics.items() if v is None or is_number(v)}


def headline(metrics: dict) -> str:
    """One line of the scalar metrics, for logs."""
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in scalar_metrics(metrics).items() if v is not None)
