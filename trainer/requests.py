"""Requests to save a checkpoint now, or to save and stop (preemption, time limits), from signals or code.

Signal handlers only set a flag: the training loop looks at the flags at the next step boundary, all ranks
agree on them (an all-reduce), and only then does it save. Nothing heavy ever runs inside a handler.
"""
from __future__ import annotations

import os
import signal
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


def _on_signal(signum, frame) -> None:
    request_stop()


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
