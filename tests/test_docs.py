"""The documentation a user reads (docs/ and README.md): the site builds with `mkdocs build --strict` (a broken link,
anchor or page missing from the navigation fails), the generated references hold every config key and command-line
option, and every command shown in a shell block is checked:

- a `trainer` command (also through accelerate, torchrun, launch/launch.sh and the sbatch scripts) parses with the
  real parser, and a `train` command's recipe and overrides load with load_config (a renamed key or a removed
  recipe fails here);
- each command is run by a test named in RUN_BY (the test must exist; an entry no command matches any more fails
  too), or its block is marked in the page, visibly, as needing what the tests cannot have: a line `*Needs a GPU
  ...*`, `*Needs a cluster ...*` or `*Needs a dataset ...*` (one the repository does not hold) right above it;
- the first session of docs/getting-started.md and the recipes for a user's own folders are run here, for real,
  with the data shrunk (test_the_commands_for_your_own_data_run_as_shown).

A synopsis (capitals to fill in, `[...]` optional) goes in a ```text block: it is not a command to run.
"""
import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from trainer.data import generated

DOCS = ROOT / "docs"
SHOWN = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
# files included into a page (pymdownx.snippets) whose commands are not checked, and why
NOT_CHECKED = {"BENCHMARKS.md": "the records of how each benchmark figure was measured (the datasets, machines and "
                                "folders named there); the bench scripts are smoke-tested by tests/test_bench*.py"}
FENCE = re.compile(r"^(\s*)```(bash|sh|shell|console)\s*$")
MARK = re.compile(r"^\*Needs (a GPU|a cluster|a dataset)\b")
SNIPPET = re.compile(r'^--8<-- "([^":]+)(?::[0-9]*:?[0-9]*)?"\s*$')

