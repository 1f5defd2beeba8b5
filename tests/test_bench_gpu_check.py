"""bench/gpu_check.py is run on a lent GPU only now and then; its dry run (every part on the CPU at tiny sizes)
is what keeps it from rotting in between: this runs it and checks that every part is in the JSON and the
Markdown, each either measured (marked dry-run) or skipped with its reason."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "bench" / "gpu_check.py")
PARTS = ["environment", "matmul", "correctness", "overhead_eager", "cifar10_airbench", "overhead_compiled", "mfu",
         "resnet18_cifar10", "gpu_decode", "timm"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def dry_run(tmp_path, *extra, timeout=300, env=ENV):
    return subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)


@pytest.mark.slow
def test_dry_run_writes_every_part(tmp_path):
    res = dry_run(tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu-check-dry-run.json").read_text())
    assert report["dry_run"] and report["mode"] == "dry-run"
    parts = {p["name"]: p for p in report["parts"]}
    assert list(parts) == PARTS
    for name, part in parts.items():
        assert part["status"] in ("ok", "skipped"), (name, part)
        assert part["summary"], name  # a measurement, or the reason it was skipped
    # parts that need nothing but the CPU must have run, not been skipped
    for name in ("environment", "matmul", "correctness", "cifar10_airbench", "resnet18_cifar10", "gpu_decode", "timm"):
        assert parts[name]["status"] == "ok", (name, parts[name]["summary"])
    assert parts["matmul"]["result"]["tflops"] > 0
    tests = parts["correctness"]["result"]
    # the CUDA tests are collected and each skipped with the reason, none run or failed without a GPU
    assert tests["skipped"] >= 10 and tests["passed"] == tests["failed"] == 0
    assert any("CUDA" in reason for reason in tests["skip_reasons"])
    assert 0 <= parts["cifar10_airbench"]["result"]["test_accuracy"] <= 1
    assert parts["resnet18_cifar10"]["result"]["train_img_s_median"] > 0
    assert parts["timm"]["result"]["sides"]["ours"]["status"] == "ok"
    assert parts["gpu_decode"]["result"]["ratio_w0"] > 0  # the decoder's code path, on the CPU here
    if parts["overhead_eager"]["status"] == "ok":  # once bench/overhead.py has the flags it needs
        assert parts["mfu"]["status"] == "ok" and parts["mfu"]["result"]["gflop_per_image"] > 0
    else:
        assert "overhead.py" in parts["overhead_eager"]["summary"]
    table = (tmp_path / "out" / "gpu-check-dry-run.md").read_text()
    assert "DRY RUN" in table and "ok (dry-run)" in table
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines() if line.startswith("| ")]
    assert rows[1:] == PARTS  # after the header row
    assert (tmp_path / "out" / "gpu-check-dry-run-cuda-tests.xml").is_file()
    assert "| timm |" in res.stdout  # the table is printed too


def test_budget_spent_skips_the_rest_and_still_writes_the_table(tmp_path):
    res = dry_run(tmp_path, "--budget-s", "5", timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    parts = {p["name"]: p for p in json.loads((tmp_path / "out" / "gpu-check-dry-run.json").read_text())["parts"]}
    assert list(parts) == PARTS
    assert parts["environment"]["status"] == "ok"
    for name in ("correctness", "cifar10_airbench", "timm"):
        assert parts[name]["status"] == "skipped" and "budget" in parts[name]["summary"], parts[name]


def test_wrong_inputs_fail_in_one_line_before_any_work(tmp_path):
    for extra, words in ((["--cifar-train-tar", str(tmp_path / "missing.tar")], ["--cifar-test-tar"]),
                         (["--timm", str(tmp_path)], ["--timm", "train.py"])):
        res = dry_run(tmp_path, *extra, timeout=60)
        assert res.returncode == 2
        last = res.stderr.strip().splitlines()[-1]
        assert all(w in last for w in words), res.stderr
        assert not (tmp_path / "out").exists()  # nothing written


def test_missing_packages_are_named_together_in_one_line_before_any_work(tmp_path):
    """A GPU machine's image lacks a few of the trainer's packages (omegaconf, pycocotools on the lent H200s):
    all of them named at once, with what the import said, instead of every part failing on its own."""
    hidden = tmp_path / "hidden"
    for module, error in (("omegaconf", "No module named 'antlr4'"), ("pycocotools", "No module named 'pycocotools'")):
        (hidden / module).mkdir(parents=True)
        (hidden / module / "__init__.py").write_text(f"raise ModuleNotFoundError({error!r})\n")
    res = dry_run(tmp_path, timeout=120, env={**ENV, "PYTHONPATH": str(hidden)})
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    last = res.stderr.strip().splitlines()
    assert len(last) == 1 and all(w in last[0] for w in ("missing Python packages", "omegaconf", "antlr4",
                                                          "pycocotools", "pip install omegaconf pycocotools")), last
    assert not (tmp_path / "out").exists()  # nothing written


def test_the_packages_checked_are_the_trainers_dependencies_and_pytest():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    needed = next(ast.literal_eval(node.value) for node in ast.parse(Path(SCRIPT).read_text()).body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "NEEDED")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0].lower() for dep in deps}
    assert set(needed.values()) == names | {"pytest"}


def test_packages_on_the_callers_pythonpath_reach_the_commands_the_tests_start(tmp_path):
    """On a GPU machine without network the missing packages are wheels installed with `pip --target DIR` and
    found through PYTHONPATH=DIR; the CUDA tests' trainer commands must still see them (they replaced PYTHONPATH
    with the project's root, and every command failed on `import omegaconf`)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "carried_package.py").write_text("")
    child = ("import os, subprocess, sys; from tests.conftest import PYTHONPATH; sys.exit(subprocess.run("
             "[sys.executable, '-c', 'import carried_package, trainer'], env={**os.environ, 'PYTHONPATH': PYTHONPATH},"
             " cwd=os.environ['PROBE_CWD']).returncode)")
    res = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**ENV, "PYTHONPATH": str(site), "PROBE_CWD": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-2000:]
