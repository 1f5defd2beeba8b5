"""A real, throwaway SLURM cluster on this machine for the tests: munged, one slurmctld and two slurmd
processes (`slurmd -N n1`, `-N n2`: two simulated nodes on one host). Every daemon is started and stopped
by PID; the state lives in a temporary folder.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages (`.ci/run` installs them).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def unavailable_reason() -> Optional[str]:
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if missing:
        return f"SLURM/munge binaries missing ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


CONF = """ClusterName=ci
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MailProg=/bin/true
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
SlurmctldPort={ctld_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
MinJobAge=300
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs=2 Sockets=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self):
        self.state = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        self.pids: dict = {}
        self.conf = self.state / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        host = socket.gethostname().split(".")[0]
        for d in ("ctld", "d/n1", "d/n2"):
            (self.state / d).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=host, state=self.state, ctld_port=16817, port1=17001, port2=17002))
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "-c"], check=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # no munged running yet
            pidfile = Path("/run/munge/munged-test.pid")  # munged runs as munge: it cannot write our state dir
            subprocess.run(["runuser", "-u", "munge", "--", _which("munged"), "--pid-file", str(pidfile),
                            "--socket", "/run/munge/munge.socket.2"], check=True)
            self.pids["munged"] = int(pidfile.read_text().strip())
        log = open(self.state / "daemons.out", "w")
        self.pids["slurmctld"] = subprocess.Popen([_which("slurmctld"), "-D", "-f", str(self.conf)], stdout=log,
                                                  stderr=subprocess.STDOUT, env=self.env).pid
        for node in ("n1", "n2"):
            self.pids[f"slurmd-{node}"] = subprocess.Popen([_which("slurmd"), "-D", "-N", node, "-f", str(self.conf)],
                                                           stdout=log, stderr=subprocess.STDOUT, env=self.env).pid
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, env=self.env)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if states.get("n1") == "idle" and states.get("n2") == "idle":
                return self
            time.sleep(0.2)
        logs = (self.state / "daemons.out").read_text()[-3000:]
        self.stop()
        raise RuntimeError(f"SLURM nodes did not become idle within {timeout_s} s:\n{logs}")

    def stop(self) -> None:
        for name, pid in reversed(list(self.pids.items())):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for pid in self.pids.values():
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.05)
        self.pids.clear()
        shutil.rmtree(self.state, ignore_errors=True)

    # ---- jobs ----

    def sbatch(self, *args, cwd=None, env=None) -> str:
        res = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True, cwd=cwd,
                             env={**self.env, **(env or {})})
        if res.returncode != 0:
            raise RuntimeError(f"sbatch failed: {res.stderr}")
        return res.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                             env=self.env).stdout
        fields = {}
        for line in out.splitlines():  # an array shows one line per task; the caller names one task
            for token in line.split():
                if "=" in token:
                    key, value = token.split("=", 1)
                    fields.setdefault(key, value)
        return fields

    def wait(self, job_id: str, timeout_s: float = 300) -> dict:
        """Poll until the job (or array task) reaches a final state; returns its scontrol fields."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in final:
                return info
            time.sleep(0.3)
        subprocess.run(["scancel", job_id], env=self.env)
        raise TimeoutError(f"job {job_id} not finished after {timeout_s} s: {self.job(job_id)}")

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        subprocess.run(["scancel", f"--signal={sig}", "--batch", job_id], check=True, env=self.env)
