"""`train(cfg)`: the one training loop, top to bottom.

start-up (the accelerator; the run directory checked and locked by trainer/rundir.py and compared with its own
checkpoint; what the run trains with built by trainer/session.py; its state restored from the newest checkpoint
that verifies by trainer/state.py; every start-up step agreed by all ranks) -> the run directory written ->
the step loop, whose blocks are inline: the task's loss, backward, clip, step with the learning rate from
`lr_at`; at an update: log, save on request or on schedule, stop; at an epoch's end: evaluate, keep the best,
stop early -> at the last update the final model, its reports, the summary and a final checkpoint -> one
teardown, one exit.

What a batch, a loss, a metric or a report is belongs to the task (trainer/tasks); what rides along the weights
(EMA, Lookahead, freezing) to the extensions (trainer/extensions.py), which the loop calls at five points
without knowing which are on; which metric picks the best to trainer/monitor.py; the loop only calls them.

Resuming is exact: the shuffle order is a pure function of (seed, epoch), augmentation of (seed, epoch,
sample), and the checkpoint holds everything else (weights, optimizer, the extensions' state, every rank's
RNG, the position in the epoch's order in samples, the schedule, the logging accumulators), so a resumed run
continues bit for bit, and on another process count continues the same order, each sample once
(trainer/data/order.py; the global batch kept, or its change refused unless allowed: trainer/state.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from trainer import host_memory, preemption, rundir
from trainer.config import Config, batching, to_dict, to_yaml
from trainer.data import data_inputs
from trainer.distributed import agree, check_processes, make_accelerator, print0
from trainer.evaluation import export_scored, rescore_exported, score, write_best_report
from trainer.models import pretrained_source
from trainer.monitor import Monitor
from trainer.optim import lr_at, momentum_at, set_momentum
from trainer.session import build_session
from trainer.state import TrainState, compare_with_checkpoint
from trainer.tracking import LossLog, Tracker, TrainLog


def train(cfg: Config) -> dict:
    t_start = time.time()
    preemption.begin_startup()  # until the step loop: a stop request leaves at once (nothing worth saving yet)
    if cfg.train.deterministic:  # before the first cuBLAS call (CUDA's reproducibility notes)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    # before the first step and before the loader's workers fork (they inherit it): see trainer/host_memory.py
    kept = cfg.train.keep_freed_memory and host_memory.keep_freed_memory()
    try:
        # ---- setup: processes, seeds ----
        acc = make_accelerator(cfg.train.device, cfg.train.mixed_precision, cfg.train.grad_accum_steps,
                               cfg.train.dist_timeout_s)
        say = print0(acc)
        check_processes(acc, say, cfg.train.dist_timeout_s)
        # this start's split of the global batch (train.global_batch_size: derived from the process count)
        cfg.train.batch_size, cfg.train.grad_accum_steps = agree(acc, lambda: batching(cfg.train, acc.num_processes))
        acc.gradient_accumulation_steps = cfg.train.grad_accum_steps
        global_batch = cfg.train.batch_size * acc.num_processes * cfg.train.grad_accum_steps
        set_seed(cfg.seed)  # same on every rank: identical initial weights, one shuffle order

        # ---- run directory: checked and locked by the main process; nothing is written before every check ----
        # Each start-up step runs through `agree`: an error on any rank ends every rank with the same one line.
        cfg.run.dir = agree(acc, lambda: str(cfg.run.dir or rundir.default_run_dir(cfg.run.name)), main_only=True,
                            share=True)
        # model.weights: found (or, if allowed, fetched) now, so that a missing file is refused before any write
        pretrained = agree(acc, lambda: pretrained_source(cfg.model, say), main_only=True, share=True)
        inputs = data_inputs(cfg.data).add("model.weights" if cfg.model.weights else "model.pretrained_path",
                                           pretrained)
        plan = agree(acc, lambda: rundir.open_run(Path(cfg.run.dir), cfg.run.resume, cfg.run.overwrite, inputs),
                     main_only=True, share=True)
        with plan:  # the main process holds the run's lock until the end; a failed start leaves nothing behind
            seen = agree(acc, lambda: compare_with_checkpoint(plan, cfg, to_dict(cfg), global_batch), main_only=True,
                         share=True)
            result, exported = None, False
            if plan.kind != "complete":
                s = build_session(cfg, acc, say)
                ts = train_state(cfg, acc, s, global_batch)
                if plan.kind == "resume":
                    for note in agree(acc, lambda: ts.restore(plan.checkpoint, plan.in_place,
                                                              cfg.run.allow_config_change)):
                        say(f"[trainer] {note}")
                    say(f"[trainer] resuming from {plan.checkpoint} (update {ts.loop.update}, epoch {ts.loop.epoch}, "
                        f"sample {ts.loop.sample_in_epoch} of the epoch's {s.epoch_samples})")
                seen = {"update": ts.loop.update}
                if not ts.loop.done:
                    try:
                        result = run(cfg, acc, plan, s, ts, say, t_start)
                    finally:
                        s.loader.close()
                s = ts = None  # DDP's model released before the process group (gloo aborts at exit otherwise)
            elif agree(acc, lambda: rundir.model_missing(plan, seen), main_only=True, share=True):
                exported = re_export(cfg, acc, plan, say, global_batch)
            if result is None:  # complete: the same command has nothing (more) to do
                for line in rundir.complete_lines(plan.dir, seen, exported):
                    say(line)
                summary = plan.dir / "summary.json"
                result = json.loads(summary.read_text()) if summary.is_file() else {}
            acc.free_memory()
            acc.end_training()  # the one teardown
            return result
    finally:
        preemption.end_startup()
        if kept:
            host_memory.give_back_kept_memory()


def train_state(cfg: Config, acc, s, global_batch: int) -> TrainState:
    """The state a start restores into and checkpoints from: the session's model, optimizer and extensions,
    with the identity a checkpoint is compared against."""
    return TrainState(acc, s.core, s.opt, s.extensions, {
        "config": to_dict(cfg), "data_fingerprint": s.fingerprint, "architecture": cfg.model.name,
        "task": s.task.name, "classes": s.data.classes, "global_batch": global_batch},
        cfg.checkpoint.keep_last, cfg.checkpoint.keep_best, s.schedule, s.total_from)


def re_export(cfg: Config, acc, plan, say, global_batch: int) -> bool:
    """A finished run whose final model (model/) was deleted: exported again from the run's final checkpoint,
    scored on val as the end of training scored it, through the write gate. The final checkpoint is taken after
    the last update (and after Lookahead's last pull), so its weights are the ones first exported; nothing else
    of the run is written. A newest loadable checkpoint that is not the final one (the final one damaged) cannot
    give the final model: that is said, and nothing is written."""
    s = build_session(cfg, acc, say)
    ts = train_state(cfg, acc, s, global_batch)
    agree(acc, lambda: ts.restore(plan.checkpoint, plan.in_place, False, weights_only=True))
    if not ts.loop.done:
        say(f"[trainer] {plan.dir / 'model'} is missing and the newest loadable checkpoint ({plan.checkpoint.name}) "
            f"is not the final one, so the final model cannot be exported again; best/ holds the best model, or "
            f"pass run.overwrite=true to train the run again")
        return False
    scores = score(s.model, s.core, s.val_set, s.task, s.extensions, acc, s.eval_batch, cfg.data.num_workers,
                   s.memory_format, cfg.eval.tta)
    agree(acc, lambda: export_scored(plan.out, "model", s.core, s.extensions, s.task, scores, s.card,
                                     ts.loop.update), main_only=True)
    say(f"[trainer] {plan.dir / 'model'} was missing: exported again from the final checkpoint "
        f"{plan.checkpoint.name} (val {scores.headline()})")
    return True


def run(cfg: Config, acc, plan, s, ts: TrainState, say, t_start: float) -> dict:
    """The run itself, once it is built (`s`: its session.Session) and its state restored: the run directory
    written, the step loop with its inline blocks, and at the last update the final evaluation, export and save."""
    loop, ext, task, core, model, opt = ts.loop, s.extensions, s.task, s.core, s.model, s.opt
    total_updates = ts.schedule.total_updates  # this start's plan, or a resume's re-planned one
    derived = {**s.derived, "total_updates": total_updates}

    def lr_for(update: int) -> float:  # through this module's `lr_at`: the fault drivers' seam (tests/)
        return lr_at(ts.schedule.position(update), **ts.schedule.kwargs)

    def momentum_for(update: int) -> Optional[float]:  # None unless the schedule cycles it (one_cycle)
        return momentum_at(ts.schedule.position(update), **ts.schedule.kwargs)

    # ---- the run directory is written now that every check has passed ----
    loop.run_ids["wandb"] = agree(acc, lambda: loop.run_ids.get("wandb") or rundir.new_run_id(), main_only=True,
                                  share=True)
    resumed_from = plan.checkpoint if plan.kind == "resume" else None
    seen_step = agree(acc, lambda: rundir.start(plan, say, task, to_yaml(cfg), derived, rundir.environment(
        acc.num_processes, str(acc.device), acc.mixed_precision), loop, resumed_from, ts.replanned), main_only=True,
                      share=True)
    tracker = Tracker(acc, plan.out, rows=loop.metrics_rows)
    agree(acc, lambda: tracker.start_loggers(cfg, plan.dir, loop, seen_step), main_only=True)
    say(f"[trainer] {task.name} | {len(s.data.classes)} classes | {len(s.train_set)} train / {len(s.val_set)} val "
        f"images | model {cfg.model.name}")
    say("[trainer] " + " ".join(f"{k}={derived[k]}" for k in (
        "processes", "device", "mixed_precision", "per_device_batch", "grad_accum_steps", "global_batch",
        "batches_per_epoch", "updates_per_epoch", "total_updates", "peak_lr")))
    say(f"[trainer] run directory: {plan.dir}")
    preemption.end_startup()  # from here a stop request is acted on at the next step boundary, after a save

    # ---- what the periodic blocks use ----
    loss_log = LossLog(acc, loop.log, loop.update, task.loss_parts(cfg.model.name))
    monitor = Monitor(cfg.eval.monitor, cfg.train.early_stopping, task, loop)
    if monitor.changed_from:
        say(f"[trainer] eval.monitor is {monitor.name}, was {monitor.changed_from}: best/ and early stopping start "
            f"afresh from this start's evaluations")
    # a bar on a terminal; in a log file (SLURM, CI) a plain line per log step instead
    show_bar = acc.is_main_process and cfg.train.progress_bar and sys.stderr.isatty()
    log_train = TrainLog(acc, tracker, loss_log, loop, lr_for, s.train_set, say, show_bar)

    # this start's best scoring (its outputs for the plots on the main rank), drawn into best/ at the end of the
    # run (eval.best_plots=end): a new best writes its weights, model.json and eval.json at once, the plots once.
    # Memory: one evaluation's outputs more, held between evaluations (what the reports draw from: e.g.
    # classification's N x C probabilities, 200 MB for 50,000 images x 1,000 classes in float32)
    best_scores = None

    def checkpoint(epoch: int, sample_in_epoch: int, done: bool = False) -> None:  # every rank
        ts.save_checkpoint(plan.out, epoch, sample_in_epoch, loss_log, tracker.rows, done)

    # ---- the step loop: epochs of batches; an update when the gradients of `grad_accum_steps` are in ----
    last = loop.update >= total_updates  # (a resume under fewer epochs may start past the end)
    stopped = False
    for epoch in range(loop.epoch, max(cfg.train.epochs, loop.epoch + 1)):
        s.loader.set_epoch(epoch)
        ext.start_epoch(core, epoch)
        # where this epoch starts in its one global order of samples: a resume continues it on any process count
        start = loop.sample_in_epoch if epoch == loop.epoch else 0
        loop.epoch, loop.sample_in_epoch = epoch, start
        bar = tqdm(total=s.batches_per_epoch, initial=s.batches_per_epoch - len(s.loader.dealing.steps(start)),
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=not show_bar or last,
                   dynamic_ncols=True)
        for position, batch in ([] if last else s.loader.steps(start)):
            with acc.accumulate(model):
                ext.before_forward(core)
                loss, _, parts = task.train_loss(model, batch, s.memory_format)
                acc.backward(loss)
                if acc.sync_gradients:
                    ext.before_step(core, epoch)  # e.g. a frozen backbone's gradients dropped: clipping sees the rest
                    if cfg.train.clip_grad_norm is not None:
                        acc.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
                    momentum = momentum_for(loop.update)
                    for group in opt.param_groups:
                        group["lr"] = lr_for(loop.update) * group.get("lr_scale", 1.0)
                        if momentum is not None:
                            set_momentum(group, momentum)
                opt.step()  # a no-op on accumulation micro-batches (accelerate skips it)
                opt.zero_grad(set_to_none=True)
            loss_log.add(loss, parts)
            loop.samples_seen += position - loop.sample_in_epoch  # this micro-step's samples, on every process
            loop.sample_in_epoch = position
            bar.update(1)
            if not acc.sync_gradients:
                continue
            # -- an optimizer update is complete: the only place where the run may be saved or stopped --
            loop.update += 1
            last = loop.update >= total_updates
            ext.after_update(core, loop.update, total_updates)
            if loop.update % cfg.train.log_every_steps == 0:
                bar.set_postfix(loss=f"{log_train(epoch + loop.sample_in_epoch / s.epoch_samples):.4f}")
            save_now, stopped = preemption.agreed(acc)  # asked on any rank: every rank answers alike
            if not last and (save_now or stopped or (cfg.checkpoint.every_steps
                                                     and loop.update % cfg.checkpoint.every_steps == 0)):
                checkpoint(epoch, loop.sample_in_epoch)
                preemption.clear()
            if last or stopped:
                break
        bar.close()
        if stopped and not last:
            say(f"[trainer] stopped on request at update {loop.update}; checkpoint saved. Run the same command to "
                f"resume.")
            break

        # -- the end of an epoch (or of the run): log, evaluate, keep the best, stop early, save --
        last = last or epoch >= cfg.train.epochs - 1
        epoch_float = epoch + loop.sample_in_epoch / s.epoch_samples
        if loss_log.count:
            log_train(epoch_float)
        if last:
            ext.end(core)  # e.g. the final model becomes Lookahead's slow copy
        if last or (cfg.eval.every_epochs and (epoch + 1) % cfg.eval.every_epochs == 0):
            scores = score(model, core, s.val_set, task, ext, acc, s.eval_batch, cfg.data.num_workers,
                           s.memory_format, cfg.eval.tta)
            tracker.log({"type": "eval", "split": "val", "step": loop.update, "epoch": round(epoch_float, 4),
                         "samples_seen": loop.samples_seen, **scores.logged})
            if monitor.new_best(scores.logged, loop.update):
                every = cfg.eval.best_plots == "every"
                agree(acc, lambda: export_scored(plan.out, "best", core, ext, task, scores, s.card, loop.update,
                                                 plots=every), main_only=True)
                best_scores = None if every else scores
            say(f"[eval] step {loop.update} epoch {epoch_float:.2f}: {scores.headline()}"
                + (f" ({ext.scored} weights)" if ext.scorer is not None else ""))
            # the metrics are the same on every rank; rank 0's decision is shared all the same (one tiny collective)
            why = agree(acc, lambda: monitor.stop_reason(scores.logged), main_only=True, share=True)
            if why is not None and not last:
                loop.stopped_early, last = why, True
                say(f"[trainer] {why}: the run ends here, at update {loop.update} of {total_updates}")
        if not last and cfg.checkpoint.every_epochs and (epoch + 1) % cfg.checkpoint.every_epochs == 0:
            checkpoint(epoch + 1, 0)
        if last:
            break

    # ---- the end: the final model, its reports, the summary, a final checkpoint ----
    if stopped and not last:
        result = {"run_dir": str(plan.dir), "stopped": True, "updates": loop.update}
    else:
        result = {"run_dir": str(plan.dir), "task": task.name, "updates": loop.update,
                  "samples_seen": loop.samples_seen, "final": scores.logged, "best": loop.best["metrics"],
                  "monitor": monitor.name, "weights": ext.scored, "stopped_early": loop.stopped_early,
                  "seconds": round(time.time() - t_start, 1),
                  "replaced_images_this_start": log_train.replaced()}
        if best_scores is None and cfg.eval.best_plots == "end" and loop.best["update"] is not None and \
                agree(acc, lambda: (plan.dir / "best" / "model.safetensors").is_file(), main_only=True, share=True):
            # best/ was written by an earlier start of this run (before a resume): its weights scored again (every
            # rank) for the plots; the metrics are those of its eval.json (an evaluation is exact). The main rank
            # looks for the file and every rank follows it: the scoring is collective, and a rank on another node
            # (no shared run directory seen alike) must not skip it alone
            best_scores = rescore_exported(plan.dir / "best", model, core, s.val_set, task, acc, s.eval_batch,
                                           cfg.data.num_workers, s.memory_format, cfg.eval.tta)
        agree(acc, lambda: end_of_run(plan, tracker, s, loop.update, scores, result, best_scores), main_only=True)
        checkpoint(cfg.train.epochs, 0, done=True)  # the same command run again now says "complete"
        say(f"[trainer] final model on the val split:\n{task.summary(scores.metrics)}")
        final, best = (f"{v:.4f}" if v is not None else "n/a" for v in (monitor.value(scores.logged),
                                                                        loop.best["value"]))
        say(f"[trainer] done in {result['seconds']} s: val {monitor.name} {final} (best {best}) on "
            f"{scores.metrics.get('num_samples', scores.metrics.get('num_images'))} images")
        say(f"[trainer] run directory: {plan.dir}  (final model: {plan.dir / 'model'}, best: {plan.dir / 'best'})")
    tracker.close()
    return result


def end_of_run(plan, tracker: Tracker, s, update: int, scores, summary: dict, best_scores=None) -> None:
    """Main process: the final model and its reports, best/'s plots (`best_scores`: the final best's scoring,
    when its plots were left to the end), the training curves, then summary.json (from then on the same command
    says the run is complete); the plots to the loggers that take images."""
    export_scored(plan.out, "model", s.core, s.extensions, s.task, scores, s.card, update)
    if best_scores is not None:  # the final scoring was the best: model/'s report is best/'s, copied, not redrawn
        write_best_report(plan.out, "best", s.task, best_scores, report_of="model" if best_scores is scores else None)
    curves = rundir.finish(plan, summary)
    tracker.log_images({"plots/training_curves": curves or plan.dir / "plots" / "none",
                        **{f"plots/{p.stem}": p for p in sorted((plan.dir / "model" / "plots").glob("*.png"))}},
                       step=update)
