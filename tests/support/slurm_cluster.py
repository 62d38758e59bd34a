"""A real one-node SLURM cluster on this machine, for the tests of slurm/*.sbatch.

munged, slurmctld and slurmd run as child processes of the test (in the foreground, so they
are stopped by their own process ids), with everything in one temporary folder: a generated
munge key and socket, slurm.conf, the controller's state, slurmd's spool, the logs and a
job-completion file. Nothing under /etc is read or written, so a system-wide SLURM or munge
on the machine is left alone. Client commands find this cluster through SLURM_CONF, which
`env()` sets; jobs inherit it from sbatch.

Needs root (slurmd starts jobs as their user) and Debian's `slurm-wlm` and `munge`
(`.ci/install-slurm.sh` installs them). By hand:

    python tests/support/slurm_cluster.py          # start one, print SLURM_CONF, stop on Enter
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")


def find_program(name: str) -> str | None:
    """A SLURM or munge program on PATH or in the sbin folders (root's PATH may lack them)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if find_program(name) is None]


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here, or None when it can."""
    missing = missing_programs()
    if missing:
        return (
            f"SLURM/munge programs not found: {', '.join(missing)} "
            "(install them with .ci/install-slurm.sh: Debian's slurm-wlm and munge)"
        )
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their owner)"
    return None


def die_with_parent() -> None:
    """Run in a daemon's child process before exec: SIGTERM it when the test process dies,
    so that a killed pytest leaves no daemons behind (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))
    except (OSError, AttributeError):
        pass


def detect_cpus() -> int:
    """The CPUs slurmd sees on this machine (a node configured with more is not used)."""
    try:
        out = subprocess.run(
            [find_program("slurmd") or "slurmd", "-C"], capture_output=True, text=True, timeout=30
        ).stdout
        return int(re.search(r"\bCPUs=(\d+)", out).group(1))
    except (OSError, subprocess.SubprocessError, AttributeError, ValueError):
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SlurmError(RuntimeError):
    pass


def scheduling_settings(jobcomp: Path) -> str:
    """The slurm.conf lines every test cluster shares (one node here, two in
    slurm_hosts.py): how processes are tracked, jobs recorded, scheduled and killed."""
    return f"""\
# No cgroups in a container: processes are tracked through /proc, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Finished jobs (and requeues) are written here; sacct needs slurmdbd, this does not.
JobCompType=jobcomp/filetxt
JobCompLoc={jobcomp}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` for 10 minutes.
MinJobAge=600
# As a production cluster has it: 30 s between SIGTERM and SIGKILL.
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
"""


