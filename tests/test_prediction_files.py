"""`trainer predict`'s per-image outputs never replace an input image or a file it did not write (ground-truth
masks, a prediction corrected by hand), and replace their own on a second run; a refusal or a failure
part-way leaves the folder as it was."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from trainer.errors import TrainerError
from trainer.predict import list_inputs
from trainer.prediction_files import RECORD, PredictionFolder


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
    """`trainer predict --model M images/*.png --output images`: each mask would land on its own image."""
    before = digest(data)
    inputs = list_inputs([str(data / "images" / "a.png"), str(data / "images" / "b.png")])
    with pytest.raises(TrainerError, match="over the input image .*a.png"):
        PredictionFolder(data / "images", "--output", inputs, (".png",))
    assert digest(data) == before and not list(data.rglob(".cnn-trainer-predict.tmp-*"))


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
    with pytest.raises(TrainerError, match=r"already holds 2 file\(s\) .*did not write.*masks/a.png"):
        PredictionFolder(data / "masks", "--output", inputs, (".png",))
    assert digest(data) == before


def test_a_second_run_replaces_its_own_files_and_leaves_the_users_alone(data):
    out = data / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    inputs = list_inputs([str(data / "images")])
    assert write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "first") == 3
    assert (out / "sub" / "c.png").read_text() == "first c.png" and (out / "notes.txt").read_text() == "mine"
    assert write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "second") == 3
    assert (out / "a.png").read_text() == "second a.png" and (out / "notes.txt").read_text() == "mine"
    # a mask corrected by hand is the user's now: the next run refuses to replace it
    (out / "b.png").write_text("corrected by hand")
    with pytest.raises(TrainerError, match="changed since.*b.png"):
        PredictionFolder(out, "--output", inputs, (".png",))
    assert (out / "b.png").read_text() == "corrected by hand"
    # as does a file where one of its folders would go
    os.rename(out / "sub", out / "elsewhere")
    (out / "sub").write_text("a file")
    (out / "b.png").unlink()
    with pytest.raises(TrainerError, match="1 file.*out/sub"):
        PredictionFolder(out, "--output", inputs, (".png",))


def test_a_record_that_is_not_ours_is_refused(data):
    out = data / "out"
    out.mkdir()
    (out / RECORD).write_text("[1, 2]")
    with pytest.raises(TrainerError, match="cannot read .*" + RECORD.replace(".", r"\.")):
        PredictionFolder(out, "--output", list_inputs([str(data / "images")]), (".png",))


def test_a_failure_part_way_leaves_the_folder_as_it_was(data):
    out = data / "out"
    inputs = list_inputs([str(data / "images")])
    write_all(PredictionFolder(out, "--output", inputs, (".png",)), inputs, "first")
    before = digest(data)
    files = PredictionFolder(out, "--output", inputs, (".png", ".overlay.jpg"))
    files.path(inputs.images[0][0], ".png").write_text("half")
    files.abort()
    assert digest(data) == before and not list(data.rglob(".cnn-trainer-predict.tmp-*"))


def test_two_images_with_one_output_name_are_refused_before_any_work(data):
    (data / "images" / "a.jpg").write_bytes(b"another a")
    with pytest.raises(TrainerError, match="would both be written as"):
        PredictionFolder(data / "out", "--output", list_inputs([str(data / "images")]), (".png",))
    assert not (data / "out").exists()


def test_the_current_folder_as_output_and_a_run_cut_short_leaves_no_folder_it_made(data, monkeypatch):
    """`trainer predict --model M images/a.png --output .` (the temporary folder used to be a sibling of
    --output, which "." has none of); an aborted run removes the folders it made for --output."""
    monkeypatch.chdir(data)
    inputs = list_inputs(["images/a.png"])
    assert write_all(PredictionFolder(Path("."), "--output", inputs, (".png",)), inputs, "here") == 1
    assert (data / "a.png").read_text() == "here a.png" and not list(data.glob(".cnn-trainer-predict.tmp-*"))
    files = PredictionFolder(Path("new") / "deep", "--output", inputs, (".png",))
    files.path(inputs.images[0][0], ".png").write_text("half")
    files.abort()
    assert not (data / "new").exists()


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
