"""Resuming on another number of processes (trainer/data/order.py): a run stopped on N processes and resumed on
N' trains every sample of each epoch exactly once, in the order of an uninterrupted run, with the same updates,
learning rates and samples_seen when the global batch is kept; a changed global batch is refused in one line,
or, allowed, re-plans the rest of the schedule.

The evidence is the sample trace (TRAINER_SAMPLE_TRACE): every rank writes the dataset indices of each of its
micro-steps with the epoch and the global position, and a `start` line at each epoch it starts. A stopped
attempt's steps at or after the position the next attempt resumes from were never checkpointed (SIGKILL) or
were not trained (SIGTERM's prefetch): they are rolled back, as the resume rolls them back. Weights are not
compared across process counts: the reduction order differs, so bitwise equality is not expected there.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import ROOT, rows, run_forked, run_torchrun
from trainer.config import batching, load_config
from trainer.data.order import Dealing, shuffled_order
from trainer.errors import ConfigError
from trainer.state import sample_position, saved_global_batch

DRIVER = ROOT / "tests" / "fault_driver.py"
GLOBAL_BATCH = 12  # 12 x 1, 6 x 2, 4 x 3: the same global batch on 1, 2 and 3 processes


def classify_args(tmp: Path, run: str, **extra) -> list:
    # 4 classes x 40 = 160 training images: 13 full global batches and one of 4 (kept on 1, 2 and 3 processes)
    base = {"data.format": "generated", "data.generated.variant": "multiclass",
            "data.generated.train_per_class": 40, "data.generated.val_per_class": 5,
            "data.generated.test_per_class": 1, "data.root": str(tmp / "gen"), "data.num_workers": 0,
            "model.name": "small_cnn", "train.epochs": 2, "train.batch_size": GLOBAL_BATCH,
            "train.global_batch_size": GLOBAL_BATCH, "train.progress_bar": "false", "train.log_every_steps": 2,
            "optim.name": "adamw", "optim.lr": 0.003, "optim.warmup_epochs": 0.5, "run.dir": str(tmp / run)}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def segment_args(tmp: Path, run: str, **extra) -> list:
    base = {"task": "segmentation", "data.format": "generated", "data.generated.variant": "segmentation",
            "data.generated.train_per_class": 8, "data.generated.val_per_class": 2,
            "data.generated.test_per_class": 1, "data.image_size": 32, "data.root": str(tmp / "gen-seg"),
            "data.num_workers": 0, "data.augment.random_resized_crop": "false", "data.augment.crop_padding": 0,
            "model.name": "unet", "train.epochs": 2, "train.batch_size": GLOBAL_BATCH,
            "train.global_batch_size": GLOBAL_BATCH, "train.drop_last": "false", "train.progress_bar": "false",
            "train.log_every_steps": 1, "optim.name": "adamw", "optim.lr": 0.003, "run.dir": str(tmp / run)}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(args: list, processes: int, trace: Path, fault: str = "", at: int = 0):
    """One attempt: `trainer train - ARGS` on `processes` processes, through the fault driver, traced (each
    launch numbered in the trace)."""
    attempt = len(list(trace.parent.glob(trace.name + ".launch-*")))
    (trace.parent / f"{trace.name}.launch-{attempt}").touch()
    env = {"TRAINER_SAMPLE_TRACE": str(trace), "TRAINER_SAMPLE_TRACE_ATTEMPT": str(attempt),
           "FAULT": fault or "none", "FAULT_AT": str(at)}
    if processes == 1:
        return run_forked(["train", "-", *args], env=env, timeout=300, script=DRIVER)
    return run_torchrun(["train", "-", *args], processes, env=env, timeout=300, script=DRIVER)


def read_trace(prefix: Path) -> list:
    """Each attempt's (first start (epoch, position), {(epoch, position): {rank: indices}}), in order, from the
    trace files of `prefix` (one per rank, appended by every attempt; a start line says which attempt the lines
    after it belong to)."""
    attempts = defaultdict(lambda: ([], defaultdict(dict)))
    for path in sorted(prefix.parent.glob(prefix.name + ".rank*")):
        attempt = None
        for line in path.read_text().splitlines():
            fields = line.split()
            if fields[0] == "start":
                attempt = int(fields[4])
                attempts[attempt][0].append((int(fields[1]), int(fields[2])))
            else:
                epoch, position, rank = map(int, fields[:3])
                attempts[attempt][1][epoch, position][rank] = [int(i) for i in fields[3].split(",")]
    return [(min(starts), steps) for _, (starts, steps) in sorted(attempts.items())]


def trained(prefix: Path) -> dict:
    """{epoch: the dataset indices trained, in global order} over a run's attempts, each stopped attempt's steps
    from the next attempt's resume position on rolled back."""
    attempts = read_trace(prefix)
    merged = {}
    for i, (_, steps) in enumerate(attempts):
        resumed_at = attempts[i + 1][0] if i + 1 < len(attempts) else None
        for key, ranks in steps.items():
            if resumed_at is None or key < resumed_at:
                merged[key] = ranks
    out = defaultdict(list)
    for (epoch, _), ranks in sorted(merged.items()):
        out[epoch] += [i for r in sorted(ranks) for i in ranks[r]]
    return dict(out)


