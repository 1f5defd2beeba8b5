"""A training process keeps the memory a step frees for the next step (trainer/host_memory.py), and gives it
back when the run ends; `trainer eval` and `trainer predict` likewise between batches. Measured as page faults
of a step-sized buffer allocated again, in a process of its own (the test process keeps glibc's defaults)."""
import json
import platform

import pytest

from .conftest import ROOT, run_forked

DRIVER = """
import json, resource, sys
import torch
from trainer import host_memory, train
from trainer.evaluate import run_eval
from trainer.predict import predict_files

def faults_of_a_step():
    '''Page faults of a 96 MiB buffer (a step's largest: above glibc's 32 MiB mmap threshold) written once,
    after the same buffer was allocated and freed many times: the fewest over the last 8 of 24 steps (kept,
    the heap needs a few steps to hold a free block large enough for posix_memalign's request).'''
    faults = []
    for _ in range(24):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.empty(96 << 20, dtype=torch.uint8)
        buffer.fill_(1)
        del buffer
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(faults[-8:])

def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2 ** 20

out = {"default": faults_of_a_step(), "in_run": {}, "given_back_mib": {}}
give_back = host_memory.give_back_kept_memory
command = None
def measured_give_back():  # the state at the command's end, then what undoing it gives back
    out["in_run"][command] = faults_of_a_step()
    before = resident_mib()
    give_back()
    out["given_back_mib"][command] = before - resident_mib()
host_memory.give_back_kept_memory = measured_give_back
args = dict(a.split("=", 1) for a in sys.argv[1:])
for keep in ("true", "false"):
    command = f"train {keep}"
    train("configs/quickstart_multiclass.yaml", [*sys.argv[1:], f"run.dir={args['run.dir']}-{keep}",
                                                  f"train.keep_freed_memory={keep}"])
model = f"{args['run.dir']}-true/model"
for keep in ("true", "false"):  # the run's own setting (true), then the command's override
    command = f"eval {keep}"
    run_eval(model, [] if keep == "true" else ["train.keep_freed_memory=false"],
             output=f"{args['run.dir']}-eval-{keep}.json")
    command = f"predict {keep}"
    predict_files(model, [args["data.root"]], f"{args['run.dir']}-predict-{keep}.csv",
                  keep_freed_memory=keep == "true")
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tunables: this C library is not glibc")
def test_train_eval_and_predict_keep_freed_memory_while_they_run_and_give_it_back_at_their_end(tmp_path, tiny):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = [o for o in tiny(**{"train.max_steps": 2}) if not o.startswith("run.dir=")]
    res = run_forked([f"run.dir={tmp_path / 'run'}", *overrides], script=driver, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    # glibc's defaults: the buffer is mapped afresh and faulted in each step (24,576 faults of 4 KiB pages here;
    # fewer where transparent huge pages are always on, so the test compares, not counts)
    assert out["default"] > 0
    # the commands told not to keep (train.keep_freed_memory=false, its override in eval, predict's
    # --give-back-memory) changed nothing to undo
    assert sorted(out["in_run"]) == ["eval true", "predict true", "train true"]
    for command, faults in out["in_run"].items():
        assert faults * 20 < out["default"], command  # kept: reused without faulting in again
        assert out["given_back_mib"][command] > 48, command  # at the command's end the memory goes back
