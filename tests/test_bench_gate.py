"""bench/gate.py: the bench scripts write through the trainer's write gate. A rerun replaces its own results
(whole files renamed into place); a file of the user's at a result's name, or one the user changed since, is
refused in one line before any work and stays byte for byte; a data folder is made once, reused, drawn again
over its own old version, and a folder the bench did not make is refused, whatever its marker says."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "bench" / "accelerate_wrappers.py")  # the quickest smoke run (a few seconds)
NAME = "accelerate-wrappers-smoke"


def run(tmp_path, out):
    return subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_rerun_replaces_its_own_results_and_a_users_file_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    first = run(tmp_path, out)
    assert first.returncode == 0, first.stderr[-3000:]
    before = {ext: (out / f"{NAME}.{ext}").stat().st_ino for ext in ("json", "md")}
    measured = json.loads((out / f"{NAME}.json").read_text())

    again = run(tmp_path, out)
    assert again.returncode == 0, again.stderr[-3000:]
    # replaced by a rename, not rewritten in place: new files, a new measurement, no temporaries left
    assert all((out / f"{NAME}.{ext}").stat().st_ino != ino for ext, ino in before.items())
    assert json.loads((out / f"{NAME}.json").read_text()) != measured
    assert sorted(p.name for p in out.iterdir()) == [".cnn-trainer-files.json", f"{NAME}.json", f"{NAME}.md"]

    # a result the user edited since is theirs now
    edited = (out / f"{NAME}.md").read_bytes() + b"\nmy note\n"
    (out / f"{NAME}.md").write_bytes(edited)
    refused = run(tmp_path, out)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: --out: ") and f"{NAME}.md" in lines[0]
    assert (out / f"{NAME}.md").read_bytes() == edited

    # a file of the user's named like a result, in a folder the bench never wrote: refused, nothing written
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / f"{NAME}.json").write_bytes(b'{"mine": 1}\n')
    refused = run(tmp_path, mine)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and len(lines) == 1, refused.stderr
    assert lines[0].startswith("error: --out: ") and f"{NAME}.json" in lines[0]
    assert (mine / f"{NAME}.json").read_bytes() == b'{"mine": 1}\n'
    assert [p.name for p in mine.iterdir()] == [f"{NAME}.json"]


@pytest.fixture
def gate():
    spec = importlib.util.spec_from_file_location("bench_gate", ROOT / "bench" / "gate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_made_once_reuses_redraws_its_own_and_refuses_a_folder_it_did_not_make(tmp_path, gate):
    drawn = []

    def fill(staging):
        drawn.append(staging)
        (staging / "images").mkdir()
        (staging / "images" / "0.jpg").write_text(f"draw {len(drawn)}")

    work = tmp_path / "work"
    root = work / "data"
    assert gate.made_once(root, {"made_by": "test", "n": 1}, fill) == root
    assert gate.made_once(root, {"made_by": "test", "n": 1}, fill) == root
    assert len(drawn) == 1  # the same parameters: reused
    assert json.loads((root / "dataset.json").read_text()) == {"made_by": "test", "n": 1}

    gate.made_once(root, {"made_by": "test", "n": 2}, fill)  # other parameters: drawn again over its own
    assert len(drawn) == 2 and (root / "images" / "0.jpg").read_text() == "draw 2"
    assert drawn[1].parent == work and not drawn[1].exists()  # staged beside it, renamed into place
    assert sorted(p.name for p in work.iterdir()) == [".cnn-trainer-files.json", "data"]

    # a folder the bench did not make, even with a marker that names a bench script, is never replaced
    theirs = work / "theirs"
    (theirs / "images").mkdir(parents=True)
    (theirs / "images" / "0.jpg").write_bytes(b"a photo of theirs")
    (theirs / "dataset.json").write_text(json.dumps({"made_by": "test", "n": 0}))
    with pytest.raises(SystemExit) as err:
        gate.made_once(theirs, {"made_by": "test", "n": 1}, fill)
    assert str(err.value).startswith(f"error: --work: {theirs} exists") and "\n" not in str(err.value)
    assert (theirs / "images" / "0.jpg").read_bytes() == b"a photo of theirs" and len(drawn) == 2

    # nor one of its own whose marker the user changed since
    (root / "dataset.json").write_text(json.dumps({"made_by": "test", "n": 3}))
    with pytest.raises(SystemExit):
        gate.made_once(root, {"made_by": "test", "n": 3}, fill)
    assert (root / "images" / "0.jpg").read_text() == "draw 2" and len(drawn) == 2
