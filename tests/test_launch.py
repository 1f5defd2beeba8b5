"""Launching: a 2-machine launch on loopback, the project's sbatch scripts on a real local SLURM cluster
(one controller, two simulated nodes), preemption with requeue and exact resume, sweeps as job arrays."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, tiny_overrides
from tests.slurm_cluster import SlurmCluster, unavailable_reason
from tests.test_elastic import trained
from trainer.errors import ConfigError
from trainer.sweep import collect, expand, load_sweep, prepare


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_on_loopback(tmp_path):
    """accelerate launch --num_machines 2, one launcher per "machine", as on two hosts."""
    port = free_port()
    args = tiny_overrides(tmp_path, "binary")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/accelerate/multinode.yaml",
         "--num_machines", "2", "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "-m", "trainer", "train", "-", *args],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}) for rank in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 processes, rendezvous 127.0.0.1" in outs[0]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["derived"]["processes"] == 2


# ---- sweeps (no cluster needed) ----

def write_sweep(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "sweep.yaml"
    f.write_text(body)
    return f


def test_grid_and_random_expansion(tmp_path):
    grid = load_sweep(str(write_sweep(tmp_path, "recipe: configs/quickstart_binary.yaml\nparameters:\n"
                                                "  optim.lr: [0.1, 0.01]\n  model.name: [small_cnn, linear, tutorial_cnn]\n")))
    runs = expand(grid)
    assert len(runs) == 6 and {r["model.name"] for r in runs} == {"small_cnn", "linear", "tutorial_cnn"}
    rnd = load_sweep(str(write_sweep(tmp_path, "recipe: configs/quickstart_binary.yaml\nmethod: random\nsamples: 5\n"
                                               "parameters:\n  optim.lr: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-1}\n"
                                               "  optim.name: [sgd, adamw]\n")))
    a, b = expand(rnd), expand(rnd)
    assert a == b and len(a) == 5 and all(1e-4 <= r["optim.lr"] <= 1e-1 for r in a)


def test_a_typo_in_a_sweep_fails_before_any_run(tmp_path):
    f = write_sweep(tmp_path, "recipe: configs/quickstart_binary.yaml\nparameters:\n  optim.lrr: [0.1]\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        prepare(str(f), str(tmp_path / "sw"))
    assert not (tmp_path / "sw").exists()


@pytest.mark.slow
def test_local_sweep_and_collect_lists_failures(tmp_path):
    extra = " ".join(f'"{o}"' for o in tiny_overrides(tmp_path, "binary", **{"train.max_steps": 2}) if not o.startswith("run.dir"))
    f = write_sweep(tmp_path, f"recipe: configs/quickstart_binary.yaml\noverrides: [{', '.join(extra.split())}]\n"
                              "parameters:\n  optim.lr: [0.01, 0.003]\n  train.batch_size: [16, 1000]\n")
    res = subprocess.run([sys.executable, "-m", "trainer", "sweep", str(f), "--local", "--dir", str(tmp_path / "sw")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = collect(str(tmp_path / "sw"))
    assert len(rows) == 4
    assert [r["status"] for r in rows[:2]] == ["done", "done"]  # done first, sorted by the metric
    assert rows[0]["value"] >= rows[1]["value"]
    assert all(r["status"].startswith("failed") for r in rows[2:])  # batch 1000 > the training split
    assert (tmp_path / "sw" / "results.md").read_text().count("\n") == 6


# ---- a real SLURM cluster ----

@pytest.fixture(scope="module")
def cluster():
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"SLURM tests must run under CI, but: {reason}")
        pytest.skip(reason)
    c = SlurmCluster().start()
    yield c
    c.stop()


def slurm_args(tmp_path: Path, run: str, **extra) -> list:
    base = {"data.image_size": 48, "train.epochs": 12, "train.log_every_steps": 1, "checkpoint.every_epochs": 0,
            "run.dir": str(tmp_path / run)}
    base.update(extra)
    return ["configs/quickstart_binary.yaml", *tiny_overrides(tmp_path, "binary", **base)]


def job_output(tmp_path: Path, job: str) -> str:
    files = list(tmp_path.glob(f"*-{job}.out"))
    return files[0].read_text() if files else "(no output file)"


@pytest.fixture(scope="module")
def reference_job(cluster, tmp_path_factory):
    """The project's single-node CPU sbatch script, 2 processes, run to the end."""
    tmp = tmp_path_factory.mktemp("slurm-ref")
    job = cluster.sbatch(f"--output={tmp}/%x-%j.out", "slurm/train_cpu.sbatch", *slurm_args(tmp, "run"), cwd=ROOT)
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", job_output(tmp, job)
    return tmp / "run"