class SlurmCluster:
    """One controller and one compute node (this machine, `hostname -s`), in `root`."""

    def __init__(self, root: Path | None = None, cpus: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="fmnist-slurm-"))
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or detect_cpus()
        self.conf = self.root / "slurm.conf"
        self.jobcomp = self.root / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------------------------------
    # Start and stop
    # ---------------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        """The environment for client commands (and, through sbatch, for jobs)."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        # sbatch options from the caller's environment would change what the tests submit.
        for key in [k for k in env if k.startswith(("SBATCH_", "SLURM_")) and k != "SLURM_CONF"]:
            del env[key]
        env.update(extra)
        return env

    def start(self, timeout: float = 60) -> SlurmCluster:
        try:
            self._write_files()
            self._start_munged()
            self._start("slurmctld", [find_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
            self._wait(lambda: self._ok(["scontrol", "ping"]), timeout, "slurmctld to answer")
            self._start("slurmd", [find_program("slurmd"), "-D", "-f", str(self.conf)])
            self._wait(self.node_idle, timeout, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job of this cluster, then stop slurmd, slurmctld and munged."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + timeout
            while (
                time.monotonic() < deadline
                and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            ):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.kill_leftovers()

    def kill_leftovers(self) -> list[int]:
        """SIGKILL what the jobs left running: proctrack/linuxproc finds a job's processes by
        their parents, so one whose parent died (a launcher whose shell was killed) outlives
        its job. Jobs inherit SLURM_CONF from sbatch: this cluster's processes carry its own."""
        marker = f"SLURM_CONF={self.conf}".encode()
        killed = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed.append(int(proc.name))
            except (OSError, ValueError):
                continue
        return killed

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_files(self) -> None:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(1024))
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        scheduling = scheduling_settings(self.jobcomp)
        self.conf.write_text(
            f"""\
# Generated by tests/support/slurm_cluster.py: a one-node cluster for tests, running as root.
ClusterName=fmnisttest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
PlugStackConfig={r}/plugstack.conf
{scheduling}NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munged(self) -> None:
        m = self.root / "munge"
        self._start(
            "munged",
            [
                find_program("munged"),
                "--foreground",
                "--force",
                f"--key-file={m / 'munge.key'}",
                f"--socket={m / 'munge.socket'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        self._wait(lambda: (m / "munge.socket").exists(), 20, "munged's socket")

    def _start(self, name: str, cmd: list) -> None:
        log = open(self.root / f"{name}.stdout", "ab")  # noqa: SIM115 (kept by the Popen)
        self.procs[name] = subprocess.Popen(
            [str(c) for c in cmd],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C of the tests reaches the daemons only through stop().
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")

    def _ok(self, cmd: list[str]) -> bool:
        return self.run(*cmd, check=False).returncode == 0

    def node_idle(self) -> bool:
        """True when the node runs nothing (and is not cleaning up after a job)."""
        state = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False).stdout
        return state.strip().rstrip("*") == "idle"

    def job_has_processes(self, job_id: str) -> bool:
        """True while slurmd still has processes of the job (an ended start being killed)."""
        out = self.run("scontrol", "listpids", job_id, check=False)
        return out.returncode == 0 and len(out.stdout.strip().splitlines()) > 1

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log (for failure messages)."""
        out = []
        for path in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stdout")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            out.append(f"--- {path.name} ---\n" + "\n".join(lines))
        munge_log = self.root / "munge" / "munged.log"
        if munge_log.exists():
            lines = munge_log.read_text(errors="replace").splitlines()[-tail:]
            out.append("--- munged.log ---\n" + "\n".join(lines))
        return "\n".join(out)

    # ---------------------------------------------------------------------------------------
    # Client commands
    # ---------------------------------------------------------------------------------------
    def run(
        self, *cmd: str, check: bool = True, env: dict | None = None, cwd=None
    ) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        result = subprocess.run(
            [find_program(cmd[0]) or cmd[0], *cmd[1:]],
            env=env or self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise SlurmError(
                f"{' '.join(cmd)} exited with {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def sbatch(self, *args: str, env: dict | None = None, cwd=None) -> int:
        """Submit; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} when gone.
        An array task is ARRAYID_TASK: the array's own id would show every task."""
        result = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        if result.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", result.stdout))

    def wait_for_job(
        self, job_id: int | str, states: tuple[str, ...], timeout: float, poll: float = 0.5
    ) -> dict[str, str]:
        """Wait until the job is in one of `states`; returns its record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(poll)
        raise SlurmError(
            f"job {job_id} not in {'/'.join(states)} after {timeout:.0f} s "
            f"(now {info.get('JobState')}, reason {info.get('Reason')})"
        )

    def completions(self, job_id: int | str) -> list[dict[str, str]]:
        """The job-completion records of a job (one per end, requeues included)."""
        if not self.jobcomp.exists():
            return []
        records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in self.jobcomp.open()]
        return [r for r in records if r.get("JobId") == str(job_id)]


if __name__ == "__main__":
    reason = unavailable_reason()
    if reason:
        raise SystemExit(reason)
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}")
        print(cluster.run("sinfo").stdout)
        input("cluster running; press Enter to stop it\n")
