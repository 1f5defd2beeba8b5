"""`trainer predict`'s per-image outputs go into a folder of their own (new, empty, or predict's), never replace
an input image or a file it did not write (ground-truth masks, a prediction corrected by hand), and replace
their own on a second run; a refusal or a failure part-way leaves the folder as it was."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from trainer.errors import TrainerError
from trainer.outputs import LEDGER, PREDICTION_RECORD
from trainer.predict import list_inputs
from trainer.prediction_files import PredictionFolder


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path):
    """A masks-style split: images/{a,b}.png and sub/c.png, and the ground truth in masks/ (same names)."""
    for rel in ("images/a.png", "images/b.png", "images/sub/c.png", "masks/a.png", "masks/b.png"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"user's {rel}".encode())
    return tmp_path


def write_all(folder: PredictionFolder, inputs, text: str) -> int:
    for path, _ in inputs.images:
        folder.path(path, ".png").write_text(f"{text} {Path(path).name}")
    return folder.close()


def test_files_given_one_by_one_are_never_written_over(data):
    """`trainer predict --model M images/*.png --output images`: each mask would land on its own image. The
    folder holds the user's images: it is not predict's (rule 4); and in predict's own folder, an image given
    as input is never replaced by its mask either."""
    before = digest(data)
    inputs = list_inputs([str(data / "images" / "a.png"), str(data / "images" / "b.png")])
    with pytest.raises(TrainerError, match="is not a folder of trainer predict's outputs"):
        PredictionFolder(data / "images", "--output", inputs, (".png",))
    out = data / "out"
    write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "first")
    (out / "c.png").write_bytes(b"an image the user put there")
    inputs = list_inputs([str(out / "c.png")])
    with pytest.raises(TrainerError, match="is the input image"):
        PredictionFolder(out, "--output", inputs, (".png",))
    assert digest(data / "images") == {k[len("images/"):]: v for k, v in before.items() if k.startswith("images/")}
    assert (out / "c.png").read_bytes() == b"an image the user put there"
    assert not list(data.rglob("*stage*"))


def test_a_folder_given_through_a_list_file_is_an_input_folder(data):
    listing = data / "list.txt"
    listing.write_text(f"{data / 'images'}\n")
    inputs = list_inputs(["@" + str(listing)])
    assert inputs.folders == [str(data / "images")] and len(inputs.images) == 3
    with pytest.raises(TrainerError, match="lies inside the input folder"):
        PredictionFolder(data / "images" / "out", "--output", inputs, (".png",))


def test_ground_truth_masks_in_the_output_folder_are_refused_and_kept(data):
    before = digest(data)
    inputs = list_inputs([str(data / "images")])
    with pytest.raises(TrainerError, match=r"masks already exists and is not a folder of trainer predict's"):
        PredictionFolder(data / "masks", "--output", inputs, (".png",))
    assert digest(data) == before


def test_a_second_run_replaces_its_own_files_and_leaves_the_users_alone(data):
    out = data / "out"
    inputs = list_inputs([str(data / "images")])
    assert write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "first") == 3
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "mine.png").write_text("mine too")
    assert write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "second") == 3
    assert (out / "a.png").read_text() == "second a.png" and (out / "notes.txt").read_text() == "mine"
    assert (out / "sub" / "c.png").read_text() == "second c.png" and (out / "sub" / "mine.png").read_text() == "mine too"
    # a mask corrected by hand is the user's now: the next run refuses to replace it
    (out / "b.png").write_text("corrected by hand")
    with pytest.raises(TrainerError, match="b.png was not written by the trainer .or changed since"):
        PredictionFolder(out, "--output", inputs, (".png",))
    assert (out / "b.png").read_text() == "corrected by hand"
    # as does a file where one of its folders would go
    os.rename(out / "sub", out / "elsewhere")
    (out / "sub").write_text("a file")
    (out / "b.png").unlink()
    with pytest.raises(TrainerError, match="out/sub is a file where the trainer needs a folder"):
        PredictionFolder(out, "--output", inputs, (".png",))


@pytest.mark.parametrize("record", [PREDICTION_RECORD, LEDGER])
def test_a_record_that_is_not_ours_is_refused(data, record):
    """predict's record of before the ledger (adopted when it reads) or a ledger that is not one."""
    out = data / "out"
    out.mkdir()
    (out / record).write_text("[1, 2]")
    with pytest.raises(TrainerError, match="cannot read .*" + record.replace(".", r"\.")):
        PredictionFolder(out, "--output", list_inputs([str(data / "images")]), (".png",))


