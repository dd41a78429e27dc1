"""A real one-node SLURM cluster on localhost, for tests/test_cluster.py (make test-cluster).

Starts munged, slurmctld and slurmd from Debian's packages (slurm-wlm, munge; tests/install_packages.sh
installs them) with state, spool and logs in a temporary folder, and stops the daemons it started
by pid. Settings that work without systemd or cgroups: process tracking by /proc, no task plugin,
no accounting. Needs root (slurmd runs jobs as their user; munged runs as user munge).
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
CPUS = 8  # more than the machine has (config_overrides): jobs that mostly wait share it
MEMORY_MB = 8000


def missing_parts() -> list[str]:
    return [
        p
        for p in ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch", "scontrol")
        if shutil.which(p) is None
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}
        self._procs: list[subprocess.Popen] = []

    def config(self) -> str:
        r = self.root
        return "\n".join(
            [
                "ClusterName=calibjaxtest",
                f"SlurmctldHost={self.host}(127.0.0.1)",
                "SlurmUser=root",
                "SlurmdUser=root",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "AuthType=auth/munge",
                f"AuthInfo=socket={r}/munge/munge.socket,cred_expire=5",  # a requeued job may start again after 5 s
                f"StateSaveLocation={r}/state",
                f"SlurmdSpoolDir={r}/spool",
                f"SlurmctldPidFile={r}/slurmctld.pid",
                f"SlurmdPidFile={r}/slurmd.pid",
                f"SlurmctldLogFile={r}/slurmctld.log",
                f"SlurmdLogFile={r}/slurmd.log",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "MpiDefault=none",
                "KillWait=5",
                "MinJobAge=3600",
                "DefMemPerCPU=500",
                "SchedulerParameters=sched_interval=2",
                f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={MEMORY_MB} State=UNKNOWN",
                f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )

    def start(self) -> Cluster:
        if os.geteuid() != 0:
            raise RuntimeError("the SLURM test cluster needs root (slurmd runs the jobs; munged runs as user munge)")
        for d in ("state", "spool", "munge"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        shutil.chown(self.root / "munge", "munge", "munge")
        self.root.chmod(0o755)
        self.conf.write_text(self.config())
        sock = self.root / "munge" / "munge.socket"
        self._spawn(
            "munged",
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                "--foreground",
                "--force",
                f"--socket={sock}",
                f"--pid-file={self.root}/munge/munged.pid",
                f"--log-file={self.root}/munge/munged.log",
                f"--seed-file={self.root}/munge/seed",
            ],
        )
        self._wait(lambda: sock.exists(), "munged's socket")
        self._spawn("slurmctld", ["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, "slurmctld")
        self._spawn("slurmd", ["/usr/sbin/slurmd", "-D", "-f", str(self.conf)])
        self._wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, "an idle node")
        return self

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")  # noqa: SIM115 - kept open for the daemon's life
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids[name] = p.pid
        self._procs.append(p)

    def _wait(self, ready, what: str, timeout: float = 30) -> None:
        t0 = time.time()
        while not ready():
            dead = [p for p in self._procs if p.poll() is not None]
            if dead or time.time() - t0 > timeout:
                raise RuntimeError(f"{what} did not come up: {self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")) if p.is_file()
        ) + "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.stdout")))

    def stop(self) -> None:
        """Stop the daemons this cluster started (by pid), and the jobs they still run."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--user", "root", check=False)
            t0 = time.time()  # let slurmd end the jobs' processes before it stops
            while self.run("squeue", "-h", check=False).stdout.strip() and time.time() - t0 < 20:
                time.sleep(0.5)
        for p in reversed(self._procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def run(self, *cmd, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol show job's fields (JobState, Reason, ExitCode, Restarts, ...); {} once it is forgotten."""
        r = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        fields = {}
        for word in r.stdout.split():
            k, sep, v = word.partition("=")
            if sep:
                fields.setdefault(k, v)
        return fields

    def wait_state(self, job_id: str, states, timeout: float = 240) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (sbatch --wait cannot tell a cancelled job)."""
        states = {states} if isinstance(states, str) else set(states)
        t0, fields = time.time(), {}
        while time.time() - t0 < timeout:
            fields = self.job(job_id)
            if fields.get("JobState") in states:
                return fields
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {fields}")
