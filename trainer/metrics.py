"""Evaluation: gather per-sample outputs from every process, then compute every metric once from them.

Per-sample probabilities, labels and losses are gathered with `gather_for_metrics` inside the loop (it
drops the duplicates that even batching adds on the last step), so metrics are computed over exactly
len(split) samples on any number of processes; nothing is averaged per batch or per rank.

Memory: every rank holds the gathered (N, C) float32 probabilities, N x C x 4 bytes
(e.g. 50,000 x 1,000 classes = 200 MB).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch

from trainer.tasks import Task


@torch.no_grad()
def collect_outputs(model, loader, task: Task, accelerator) -> Dict[str, np.ndarray]:
    """(probs (N, C), labels (N,), losses (N,)) over the whole split, identical on every rank."""
    model.eval()
    probs, labels, losses = [], [], []
    for x, y in loader:
        logits = model(x)
        per_sample = task.loss(logits, y, reduction="none")
        p, y, l = accelerator.gather_for_metrics((task.probabilities(logits), y, per_sample))
        probs.append(p.float().cpu())
        labels.append(y.cpu())
        losses.append(l.float().cpu())
    model.train()
    if not probs:
        return {"probs": np.zeros((0, task.num_classes), np.float32), "labels": np.zeros(0, np.int64),
                "losses": np.zeros(0, np.float32)}
    return {"probs": torch.cat(probs).numpy(), "labels": torch.cat(labels).numpy(),
            "losses": torch.cat(losses).numpy()}


def topk_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction whose true class is among the k highest probabilities (ties broken by class index)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def compute_metrics(probs: np.ndarray, labels: np.ndarray, losses: np.ndarray, task: Task,
                    threshold: float = 0.5, topk: Sequence[int] = (5,)) -> Dict[str, float]:
    n = int(len(labels))
    out: Dict[str, float] = {"num_samples": n}
    if n == 0:
        return out
    preds = task.predict(torch.from_numpy(probs), threshold).numpy()
    out["loss"] = float(np.mean(losses, dtype=np.float64))
    out["accuracy"] = float((preds == labels).mean())
    if task.kind == "binary":
        out["threshold"] = float(threshold)
    else:
        for k in sorted({min(k, task.num_classes) for k in topk}):
            if k > 1:
                out[f"top{k}_accuracy"] = topk_accuracy(probs, labels, k)
    return out


def higher_is_better(metric: str) -> bool:
    return not (metric == "loss" or metric.endswith("_loss"))


def format_metrics(metrics: Dict[str, float], keys: List[str] = None) -> str:
    keys = keys or [k for k in metrics if isinstance(metrics[k], (int, float))]
    return "  ".join(f"{k}={metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}"
                     for k in keys if k in metrics)
