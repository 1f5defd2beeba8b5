"""The one evaluation, used by training and by `trainer eval`: the split is cut into batches at fixed
positions (images [kB, (k+1)B)), and process r takes batches r, r + W, r + 2W, ...: nothing padded or
repeated, and every batch holds the same images on any number of processes, so each image's logits are the
same floats whether 1 or 8 processes evaluate (a network's arithmetic can depend on what else is in the batch).
Each process runs its batches through the unwrapped model (no collective per batch, so uneven shares cannot
hang) and hands each batch's outputs to the task's evaluator, which knows the split index of every image it
is given (`indices`); the evaluator's `finish` is the one collective, puts everything back in split order
and gives every rank the same metrics. What is gathered and how it is scored is the task's (trainer/tasks).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Subset

from trainer.distributed import gather_to_main, sync_buffers
from trainer.errors import TrainerError
from trainer.metrics import headline, scalar_metrics
from trainer.tasks import report_files


def batch_share(n: int, batch_size: int, rank: int, world: int) -> list:
    """The split indices process `rank` of `world` evaluates: whole batches k = rank, rank + world, ..."""
    return [i for start in range(rank * batch_size, n, world * batch_size)
            for i in range(start, min(start + batch_size, n))]


def split_order(indices: torch.Tensor, num_samples: int, accelerator) -> "torch.Tensor | None":
    """On the main rank, the permutation that puts the gathered (rank-ordered) rows back in split order, after
    checking that every image of the split is there exactly once; None elsewhere."""
    gathered = gather_to_main(indices, accelerator)
    if gathered is None:
        return None
    order = torch.argsort(gathered)
    if gathered.numel() != num_samples or not torch.equal(gathered[order], torch.arange(num_samples)):
        # by construction impossible; a loud check, never a silent miscount
        raise TrainerError(f"evaluation gathered {gathered.numel()} samples for a split of {num_samples} "
                           f"(each must come exactly once)")
    return order


@torch.no_grad()
def evaluate(model, dataset, task, accelerator, batch_size: int, num_workers: int = 0,
             memory_format=torch.contiguous_format, tta: str = "none", evaluator=None) -> Tuple[dict, Optional[dict]]:
    """(metrics, the same on every rank; outputs, on the main rank for reports, None elsewhere).
    `model` may be wrapped (DDP): its unwrapped module runs. `evaluator` defaults to the task's own."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    mine = batch_share(len(dataset), batch_size, accelerator.process_index, accelerator.num_processes)
    evaluator = evaluator or task.evaluator(dataset, torch.tensor(mine, dtype=torch.int64))  # its images' indices
    loader = DataLoader(Subset(dataset, mine), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=accelerator.device.type == "cuda", collate_fn=task.collate)
    try:
        with evaluation_threads(accelerator.device):
            for batch in loader:
                batch = task.to_device(batch, accelerator.device, memory_format)
                with accelerator.autocast():
                    outputs = task.forward(net, batch, tta)
                evaluator.add(batch, outputs)
    finally:
        net.train(was_training)
    return evaluator.finish(accelerator)


@contextmanager
def evaluation_threads(device):
    """One thread per process while evaluating (and predicting) on a CPU: a CPU convolution's float rounding
    depends on how many threads split it (measured: a segmentation loss differed in the 11th digit between 2
    threads and 1), and an evaluation must give the same numbers whether 1 process with all cores or N with one
    each, and `trainer predict` the same as `trainer eval`."""
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- scoring a run's weights during training, and exporting the scored ones ----

class Scores(NamedTuple):
    """One scoring: the metrics of the scored weights (the same on every rank), their outputs for the reports
    (main rank), and every scalar to log (with the EMA evaluated both ways, the raw weights' as raw_<name>)."""
    metrics: dict
    outputs: Optional[dict]
    logged: dict

    def headline(self) -> str:
        return headline(self.metrics)