def train_rows(run: Path) -> list:
    return [(r["step"], r["samples_seen"], r["lr"], round(r["epoch"], 4)) for r in rows(run) if r["type"] == "train"]


def eval_rows(run: Path) -> list:
    return [(r["step"], r["samples_seen"], r["epoch"]) for r in rows(run) if r["type"] == "eval"]


def reference(tmp: Path, args_of, processes: int = 1) -> tuple:
    res = launch(args_of(tmp, "ref"), processes, tmp / "trace-ref")
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    order = trained(tmp / "trace-ref")
    return order, tmp / "ref"


# (processes before, after, how the first attempt stops, at which update, extra keys)
CASES = {
    "1to2-sigterm-mid-epoch": (1, 2, "sigterm_at_update", 5, {}),
    "2to1-sigkill-mid-epoch": (2, 1, "kill_at_update", 19, {"checkpoint.every_steps": 3}),
    "2to3-at-the-epoch-boundary": (2, 3, "kill_at_update", 16, {"checkpoint.every_epochs": 1}),
    "1to2-device-path-sigkill": (1, 2, "kill_at_update", 8, {"data.loader": "device", "checkpoint.every_steps": 3}),
    "2to3-device-path-sigterm": (2, 3, "sigterm_at_update", 17, {"data.loader": "device"}),
    "2to1-weighted-sampler-sigterm": (2, 1, "sigterm_at_update", 10, {"data.sampler": "weighted"}),
    "1to2-multilabel-sigterm": (1, 2, "sigterm_at_update", 6, {"task": "multilabel",
                                                               "data.generated.variant": "multilabel"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_resume_on_another_process_count_trains_each_sample_once_in_the_uninterrupted_order(case, tmp_path):
    before, after, fault, at, extra = CASES[case]
    # the reference of this case's data path (the device path and the weighted sampler have their own orders),
    # uninterrupted, on 1 process
    expected, ref_run = reference(tmp_path, lambda tmp, run: classify_args(tmp, run, **extra))
    args = classify_args(tmp_path, "run", **extra)
    first = launch(args, before, tmp_path / "trace", fault, at)
    assert first.returncode != 0 or "stopped on request" in first.stdout, first.stdout[-1500:] + first.stderr[-1500:]
    second = launch(args, after, tmp_path / "trace")
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-1500:]
    assert f"checkpoint written by {before} process(es), resuming on {after} with the same global batch" in second.stdout
    got = trained(tmp_path / "trace")
    assert got == expected  # each epoch: the same samples, each once, in the same global order
    n = json.loads((tmp_path / "run" / "run.json").read_text())["derived"]["train_samples"]
    if "weighted" not in case:
        assert all(sorted(v) == list(range(n)) for v in got.values())
    # the same updates, learning rates, samples_seen and epoch counter at every logged step and evaluation
    assert train_rows(tmp_path / "run") == train_rows(ref_run)
    assert eval_rows(tmp_path / "run") == eval_rows(ref_run)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["samples_seen"] == 2 * n and summary["updates"] == 2 * math.ceil(n / GLOBAL_BATCH)
    starts = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
    assert [(s["processes"], s["global_batch"]) for s in starts] == [(before, 12), (after, 12)]


@pytest.mark.slow
def test_a_segmentation_run_resumed_on_another_process_count_trains_each_sample_once(tmp_path):
    expected, ref_run = reference(tmp_path, segment_args)
    args = segment_args(tmp_path, "run")
    first = launch(args, 2, tmp_path / "trace", "sigterm_at_update", 3)
    assert "stopped on request" in first.stdout, first.stdout[-1500:] + first.stderr[-1500:]
    second = launch(args, 1, tmp_path / "trace")
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-1500:]
    got = trained(tmp_path / "trace")
    assert got == expected and all(sorted(v) == sorted(expected[0]) for v in got.values())
    assert len(expected[0]) == len(set(expected[0])) > GLOBAL_BATCH
    assert train_rows(tmp_path / "run") == train_rows(ref_run)


@pytest.mark.slow
def test_packed_shards_resumed_on_another_process_count_train_each_sample_once(tmp_path):
    from trainer.data.generated import ensure_generated

    folder = ensure_generated(tmp_path / "folder", "multiclass", 32, 0, {"train": 40, "val": 5, "test": 1})
    assert run_forked(["pack", str(folder), str(tmp_path / "packed"), "--shard-mb", "0.05"]).returncode == 0

    def args_of(tmp, run, **extra):
        return classify_args(tmp, run, **{"data.format": "shards", "data.root": str(tmp_path / "packed"),
                                          "data.image_size": 32, **extra})

    expected, ref_run = reference(tmp_path, args_of)
    args = args_of(tmp_path, "run", **{"checkpoint.every_steps": 4})
    first = launch(args, 2, tmp_path / "trace", "kill_at_update", 11)
    assert first.returncode != 0, first.stdout[-1500:] + first.stderr[-1500:]
    second = launch(args, 1, tmp_path / "trace")
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-1500:]
    got = trained(tmp_path / "trace")
    assert got == expected and all(sorted(v) == list(range(160)) for v in got.values())
    assert train_rows(tmp_path / "run") == train_rows(ref_run)


