"""Processes: creating an Accelerator that really runs every launched process, and moving per-sample
results to the main process."""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import gather_object

from trainer.errors import ConfigError, TrainerError


def make_accelerator(device: str, mixed_precision: str, grad_accum_steps: int = 1,
                     timeout_s: int = 300) -> Accelerator:
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
    try:
        acc = Accelerator(
            cpu=use_cpu,  # without it, CPU processes under torchrun each believe they are alone (world 1)
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=grad_accum_steps,
            # the shuffle order becomes a pure function of (seed, epoch): what exact resume needs
            # non_blocking: host-to-GPU copies of pinned batches overlap with compute
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=not use_cpu),
            # a finite wait for every collective: a lost peer fails the run instead of hanging for 30 minutes
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
        )
    except (RuntimeError, ValueError) as err:  # DistNetworkError / DistStoreError subclass RuntimeError
        if expected == 1:
            raise
        raise TrainerError(f"could not join the process group at {rendezvous_address()} within {timeout_s} s "
                           f"(rank {os.environ.get('RANK')} of {expected}): {str(err).splitlines()[0]}") from None
    if acc.num_processes != expected:
        raise TrainerError(f"launched {expected} processes but accelerate sees {acc.num_processes}; "
                           f"on CPU use `accelerate launch --multi_gpu` or torchrun, not `--cpu`")
    return acc


def print0(acc):
    """The one print gate: a print that only the global rank 0 does (accelerate's `acc.print` prints once per
    node), flushed at once for SLURM and CI logs. `say = print0(acc)`, then `say(...)` on every rank."""
    def say(*args) -> None:
        if acc.is_main_process:
            print(*args, flush=True)
    return say


def rendezvous_address() -> str:
    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


def check_processes(acc: Accelerator, say, timeout_s: int) -> None:
    """Print who is who (global rank, local rank, host, device) and prove every rank can talk to every
    other one with a barrier and a tiny all-reduce, before any real work."""
    if acc.num_processes == 1:
        return
    me = {"rank": acc.process_index, "local_rank": acc.local_process_index, "host": socket.gethostname(),
          "device": str(acc.device), "pid": os.getpid()}
    try:
        table = gather_object([me])
        acc.wait_for_everyone()
        total = torch.ones(1, device=acc.device)
        dist.all_reduce(total)
    except (RuntimeError, ValueError) as err:
        raise TrainerError(f"processes could not reach each other through {rendezvous_address()} within "
                           f"{timeout_s} s: {str(err).splitlines()[0]}") from None
    if int(total.item()) != acc.num_processes:
        raise TrainerError(f"all-reduce over {acc.num_processes} processes gave {int(total.item())}")
    say(f"[trainer] {acc.num_processes} processes, rendezvous {rendezvous_address()}, backend {dist.get_backend()}")
    say("  rank  local  host                  device     pid")
    for row in table:
        say(f"  {row['rank']:>4}  {row['local_rank']:>5}  {row['host'][:20]:<20}  {row['device']:<9}  {row['pid']}")


def shard_bounds(n: int, rank: int, world: int) -> range:
    """Contiguous shard of range(n) for `rank`: sizes differ by at most one, nothing repeated or dropped."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


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


def gather_objects_to_main(items: list, accelerator) -> Optional[list]:
    """Every rank's list of picklable items (our own in-memory records, never read from a file), concatenated in
    rank order on the main process; None elsewhere: only the main rank holds the whole split's results."""
    if accelerator.num_processes == 1:
        return list(items)
    if accelerator.is_main_process:
        parts = [None] * accelerator.num_processes
        dist.gather_object(items, parts, dst=0)
        return [item for part in parts for item in part]
    dist.gather_object(items, None, dst=0)
    return None