# What runs each command shown (a regex on the command, its environment assignments dropped -> the tests that run
# it, or the script CI runs). "launch/test.sh" is what CI runs; it runs launch/setup.sh first.
RUN_BY = [
    (r"bash launch/quickstart\.sh", ("launch/test.sh", "tests/test_api.py::test_train_runs_the_quick_start_recipe_and_returns_its_summary")),
    (r"bash launch/test\.sh( .*)?", ("launch/test.sh",)),
    (r"pip install -e \S*\.\[(tune|onnx|shards|tensorboard,mlflow|wandb)\]\S*", ("launch/test.sh",)),
    (r"trainer train configs/quickstart_multiclass\.yaml( .*)?", ("tests/test_api.py::test_train_runs_the_quick_start_recipe_and_returns_its_summary",
                                                               "tests/test_docs.py::test_the_commands_for_your_own_data_run_as_shown")),
    (r"trainer train configs/quickstart_binary\.yaml", ("tests/test_end_to_end.py::test_training_beats_chance_and_run_dir_describes_itself",)),
    (r"trainer train configs/quickstart_segmentation\.yaml", ("tests/test_segmentation.py::test_the_quick_start_beats_a_per_pixel_colour_rule_by_a_wide_margin",)),
    (r"trainer train configs/quickstart_detection\.yaml", ("tests/test_detection.py::test_the_quick_start_clearly_beats_an_untrained_detector",)),
    (r"trainer train configs/quickstart_multilabel\.yaml", ("tests/test_multilabel.py::test_the_quick_start_recipe_learns_well_above_chance",)),
    (r"trainer train configs/(imagefolder|segmentation_folder|detection_folder|multilabel_csv)\.yaml data\.root=\S+",
     ("tests/test_docs.py::test_the_commands_for_your_own_data_run_as_shown",)),
    (r"trainer (eval|predict|export) --model runs/first.*", ("tests/test_docs.py::test_the_commands_for_your_own_data_run_as_shown",)),
    (r"trainer eval --model runs/RUN data\.root=\S+( .*)?", ("tests/test_end_to_end.py::test_eval_of_a_folder_of_class_folders_scores_every_image",)),
    (r"trainer eval --model runs/RUN data\.format=masks .*", ("tests/test_segmentation.py::test_a_segmentation_run_describes_itself_and_predict_reproduces_eval",)),
    (r"trainer eval --model runs/RUN data\.format=coco .*", ("tests/test_detection.py::test_eval_is_exact_on_1_2_and_3_processes_and_predict_reproduces_it_under_pycocotools",)),
    (r"trainer eval --model runs/RUN data\.format=multilabel .*", ("tests/test_multilabel.py::test_a_multilabel_run_reports_map_and_predict_reproduces_eval",)),
    (r"trainer predict --model runs/RUN \S+ --output preds\.csv( .*)?", ("tests/test_end_to_end.py::test_predict_and_eval_reproduce_the_in_memory_model",
                                                                     "tests/test_multilabel.py::test_a_multilabel_run_reports_map_and_predict_reproduces_eval")),
    (r"trainer predict --model runs/RUN \S+ --output masks/ .*", ("tests/test_segmentation.py::test_a_segmentation_run_describes_itself_and_predict_reproduces_eval",)),
    (r"trainer predict --model runs/RUN \S+ --output preds\.json .*", ("tests/test_detection.py::test_predict_draws_neither_into_the_input_folder_nor_over_a_users_file",)),
    (r"trainer export --model runs/RUN --format onnx .*", ("tests/test_onnx.py::test_cli_export_matches_trainer_predict",)),
    (r"trainer pack \S+ \S+", ("tests/test_shards.py::test_training_from_shards_equals_training_from_the_folder",)),
    (r"trainer pack \S+ \S+ --max-side \d+", ("tests/test_shards.py::test_a_shrunk_pack_trains",)),
    (r"trainer train configs/imagefolder\.yaml data\.format=shards data\.root=\S+",
     ("tests/test_shards.py::test_training_from_shards_equals_training_from_the_folder",)),
    (r"accelerate launch --multi_gpu --num_processes 2 -m trainer train configs/quickstart_binary\.yaml",
     ("tests/test_end_to_end.py::test_accelerate_launch_multi_gpu_flag_runs_two_cpu_processes",)),
    (r"torchrun --nproc_per_node 2 -m trainer train configs/quickstart_binary\.yaml",
     ("tests/test_end_to_end.py::test_two_cpu_processes_really_run_and_evaluate_every_sample_once",)),
    (r"bash launch/launch\.sh configs/quickstart_binary\.yaml 2 .*", ("tests/test_docs.py::test_the_commands_for_your_own_data_run_as_shown",)),
    (r"trainer sweep configs/sweeps/quickstart_lr\.yaml --local", ("tests/test_launch.py::test_local_sweep_and_collect_lists_failures",)),
    (r"trainer collect sweeps/quickstart_lr", ("tests/test_launch.py::test_local_sweep_and_collect_lists_failures",)),
    (r"trainer tune configs/tunes/quickstart\.yaml --local --workers 2",
     ("tests/test_tune.py::test_two_local_workers_share_one_study_prune_and_the_best_config_trains_as_is",)),
    (r"trainer collect tunes/quickstart", ("tests/test_tune.py::test_two_local_workers_share_one_study_prune_and_the_best_config_trains_as_is",)),
    (r"trainer train tunes/quickstart/best\.yaml", ("tests/test_tune.py::test_two_local_workers_share_one_study_prune_and_the_best_config_trains_as_is",)),
    (r"mkdocs serve", ("tests/test_docs.py::test_the_site_builds_strictly",)),  # the same site, built
    (r"python bench/gpu_check\.py --dry-run", ("tests/test_bench_gpu_check.py::test_dry_run_writes_every_part",)),
]


