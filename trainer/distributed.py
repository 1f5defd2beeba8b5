"""Processes: creating an Accelerator that really runs every launched process, and moving per-sample
results to the main process."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.state import AcceleratorState, PartialState

from trainer.errors import ConfigError, TrainerError


def make_accelerator(device: str, mixed_precision: str, grad_accum_steps: int = 1, timeout_s: int = 900,
                     log_with=None) -> Accelerator:
    """An Accelerator that really runs every launched process, on GPU or (gloo) CPU."""
    use_cpu = device == "cpu" or not torch.cuda.is_available()
    expected = int(os.environ.get("WORLD_SIZE", "1"))
    known = PartialState._shared_state
    if not dist.is_initialized() or (known and known.get("num_processes") != expected):
        # accelerate's state here is stale (an earlier run in this process, or one inherited through fork by
        # a launcher): forget it rather than fail on changed settings or trust a wrong process count
        AcceleratorState._reset_state(reset_partial_state=True)
    if mixed_precision == "fp16" and use_cpu:
        # accelerate would accept this and silently train in fp32
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on CPU use bf16 or no")
    acc = Accelerator(
        cpu=use_cpu,  # without it, CPU processes under torchrun each believe they are alone (world 1)
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        # the shuffle order becomes a pure function of (seed, epoch): what exact resume needs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
        log_with=log_with,
    )
    if acc.num_processes != expected:
        raise TrainerError(f"launched {expected} processes but accelerate sees {acc.num_processes}; "
                           f"on CPU use `accelerate launch --multi_gpu` or torchrun, not `--cpu`")
    return acc


def gather_to_main(local: torch.Tensor, accelerator) -> Optional[torch.Tensor]:
    """Concatenate every rank's rows (in rank order) on the main process; None elsewhere."""
    if accelerator.num_processes == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = local.to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(accelerator.num_processes)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local
    if accelerator.is_main_process:
        parts = [torch.empty_like(padded) for _ in range(accelerator.num_processes)]
        dist.gather(padded, gather_list=parts, dst=0)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]).cpu()
    dist.gather(padded, dst=0)
    return None
