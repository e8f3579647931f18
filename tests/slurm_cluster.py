"""A one-node SLURM cluster in a temporary folder, for the tests of ``hydra/launcher=slurm``.

:class:`Cluster` starts ``munged`` (with its own key and socket), ``slurmctld`` and ``slurmd``
in the foreground as children of this process, with ``slurm.conf``, state, spool and logs
under one folder; clients find it through ``SLURM_CONF``. :meth:`Cluster.start` returns once
``sinfo`` shows the node idle; :meth:`Cluster.stop` ends the jobs and the daemons (SIGTERM,
then SIGKILL) and leaves no process behind. It needs root (slurmd starts jobs as their user)
and Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs them).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
START_TIMEOUT_S = 60.0


class ClusterUnavailable(RuntimeError):
    """Why the cluster cannot start here (one line)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory_mb() -> int:
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    return total_kb // 1024 - 512  # what slurmd may hand out, less a margin for the system


def slurm_conf(root: Path, host: str, cpus: int) -> str:
    """One node with this machine's CPUs and memory, one partition, no accounting, no cgroups."""
    ports = free_port(), free_port()
    return f"""ClusterName=cachelab
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=5
SchedulerParameters=sched_interval=5
NodeName={host} CPUs={cpus} RealMemory={memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=60 State=UP
"""


class Cluster:
    """A one-node SLURM cluster under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]  # NodeName must be `hostname -s`
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.processes: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "Cluster":
        missing = [name for name in (*DAEMONS, "mungekey", "sinfo", "sbatch") if not find(name)]
        if missing:
            raise ClusterUnavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd needs root")
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(slurm_conf(self.root, self.host, self.cpus))
        key = self.root / "munge.key"
        subprocess.run([find("mungekey"), "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
        key.chmod(0o600)
        try:
            self._spawn("munged", [find("munged"), "--foreground", "--force", f"--key-file={key}",
                                   f"--socket={self.root / 'munge.socket'}", f"--pid-file={self.root / 'munged.pid'}",
                                   f"--log-file={self.root / 'log' / 'munged.log'}",
                                   f"--seed-file={self.root / 'munge.seed'}"])
            self._wait(lambda: (self.root / "munge.socket").exists(), "munged made no socket")
            self._spawn("slurmctld", [find("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [find("slurmd"), "-D", "-f", str(self.conf)])
            self._wait(self.idle, "the node is not idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True)
        log.close()

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"{what} after {START_TIMEOUT_S:g} s"
                raise ClusterUnavailable(f"{why} (logs in {self.root / 'log'})")
            time.sleep(0.2)

    def idle(self) -> bool:
        shown = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
        return shown.returncode == 0 and shown.stdout.split() == ["idle"]

    def job_processes(self) -> list[int]:
        """The processes of this cluster's jobs still alive on the node: every ``slurmstepd`` and
        submitit job process (SLURM may call a requeued job's node idle before they are gone)."""
        found = []
        for pid in self.leftovers():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:  # gone
                continue
            if b"slurmstepd" in command or b"submitit" in command:
                found.append(pid)
        return found

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(list(command), env=self.env, capture_output=True, text=True, check=check, timeout=30)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then SIGKILL whatever still runs with this
        cluster's ``SLURM_CONF`` (a job's processes, slurmstepd): nothing is left behind."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            deadline = time.monotonic() + 15
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self) -> list[int]:
        """Processes (other than this one) whose environment points at this cluster's config."""
        marker = f"SLURM_CONF={self.conf}".encode() + b"\0"
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                pass
        return found


def find(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
