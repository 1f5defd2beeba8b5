"""Command line: `trainer train|eval|predict|export|...`. Parses, loads the config, calls one function.

User mistakes (TrainerError: config, data, paths, model names) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from trainer.errors import ConfigError, TrainerError
from trainer.preemption import StopRequested

EXIT_STOPPED = 3  # stopped on request (signal) after saving a checkpoint: run the same command to resume
USAGE_EXAMPLES = """examples:
  trainer train configs/quickstart_multiclass.yaml train.epochs=3 optim.lr=0.01
  accelerate launch --multi_gpu --num_processes 2 -m trainer train configs/quickstart_binary.yaml
  torchrun --nproc_per_node 2 -m trainer train configs/quickstart_binary.yaml
  trainer eval --model runs/my-run data.root=/data/images eval.split=test
  trainer train configs/quickstart_segmentation.yaml
  trainer train configs/detection_folder.yaml data.root=/data/coco
  trainer predict --model runs/my-run/model images/ --output preds.csv
  trainer export --model runs/my-run --format onnx --output my-run.onnx --images images/
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trainer", description="Distributed trainer for CNN image models: binary, multi-class and multi-label\n"
                                "classification, semantic segmentation and object detection, on one or many\n"
                                "processes (CPU or GPU).",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=USAGE_EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           description="`trainer COMMAND --help` says more about each")

    def command(name: str, text: str) -> argparse.ArgumentParser:  # its line in `trainer --help` heads its own help
        return sub.add_parser(name, help=text, description=text)
    t = command("train", "train a model from a recipe plus key=value overrides into a run directory; the same "
                       "command again resumes it from its latest checkpoint")
    t.add_argument("recipe", help="YAML recipe (configs/*.yaml), or - for the defaults")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=0.01 train.epochs=5")
    t.add_argument("--resume", metavar="PATH", help="resume from this checkpoint folder or run folder "
                   "(same as run.resume=PATH; by default an existing run.dir resumes from its latest checkpoint)")
    e = command("eval", "score an exported model on a dataset split (a folder of class folders without "
                       "train/val/test: every image) and write eval.json with its plots")
    e.add_argument("--model", required=True, help="a run folder or an exported model folder")
    e.add_argument("--output", help="where to write eval.json, its plots in plots/ beside it (default: the model's "
                   "run folder)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --output file (and plots beside "
                   "it) that the trainer did not write")
    e.add_argument("overrides", nargs="*", help="key=value for data.* and eval.*, e.g. eval.split=test")
    pk = command("pack", "pack an image, masks, COCO or multi-label CSV folder into a few large shards "
                        "(data.format=shards): one file per few hundred MB instead of one per image; resumable, "
                        "every image checked once")
    pk.add_argument("src", help="the image folder (train/ [val/ test/] of class folders, or class folders), a "
                    "masks folder (<split>/images + <split>/masks + classes.txt), a COCO folder (as "
                    "data.format=coco reads it) or a multi-label CSV folder (train.csv, val.csv [test.csv])")
    pk.add_argument("dest", help="a new or empty folder for the shards (or one a cut-short pack left: it resumes)")
    pk.add_argument("--shard-mb", type=float, default=256, help="images per shard, in MiB of files (default 256, "
                    "at most 1024)")
    pk.add_argument("--max-side", type=int, metavar="N", help="store every image whose longer side exceeds N "
                    "pixels shrunk to N (aspect kept, EXIF orientation applied) as a JPEG, so that training decodes "
                    "fewer pixels (as FFCV's max_resolution); smaller images keep their bytes. A masks folder's masks "
                    "are resized with their images (nearest), a COCO folder's annotations scaled to them (default: "
                    "every image as it is)")
    pk.add_argument("--quality", type=int, help="the JPEG quality (1-100) of the images --max-side shrinks "
                    "(default 90)")
    pk.add_argument("--skip-bad-images", action="store_true", help="leave unreadable files out (listed in "
                    "index.json) instead of stopping at the first")
    pk.add_argument("overrides", nargs="*", help="data.csv.KEY=VALUE: a multi-label CSV folder's columns and "
                    "separator, as training from the folder reads them")
    w = command("sweep", "expand a sweep file into runs: a SLURM job array or local runs")
    w.add_argument("sweep_file", help="a sweep file: a recipe and the config keys to vary (configs/sweeps/)")
    w.add_argument("--dir", help="sweep folder (default sweeps/<name>)")
    how = w.add_mutually_exclusive_group(required=True)
    how.add_argument("--slurm", metavar="SCRIPT", help="submit as a job array of this sbatch script, "
                     "e.g. slurm/train.sbatch or slurm/train_cpu.sbatch")
    how.add_argument("--local", action="store_true", help="run the tasks here, one after another")
    w.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch argument (repeatable)")
    a = sub.add_parser("sweep-args")  # used by slurm/lib.sh: one task's arguments (no help: not listed)
    a.add_argument("sweep_dir")
    a.add_argument("index", type=int)
    u = command("tune", "hyperparameter search with Optuna: workers pull trials from one study, "
                       "the pruner stops bad trials early, a preempted trial continues as the same trial")
    u.add_argument("tune_file", help="a tune file: a recipe, the search space, sampler and pruner "
                   "(configs/tunes/)")
    u.add_argument("overrides", nargs="*", help="key=value applied to every trial (after the tune file's overrides)")
    u.add_argument("--dir", help="tune folder (default tunes/<name>)")
    how = u.add_mutually_exclusive_group(required=True)
    how.add_argument("--local", action="store_true", help="run the workers here, as processes")
    how.add_argument("--slurm", metavar="SCRIPT", help="submit the workers as a job array of this sbatch script, "
                     "e.g. slurm/train.sbatch or slurm/train_cpu.sbatch")
    u.add_argument("--workers", type=int, default=1, help="workers pulling trials at once (default 1)")
    u.add_argument("--storage", metavar="URL", help="an Optuna RDB URL (postgresql://..., mysql://...) instead "
                   "of the journal file in the tune folder")
    u.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch argument (repeatable)")
    k = sub.add_parser("tune-worker")  # one worker: `trainer tune` and slurm/lib.sh start it (not listed)
    k.add_argument("tune_dir")
    k.add_argument("--worker-id", required=True)
    k.add_argument("--worker-index", type=int, default=0)
    c = command("collect", "table of a sweep's runs or a tune's trials (best metric, values, status), "
                       "best first; for a tune also best.yaml and plots")
    c.add_argument("sweep_dir", metavar="DIR", help="a sweep folder (sweeps/<name>) or a tune folder (tunes/<name>)")
    c.add_argument("--metric", help="rank by this metric (default: each run's eval.monitor)")
    r = command("predict", "predictions for image files: a CSV (classification, multi-label), "
                       "index PNGs (segmentation) or a JSON of boxes (detection)")
    r.add_argument("--model", required=True, help="a run folder or an exported model folder")
    r.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or @list.txt")
    r.add_argument("--output", required=True, help="classification: the CSV file to write; segmentation: the "
                   "folder for one PNG of class indices per image; detection: the JSON file of detections")
    r.add_argument("--overlay", action="store_true", help="segmentation: also a colour overlay beside each mask")
    r.add_argument("--draw", help="detection: also each image with its boxes drawn, as a JPEG in this folder")
    r.add_argument("--score-threshold", type=float, help="detection: override the model's score threshold")
    r.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    r.add_argument("--threshold", type=float, help="binary: override the model's decision threshold; "
                   "multi-label: one threshold for every class")
    r.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --output file that the trainer "
                   "did not write (never an input)")
    r.add_argument("--give-back-memory", action="store_true", help="give memory each batch frees back to the "
                   "system (glibc's defaults) instead of keeping it for the next batch, as train.keep_freed_memory"
                   "=false does for training: a lower peak, more system time")
    x = command("export", "an exported model as an ONNX file (logits of a normalised float32 NCHW "
                       "batch), checked against PyTorch with ONNX Runtime before it is written")
    x.add_argument("--model", required=True, help="a run folder or an exported model folder")
    x.add_argument("--format", required=True, choices=["onnx"])
    x.add_argument("--output", required=True, help="the file to write, e.g. model.onnx (plus model.onnx.json)")
    x.add_argument("--images", nargs="+", metavar="PATH", help="image files, folders or @list.txt for the "
                   "parity check (default: a few of the run's data, else a fixed-seed random batch)")
    x.add_argument("--opset", type=int, help="ONNX opset (default 18, the exporter's own; >= 18)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def _error_prefix() -> str:
    """"error:" on rank 0 (or a lone process); other ranks say who they are, so an error seen by one rank
    only is never silent."""
    rank = os.environ.get("RANK", "0")
    return "error:" if rank == "0" else f"[rank {rank}] error:"


def _same_on_every_rank(err: TrainerError) -> bool:
    """An error every rank raised alike, which rank 0 prints for all: one agreed through a collective
    (SharedError), or one raised before the process group existed (each rank then ran the same code on the
    same arguments and files, so it met the same error)."""
    if hasattr(err, "exit_code"):
        return True
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized())