def _resolve(path: Path) -> list:
    """The page's lines with its included files' lines in place of each `--8<--` line (those not in NOT_CHECKED),
    as (file, line number, text)."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = SNIPPET.match(line)
        if m and m.group(1) not in NOT_CHECKED:
            out += _resolve(ROOT / m.group(1))
        elif not m:
            out.append((path, n, line))
    return out


def shown_blocks() -> list:
    """(where, marker or None, [command, ...]) of every shell block of the docs and README; a command is one line
    (continuations joined), tokenised as the shell would (comments dropped), its leading VAR=value dropped."""
    found = []
    for page in SHOWN:
        lines = _resolve(page)
        i = 0
        while i < len(lines):
            path, n, text = lines[i]
            fence = FENCE.match(text)
            if not fence:
                i += 1
                continue
            before = next((t.strip() for _, _, t in reversed(lines[:i]) if t.strip()), "")
            marker = MARK.match(before)
            body, i = [], i + 1
            while not lines[i][2].strip().startswith("```"):
                body.append(lines[i][2])
                i += 1
            i += 1
            commands = []
            for command in re.sub(r"\\\n", " ", "\n".join(body)).splitlines():
                tokens = shlex.split(command, comments=True)
                while tokens and re.match(r"^[A-Z_][A-Z0-9_]*=", tokens[0]):
                    tokens = tokens[1:]
                if tokens:
                    commands.append(tokens)
            found.append((f"{path.relative_to(ROOT)}:{n}", marker.group(0) if marker else None, commands))
    return found


def _test_exists(name: str) -> bool:
    if "::" not in name:
        return (ROOT / name).is_file()
    file, func = name.split("::")
    tree = ast.parse((ROOT / file).read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == func for node in ast.walk(tree))


def test_every_command_shown_is_run_by_a_test_or_marked():
    blocks = shown_blocks()
    assert len(blocks) >= 20, "the docs' shell blocks were not found"
    unrun, used = [], set()
    for where, marker, commands in blocks:
        for tokens in commands:
            text = " ".join(tokens)
            hits = [i for i, (pattern, _) in enumerate(RUN_BY) if re.fullmatch(pattern, text)]
            used.update(hits)
            if not hits and not marker:
                unrun.append(f"{where}: {text}")
    assert not unrun, ("commands shown that no test runs and no *Needs a GPU/cluster/dataset* line marks (add the "
                       "test that runs each to RUN_BY, or mark its block):\n" + "\n".join(unrun))
    stale = [pattern for i, (pattern, _) in enumerate(RUN_BY) if i not in used]
    assert not stale, f"RUN_BY entries that match no command shown any more: {stale}"
    missing = [name for _, names in RUN_BY for name in names if not _test_exists(name)]
    assert not missing, f"RUN_BY names tests that do not exist: {missing}"


def trainer_argv(tokens: list):
    """The argv `trainer` receives from a command shown, or None for a command that does not start the trainer."""
    if tokens[0] in ("trainer", ".venv/bin/trainer"):
        return tokens[1:]
    if tokens[0] in ("python", "python3", ".venv/bin/python", "accelerate", "torchrun") and "-m" in tokens:
        at = tokens.index("-m")
        return tokens[at + 2:] if tokens[at + 1:at + 2] == ["trainer"] else None
    if tokens[:2] == ["bash", "launch/launch.sh"]:
        return ["train", tokens[2], *tokens[4:]]
    if tokens[0] == "sbatch":
        script = next(i for i, t in enumerate(tokens) if t.startswith("slurm/"))
        return ["train", *tokens[script + 1:]]
    return None


def test_every_trainer_command_shown_parses_and_its_config_loads():
    from trainer.cli import _parser
    from trainer.config import load_config

    checked, problems = 0, []
    for where, _, commands in shown_blocks():
        for tokens in commands:
            argv = trainer_argv(tokens)
            if argv is None:
                continue
            checked += 1
            try:
                args = _parser().parse_args(argv)
            except SystemExit:
                problems.append(f"{where}: {' '.join(tokens)}: the parser refuses it")
                continue
            if args.command == "train" and args.recipe != "-" and not (ROOT / args.recipe).is_file():
                if not args.recipe.startswith("tunes/"):  # written by `trainer collect` (checked by its test)
                    problems.append(f"{where}: no recipe {args.recipe}")
                continue
            if args.command in ("train", "eval"):
                recipe = str(ROOT / args.recipe) if args.command == "train" and args.recipe != "-" else None
                try:
                    load_config(recipe, args.overrides)
                except Exception as err:  # ConfigError: a key or value the schema refuses
                    problems.append(f"{where}: {' '.join(tokens)}: {err}")
            for name in ("sweep_file", "tune_file"):
                if getattr(args, name, None) and not (ROOT / getattr(args, name)).is_file():
                    problems.append(f"{where}: no {getattr(args, name)}")
    assert checked >= 30, checked
    assert not problems, "\n".join(problems)


def test_a_command_nobody_runs_is_caught():
    """The check above fails for a command that no test runs and nothing marks (it is not vacuous)."""
    text = "trainer train configs/resnet18_cifar10.yaml data.root=/data/cifar"
    assert not any(re.fullmatch(pattern, text) for pattern, _ in RUN_BY)
    assert trainer_argv(shlex.split("sbatch --nodes=2 slurm/multinode.sbatch configs/x.yaml a=1")) == [
        "train", "configs/x.yaml", "a=1"]


# ---- the site ----

def _mkdocs():
    try:
        import material  # noqa: F401  (mkdocs-material: the theme; the dev extra installs it)
        import mkdocs  # noqa: F401
    except ImportError as err:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"mkdocs-material is not installed ({err}); `pip install -e '.[dev]'` installs it")


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` into a temporary folder: a broken link or anchor, a page missing from the navigation
    or an included file that does not exist fails; nothing is written into the repository."""
    _mkdocs()
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})  # Material's notice of its successor
    assert res.returncode == 0, res.stdout + res.stderr
    config = (site / "reference" / "configuration" / "index.html").read_text()
    assert "data.augment.mixup_alpha" in config and "<!-- reference" not in config
    assert "trainer predict" in (site / "reference" / "cli" / "index.html").read_text()
    assert (site / "benchmarks" / "index.html").read_text().count("<table>") > 5  # BENCHMARKS.md included


