"""Benchmarks are not timed tests: this only checks that each runs end to end on tiny sizes and writes its
JSON and Markdown results."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize("script, name", [("overhead.py", "overhead-small_cnn-no-smoke"),
                                          ("input_pipeline.py", "input-pipeline-smoke")])
def test_benchmark_smoke(tmp_path, script, name):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / f"{name}.json").read_text())
    assert result
    assert (tmp_path / f"{name}.md").read_text().startswith("|")