def test_a_folder_of_an_earlier_version_is_adopted_by_its_record(data):
    """A predict of before the ledger recorded each file's size and modification time: those still unchanged
    are predict's, the rest the user's."""
    out = data / "out"
    out.mkdir()
    for name in ("a.png", "b.png"):
        (out / name).write_text("old mask")
    stat = {name: [(out / name).stat().st_size, (out / name).stat().st_mtime_ns] for name in ("a.png", "b.png")}
    (out / PREDICTION_RECORD).write_text(json.dumps({"format": "cnn-trainer-predictions", "files": stat}))
    (out / "b.png").write_text("corrected")
    inputs = list_inputs([str(data / "images" / "a.png")])
    write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "new")
    assert (out / "a.png").read_text() == "new a.png"
    inputs = list_inputs([str(data / "images" / "b.png")])
    with pytest.raises(TrainerError, match="b.png was not written by the trainer"):
        PredictionFolder(out, "--output", inputs, (".png",))


def test_a_failure_part_way_leaves_the_folder_as_it_was(data):
    out = data / "out"
    inputs = list_inputs([str(data / "images")])
    write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "first")
    before = digest(data)
    files = PredictionFolder(out, "--output", inputs, (".png", ".overlay.jpg"))
    files.path(inputs.images[0][0], ".png").write_text("half")
    files.abort()
    assert digest(data) == before and not list(data.rglob("*stage*"))


def test_two_images_with_one_output_name_are_refused_before_any_work(data):
    (data / "images" / "a.jpg").write_bytes(b"another a")
    with pytest.raises(TrainerError, match="would both be written as"):
        PredictionFolder(data / "out", "--output", list_inputs([str(data / "images")]), (".png",))
    assert not (data / "out").exists()


def test_the_current_folder_as_output_and_a_run_cut_short_leaves_no_folder_it_made(data, monkeypatch):
    """`trainer predict --model M images/a.png --output .`: only into an empty current folder (or predict's own);
    an aborted run removes the folders it made for --output."""
    monkeypatch.chdir(data)
    inputs = list_inputs(["images/a.png"])
    with pytest.raises(TrainerError, match="is not a folder of trainer predict's outputs"):
        PredictionFolder(Path("."), "--output", inputs, (".png",))
    (data / "empty").mkdir()
    monkeypatch.chdir(data / "empty")
    inputs = list_inputs([str(data / "images" / "a.png")])
    assert write_all(PredictionFolder(Path("."), "--output", inputs, (".png",)), inputs, "here") == 1
    assert (data / "empty" / "a.png").read_text() == "here a.png" and not list(data.rglob("*stage*"))
    files = PredictionFolder(Path("new") / "deep", "--output", inputs, (".png",))
    files.path(inputs.images[0][0], ".png").write_text("half")
    files.abort()
    assert not (data / "empty" / "new").exists()


def test_two_runs_into_one_folder_at_once_keep_each_others_record(data):
    out = data / "out"
    first, second = (list_inputs([str(data / "images" / name)]) for name in ("a.png", "b.png"))
    a = PredictionFolder(out, "--output", first, (".png",))
    b = PredictionFolder(out, "--output", second, (".png",))  # started before a finished
    write_all(a, first, "a")
    write_all(b, second, "b")
    for inputs in (first, second):  # each run's own file is still its own
        write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "again")
    assert (out / "a.png").read_text() == "again a.png" and (out / "b.png").read_text() == "again b.png"