def _hook():
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import reference
    finally:
        sys.path.pop(0)
    return reference


def test_the_configuration_reference_holds_every_key_with_its_type_default_range_and_help():
    import dataclasses

    from trainer.config import Config, flatten, to_dict

    rows = {row[0]: row for _, _, rows in _hook().config_rows() for row in rows}
    keys = set(flatten(to_dict(Config())))
    # dict-valued keys (optim.freeze_after_epochs, data.coco_files) are one key of the schema, empty by default
    assert keys - set(rows) <= {k for k in keys if k.startswith(("optim.freeze_after_epochs", "data.coco_files"))}
    assert set(rows) >= keys - {"optim.freeze_after_epochs", "data.coco_files"}
    unexplained = [key for key, row in rows.items() if not row[4]]
    assert not unexplained, f"keys without a comment in trainer/config.py (their help line): {unexplained}"
    lr = rows["optim.lr"]
    assert lr[1:4] == ("float", "0.05", "> 0") and "peak lr" in lr[4]
    assert rows["task"][1].startswith("one of `auto`") and "`detection`" in rows["task"][1] and "`multilabel`" in rows["task"][1]
    assert rows["train.batch_size"][4].startswith("per process") and rows["data.mean"][3] == "in [0, 1]"
    assert rows["data.root"][5] and not rows["train.batch_size"][5]  # may change on resume, or not
    page = _hook().config_reference()
    assert all(f"`{key}`" in page for key in rows)
    assert dataclasses.is_dataclass(Config)


def test_the_command_line_reference_holds_every_sub_command_and_option():
    from trainer.cli import _parser

    page = _hook().cli_reference()
    listed = [name for name, _, _ in _hook().cli_commands()]
    assert listed[0] == "trainer" and {"train", "eval", "predict", "export", "pack", "sweep", "tune", "collect"} <= set(listed)
    assert "sweep-args" not in listed and "tune-worker" not in listed  # internal: started by the scripts
    sub = next(a for a in _parser()._actions if a.dest == "command")
    for name in listed[1:]:
        for action in sub.choices[name]._actions:
            for flag in action.option_strings:
                assert flag in page, (name, flag)


