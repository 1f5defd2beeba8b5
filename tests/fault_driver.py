"""Runs the trainer's CLI with one fault injected at a chosen moment, by wrapping a trainer function (no hook
in the product). Usage: FAULT=kind FAULT_AT=n python tests/fault_driver.py train - key=value ...

kinds (n = the update counted from 1, as in metrics.jsonl's "step"):
  kill_at_update      SIGKILL while update n is being computed (when its learning rate is asked for)
  kill_during_save    SIGKILL after the first file of the checkpoint of update n is written
  kill_between_renames  SIGKILL after the checkpoint folder of update n already on disk is renamed aside to be
                      replaced by its new version (saved again under its name), before that one lands
  kill_after_rename   SIGKILL right after the checkpoint of update n is renamed into place, before the gate's
                      ledger records it
  kill_during_eval    SIGKILL in the middle of the evaluation that follows update n
  kill_during_export  SIGKILL after model.safetensors of the final export is written (n unused)
  sigterm_at_update   a real preemption signal (SIGTERM) during update n
  fill_disk_at_save   fill the run directory's file system ($FAULT_DISK) just before the checkpoint of update n
  fill_disk_at_export fill it just before model.safetensors of the final export is written (n unused)
  kill_in_startup     SIGKILL while the data are being read (start-up)
  sigterm_in_startup  SIGTERM to itself while the data are being read (start-up)
  stop_file_in_startup  create $TRAINER_STOP_FILE, then keep "scanning" until stopped (start-up)
  announce_phases     no fault: print "PHASE <name> begins pid=<pid>" (stdout, flushed) when the start-up's
                      check of a split's files (verify) or the device loader's decode (decode) begins, and
                      "PHASE <name> ends" when it returns, so that a test can signal the run inside one
  kill_rank1_at_update / stop_rank1_at_update   rank 1 SIGKILLs / SIGSTOPs itself during update n
"""
import os
import signal
import sys
import time

import trainer.checkpoint as C
import trainer.evaluation as V
import trainer.export as E
import trainer.loop as L
import trainer.session as S
from trainer.cli import main

KIND, AT = os.environ["FAULT"], int(os.environ.get("FAULT_AT", "0"))
RANK = int(os.environ.get("RANK", "0"))
seen = {"update": 0}  # the update being computed: lr_at(u - 1) is asked for during update u


def die(sig=signal.SIGKILL) -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), sig)


original_lr_at = L.lr_at


def lr_at(update, *a, **k):
    seen["update"] = max(seen["update"], update + 1)
    if update + 1 == AT:
        if KIND == "kill_at_update":
            die()
        elif KIND == "sigterm_at_update":
            os.kill(os.getpid(), signal.SIGTERM)
        elif KIND == "kill_rank1_at_update" and RANK == 1:
            die()
        elif KIND == "stop_rank1_at_update" and RANK == 1:
            die(signal.SIGSTOP)
    return original_lr_at(update, *a, **k)


L.lr_at = lr_at
original_save_file = C.save_file


def fill_disk() -> None:
    """Fill $FAULT_DISK until the file system refuses a single byte. Unbuffered writes, so that the refusal
    happens here and nothing is left in a buffer to fail again on close: the next write, the trainer's own
    inside safetensors' writer, is the first to meet the full disk (as it would on a real one)."""
    fd = os.open(os.path.join(os.environ["FAULT_DISK"], "filler.bin"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 4096, 1):  # then the last partial block
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)


def save_file(tensors, path, *a, **k):
    in_target = f".step-{AT:08d}.tmp-" in str(path)
    if KIND == "fill_disk_at_save" and in_target and path.endswith("/model.safetensors"):
        fill_disk()
    original_save_file(tensors, path, *a, **k)
    if KIND == "kill_during_save" and in_target:
        die()


C.save_file = save_file
original_rename = os.rename


def rename(src, dst, *a, **k):
    original_rename(src, dst, *a, **k)
    name = f"step-{AT:08d}"
    if KIND == "kill_between_renames" and str(src).endswith(f"checkpoints/{name}") and f".{name}.old-" in str(dst):
        die()
    if KIND == "kill_after_rename" and str(dst).endswith(f"checkpoints/{name}") and f".{name}.tmp-" in str(src):
        die()


os.rename = rename  # the gate's folder swap (outputs.Folder.replacing) renames with it
original_evaluate = V.evaluate


def evaluate(*a, **k):
    if KIND == "kill_during_eval" and seen["update"] == AT:
        die()
    return original_evaluate(*a, **k)


V.evaluate = evaluate  # what the loop's scoring (evaluation.score) calls
original_export_save = E.save_file


def export_save(tensors, path, *a, **k):
    if KIND == "fill_disk_at_export" and "/.model.tmp-" in str(path):
        fill_disk()
    original_export_save(tensors, path, *a, **k)
    if KIND == "kill_during_export" and "/.model.tmp-" in str(path):
        die()


E.save_file = export_save
original_build_data = S.build_data_on_ranks


def build_data(*a, **k):
    if KIND == "kill_in_startup":
        die()
    if KIND == "sigterm_in_startup":
        os.kill(os.getpid(), signal.SIGTERM)
    if KIND == "stop_file_in_startup":
        open(os.environ["TRAINER_STOP_FILE"], "w").close()
        deadline = time.time() + 60  # a long scan, as of a million files; a stop must end it within seconds
        while time.time() < deadline:
            time.sleep(0.01)
        print("start-up was not stopped", file=sys.stderr)
    return original_build_data(*a, **k)


S.build_data_on_ranks = build_data  # what the session's start-up calls


def announced(module, name: str, phase: str) -> None:
    original = getattr(module, name)

    def wrapper(*a, **k):
        print(f"PHASE {phase} begins pid={os.getpid()}", flush=True)
        out = original(*a, **k)
        print(f"PHASE {phase} ends", flush=True)  # not on an exception: a stop inside it prints nothing here
        return out

    setattr(module, name, wrapper)


if KIND == "announce_phases":
    import trainer.data as DATA
    import trainer.data.device as DEVICE

    announced(DATA, "find_bad_images", "verify")  # as build_data calls it (one process)
    announced(DEVICE, "decode_split", "decode")  # as to_device_loader calls it
main(sys.argv[1:])