def score(model, core, dataset, task, extensions, accelerator, batch_size: int, num_workers: int,
          memory_format, tta: str) -> Scores:
    """Every rank: the validation split scored on each of the weights the extensions name (the EMA's, the raw
    ones, or both), with rank 0's BatchNorm statistics on every rank."""
    sync_buffers(core, accelerator)  # every rank scores its shard with rank 0's BN statistics
    logged, scored = {}, None
    for prefix, weights in extensions.evaluations(core, accelerator):
        with weights:
            metrics, outputs = evaluate(model, dataset, task, accelerator, batch_size, num_workers, memory_format, tta)
        logged.update({prefix + k: v for k, v in scalar_metrics(metrics).items()})
        if prefix == extensions.scored_prefix():
            scored = (metrics, outputs)
    return Scores(scored[0], scored[1], logged)


def export_scored(out, target: str, core, extensions, task, scores: Scores, card: dict, step: int,
                  plots: bool = True) -> None:
    """Main process: the scored weights with model.json (the model card, the task's fields with the threshold
    used, the step, which weights, their metrics) and the task's report, replacing the run's folder `target`
    (model or best) in one rename through the write gate. `plots=False`: eval.json only, the plots left to
    `write_best_report` at the end of the run (a new best during training: eval.best_plots=end)."""
    from trainer.export import write_model
    from trainer.reports import start_report

    with out.replacing(target, fsync=True) as tmp:  # a reader never sees half a model
        with extensions.scored_weights(core):
            write_model(core, tmp, {**card, **task.export_meta(scores.metrics), "step": step,
                                    "weights": extensions.scored, "metrics": scalar_metrics(scores.metrics)})
        if plots:
            task.write_report(tmp, scores.metrics, scores.outputs)
        else:  # the same eval.json the report starts with (trainer.reports.start_report), no figure drawn
            start_report(tmp, scores.metrics, "eval.json")


def rescore_exported(folder: Path, model, core, dataset, task, accelerator, batch_size: int, num_workers: int,
                     memory_format, tta: str) -> Scores:
    """Every rank: the weights exported in `folder` (a run's best/, written by an earlier start of the run)
    scored again, for the plots of its report; the run's own weights are put back afterwards. An evaluation is
    a pure function of the weights (see the module docstring), so the metrics are those of its eval.json."""
    from trainer.files import load_safetensors

    exported = load_safetensors(Path(folder) / "model.safetensors", "best model weights")
    kept = {k: v.detach().clone() for k, v in core.state_dict().items()}
    core.load_state_dict(exported, strict=True)
    try:
        # under a forked RNG: a DataLoader draws its base seed from torch's, and this scoring happens only after a
        # resume, so the final checkpoint's RNG state is the same as an uninterrupted run's
        with torch.random.fork_rng(devices=[]):
            metrics, outputs = evaluate(model, dataset, task, accelerator, batch_size, num_workers, memory_format, tta)
    finally:
        core.load_state_dict(kept, strict=True)
    return Scores(metrics, outputs, scalar_metrics(metrics))


def write_best_report(out, target: str, task, scores: Scores, report_of: Optional[str] = None) -> None:
    """Main process, at the end of a run: the folder `target` (best) again, its weights and model.json as they
    are, with the task's whole report (eval.json and plots) of `scores`, its scoring; one rename through the
    write gate, like every export. `report_of`: a folder of the run (model) whose report is of these very
    scores (the final evaluation was the best), copied byte for byte instead of drawn again: a report is a pure
    function of the scores, and drawing the plots was most of the end of a run (BENCHMARKS.md, vs_reference)."""
    with out.replacing(target, fsync=True) as tmp:
        for name in ("model.safetensors", "model.json"):  # as export_scored wrote them: the bytes, unchanged
            (tmp / name).write_bytes((out.root / target / name).read_bytes())
        if report_of is None:
            task.write_report(tmp, scores.metrics, scores.outputs)
            return
        # only the files the task's report writes: anything else in that folder is not this report's (a user's
        # file put there must not turn up in best/ as if the trainer had made it)
        source = out.root / report_of
        for rel in report_files(task):
            if (source / rel).is_file():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes((source / rel).read_bytes())
