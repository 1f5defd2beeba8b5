"""The cached scan of an image folder (trainer.data.manifest): used only while nothing in the tree changed,
the same datasets as a fresh scan, verification results kept, never written into the data folder."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import trainer.data as data_module
from tests.conftest import make_folder, write_image
from trainer.config import load_config
from trainer.data import build_data, data_fingerprint
from trainer.data.manifest import cache_file
from trainer.errors import DataError


def cfg_for(root: Path, cache: Path, **kw):
    overrides = ["data.format=imagefolder", f"data.root={root}", "data.image_size=16", f"data.cache_dir={cache}",
                 "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, overrides).data


def build(cfg, notes=None):
    return build_data(cfg, seed=0, log=(notes.append if notes is not None else lambda *_: None))


def summary(data) -> dict:
    return {split: (list(ds.paths), ds.labels.tolist()) for split, ds in data.datasets.items()} | {
        "classes": data.classes, "fingerprint": data_fingerprint(data.datasets["train"], data.classes)}


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    make_folder(root / "train", ("cat", "dog"), 6)
    make_folder(root / "val", ("cat", "dog"), 2)
    return root


def forbid(monkeypatch, name: str):
    def fail(*_, **__):
        raise AssertionError(f"{name} ran although the cached scan was valid")

    monkeypatch.setattr(data_module, name, fail)


def test_a_second_start_reads_the_cache_and_gets_the_same_datasets(folder, tmp_path, monkeypatch):
    cfg = cfg_for(folder, tmp_path / "cache")
    first = summary(build(cfg))
    assert cache_file(folder, str(tmp_path / "cache")).is_file()
    assert not [p for p in folder.rglob("*") if "manifest" in p.name or p.suffix == ".npz"]  # nothing in the data
    forbid(monkeypatch, "scan_imagefolder")
    forbid(monkeypatch, "find_bad_images")  # the header check's results are cached too
    assert summary(build(cfg)) == first


@pytest.mark.parametrize("change", ["file added", "file removed", "class folder renamed", "subfolder added",
                                    "val folder removed"])
def test_any_change_in_the_tree_means_a_fresh_scan(folder, tmp_path, change):
    cfg = cfg_for(folder, tmp_path / "cache")
    build(cfg)
    time.sleep(0.01)  # a later modification time than the scan's, on file systems with coarse clocks
    if change == "file added":
        write_image(folder / "train" / "cat" / "new.png", seed=99)
    elif change == "file removed":
        next((folder / "train" / "dog").iterdir()).unlink()
    elif change == "class folder renamed":
        os.rename(folder / "train" / "dog", folder / "train" / "wolf")
        os.rename(folder / "val" / "dog", folder / "val" / "wolf")
    elif change == "subfolder added":
        make_folder(folder / "train" / "cat" / "more", ("x",), 2)
    else:
        import shutil

        shutil.rmtree(folder / "val")
    fresh = summary(build(cfg_for(folder, tmp_path / "other-cache")))  # what a scan without any cache gives
    assert summary(build(cfg)) == fresh


def test_a_bad_file_found_once_is_reported_again_without_checking_again(folder, tmp_path, monkeypatch):
    bad = folder / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"not an image")
    cfg = cfg_for(folder, tmp_path / "cache")
    with pytest.raises(DataError, match="broken.jpg") as first:
        build(cfg)
    forbid(monkeypatch, "find_bad_images")
    with pytest.raises(DataError, match="broken.jpg") as again:
        build(cfg)
    assert str(again.value) == str(first.value)
    monkeypatch.undo()  # the val split was never reached: it is checked now
    skipping = cfg_for(folder, tmp_path / "cache", **{"data.skip_bad_images": "true"})
    assert str(bad) not in build(skipping).datasets["train"].paths.tolist()


def test_a_full_check_is_not_answered_by_a_header_check(folder, tmp_path, monkeypatch):
    build(cfg_for(folder, tmp_path / "cache"))  # header (the default)
    calls = []
    real = data_module.find_bad_images
    monkeypatch.setattr(data_module, "find_bad_images", lambda samples, full: calls.append(full) or real(samples, full))
    build(cfg_for(folder, tmp_path / "cache", **{"data.verify_images": "full"}))
    assert calls and all(calls)  # decoded now
    calls.clear()
    build(cfg_for(folder, tmp_path / "cache", **{"data.verify_images": "full"}))
    build(cfg_for(folder, tmp_path / "cache"))  # and a full decode answers a header check
    assert calls == []


def test_cache_off_writes_nothing_and_an_unwritable_cache_is_a_note_not_an_error(folder, tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # a relative cache folder would land here (YAML once turned `off` into "False")
    cfg = cfg_for(folder, "off")
    assert cfg.cache_dir == "off"
    build(cfg)
    assert list(work.iterdir()) == []
    assert not cache_file(folder, "").exists()  # nor in the default place
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    notes = []
    data = build(cfg_for(folder, blocker / "cache"), notes)  # a file where the cache folder should be
    assert len(data.datasets["train"]) > 0
    assert any(n.startswith("note: cannot cache the scan") for n in notes), notes


def test_a_symlink_loop_is_reported_from_the_cache_as_from_the_scan(folder, tmp_path):
    os.symlink(folder / "train", folder / "train" / "cat" / "loop")
    cfg = cfg_for(folder, tmp_path / "cache")
    first, second = [], []
    a, b = build(cfg, first), build(cfg, second)
    assert summary(a) == summary(b)
    assert [n for n in first if "skipped" in n] == [n for n in second if "skipped" in n] != []


@pytest.mark.parametrize("given", ["off", "false", "no", "OFF"])
def test_cache_off_however_yaml_reads_it(given, tmp_path):
    assert cfg_for(tmp_path, "x", **{"data.cache_dir": given}).cache_dir == "off"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  cache_dir: {given}\n")
    assert load_config(str(recipe), []).data.cache_dir == "off"


RANKS_DRIVER = '''
import json, os, sys
import trainer.data.on_ranks as on_ranks
from trainer.config import load_config
from trainer.data import data_fingerprint
from trainer.distributed import SharedError, make_accelerator

out = sys.argv[1]
checked = []
real = on_ranks.find_bad_images
def counting(samples, full):
    checked.extend(p for p, _ in samples)
    return real(samples, full)
on_ranks.find_bad_images = counting
acc = make_accelerator("cpu", "no", timeout_s=60)
cfg = load_config(None, sys.argv[2:]).data
try:
    data = on_ranks.build_data_on_ranks(acc, cfg, 0, ("train", "val"), print if acc.is_main_process else (lambda *a: 0))
    result = {"skipped": data.skipped, "train": list(data.datasets["train"].paths),
              "fingerprint": data_fingerprint(data.datasets["train"], data.classes)}
except SharedError as err:
    result = {"error": str(err)}
result["checked"] = checked
with open(os.path.join(out, f"rank{acc.process_index}.json"), "w") as fh:
    json.dump(result, fh)
acc.wait_for_everyone()
acc.end_training()  # the process group released before exit, as the trainer does (else gloo may abort at exit)
'''


def run_on_two_ranks(tmp_path: Path, cfg_overrides: list, name: str) -> list:
    import subprocess
    import sys

    out = tmp_path / name
    out.mkdir()
    driver = tmp_path / "ranks_driver.py"
    driver.write_text(RANKS_DRIVER)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(driver), str(out)] + cfg_overrides, capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["header", "full"])
def test_two_ranks_split_the_checks_and_find_what_one_finds(folder, tmp_path, mode):
    """Each rank checks its own half of every list (no file twice, none left out), and the bad files found,
    the datasets and the cached results are those of one process checking everything."""
    (folder / "train" / "cat" / "bad.png").write_bytes(b"not an image")  # fails both checks
    truncated = folder / "train" / "dog" / "cut.png"  # a header that reads, pixels that do not
    write_image(truncated, size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[:200])
    overrides = [f"data.verify_images={mode}", "data.skip_bad_images=true"]
    one = summary(build(cfg_for(folder, tmp_path / "cache1", **dict(o.split("=") for o in overrides))))
    one_skipped = build(cfg_for(folder, tmp_path / "cache1b", **dict(o.split("=") for o in overrides))).skipped
    args = ["data.format=imagefolder", f"data.root={folder}", "data.image_size=16", "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]", f"data.cache_dir={tmp_path / 'cache2'}"] + overrides
    ranks = run_on_two_ranks(tmp_path, args, "first")
    every = sorted(str(p) for p in folder.rglob("*.png"))
    assert sorted(ranks[0]["checked"] + ranks[1]["checked"]) == every  # train and val, each file once
    assert ranks[0]["checked"] and ranks[1]["checked"]
    assert {str(folder / "train/cat/bad.png"), str(truncated)} == set(one_skipped)  # one process finds both
    for r in ranks:
        assert sorted(r["skipped"]) == sorted(one_skipped)
        assert r["train"] == one["train"][0] and r["fingerprint"] == one["fingerprint"]
    again = run_on_two_ranks(tmp_path, args, "again")  # a restart: every answer is in the cache
    assert again[0]["checked"] == again[1]["checked"] == []
    assert again[0]["skipped"] == ranks[0]["skipped"]


def test_a_bad_file_found_by_one_rank_stops_every_rank_with_the_same_line(folder, tmp_path):
    (folder / "train" / "dog" / "bad.png").write_bytes(b"not an image")  # in rank 1's half (dogs come second)
    args = ["data.format=imagefolder", f"data.root={folder}", "data.image_size=16", "data.mean=[0.5,0.5,0.5]",
            "data.std=[0.25,0.25,0.25]", f"data.cache_dir={tmp_path / 'cache'}"]
    ranks = run_on_two_ranks(tmp_path, args, "bad")
    assert any("bad.png" in p for p in ranks[1]["checked"])
    assert not any("bad.png" in p for p in ranks[0]["checked"])
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["error"].startswith(f"cannot read image {folder / 'train/dog/bad.png'}: ")
