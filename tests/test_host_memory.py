"""A training process keeps the memory a step frees for the next step (trainer/host_memory.py), and gives it
back when the run ends: measured as page faults of a step-sized buffer allocated again, in a process of its own
(the test process keeps glibc's defaults)."""
import json
import platform

import pytest

from .conftest import ROOT, run_forked

DRIVER = """
import json, resource, sys
import torch
from trainer import host_memory, train

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

out = {"default": faults_of_a_step()}
give_back = host_memory.give_back_kept_memory
def measured_give_back():  # the state at the run's end, then what undoing it gives back
    out.setdefault("in_run", []).append(faults_of_a_step())
    before = resident_mib()
    give_back()
    out.setdefault("given_back_mib", []).append(before - resident_mib())
host_memory.give_back_kept_memory = measured_give_back
for keep in ("true", "false"):
    train("configs/quickstart_multiclass.yaml", [*sys.argv[1:], f"run.dir={sys.argv[1].split('=', 1)[1]}-{keep}",
                                                  f"train.keep_freed_memory={keep}"])
print("RESULT " + json.dumps(out))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tunables: this C library is not glibc")
def test_a_run_keeps_freed_memory_for_its_next_step_and_gives_it_back_at_its_end(tmp_path, tiny):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    overrides = [o for o in tiny(**{"train.max_steps": 2}) if not o.startswith("run.dir=")]
    res = run_forked([f"run.dir={tmp_path / 'run'}", *overrides], script=driver, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.split("RESULT ", 1)[1])
    # glibc's defaults: the buffer is mapped afresh and faulted in each step (24,576 faults of 4 KiB pages here;
    # fewer where transparent huge pages are always on, so the test compares, not counts)
    assert out["default"] > 0
    assert len(out["in_run"]) == 1  # the run with train.keep_freed_memory=false changed nothing to undo
    assert out["in_run"][0] * 20 < out["default"]  # kept: reused without faulting in again
    assert out["given_back_mib"][0] > 48  # at the run's end the kept memory goes back to the system
