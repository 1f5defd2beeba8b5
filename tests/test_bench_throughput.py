"""bench/step_throughput.py is a benchmark, not a timed test: this only checks that its smoke mode runs end to end
(one subprocess per model x combination) and writes a full JSON and a Markdown table."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_step_throughput_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "step_throughput.py"), "--smoke", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "step-throughput-smoke.json").read_text())
    combos = {(r["model"], r["precision"], r["format"], r["compile"]) for r in result["rows"]}
    assert combos == {(m, p, f, "off") for m in ("small_cnn", "linear") for p in ("fp32", "bf16")
                      for f in ("nchw", "channels_last")}
    assert len(result["rows"]) == len(combos)
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["train_img_s_median"] > 0 and row["eval_img_s_median"] > 0, row
        assert row["peak_mem_mib"] > 0, row
    assert result["machine"]["torch"] and result["settings"]["smoke"] is True
    md = (tmp_path / "step-throughput-smoke.md").read_text()
    assert md.startswith("|") and len(md.strip().splitlines()) == 2 + len(combos)
