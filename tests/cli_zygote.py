"""Run many `python -m trainer ...` command lines, each in its own process, from one parent that has imported
the trainer (torch, torchvision, accelerate, pycocotools) once.

Why: the bad-input catalogue in tests/test_faults.py runs ~130 refused commands. As separate interpreters each
one paid ~5 s of imports on 2 cores (5.5 minutes of CI for ~0.3 s of work each). Here every case is a fork of
this parent: its own pid, current directory, stdout/stderr files, signal handlers and exit code, exactly as
`python -m trainer` would give; only the imports are shared. The test also runs a sample of the cases as real
interpreters and checks that both ways print the same thing.

Protocol: a JSON list of {"argv": [...], "cwd": "..."} on stdin; a JSON list of {"returncode", "stdout",
"stderr"} on stdout, in the same order. Usage: python tests/cli_zygote.py --jobs 2 < cases.json
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import traceback


def preload() -> None:
    """Every trainer module and what each imports (the commands import them lazily): the whole point."""
    import importlib
    import pkgutil

    import trainer

    for info in pkgutil.walk_packages(trainer.__path__, "trainer."):
        importlib.import_module(info.name)


def child(argv: list, cwd: str, out_path: str, err_path: str) -> None:
    """In the forked process: become `python -m trainer ARGV` run from CWD, and never return."""
    code = 1
    try:
        os.chdir(cwd)
        for fd, path in ((1, out_path), (2, err_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        sys.argv = ["trainer", *argv]
        from trainer.cli import main

        try:
            main(argv)
            code = 0
        except SystemExit as exc:  # what the interpreter would turn into the exit status
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # an uncaught exception: the interpreter prints the traceback and exits 1
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()  # what a normal interpreter exit runs (and could write to disk)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once")
    jobs = ap.parse_args().jobs
    cases = json.load(sys.stdin)
    preload()
    results: list = [None] * len(cases)
    # not TemporaryDirectory: its clean-up is an exit hook, which every child runs at its own exit
    tmp = tempfile.mkdtemp(prefix="cli-zygote-")
    try:
        running: dict = {}  # pid -> case index
        pending = list(range(len(cases)))
        while pending or running:
            while pending and len(running) < jobs:
                i = pending.pop(0)
                out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    child(cases[i]["argv"], cases[i]["cwd"], out, err)
                running[pid] = i
            pid, status = os.wait()  # blocks until one case ends; the caller's timeout bounds a hang
            i = running.pop(pid)
            with open(os.path.join(tmp, f"{i}.out")) as f_out, open(os.path.join(tmp, f"{i}.err")) as f_err:
                results[i] = {"returncode": os.waitstatus_to_exitcode(status), "stdout": f_out.read(),
                              "stderr": f_err.read()}
    finally:
        shutil.rmtree(tmp)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
