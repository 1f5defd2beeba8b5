"""Requests to save a checkpoint now, or to save and stop (preemption, time limits), from signals or code.

Signal handlers only set a flag: the training loop looks at the flags at the next step boundary, all ranks
agree on them (an all-reduce), and only then does it save. Nothing heavy ever runs inside a handler.

During start-up (scanning and verifying data, decoding it, building the model: seconds to minutes, and
nothing worth saving yet) a stop request instead raises `StopRequested` in the main thread at once, so the
process leaves promptly; every file write is atomic and a start that has not committed removes what it
made, so nothing is left half-written. A watcher thread turns the stop file into the same signal then.
"""
from __future__ import annotations

import os
import signal
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
    if _startup["on"]:
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


def pending() -> Tuple[bool, bool]:
    """(save, stop) asked of this process; the stop file is looked at here (one stat per update)."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    if stop_file and os.path.exists(stop_file):
        _flags["stop"] = True
    return _flags["save"], _flags["stop"]


def clear() -> None:
    _flags["save"] = _flags["stop"] = False
