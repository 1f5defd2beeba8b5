"""Run `python -m trainer ...` command lines, each in its own process, from one parent that has imported the
trainer (torch, torchvision, accelerate, pycocotools) once.

Why: a command spends ~5 s of this 2-core machine on imports before it does anything; the bad-input catalogue
in tests/test_faults.py alone runs ~150 refused commands (~0.3 s of work each), and the seeded SIGKILL test
20 kill cycles. Here every case is a fork of this parent: its own pid, process group, current directory,
environment, argv, stdout/stderr files, signal handlers and exit status, as `python -m trainer` would have;
only the imports are shared. The catalogue also runs a sample of its cases as real interpreters and checks
that both ways print the same thing. A case may name a `script` instead (a test's driver, e.g.
tests/fault_driver.py, which wraps trainer functions and then calls the CLI): it runs as __main__ in the
child, so its wrapping stays in that child.

Batch: a JSON list of {"argv": [...], "cwd": "...", optional "env": {NAME: value} (added to the environment),
optional "environ" (the whole environment, replacing it), optional "script": path} on stdin; a JSON list of
{"returncode", "stdout", "stderr"} on stdout, in the same order; --jobs cases at once.
Usage: python tests/cli_zygote.py --jobs 2 < cases.json

--serve: one case at a time for as long as stdin stays open: each line on stdin is one case, and for each
the server writes two lines: {"pid": N} when the case's process has started (in its own process group, so
that a caller's timeout can stop it and what it started), then {"returncode", "stdout", "stderr"} when it
has ended. tests/conftest.py's `run_cli` and `run_forked` run the suite's one-process commands through one
such server per test process (TRAINER_TESTS_FORK_CLI=0 runs each as its own interpreter instead).
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

import trainer


def preload() -> None:
    """Every trainer module and what each imports (the commands import them lazily): the whole point."""
    import importlib
    import pkgutil

    import trainer

    for info in pkgutil.walk_packages(trainer.__path__, "trainer."):
        importlib.import_module(info.name)


def child(case: dict, out_path: str, err_path: str) -> None:
    """In the forked process: become `python -m trainer ARGV` (or `python SCRIPT ARGV`) run from CWD with ENV
    added to the environment, and never return."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a caller's timeout stops it and whatever it started
        os.chdir(case["cwd"])
        if "environ" in case:
            os.environ.clear()
            os.environ.update(case["environ"])
        os.environ.update(case.get("env", {}))
        for fd, path in ((0, os.devnull), (1, out_path), (2, err_path)):
            target = os.open(path, os.O_RDONLY) if fd == 0 else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                                                                           0o600)
            os.dup2(target, fd)
            os.close(target)
        argv, script = case["argv"], case.get("script")
        # as the interpreter sets it: `python -m trainer` puts the path of trainer/__main__.py first
        sys.argv = [script or os.path.join(os.path.dirname(trainer.__file__), "__main__.py"), *argv]
        from trainer.cli import main

        try:
            if script:
                import runpy

                runpy.run_path(script, run_name="__main__")
            else:
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


def result(status: int, out_path: str, err_path: str) -> dict:
    with open(out_path) as f_out, open(err_path) as f_err:
        return {"returncode": os.waitstatus_to_exitcode(status), "stdout": f_out.read(), "stderr": f_err.read()}


def serve() -> None:
    """One case per line of stdin, each run to its end before the next is read (see the module's doc)."""
    preload()
    tmp = tempfile.mkdtemp(prefix="cli-zygote-")
    out, err = os.path.join(tmp, "case.out"), os.path.join(tmp, "case.err")
    try:
        for line in sys.stdin:
            case = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(case, out, err)
            sys.stdout.write(json.dumps({"pid": pid}) + "\n")
            sys.stdout.flush()
            _, status = os.waitpid(pid, 0)
            sys.stdout.write(json.dumps(result(status, out, err)) + "\n")
            sys.stdout.flush()
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once")
    ap.add_argument("--serve", action="store_true", help="one case per line of stdin until it closes")
    args = ap.parse_args()
    if args.serve:
        return serve()
    jobs = args.jobs
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
                    child(cases[i], out, err)
                running[pid] = i
            pid, status = os.wait()  # blocks until one case ends; the caller's timeout bounds a hang
            i = running.pop(pid)
            results[i] = result(status, os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err"))
    finally:
        shutil.rmtree(tmp)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
