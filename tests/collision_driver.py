"""`python -m trainer ARGS`, killed (SIGKILL) at the moment it would put its first file in place under
COLLISION_KILL_UNDER: the file is written (a temporary the write gate recorded), not yet renamed over its
name. What a crash, a preemption or a kill -9 leaves; the collision table (tests/test_faults.py) then runs the
same command again and checks that it cleans up only its own leftovers.

No hook in the product: os.replace and os.rename are wrapped in this process only (the write gate places every
file with one of them; its own ledger file is left alone, so the kill lands on an output).
"""
import os
import signal
import sys

UNDER = os.path.realpath(os.environ["COLLISION_KILL_UNDER"])
GATE = (".cnn-trainer-files.json", ".cnn-trainer-files.lock", ".cnn-trainer-files.json.tmp")


def killing(real):
    def wrapped(src, dst, *a, **k):
        path = os.path.realpath(dst)
        if path.startswith(UNDER + os.sep) and os.path.basename(path) not in GATE:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    return wrapped


os.replace = killing(os.replace)
os.rename = killing(os.rename)

from trainer.cli import main  # noqa: E402  (after the wrapping, as a user's command would import it)

main(sys.argv[1:])
