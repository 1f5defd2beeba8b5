"""The one evaluation, used by training and by `trainer eval`: the split is cut into contiguous shards
without padding (sizes differ by at most one; trainer.distributed.shard_bounds), each process runs its shard
through the unwrapped model (no collective per batch, so uneven shards cannot hang) and hands each batch's
outputs to the task's evaluator; the evaluator's `finish` is the one collective, and every rank gets the
same metrics. What is gathered and how it is scored is the task's (trainer/tasks).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from trainer.distributed import shard_bounds


@torch.no_grad()
def evaluate(model, dataset, task, accelerator, batch_size: int, num_workers: int = 0,
             memory_format=torch.contiguous_format, tta: str = "none", evaluator=None) -> Tuple[dict, Optional[dict]]:
    """(metrics, the same on every rank; outputs, on the main rank for reports, None elsewhere).
    `model` may be wrapped (DDP): its unwrapped module runs. `evaluator` defaults to the task's own."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    evaluator = evaluator or task.evaluator(len(dataset))
    mine = shard_bounds(len(dataset), accelerator.process_index, accelerator.num_processes)
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=accelerator.device.type == "cuda", collate_fn=task.collate)
    try:
        for batch in loader:
            batch = task.to_device(batch, accelerator.device, memory_format)
            with accelerator.autocast():
                outputs = task.forward(net, batch, tta)
            evaluator.add(batch, outputs)
    finally:
        net.train(was_training)
    return evaluator.finish(accelerator)