def _one_line(err: TrainerError) -> str:
    """The message; for an error raised in a DataLoader worker (which torch re-raises with "Caught X in
    DataLoader worker process N" and the worker's whole traceback), the original one line."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(("trainer.errors.", type(err).__name__)) else last


def _leave(code: int, at_once: bool = False) -> None:
    """Exit with `code` after an error. With a process group still up, or `at_once`, leave at once
    (os._exit): gloo's teardown at interpreter exit can abort the process (SIGABRT, measured in 7 of 20 plain
    exits in accelerate-on-cpu.md) or hang on a dead peer, which would replace the exit code the user should
    see. Every file is already closed or atomic by then (the `with` blocks have run)."""
    sys.stdout.flush()
    sys.stderr.flush()
    dist = sys.modules.get("torch.distributed")  # not imported: no process group (and no import cost now)
    if at_once or (dist is not None and dist.is_available() and dist.is_initialized()):
        os._exit(code)
    sys.exit(code)


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def pack_csv(overrides: List[str]):
    """`trainer pack`'s data.csv.KEY=VALUE overrides as a data.csv section (its defaults without any)."""
    from trainer.config import CsvCfg

    csv_cfg = CsvCfg()
    for item in overrides:
        key, sep, value = item.partition("=")
        name = key[len("data.csv."):]
        if not sep or not key.startswith("data.csv.") or not hasattr(csv_cfg, name):
            raise ConfigError(f"trainer pack takes data.csv.KEY=VALUE (KEY: image_column, labels_column or "
                              f"separator), got {item!r}")
        if not value:
            raise ConfigError(f"{key} must be a non-empty string, got {item!r}")
        setattr(csv_cfg, name, value)
    if csv_cfg.image_column == csv_cfg.labels_column:
        raise ConfigError(f"data.csv.image_column and data.csv.labels_column are both '{csv_cfg.image_column}'")
    return csv_cfg


