"""A real two-node SLURM cluster on test hosts (tests/support/hosts.py), for the tests of
slurm/train_multinode.sbatch across machines.

The controller, slurmctld, runs in the hosts' switch namespace and listens on the bridge's
address (10.213.0.1); one slurmd per host runs in that host's namespace as node `nodeN`
(`slurmd -N nodeN`), with `NodeAddr` the host's own address, and a spool folder, log and pid
file of its own (`%n` in slurm.conf). munged runs once, on the machine: its socket is a file,
which every namespace sees. Client commands (sbatch, scontrol, ...) run in the switch
namespace, as from a login node that reaches the controller; a job's batch script runs on
node0, its srun step on both nodes. Everything else is SlurmCluster's: a generated slurm.conf
in a temporary folder, nothing under /etc, the daemons stopped by their own process ids.

    with Hosts(2) as hosts, TwoNodeCluster(hosts, root) as cluster:
        cluster.sbatch("--nodes=2", ...)
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .hosts import SWITCH_ADDRESS, Hosts
from .slurm_cluster import (
    SlurmCluster,
    SlurmError,
    detect_cpus,
    find_program,
    free_port,
    scheduling_settings,
)


class TwoNodeCluster(SlurmCluster):
    """slurmctld on the switch, `node0` and `node1` (slurmd) on the first two hosts."""

    def __init__(self, hosts: Hosts, root: Path | None = None, cpus: int | None = None):
        super().__init__(root, cpus or detect_cpus())
        self.hosts = hosts
        self.nodes = [f"node{h.index}" for h in hosts]
        self.node = self.nodes[0]  # the job's first node, where a batch script runs

    def start(self, timeout: float = 60) -> TwoNodeCluster:
        try:
            self._write_files()
            self._start_munged()
            self._start_in(
                self.hosts.switch,
                "slurmctld",
                [find_program("slurmctld"), "-D", "-i", "-f", self.conf],
            )
            self._wait(lambda: self._ok(["scontrol", "ping"]), timeout, "slurmctld to answer")
            for host, node in zip(self.hosts, self.nodes, strict=True):
                self._start_in(
                    host.netns, f"slurmd-{node}",
                    [find_program("slurmd"), "-D", "-N", node, "-f", self.conf],
                )  # fmt: skip
            self._wait(self.node_idle, timeout, f"nodes {', '.join(self.nodes)} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, stop the slurmd's, then slurmctld and munged (SlurmCluster)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + timeout
            while (
                time.monotonic() < deadline
                and self.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            ):
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd-")]:
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        super().stop(timeout)

    def _start_in(self, netns: str, name: str, cmd: list) -> None:
        """A daemon in the namespace's network. Through nsenter, not `ip netns exec`: that one
        also mounts a /sys of the namespace's own, without /sys/fs/cgroup, and slurmd 22.05
        will not start without its cgroup plugin (even with proctrack/linuxproc)."""
        nsenter = find_program("nsenter") or "nsenter"
        self._start(name, [nsenter, f"--net=/run/netns/{netns}", *cmd])

    def node_idle(self) -> bool:
        """True when every node runs nothing."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        states = dict(zip(out[::2], (s.rstrip("*") for s in out[1::2]), strict=False))
        return all(states.get(node) == "idle" for node in self.nodes)

    def run(
        self, *cmd: str, check: bool = True, env: dict | None = None, cwd=None
    ) -> subprocess.CompletedProcess:
        """A client command, from the switch's namespace (where the controller listens)."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.hosts.switch, find_program(cmd[0]) or cmd[0], *cmd[1:]],
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

    def _write_files(self) -> None:
        for sub in ("state", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
        super_conf = self.conf
        super()._write_files()  # the munge key, plugstack.conf, then slurm.conf replaced here
        r = self.root
        nodes = "\n".join(
            f"NodeName={node} NodeAddr={host.address} CPUs={self.cpus} State=UNKNOWN"
            for node, host in zip(self.nodes, self.hosts, strict=True)
        )
        super_conf.write_text(
            f"""\
# Generated by tests/support/slurm_hosts.py: two nodes on test hosts, running as root.
ClusterName=fmnisthosts
SlurmctldHost={self.hostname}({SWITCH_ADDRESS})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
PlugStackConfig={r}/plugstack.conf
{scheduling_settings(self.jobcomp)}{nodes}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    @property
    def hostname(self) -> str:
        """The machine's name: slurmctld runs only where it matches SlurmctldHost's."""
        import socket

        return socket.gethostname().split(".")[0]