def sync_buffers(model: torch.nn.Module, accelerator) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP copies them from rank 0 only at the start of each forward, and each rank's own training forward then
    updates its copy from its own batch, so after a step the ranks disagree. Before anything that reads them
    on every rank (evaluating each rank's shard, the lookahead average) they are made equal again: rank 0's
    are the ones in checkpoints and exports."""
    if accelerator.num_processes == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


# ---- agreeing on failures: one rank's error ends every rank the same way, never a hang ----

class SharedError(TrainerError):
    """An error every rank raises together, agreed through a collective: rank 0 prints it, the others exit
    quietly with the same code (`exit_code`: 2 for a user's mistake, 1 for a bug on some rank)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def agree(accelerator, fn, main_only: bool = False, share: bool = False, gather: bool = False):
    """Run `fn` on every rank (on the main rank only with `main_only`), then one all-gather of how it went.

    If any rank raised, every rank raises: a user error (TrainerError) as the same SharedError on all ranks;
    a stop request as StopRequested; a bug re-raised with its traceback on its own rank and as a one-line
    SharedError elsewhere. Otherwise returns `fn`'s result: the main rank's on every rank with `share` (it
    must pickle), the list of every rank's, in rank order, with `gather`, each rank's own without either.
    `fn` must run no collective itself: the all-gather here is the one every rank reaches whatever happened,
    which is what keeps a failure on one rank from hanging the others."""
    from trainer.preemption import StopRequested

    if accelerator.num_processes == 1:
        return [fn()] if gather else fn()
    result, failure, original = None, None, None
    try:
        if not main_only or accelerator.is_main_process:
            result = fn()
    except StopRequested as err:
        failure, original = ("stop", str(err)), err
    except TrainerError as err:
        failure, original = ("user", str(err)), err
    except Exception as err:  # a bug: its rank keeps the traceback
        failure, original = ("bug", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"), err
    mine = (accelerator.process_index, failure, result if gather or (share and accelerator.is_main_process) else None)
    everyone = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, mine)
    failed = [(rank, f) for rank, f, _ in everyone if f is not None]
    if failed:
        rank, (kind, message) = failed[0]
        if kind == "stop":
            raise StopRequested(message)
        if original is not None and kind == "bug" and rank == accelerator.process_index:
            raise original
        if kind == "bug":
            raise SharedError(f"rank {rank} failed: {message}", exit_code=1) from None
        raise SharedError(message) from None
    if gather:
        return [r for _, _, r in everyone]
    if not share:
        return result
    return result if accelerator.is_main_process else everyone[0][2]


def main_first(accelerator, fn):
    """`fn` on the main rank, then on the others (e.g. the main rank writes a generated dataset that the
    others then read); errors agreed as in `agree`; each rank gets its own result."""
    mine = agree(accelerator, fn, main_only=True)
    theirs = agree(accelerator, lambda: None if accelerator.is_main_process else fn())
    return mine if accelerator.is_main_process else theirs


def peer_failure(err: BaseException) -> Optional[str]:
    """One line for a collective that failed because another process of the run died, froze or became
    unreachable (gloo: "Connection closed by peer" at once; a frozen peer: a timeout after
    train.dist_timeout_s); None for any other error."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    kinds = {c.__name__ for c in type(err).__mro__}
    text = str(err).strip()
    markers = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
               "NCCL", "gloo", "Socket Timeout")
    if not (kinds & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
            or any(m in text for m in markers)):
        return None
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
    return (f"lost contact with another process of this run (it died, froze or was stopped); the latest "
            f"checkpoint is intact, run the same command to resume. ({type(err).__name__}: {first[:300]})")


def check_launch() -> None:
    """Refuse a launch that asked for several processes and got one: `accelerate launch --cpu
    --num_processes N` (or a MULTI_CPU config) runs a single process without a word (accelerate-on-cpu.md).
    That launcher gives no process count to the child, but it sets MASTER_ADDR for N > 1, so a child of
    accelerate (ACCELERATE_* variables) with MASTER_ADDR, without WORLD_SIZE, and whose parent (the
    launcher) did not have MASTER_ADDR itself, was asked to be one of several."""
    env = os.environ
    if "WORLD_SIZE" in env or "MASTER_ADDR" not in env:
        return
    if "ACCELERATE_MIXED_PRECISION" not in env and "ACCELERATE_DYNAMO_BACKEND" not in env:
        return
    try:
        parent = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\0")
    except OSError:
        return  # not Linux, or not allowed to look: no check rather than a false alarm
    if any(v.startswith(b"MASTER_ADDR=") for v in parent):
        return  # inherited from the user's shell, not set by the launcher
    raise ConfigError("accelerate launch started one process although several were asked for (its --cpu flag and "
                      "MULTI_CPU configs run a single process); on CPU use `accelerate launch --multi_gpu "
                      "--num_processes N` (gloo) or `torchrun --nproc_per_node N`")
