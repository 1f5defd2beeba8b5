"""Where `trainer predict` may write, checked before the model is loaded: never over an input image, never over
a file it did not write itself.

Per-image outputs (segmentation masks and overlays, detection drawings) go into a folder that often holds the
user's own files: the images themselves (`--output data/val/images`), the ground-truth masks
(`--output data/val/masks`), a hand-corrected earlier prediction. `PredictionFolder` plans every file's name
from the input list first and refuses, in one line, a name that is an input image or an existing file that an
earlier `trainer predict` did not write (or that changed since: a mask corrected by hand is the user's now).
What it wrote is recorded in RECORD inside the folder (each file's size and modification time), so running
the same prediction again replaces its own files and nothing else. The files are written into a temporary
folder (hidden, inside the output folder) and moved into place only when every image is done: a failure
part-way leaves the folder as it was.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Sequence, Tuple

from trainer.data.folders import is_image_file
from trainer.errors import TrainerError
from trainer.files import atomic_write_json

RECORD = ".cnn-trainer-predictions.json"
RECORD_FORMAT = "cnn-trainer-predictions"


class Inputs(NamedTuple):
    """What `trainer predict` was given: each image as (its path, the folder it was found under: a given
    folder, or a given file's own folder), and the folders given (searched recursively)."""
    images: List[Tuple[str, str]]
    folders: List[str]


def check_output_file(output: str, inputs: Inputs, kind: str) -> Path:
    """A single output file (the classifier's CSV, the detector's JSON): not a folder, not an image's name, not
    one of the inputs."""
    out = Path(output)
    if out.is_dir():
        raise TrainerError(f"--output {output} is a folder; give a {kind} file path, e.g. "
                           f"{out / ('preds.' + kind.lower())}")
    inputs_real = {os.path.realpath(path) for path, _ in inputs.images}
    if is_image_file(out) or os.path.realpath(out) in inputs_real:
        raise TrainerError(f"--output {output} would overwrite an input image; give a {kind} file path")
    return out


class PredictionFolder:
    """The files of one `trainer predict` in `folder` (`option` names it in messages: --output, --draw): for
    each input image, one file per suffix (the first is its main file: `a/b.jpg` -> `a/b.png`, then e.g.
    `.overlay.jpg` -> `a/b.overlay.jpg`), named after the image's path below the folder it was found under."""

    def __init__(self, folder: Path, option: str, inputs: Inputs, suffixes: Sequence[str]):
        self.folder, self.option, self.suffixes = Path(folder), option, tuple(suffixes)
        if self.folder.exists() and not self.folder.is_dir():
            raise TrainerError(f"{option} {folder} is a file; it must be a folder (one file per image is written "
                               f"into it)")
        out = os.path.realpath(self.folder)
        for given in inputs.folders:
            if out == os.path.realpath(given) or out.startswith(os.path.realpath(given).rstrip(os.sep) + os.sep):
                raise TrainerError(f"{option} {folder} lies inside the input folder {given}: the outputs would mix "
                                   f"with the images; write them elsewhere")
        self.names: Dict[str, Path] = {}  # image path -> its main file's name below the folder
        seen: Dict[Path, str] = {}
        for path, base in inputs.images:
            rel = Path(os.path.relpath(path, base)).with_suffix(self.suffixes[0])
            if rel in seen:
                raise TrainerError(f"{path} and {seen[rel]} would both be written as {self.folder / rel}; give them "
                                   f"in separate runs or from one common folder")
            seen[rel], self.names[path] = path, rel
        self.inputs_real = {os.path.realpath(path): path for path, _ in inputs.images}
        self.record = self.read_record()
        self.check_targets()
        # the temporary folder inside the output folder: the final moves stay on one file system (the output may
        # be a link to, or a mount of, another), and its name is unique (two runs may share a process id)
        self.created = [d for d in (self.folder, *self.folder.parents) if not d.exists()]  # removed by abort
        self.folder.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=".cnn-trainer-predict.tmp-", dir=self.folder))

    def targets(self) -> List[Path]:
        return [rel.with_suffix(suffix) for rel in self.names.values() for suffix in self.suffixes]

    def read_record(self) -> Dict[str, list]:
        path = self.folder / RECORD
        if not path.exists():
            return {}
        try:
            record = json.loads(path.read_text())
            if record.get("format") != RECORD_FORMAT:
                raise ValueError("not a record of trainer predict")
            return {str(name): list(stat) for name, stat in record["files"].items()}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
            raise TrainerError(f"{self.option} {self.folder}: cannot read {path} ({err}); it says which "
                               f"files an earlier trainer predict wrote there: move it away or choose another "
                               f"folder") from None

    def owned(self, rel: Path) -> bool:
        """Written there by an earlier `trainer predict` and unchanged since (same size and modification time)."""
        stat = self.record.get(rel.as_posix())
        target = self.folder / rel
        if stat is None or target.is_symlink() or not target.is_file():
            return False
        now = target.stat()
        return [now.st_size, now.st_mtime_ns] == stat

    def check_targets(self) -> None:
        """Refuse, before anything is written, a name that is an input image or a file that is not ours (or a
        file or link where one of its folders would go)."""
        in_the_way = []
        for rel in self.targets():
            target = self.folder / rel
            image = self.inputs_real.get(os.path.realpath(target))
            if image is not None:
                raise TrainerError(f"{self.option} {self.folder} would write {target} over the input image {image}; "
                                   f"write the outputs into another folder")
            between = list(rel.parents)[:-1]  # its folders below self.folder
            blocked = [self.folder / d for d in between if (self.folder / d).is_symlink()
                       or ((self.folder / d).exists() and not (self.folder / d).is_dir())]
            if not blocked and (target.exists() or target.is_symlink()) and not self.owned(rel):
                blocked = [target]
            in_the_way += blocked[:1]
        if in_the_way:
            raise TrainerError(f"{self.option} {self.folder} already holds {len(in_the_way)} file(s) that trainer "
                               f"predict would replace but did not write (or that changed since it did), e.g. "
                               f"{in_the_way[0]}; they are left as they are: choose another folder or move them")

    def path(self, image_path: str, suffix: str) -> Path:
        """Where to write one output of one image (inside the temporary folder); its folder exists."""
        target = self.tmp / self.names[image_path].with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        for folder in self.created:  # deepest first; only the folders this run made, and only when empty
            try:
                folder.rmdir()
            except OSError:
                break

    def close(self) -> int:
        """Move every file written into place and record them; returns the number of images. Under a lock on
        the folder (another `trainer predict` into it may finish meanwhile): the record is read again and the
        targets checked again (something may have appeared since the start)."""
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (some NFS): the record is still re-read just before
                pass
            self.record = self.read_record()
            self.check_targets()
            record = {name: stat for name, stat in self.record.items() if (self.folder / name).is_file()}
            try:
                for source in sorted(p for p in self.tmp.rglob("*") if p.is_file()):
                    rel = source.relative_to(self.tmp)
                    target = self.folder / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(source, target)
                    now = target.stat()
                    record[rel.as_posix()] = [now.st_size, now.st_mtime_ns]
            finally:  # also after a failure part-way: what was moved is ours, and the next run may replace it
                atomic_write_json(self.folder / RECORD, {"format": RECORD_FORMAT, "files": record})
        finally:
            os.close(fd)  # and the lock with it
        shutil.rmtree(self.tmp, ignore_errors=True)
        return len(self.names)