def main(argv: Optional[List[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from trainer import preemption

            # first thing: from here on SIGTERM/SIGUSR1 mean "save at the next step and stop", never a lost run
            preemption.install_signal_handlers()
            preemption.stop_with_launcher()  # `accelerate launch` of one process forwards no signal
            from trainer.config import load_config

            overrides = args.overrides + ([f"run.resume={args.resume}"] if args.resume else [])
            cfg = load_config(None if args.recipe == "-" else args.recipe, overrides)  # before torch is imported
            from trainer.distributed import check_launch
            from trainer.loop import train

            check_launch()
            if train(cfg).get("stopped"):
                sys.exit(EXIT_STOPPED)
        elif args.command == "eval":
            from trainer.evaluate import run_eval

            run_eval(args.model, args.overrides, args.output, args.overwrite)
        elif args.command == "pack":
            from trainer.data.shards import pack

            pack(args.src, args.dest, args.shard_mb, args.skip_bad_images, csv_cfg=pack_csv(args.overrides),
                 max_side=args.max_side, quality=args.quality)
        elif args.command == "sweep":
            from trainer import sweep

            folder = sweep.prepare(args.sweep_file, args.dir)
            if args.local:
                sweep.run_local(folder)
                sweep.collect(str(folder))
            else:
                sweep.submit_slurm(folder, args.slurm, args.sbatch_arg)
        elif args.command == "sweep-args":
            from trainer.sweep import task_args

            print("\n".join(task_args(args.sweep_dir, args.index)))
        elif args.command == "tune":
            from trainer import tune

            if args.workers < 1:
                raise ConfigError(f"--workers must be >= 1, got {args.workers}")
            folder = tune.prepare(args.tune_file, args.dir, args.overrides, args.storage)
            if args.local:
                code = tune.run_local(folder, args.workers)
                rows = tune.collect(str(folder))
                if code:
                    sys.exit(code)
                if rows and all(row["state"] == "fail" for row in rows):  # nothing to show for it: not a success
                    print(f"error: every trial of {folder} failed (the reason of each is in the table; their "
                          f"output in {Path(folder) / 'logs'})", file=sys.stderr)
                    sys.exit(1)
            else:
                tune.submit_slurm(folder, args.slurm, args.workers, args.sbatch_arg)
        elif args.command == "tune-worker":
            from trainer.tune import run_worker

            code = run_worker(Path(args.tune_dir), args.worker_id, args.worker_index)
            if code:
                sys.exit(code)
        elif args.command == "collect":
            from trainer import tune
            from trainer.sweep import collect

            if tune.is_tune_dir(args.sweep_dir):
                tune.collect(args.sweep_dir)
            else:
                collect(args.sweep_dir, args.metric)
        elif args.command == "predict":
            from trainer.predict import predict_files

            n = predict_files(args.model, args.inputs, args.output, args.batch_size, args.threshold, args.device,
                              overlay=args.overlay, draw=args.draw, score_threshold=args.score_threshold,
                              overwrite=args.overwrite, keep_freed_memory=not args.give_back_memory)
            print(f"[predict] {n} images -> {args.output}")
        elif args.command == "export":
            from trainer.onnx_export import DEFAULT_OPSET, describe, export_onnx

            opset = DEFAULT_OPSET if args.opset is None else args.opset
            done = export_onnx(args.model, args.output, args.images, opset, args.overwrite)
            print(describe(args.output, done))
    except TrainerError as err:
        if not (_rank() != 0 and _same_on_every_rank(err)):
            print(f"{_error_prefix()} {_one_line(err)}", file=sys.stderr)
        _leave(getattr(err, "exit_code", 2))
    except OSError as err:  # a full disk, a read-only folder, ... outside the writers that name their file
        from trainer.files import disk_error

        known = disk_error(err)
        if known is err:
            raise
        print(f"{_error_prefix()} {known}", file=sys.stderr)
        _leave(2)
    except RuntimeError as err:
        stop = _stop_behind(err)
        if stop is not None:  # raised inside a threading primitive (a reader pool's submit), which then failed
            _stopped_in_startup(stop)
        from trainer.distributed import peer_failure

        message = peer_failure(err)
        if message is None:
            raise
        print(f"{_error_prefix()} {message}", file=sys.stderr)
        _leave(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except StopRequested as err:
        _stopped_in_startup(err)


def _stop_behind(err: BaseException):
    """The StopRequested an exception was raised while handling, if any: a stop request raised by the signal
    handler inside threading's own lock code leaves it broken, and what surfaces is its RuntimeError."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, StopRequested):
            return err
        seen.add(id(err))
        err = err.__context__
    return None


def _stopped_in_startup(err: StopRequested) -> None:
    if _rank() == 0:
        print(f"[trainer] stopped on request during start-up ({err}); nothing is left half-written. "
              f"Run the same command to start again", file=sys.stderr)
    # at once: the interpreter's teardown (torch's modules, a reader pool's threads finishing their files)
    # took another 1.0-2.5 s of the scheduler's grace here after the line, and there is nothing to save;
    # the exit hooks skipped write none of our files (PIL, logging, torch's caches, thread pools)
    _leave(EXIT_STOPPED, at_once=True)


if __name__ == "__main__":
    main()
