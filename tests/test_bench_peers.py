"""bench/peers.py is not a timed test: this checks that our side runs end to end on tiny generated data and
writes its JSON and Markdown with the peers not given marked "not run", and that a wrong peer path fails at
once with one line naming it. The peers themselves need checkouts the tests do not have."""
import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = str(ROOT / "bench" / "peers.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_smoke_without_peers(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    [json_path] = (tmp_path / "out").glob("peers-*-smoke.json")
    result = json.loads(json_path.read_text())
    ours = result["sides"]["ours"]
    assert ours["status"] == "ok" and ours["median"] > 0 and ours["ratio_vs_ours"] == 1.0
    assert len(ours["epochs_per_repeat"][0]) == 2  # both epochs read back; only the second is counted
    assert result["sides"]["timm"]["status"] == result["sides"]["accelerate"]["status"] == "not run"
    table = json_path.with_suffix(".md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| ")]
    assert rows[0].startswith("| side | command | img/s median (min-max) | ratio vs ours | notes |")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| ours", "| timm", "| accelerate"]
    assert "1.00x" in rows[1] and "not run" in rows[2] and "not run" in rows[3]


def test_wrong_timm_path_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--timm", "/nonexistent", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, env=ENV)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "/nonexistent" in lines[0] and "--timm" in lines[0], res.stderr
    assert not list(tmp_path.iterdir())  # nothing written
