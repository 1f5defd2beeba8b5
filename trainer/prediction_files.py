"""Where `trainer predict` writes, decided before the model is loaded, through the write gate (trainer/outputs.py):
never over an input, never over a file it did not write.

A single output file (the classifier's CSV, the detector's JSON) is `output_file`: an existing one that predict
did not write needs --overwrite; an input (an image, a @list file, the model's own files) never. Per-image
outputs (segmentation masks and overlays, detection drawings) go into a folder of their own
(`PredictionFolder`): new, empty, or one an earlier `trainer predict` wrote into (its ledger says so), where
every file's name is planned from the input list first and checked (an input image, a file the user put there
or changed by hand: one line, nothing written). The files are written into a staging folder and moved into
place only when every image is done: a failure part-way leaves the folder as it was.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

from trainer.errors import TrainerError
from trainer.outputs import Folder, Inputs, open_folder, output_file


class Given(NamedTuple):
    """What `trainer predict` was given: each image as (its path, the folder it was found under: a given
    folder, or a given file's own folder), the folders and @list files given, and everything it reads
    (`protected`: those, and the model's folder), which it never writes."""
    images: List[Tuple[str, str]]
    folders: List[str]
    lists: List[str]
    protected: Inputs


def output_path(output: str, given: Given, kind: str, overwrite: bool) -> Tuple[Folder, str]:
    """The single output file (`kind`: CSV, JSON) as (its folder, its name), checked."""
    if Path(output).is_dir():
        raise TrainerError(f"--output {output} is a folder; give a {kind} file path, e.g. "
                           f"{Path(output) / ('preds.' + kind.lower())}")
    return output_file(output, "predict", "--output", given.protected, overwrite)


class PredictionFolder:
    """The files of one `trainer predict` in `folder` (`option` names it in messages: --output, --draw): for
    each input image, one file per suffix (the first is its main file: `a/b.jpg` -> `a/b.png`, then e.g.
    `.overlay.jpg` -> `a/b.overlay.jpg`), named after the image's path below the folder it was found under."""

    def __init__(self, folder: Path, option: str, given: Given, suffixes: Sequence[str]):
        self.option, self.suffixes = option, tuple(suffixes)
        self.out = open_folder(folder, "predictions", "predict", option, given.protected,
                               what="a folder of trainer predict's outputs")
        self.names: Dict[str, Path] = {}  # image path -> its main file's name below the folder
        seen: Dict[Path, str] = {}
        for path, base in given.images:
            rel = Path(os.path.relpath(path, base)).with_suffix(self.suffixes[0])
            if rel in seen:
                raise TrainerError(f"{path} and {seen[rel]} would both be written as {Path(folder) / rel}; give them "
                                   f"in separate runs or from one common folder")
            seen[rel], self.names[path] = path, rel
        self.out.check(self.targets(), advice="They are left as they are: choose another folder or move them")
        self._staging = self.out.staged()
        self.tmp: Optional[Path] = self._staging.__enter__()

    def targets(self) -> List[str]:
        return [rel.with_suffix(suffix).as_posix() for rel in self.names.values() for suffix in self.suffixes]

    def path(self, image_path: str, suffix: str) -> Path:
        """Where to write one output of one image (inside the staging folder); its folder exists."""
        target = self.tmp / self.names[image_path].with_suffix(suffix)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def abort(self) -> None:
        if self.tmp is not None:
            self.tmp = None
            self._staging.__exit__(_Aborted, _Aborted(), None)  # the staging folder goes; nothing is placed
            self.out.abandon()

    def close(self) -> int:
        """Move every file written into place and record them (each target checked again: something may have
        appeared since the start); returns the number of images."""
        self.tmp = None
        self._staging.__exit__(None, None, None)
        return len(self.names)


class _Aborted(Exception):
    """Thrown into the staging context to leave it without placing anything."""
