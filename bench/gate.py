"""How the bench scripts write: every file they write, replace or delete outside a temporary folder of their own
goes through the trainer's write gate (trainer/outputs.py) under its policy. A result file is written whole and
renamed into place (a reader never sees half of one) and recorded in its folder's ledger, so a rerun replaces
its own results while a file of the user's at that name is refused in one line and stays byte for byte; a
folder of synthetic data is drawn in a staging folder and renamed into place in one step; a log is recorded
before a subprocess writes into it.

Refusals end the script as its other errors do: SystemExit with one "error: ..." line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence, Union

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's trainer, not an installed one

from trainer.errors import TrainerError  # noqa: E402
from trainer.outputs import Folder  # noqa: E402

BY = "bench"  # who the ledgers say wrote a file: any bench script replaces what a bench script wrote
MARKER = "dataset.json"  # in each folder made_once makes: the parameters it was drawn with


def _refused(err: TrainerError) -> SystemExit:
    return SystemExit(f"error: {err}")


def bench_folder(path: Union[str, Path], option: str) -> Folder:
    """A folder a bench script writes into; `option` names it in messages (the flag that chose it)."""
    return Folder(Path(path), BY, option=option)


def result_files(name: str) -> list:
    return [f"{name}.json", f"{name}.md"]


def check_results(out: Union[str, Path], names: Sequence[str], option: str = "--out") -> None:
    """Before any work: refuse (in one line) the files in `out` this run could not write at the end, e.g. a file
    of the user's named like a result, so that a long measurement is not lost at its last step."""
    try:
        bench_folder(out, option).check(names)
    except TrainerError as err:
        raise _refused(err) from None


def write_results(out: Union[str, Path], name: str, data: Union[dict, list], markdown: str,
                  option: str = "--out") -> Path:
    """`out`/`name`.json (`data`) and `out`/`name`.md (`markdown`), both checked before either is written."""
    folder = bench_folder(out, option)
    try:
        folder.check(result_files(name))
        folder.write_json(f"{name}.json", data)
        return folder.write(f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n")
    except TrainerError as err:
        raise _refused(err) from None


def write_file(out: Union[str, Path], rel: str, data: Union[str, bytes], option: str = "--out") -> Path:
    """One more file a bench script leaves in `out` (a side's result, a test report), under the same rule."""
    try:
        return bench_folder(out, option).write(rel, data)
    except TrainerError as err:
        raise _refused(err) from None


def fresh_log(folder: Folder, rel: str):
    """The file `rel` of `folder`, empty and open for appending (line-buffered), for a subprocess's output: the
    log an earlier run left there (recorded as the bench's) is removed first; a file of the user's at that name
    is refused and left as it is. Recorded as live, so lines are appended without a ledger write each."""
    try:
        folder.remove(rel)
        return folder.append(rel)
    except TrainerError as err:
        raise _refused(err) from None


def made_once(root: Path, params: dict, fill: Callable[[Path], None], option: str = "--work") -> Path:
    """The folder `root` holding what `params` describe. Reused when the bench made it with these `params` (its
    marker, recorded in the ledger of root's parent, says so); else `fill(staging)` draws it in a staging folder
    that the gate renames over `root` in one step (an earlier version's files of the bench's own replaced), so a
    run cut short never leaves a half-made folder that a later run would trust. A folder at `root` that the bench
    did not make is refused and left as it is: nothing found by a marker alone is ever deleted."""
    root = Path(root)
    parent = bench_folder(root.parent, option)
    rel = root.name
    if os.path.lexists(root):
        if rel not in parent.ledger.dirs or not parent.owns(f"{rel}/{MARKER}"):
            raise SystemExit(f"error: {option}: {root} exists and was not made by a bench script (the ledger of "
                             f"{root.parent} does not record it, or its {MARKER} changed); it is left as it is: "
                             f"move it away or choose another {option}")
        if json.loads((root / MARKER).read_text()) == params:
            return root
    try:
        with parent.replacing(rel) as staging:
            fill(staging)
            (staging / MARKER).write_text(json.dumps(params, indent=1) + "\n")
    except TrainerError as err:
        raise _refused(err) from None
    return root