def mixed_aspect_coco(root: Path, per_split: dict) -> Path:
    """A COCO folder of flat images in three shapes (48x32, 32x48, 48x20: three aspect-ratio groups of factor 1),
    a box or two each; category 3 (a rare one) in every seventh image only, so that its images repeat."""
    import numpy as np
    from PIL import Image

    shapes = [(48, 32), (32, 48), (48, 20)]
    for split, count in per_split.items():
        folder = root / split
        folder.mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            w, h = shapes[i % 3]
            arr = np.full((h, w, 3), 60 + 7 * (i % 20), dtype=np.uint8)
            arr[4:20, 6:22] = (200, 40, 40)
            Image.fromarray(arr).save(folder / f"{i:03d}.png")
            images.append({"id": i, "file_name": f"{i:03d}.png", "width": w, "height": h})
            annotations.append({"id": 2 * i + 1, "image_id": i, "category_id": 3 if i % 7 == 0 else 1,
                                "bbox": [6, 4, 16, 16]})
            if i % 2:
                annotations.append({"id": 2 * i + 2, "image_id": i, "category_id": 2, "bbox": [24, 2, 6, 6]})
        (folder / "annotations.json").write_text(json.dumps({
            "images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n in ((1, "a"), (2, "b"), (3, "rare"))]}))
    return root


@pytest.mark.slow
def test_a_grouped_repeat_factor_detection_run_resumed_on_another_process_count_trains_each_position_once(tmp_path):
    """Detection's samplers (trainer/data/detection_order.py) through real processes: aspect-ratio groups and
    repeat factors make the epoch's order, stopped on 2 processes and resumed on 1 it is trained exactly as an
    uninterrupted run trains it, and every rank's batch of a full global batch holds one aspect-ratio group."""
    from trainer.data.detection_order import aspect_ratio_groups

    root = mixed_aspect_coco(tmp_path / "coco", {"train": 42, "val": 3})

    def args_of(tmp, run, **extra):
        base = {"task": "detection", "data.format": "coco", "data.root": str(root), "data.image_size": 48,
                "data.num_workers": 0, "data.aspect_ratio_group_factor": 1, "data.repeat_factor_threshold": 0.5,
                "model.name": "retinanet_small", "model.detection.max_size": 48, "train.epochs": 2,
                "train.batch_size": 4, "train.global_batch_size": 4, "train.progress_bar": "false",
                "train.log_every_steps": 2, "optim.name": "adamw", "optim.lr": 0.002, "eval.every_epochs": 0,
                "run.dir": str(tmp / run), **extra}
        return [f"{k}={v}" for k, v in base.items()]

    expected, ref_run = reference(tmp_path, args_of)
    first = launch(args_of(tmp_path, "run"), 2, tmp_path / "trace", "sigterm_at_update", 4)
    assert "stopped on request" in first.stdout, first.stdout[-1500:] + first.stderr[-1500:]
    second = launch(args_of(tmp_path, "run"), 1, tmp_path / "trace")
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-1500:]
    got = trained(tmp_path / "trace")
    assert got == expected
    # the 6 images of the rare category at r = sqrt(0.5 / (6 / 42)) = 1.87 (categories 1 and 2, in 36 and 21
    # images, at r = 1): 42 + round(6 x 0.87) = 47 positions an epoch, each image at least once
    assert all(len(v) == 47 and set(v) == set(range(42)) for v in got.values()) and got[0] != got[1]
    groups = aspect_ratio_groups([48, 32, 48] * 14, [32, 48, 20] * 14, 1)
    assert sorted(set(groups)) == [1, 2, 3]
    for _, steps in read_trace(tmp_path / "trace"):
        for (epoch, position), ranks in steps.items():
            if position + 4 <= 47 - 3 * 4:  # not among the blocks left open at the end of the epoch
                assert all(len({groups[i] for i in mine}) == 1 for mine in ranks.values())
    assert train_rows(tmp_path / "run") == train_rows(ref_run)


def test_a_changed_global_batch_is_refused_in_one_line_and_allowed_re_plans_the_schedule(tmp_path):
    args = classify_args(tmp_path, "run", **{"train.global_batch_size": "null", "train.batch_size": 8})
    first = launch(args, 1, tmp_path / "trace", "sigterm_at_update", 6)
    assert "stopped on request" in first.stdout, first.stdout[-1500:] + first.stderr[-1500:]
    # the same per-process batch on 2 processes: a global batch of 16, not 8
    refused = launch(args, 2, tmp_path / "trace-x")
    assert refused.returncode != 0
    line = [ln for ln in refused.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) >= 1 and "would change from 8 to 16" in line[0] and "run.allow_config_change" in line[0]
    assert not list(tmp_path.glob("trace-x.rank*"))  # refused before any training
    allowed = launch([*args, "run.allow_config_change=true"], 2, tmp_path / "trace")
    assert allowed.returncode == 0, allowed.stdout[-1500:] + allowed.stderr[-1500:]
    got = trained(tmp_path / "trace")
    assert all(sorted(v) == list(range(160)) for v in got.values())  # still every sample once per epoch
    # 6 updates of 8, then the 112 samples left of epoch 0 in 7 updates of 16, and epoch 1 in 10
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["updates"] == 6 + 7 + 10 and summary["samples_seen"] == 2 * 160
    starts = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
    assert "global batch 8 -> 16 at update 6" in starts[-1]["schedule"] and "ending at update 23" in starts[-1]["schedule"]
    lrs = [lr for _, _, lr, _ in train_rows(tmp_path / "run")]
    assert lrs[-1] < lrs[0] and min(lrs) >= 0  # the cosine re-planned, not restarted: it still ends low


# ---- the pieces, without processes ----

@pytest.mark.parametrize("length,batch,processes,drop_last", [(160, 12, 1, False), (160, 6, 2, False),
                                                               (161, 4, 3, False), (163, 4, 3, False),
                                                               (160, 5, 3, True), (7, 4, 2, False)])
def test_the_ranks_of_every_micro_step_share_its_chunk_exactly(length, batch, processes, drop_last):
    dealing = Dealing(length, batch, processes, drop_last)
    dealt = []
    for first, stop in dealing.steps():
        parts = [dealing.rank_slice(first, stop, r) for r in range(processes)]
        assert all(len(p) >= 1 for p in parts) and max(map(len, parts)) - min(map(len, parts)) <= 1
        dealt += [i for p in parts for i in p]
    assert dealt == list(range(dealing.end))  # in order, each position once
    tail = length % (batch * processes)
    assert length - dealing.end == (tail if tail and (drop_last or tail < processes) else 0)
    # from any position on the chunk grid of another process count, the rest of the same order
    middle = dealing.steps()[len(dealing.steps()) // 2][0]
    assert [i for f, s in dealing.steps(middle) for r in range(processes)
            for i in dealing.rank_slice(f, s, r)] == list(range(middle, dealing.end))


def test_the_order_is_accelerates_seedable_shuffle_so_earlier_checkpoints_resume_in_it():
    import torch
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(range(50), data_seed=7, generator=torch.Generator())
    sampler.set_epoch(3)
    assert shuffled_order(50, 7, 3).tolist() == list(sampler)


@pytest.mark.parametrize("processes,expected", [(1, (8, 2)), (2, (8, 1)), (4, (4, 1)), (3, None), (16, (1, 1))])
def test_global_batch_size_derives_the_accumulation_and_the_batch_from_the_process_count(processes, expected):
    train = load_config(None, ["train.global_batch_size=16", "train.batch_size=8"]).train
    if expected is None:
        with pytest.raises(ConfigError, match="train.global_batch_size=16 cannot be split evenly over 3 processes"):
            batching(train, processes)
    else:
        assert batching(train, processes) == expected


def test_global_batch_size_with_an_explicit_accumulation_is_refused_at_load():
    with pytest.raises(ConfigError, match="leave train.grad_accum_steps at 1"):
        load_config(None, ["train.global_batch_size=16", "train.grad_accum_steps=2"])


def test_a_checkpoint_of_an_earlier_version_resumes_at_the_same_sample():
    # before positions were global samples: batch 5 of this process, 2 processes of batch 8
    saved = {"batch_in_epoch": 5, "world_size": 2, "config": {"train": {"batch_size": 8, "grad_accum_steps": 1}}}
    assert sample_position(saved) == 80 and saved_global_batch(saved) == 16
    assert sample_position({"sample_in_epoch": 33}) == 33
