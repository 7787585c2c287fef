"""A single-node SLURM of its own for the tests: munged, slurmctld and slurmd from Debian's
packages (`tests/install_slurm.sh` installs them), started in a temporary folder with their own
config (SLURM_CONF), ports, state and spool folders and munge socket, so that a SLURM or munge
the machine already runs is never touched; stopped again however the tests end (the daemons
die with the process that started them).

Hand-written: no library brings up a throwaway SLURM. Run `python -m tests.slurm_cluster` to
bring one up, print its `sinfo` and its environment, and keep it until Ctrl-C.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scancel", "scontrol", "sinfo")
PR_SET_PDEATHSIG = 1


def unavailable() -> str | None:
    """Why a cluster cannot be brought up here, or None when it can."""
    if sys.platform != "linux":
        return "SLURM's daemons run on Linux only"
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs jobs as their users)"
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return (f"{', '.join(missing)} not installed: run `bash tests/install_slurm.sh` (Debian's "
                "slurmctld, slurmd, slurm-client and munge packages)")
    return None


def _die_with_parent() -> None:
    """In the daemon's process before exec: SIGTERM when the process that started it ends."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setsid()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """One node, `cpus` CPUs, partition `debug`; `env` is what a client command needs."""

    def __init__(self, cpus: int | None = None, memory_mb: int = 4000) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="genbench-slurm-"))
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb
        self.node = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}
        # clients in jobs (srun inside sbatch) take the same config from the job's environment

    def _write_config(self) -> None:
        f = self.folder
        for name in ("state", "spool", "munge"):
            (f / name).mkdir(mode=0o700)
        (f / "slurm.conf").write_text(f"""\
ClusterName=genbench-test
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={f / 'munge' / 'munge.socket'}
CredType=cred/munge
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.pid'}
SlurmctldLogFile={f / 'slurmctld.log'}
SlurmdLogFile={f / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
MinJobAge=300
NodeName={self.node} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        key = f / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _start(self, *command: str) -> None:
        log = open(self.folder / f"{Path(command[0]).name}.out", "w")  # noqa: SIM115 - kept open
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT,
                                               preexec_fn=_die_with_parent))

    def start(self, timeout_s: float = 90) -> LocalSlurm:
        self._write_config()
        m = self.folder / "munge"
        self._start(_binary("munged"), "--foreground", "--force", f"--key-file={m / 'munge.key'}",
                    f"--socket={m / 'munge.socket'}", f"--pid-file={m / 'munged.pid'}",
                    f"--seed-file={m / 'munge.seed'}", f"--log-file={m / 'munged.log'}")
        self._wait(lambda: (m / "munge.socket").exists(), "munged", timeout_s)
        self._start(_binary("slurmctld"), "-D", "-i")
        self._start(_binary("slurmd"), "-D", "-N", self.node)
        self._wait(self._node_idle, "the node to come up", timeout_s)
        return self

    def _node_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env,
                              capture_output=True, text=True)
        return done.returncode == 0 and done.stdout.strip().startswith("idle")

    def _wait(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p for p in self.processes if p.poll() is not None]
            if dead:
                break
            time.sleep(0.5)
        self.stop()
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}"
                         for p in sorted(self.folder.glob("*.log")) + sorted(self.folder.glob("*.out")))
        raise RuntimeError(f"waited for {what} in vain; the daemons' logs:\n{logs}")

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scancel, ...) against this cluster."""
        return subprocess.run(command, env={**self.env, **kwargs.pop("env", {})},
                              capture_output=True, text=True, **kwargs)

    def stop(self) -> None:
        if self.processes:  # jobs first: their processes would outlive slurmd
            self.run("scancel", "--full", "--signal=KILL", "--partition", "debug")
            self.run("scancel", "--partition", "debug")
            deadline = time.monotonic() + 15
            while self.run("squeue", "-h").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        self.processes.clear()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    reason = unavailable()
    if reason:
        sys.exit(f"no cluster here: {reason}")
    cluster = LocalSlurm().start()
    print(cluster.run("sinfo").stdout)
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}")
    try:
        signal.pause()
    finally:
        cluster.cleanup()