def test_help_describes_every_task():
    res = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for task in ("binary", "multi-class", "multi-label", "segmentation", "detection"):
        assert task in text, task
    assert "image-classification trainer" not in text and "==SUPPRESS==" not in text


# ---- the README: the front door ----

def test_the_readme_is_a_front_door_that_links_into_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 160
    assert "../shared" not in text and "](../" not in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link
    for page in ("getting-started", "tasks/classification", "tasks/segmentation", "tasks/detection",
                 "tasks/multilabel", "launching", "reference/configuration"):
        assert f"docs/{page}.md" in text, page
    assert "bash launch/quickstart.sh" in text and "bash launch/test.sh" in text
    for page in SHOWN:  # no paragraph of prose that is a wall of text (lists and tables are cut into items)
        for paragraph in re.split(r"\n\s*\n|\n(?=\s*(?:[-*]|\d+\.) )", page.read_text()):
            if not re.match(r"\s*(\||```|-|\*|<|!|--8<--|#|\d+\. )", paragraph):
                assert len(paragraph) < 1200, f"{page.relative_to(ROOT)}: a paragraph of {len(paragraph)} characters"


# ---- the commands for your own data, run as shown (the data shrunk) ----

@pytest.mark.slow
def test_the_commands_for_your_own_data_run_as_shown(tmp_path):
    """The first session of the getting-started page, each `trainer train configs/<recipe>.yaml data.root=...` of
    the task pages for a user's own folders (on a folder of that layout drawn by the generated dataset), and
    launch/launch.sh, with the data, the image size and the run shrunk by trailing overrides (the commands' own
    keys are kept; a later key=value wins)."""
    shrink = ["data.generated.train_per_class=12", "data.generated.val_per_class=4", "data.generated.test_per_class=3",
              "train.epochs=1", "train.max_steps=2", "train.batch_size=8", "data.num_workers=0",
              "train.progress_bar=false"]
    commands = {" ".join(tokens): tokens for _, _, cmds in shown_blocks() for tokens in cmds}
    first = [tokens for text, tokens in commands.items() if "runs/first" in text]
    assert [t[1] for t in first] == ["train", "eval", "predict", "export"], first
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # run as from the project's root, writing nothing there
    for tokens in first:
        extra = shrink if tokens[1] == "train" else []
        res = run_cli(*tokens[1:], *extra, cwd=tmp_path)
        assert res.returncode == 0, f"{' '.join(tokens)}:\n{res.stdout[-1500:]}{res.stderr[-1500:]}"
    # the recipes for a user's own folders, on folders of their layouts
    recipes = {"imagefolder": "multiclass", "segmentation_folder": "segmentation", "detection_folder": "detection",
               "multilabel_csv": "multilabel"}
    for recipe, variant in recipes.items():
        shown = [t for text, t in commands.items() if text.startswith(f"trainer train configs/{recipe}.yaml data.root=")]
        assert shown, recipe
        folder = tmp_path / f"data-{variant}"
        generated.ensure_generated(folder, variant, 64 if variant == "detection" else 32, 0, {"train": 10, "val": 4})
        argv = [t if not t.startswith("data.root=") else f"data.root={folder}" for t in shown[0][1:]]
        size = 64 if variant == "detection" else 32  # the recipes' own sizes (128-512 px) take minutes on a CPU
        res = run_cli(*argv, *shrink[3:], f"data.image_size={size}", f"run.dir={tmp_path / ('run-' + variant)}",
                      cwd=ROOT)
        assert res.returncode == 0, f"{recipe}:\n{res.stdout[-1500:]}{res.stderr[-1500:]}"
    # launch/launch.sh as shown, on 2 CPU processes
    shown = next(t for text, t in commands.items() if text.startswith("bash launch/launch.sh"))
    env = {**os.environ, "TRAINER_PY": sys.executable, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*shown, *shrink, f"data.root={tmp_path / 'gen-launch'}", f"run.dir={tmp_path / 'launch'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    assert "processes=2" in res.stdout, res.stdout[-1500:]
    shutil.rmtree(tmp_path, ignore_errors=True)
