"""Where a run is in an epoch, counted in global samples, and how the rest of the epoch is dealt to the processes.

Each epoch has one global order of dataset indices, a pure function of (seed, epoch) (`shuffled_order`; the
weighted sampler draws its own list, also from (seed, epoch)), whatever the number of processes. A micro-step
trains one chunk of it: `batch_size x processes` consecutive positions, rank r taking positions
[r x B, (r + 1) x B) of the chunk (the dealing accelerate's batch-sampler sharding did before, so the order of
runs started before this module is unchanged). A run's position is the global index of the next untrained
sample of that order (a checkpoint stores it), so a resume on any number of processes deals the remaining
positions to its own ranks: every sample of the epoch is trained once, none skipped, none repeated.

The last chunk of an epoch, when smaller than `batch_size x processes`: dropped under drop_last; else split as
evenly as possible (sizes differ by at most one), kept when every rank gets at least one sample (DDP needs every
rank to step), dropped otherwise (at most processes - 1 samples; an uninterrupted run on that process count
does the same).

TRAINER_SAMPLE_TRACE=<prefix> (tests only) appends each micro-step's dataset indices of this rank to
<prefix>.rank<r> as `epoch position rank i,j,...` when the step's batch is dealt, after a `start epoch position
processes attempt` line at each epoch a process starts, so that a test can prove the union of a stopped and
resumed run's samples. The attempt: TRAINER_SAMPLE_TRACE_ATTEMPT (a test numbers its launches), else SLURM's
SLURM_RESTART_COUNT (a requeued job), else 0.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence, Tuple

import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState

from trainer.distributed import shard_bounds

TRACE_ENV = "TRAINER_SAMPLE_TRACE"


def shuffled_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of range(n): the draw of accelerate's SeedableRandomSampler (a generator seeded
    with seed + epoch, torch.randperm), which fed the DataLoader path before; kept so that a checkpoint of an
    earlier version resumes in the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


@dataclass(frozen=True)
class Dealing:
    """How an epoch of `length` positions is dealt: `batch_size` per process, `processes` ranks."""
    length: int  # positions in the epoch's order (its sample count; the weighted sampler's draw count)
    batch_size: int  # per process
    processes: int
    drop_last: bool

    @property
    def chunk(self) -> int:
        return self.batch_size * self.processes

    @property
    def end(self) -> int:
        """The position an epoch ends at: `length` less the dropped last chunk, if it is dropped."""
        tail = self.length % self.chunk
        return self.length - tail if tail and (self.drop_last or tail < self.processes) else self.length

    def steps(self, start: int = 0) -> List[Tuple[int, int]]:
        """The micro-steps from position `start`: (first, last + 1) global positions of each chunk."""
        return [(p, min(p + self.chunk, self.end)) for p in range(start, self.end, self.chunk)]

    def steps_per_epoch(self) -> int:
        return len(self.steps())

    def rank_slice(self, first: int, stop: int, rank: int) -> range:
        """Rank `rank`'s positions of the chunk [first, stop)."""
        if stop - first == self.chunk:
            return range(first + rank * self.batch_size, first + (rank + 1) * self.batch_size)
        part = shard_bounds(stop - first, rank, self.processes)
        return range(first + part.start, first + part.stop)


def rank_batches(order: Sequence[int], dealing: Dealing, rank: int, epoch: int, start: int
                 ) -> Iterator[Tuple[int, List[int]]]:
    """(position after the step, this rank's dataset indices) of each micro-step from `start`; traced when
    TRAINER_SAMPLE_TRACE is set."""
    trace = Trace.open(rank)
    if trace is not None:
        trace.line(f"start {epoch} {start} {dealing.processes} {Trace.attempt()}")
    for first, stop in dealing.steps(start):
        part = dealing.rank_slice(first, stop, rank)
        mine = [int(i) for i in order[part.start:part.stop]]
        if trace is not None:
            trace.line(f"{epoch} {first} {rank} {','.join(map(str, mine))}")
        yield stop, mine


class Trace:
    """The test-only sample trace (module docstring); one file per rank, appended line by line."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def open(cls, rank: int):
        prefix = os.environ.get(TRACE_ENV)
        return cls(f"{prefix}.rank{rank}") if prefix else None

    @staticmethod
    def attempt() -> int:
        return int(os.environ.get(TRACE_ENV + "_ATTEMPT") or os.environ.get("SLURM_RESTART_COUNT") or 0)

    def line(self, text: str) -> None:
        with open(self.path, "a") as fh:  # a test's own file, named by its environment (not a run's output)
            fh.write(text + "\n")


class EpochSteps(DataLoaderStateMixin):
    """What accelerate must know of a training loader: where the epoch ends (`accelerator.accumulate` syncs the
    gradients at its last micro-step, as it does for a DataLoader it prepared). Both loaders deal their own
    batches (above), so neither is prepared by accelerate."""

    _drop_last = True  # accelerate reads it; its remainder bookkeeping serves gather_for_metrics, not training

    def stepping(self, steps: Iterable, count: int) -> Iterator:
        """`steps` (the epoch's `count` remaining micro-steps), with the end of the epoch flagged at the last."""
        self.gradient_state = GradientState()  # accelerate's shared state (one per process)
        self.begin()
        try:
            for i, step in enumerate(steps):
                self.end_of_dataloader = i == count - 1
                yield step
        finally:
            self.end()

    def close(self) -> None:
        """Stops what the loader keeps running between epochs (WorkerLoader: its persistent workers)."""