@pytest.mark.slow
def test_single_node_two_process_job(reference_job):
    run = json.loads((reference_job / "run.json").read_text())
    assert run["derived"]["processes"] == 2 and run["environment"]["slurm_job_id"]
    evals = [json.loads(l) for l in (reference_job / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert evals and evals[-1]["num_samples"] == 26
    assert (reference_job / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_node_job(cluster, tmp_path):
    job = cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/multinode_cpu.sbatch",
                         *slurm_args(tmp_path, "run", **{"train.epochs": 2}), cwd=ROOT)
    info = cluster.wait(job)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out
    assert info["NodeList"] in ("n[1-2]", "n1,n2"), info["NodeList"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["derived"]["processes"] == 2
    assert out.count("[trainer] done") == 1  # one main process speaks, not one per node


@pytest.mark.slow
def test_usr1_requeues_resumes_and_ends_bitwise_identical(cluster, reference_job, tmp_path):
    job = cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/train_cpu.sbatch", *slurm_args(tmp_path, "run"),
                         cwd=ROOT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until training is under way, then preempt it
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 3:
            break
        time.sleep(0.2)
    else:
        pytest.fail("training never started: " + job_output(tmp_path, job))
    cluster.signal_batch(job, "USR1")
    info = cluster.wait(job, timeout_s=300)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out
    assert info["Restarts"] == "1", out  # requeued once, same job id
    assert "stopped on request" in out and "resuming from" in out
    a, b = load_file(str(reference_job / "model" / "model.safetensors")), load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in metrics.read_text().splitlines() if '"train"' in l]
    assert steps == sorted(set(steps))


@pytest.mark.slow
def test_a_job_preempted_on_two_nodes_and_requeued_onto_one_trains_every_sample_once(cluster, tmp_path):
    """The multi-node script, stopped (USR1) on 2 nodes, requeued with its node count changed to 1 while it waits
    to restart: train.global_batch_size keeps the global batch, and the sample trace of both attempts holds
    every training sample once per epoch, in the order of the epoch."""
    args = slurm_args(tmp_path, "run", **{"train.epochs": 4, "train.batch_size": 16, "train.global_batch_size": 16})
    job = cluster.sbatch(f"--output={tmp_path}/%x-%j.out", "slurm/multinode_cpu.sbatch", *args, cwd=ROOT,
                         env={"TRAINER_SAMPLE_TRACE": str(tmp_path / "trace")})
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and sum(1 for _ in metrics.open()) >= 3):  # training under way: preempt it
        assert time.time() < deadline, "training never started: " + job_output(tmp_path, job)
        time.sleep(0.2)
    cluster.signal_batch(job, "USR1")
    while cluster.job(job).get("JobState") != "PENDING":  # requeued: it waits cred_expire + 1 s to restart
        assert time.time() < deadline + 120, "never requeued: " + job_output(tmp_path, job)
        time.sleep(0.1)
    # one node, one task (the script launches one task per node it has)
    subprocess.run(["scontrol", "update", f"JobId={job}", "NumNodes=1-1", "NumTasks=1"], check=True, env=cluster.env)
    info = cluster.wait(job, timeout_s=300)
    out = job_output(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out
    assert "checkpoint written by 2 process(es), resuming on 1 with the same global batch of 16" in out
    got = trained(tmp_path / "trace")
    assert len(got) == 4 and all(sorted(v) == list(range(80)) for v in got.values()), out
    starts = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
    assert [(s["processes"], s["global_batch"]) for s in starts] == [(2, 16), (1, 16)]


@pytest.mark.slow
def test_sweep_as_a_job_array(cluster, tmp_path):
    overrides = [o for o in tiny_overrides(tmp_path, "binary", **{"train.max_steps": 2}) if not o.startswith("run.dir")]
    f = write_sweep(tmp_path, "recipe: configs/quickstart_binary.yaml\nmax_parallel: 2\noverrides: ["
                    + ", ".join(f'"{o}"' for o in overrides) + "]\nparameters:\n  optim.lr: [0.01, 0.003, 0.001]\n")
    res = subprocess.run([sys.executable, "-m", "trainer", "sweep", str(f), "--dir", str(tmp_path / "sw"),
                          "--slurm", "slurm/train_cpu.sbatch"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=cluster.env)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().splitlines()[-1].split("array job ")[1].split()[0]
    assert "--array=0-2%2" in res.stdout
    for i in range(3):
        info = cluster.wait(f"{job}_{i}")
        assert info["JobState"] == "COMPLETED", (tmp_path / "sw" / f"slurm-{job}_{i}.out").read_text()[-2000:]
    rows = collect(str(tmp_path / "sw"))
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)


@pytest.mark.slow
def test_tune_workers_as_a_job_array_and_a_preempted_trial_continues_as_the_same_trial(cluster, tmp_path):
    """`trainer tune --slurm`: 2 array workers share one study of 6 trials. Worker 0 is preempted in the middle
    of a trial (USR1 to its batch shell, as SLURM's --signal does), requeued under the same job id, and
    re-attaches to the same trial, which resumes from its checkpoint and ends bitwise like an uninterrupted
    run of that trial's config; the study ends with 6 trials complete, none lost, none doubled."""
    pytest.importorskip("optuna", reason="the tune extra (pip install -e '.[tune]') is not installed")
    import yaml

    from tests.conftest import assert_same_run, run_cli

    fixed = [o for o in tiny_overrides(tmp_path, "multiclass", **{"train.epochs": 8, "checkpoint.every_steps": 2})
             if not o.startswith("run.dir")]
    spec = tmp_path / "tune.yaml"
    spec.write_text(yaml.safe_dump({"name": "t", "recipe": "configs/quickstart_multiclass.yaml", "overrides": fixed,
                                    "trials": 6, "sampler": "random", "pruner": "none", "seed": 0, "parameters": {
                                        "optim.lr": {"type": "float", "low": 1.0e-4, "high": 0.03, "log": True}}}))
    folder = tmp_path / "tu"
    res = subprocess.run([sys.executable, "-m", "trainer", "tune", str(spec), "--dir", str(folder), "--workers", "2",
                          "--slurm", "slurm/train_cpu.sbatch"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=cluster.env)
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("array job ")[1].split(";")[0].strip()
    lease = folder / "leases" / f"{job}_0.json"
    deadline = time.time() + 180
    held = None
    while time.time() < deadline:  # until worker 0 holds a trial that has checkpointed, then preempt it
        try:
            held = json.loads(lease.read_text())["trial"]
        except (OSError, ValueError, KeyError):
            held = None
        if held is not None and any((folder / "trials" / f"{held:04d}" / "checkpoints").glob("step-*")):
            break
        time.sleep(0.1)
    else:
        pytest.fail("worker 0 never checkpointed a trial: " + "".join(p.read_text()[-2000:] for p in folder.glob("slurm-*")))
    cluster.signal_batch(f"{job}_0", "USR1")
    infos = [cluster.wait(f"{job}_{i}", timeout_s=600) for i in range(2)]
    out0 = (folder / f"slurm-{job}_0.out").read_text()
    assert all(info["JobState"] == "COMPLETED" for info in infos), out0[-3000:]
    assert infos[0]["Restarts"] == "1", out0[-3000:]  # requeued once, same job id: the same worker
    assert f"trial {held} resumes" in out0, out0[-3000:]
    assert "resuming from" in (folder / "logs" / f"{held:04d}.log").read_text()
    collected = run_cli("collect", str(folder), timeout=300, env=cluster.env)
    assert collected.returncode == 0, collected.stderr[-2000:]
    import csv

    with open(folder / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(int(r["trial"]) for r in rows) == list(range(6)) and {r["state"] for r in rows} == {"complete"}
    # the preempted trial against its own config trained in one go
    ref = run_cli("train", str(folder / "trials" / f"{held:04d}" / "config.yaml"), f"run.dir={tmp_path / 'ref'}",
                  timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert_same_run(folder / "trials" / f"{held:04d}", tmp_path / "ref")
