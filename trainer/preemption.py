"""Requests to save a checkpoint now, or to save and stop (preemption, time limits), from signals or code.

Signal handlers only set a flag: the training loop looks at the flags at the next step boundary, all ranks
agree on them (an all-reduce), and only then does it save. Nothing heavy ever runs inside a handler.

During start-up (scanning and verifying data, decoding it, building the model: seconds to minutes, and
nothing worth saving yet) a stop request instead raises `StopRequested` in the main thread at once, so the
process leaves promptly; every file write is atomic and a start that has not committed removes what it
made, so nothing is left half-written. A watcher thread turns the stop file into the same signal then.

A process started by `accelerate launch` on one process (its simple launcher: a plain subprocess) would never
hear of a SIGTERM sent to the launcher: the launcher dies of it and this process goes on, orphaned, until
the scheduler's SIGKILL (`stop_with_launcher`).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Iterable, Tuple

_flags = {"save": False, "stop": False}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # scheduler preemption / SLURM's --signal warning
# A file whose existence also means "save and stop": the SLURM batch scripts touch it from their signal trap,
# which reaches the trainer whatever launcher sits between (accelerate launch, torchrun, srun).
STOP_FILE_ENV = "TRAINER_STOP_FILE"


def request_save() -> None:
    """Save a checkpoint at the next step boundary, then go on training."""
    _flags["save"] = True


def request_stop() -> None:
    """Save a checkpoint at the next step boundary, then stop (resumable)."""
    _flags["stop"] = True


class StopRequested(BaseException):
    """A stop request during start-up. A BaseException, like KeyboardInterrupt, so that no `except
    Exception` on the way (a reader naming a bad file, say) turns it into something else."""


_startup = {"on": False, "watcher": None, "done": None}
STOP_FILE_POLL_S = 0.5  # how often the start-up watcher looks for the stop file


def _on_signal(signum, frame) -> None:
    request_stop()
    # Raised once, and never while the main thread is already leaving on an exception (in an `except`,
    # `finally` or `__exit__`): a second request (SLURM's SIGTERM to every task, then the batch script's stop
    # file seen by the watcher; Ctrl-C, then the SIGTERM of a launcher that died of it) must not interrupt the
    # clean-up under way (a temporary file being removed, the run folder being undone). The flag is enough
    # then: that exit ends the process, and were the exception handled and the start to go on, the step loop
    # acts on the flag at its first step.
    if _startup["on"] and sys.exc_info()[1] is None:
        _startup["on"] = False
        raise StopRequested(f"{signal.Signals(signum).name} during start-up")


def begin_startup() -> None:
    """From here until `end_startup`, a stop request (signal or stop file) raises StopRequested."""
    _startup["on"] = True
    if pending()[1]:  # asked before start-up began (while importing, say)
        raise StopRequested("stop requested before start-up")
    stop_file = os.environ.get(STOP_FILE_ENV)
    # the watcher signals this process: only where our handler (installed by the CLI) will receive it
    if stop_file and _startup["watcher"] is None and signal.getsignal(signal.SIGUSR1) is _on_signal:
        done = threading.Event()

        def watch() -> None:
            while not done.wait(STOP_FILE_POLL_S):
                if os.path.exists(stop_file):
                    os.kill(os.getpid(), signal.SIGUSR1)  # runs the handler in the main thread
                    return

        _startup["done"] = done
        _startup["watcher"] = threading.Thread(target=watch, name="stop-file-watcher", daemon=True)
        _startup["watcher"].start()


def end_startup() -> None:
    """The step loop begins: stop requests are flags again, acted on at the next step boundary."""
    _startup["on"] = False
    if _startup["done"] is not None:
        _startup["done"].set()
    _startup["watcher"] = _startup["done"] = None


def install_signal_handlers(signals: Iterable[int] = STOP_SIGNALS) -> None:
    for sig in signals:
        signal.signal(sig, _on_signal)


PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal the kernel sends this process when its parent dies


def _launcher_parent() -> int:
    """The pid of this process's parent if it is `accelerate launch` (`accelerate launch ...`, `python -m
    accelerate.commands.launch ...` or `python -m accelerate.commands.accelerate_cli launch ...`), else 0."""
    ppid = os.getppid()
    try:
        with open(f"/proc/{ppid}/cmdline", "rb") as fh:
            head = fh.read().split(b"\0")[:4]  # the interpreter, the script or -m and its module, the command
    except OSError:  # not Linux, or not allowed to look
        return 0
    names = {os.path.basename(arg) for arg in head}
    if b"accelerate.commands.launch" in names or (names & {b"accelerate", b"accelerate.commands.accelerate_cli"}
                                                   and b"launch" in names):
        return ppid
    return 0


def stop_with_launcher() -> None:
    """When `accelerate launch` started this one process, ask the kernel for a SIGTERM (a stop request) when
    the launcher dies. Why: for one process accelerate's simple launcher (1.15) runs the trainer as a plain
    subprocess and forwards no signal; a SIGTERM to the launcher (kill, `timeout`, a container's stop, a
    scheduler that signals only the pid it started) kills the launcher and leaves the trainer running, unaware,
    until the SIGKILL that follows (measured: SIGTERM to the launcher mid-decode of CIFAR-10's training split;
    the trainer went on to the end of its run, 50 s later). The launcher of several processes (torchrun's
    agent) forwards the signal itself and is left alone, and so is a trainer started from a shell (a `nohup`
    run outlives its shell, as it should)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return
    launcher = _launcher_parent()
    if not launcher:
        return
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # no prctl in this C library
        return
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != launcher:  # it died before the request took effect: the signal it would have sent
        os.kill(os.getpid(), signal.SIGTERM)


def pending() -> Tuple[bool, bool]:
    """(save, stop) asked of this process; the stop file is looked at here (one stat per update)."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file and os.path.exists(stop_file):
        _flags["stop"] = True
    return _flags["save"], _flags["stop"]


def clear() -> None:
    _flags["save"] = _flags["stop"] = False


def agreed(acc) -> Tuple[bool, bool]:
    """(save, stop) requested on any rank; every rank gets the same answer at the same step (one all-reduce of
    two flags; none on one process, so no GPU sync per update)."""
    if acc.num_processes == 1:
        return pending()
    import torch

    flags = torch.tensor([float(f) for f in pending()], device=acc.device)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0]), bool(flags[1])
