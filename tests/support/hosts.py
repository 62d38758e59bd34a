"""Test "hosts": network namespaces with addresses of their own, joined by a bridge.

    with Hosts(2) as hosts:           # needs root and iproute2's `ip`
        hosts[0].address              # '10.213.0.10'
        hosts.popen(hosts[1], [...])  # a command on host 1 (ip netns exec), process_env()
        hosts.cut(hosts[1])           # host 1 loses the network (its link goes down)
        hosts.heal(hosts[1])

Each host is a network namespace `fmnist-<pid>-<n>-hN` (pid: the test session's; n counts
its hosts) with the loopback up and one interface, `eth0`, at 10.213.0.(10+N)/24: one end of
a veth pair whose other end, `hN`, is a port of a bridge `br0` in one more namespace,
`fmnist-<pid>-<n>-net`, the "switch", which has 10.213.0.1
(where a test's SLURM controller listens). Nothing else is connected: no namespace has a
default route, the bridge has no real interface, and the root namespace (the machine's own
network) is not touched, so no packet can leave 10.213.0.0/24 and the loopback range. Several
test sessions can hold hosts at the same time: each has its own switch, so the same addresses
do not meet. The file system, the process ids and the host name are the machine's: a process
on a host is an ordinary process (`ps`, `/proc`, signals), only its network differs.

`remove()` (and leaving the `with`) kills every process still in the namespaces and deletes
them: whatever the test did, also when it failed. Namespaces left by a test session that was
killed (its pid is gone) are deleted by the next one that makes hosts.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .processes import process_env, run_command, start

PREFIX = "fmnist-"
SUBNET = "10.213.0"
SWITCH_ADDRESS = f"{SUBNET}.1"
IFACE = "eth0"  # each host's one interface (the name a user gives GLOO_SOCKET_IFNAME)
REQUIRE_VAR = "FMNIST_ACCEL_REQUIRE_HOSTS"
# fmnist-<pid of the test session>-<its count of Hosts>-<net | hN>
_NAME = re.compile(rf"^{re.escape(PREFIX)}(\d+)-(\d+-)?(net|h\d+|probe)$")
_made = itertools.count()


class HostsError(RuntimeError):
    pass


def _ip() -> str | None:
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin:/usr/bin:/bin")


def _ip_run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [_ip() or "ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")
    return result


def namespaces() -> list[str]:
    """The names `ip netns list` shows."""
    out = _ip_run("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """Why test hosts cannot be made here (one line), or None when they can."""
    if _ip() is None:
        return "no `ip` program (Debian's iproute2) to make network namespaces"
    if os.geteuid() != 0:
        return "network namespaces for test hosts need root"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = _ip_run("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        veth = _ip_run(
            "-n",
            probe,
            "link",
            "add",
            "probe0",
            "type",
            "veth",
            "peer",
            "name",
            "probe1",
            check=False,
        )
        if veth.returncode != 0:
            return f"cannot make a veth pair in a network namespace: {veth.stderr.strip()}"
    finally:
        _ip_run("netns", "delete", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete the namespaces of test sessions that no longer run (killed before their
    teardown), with whatever still runs in them; returns their names."""
    removed = []
    for name in namespaces():
        match = _NAME.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_namespace_processes(name)
            _ip_run("netns", "delete", name, check=False)
            removed.append(name)
    return removed


def _namespace_pids(name: str) -> list[int]:
    out = _ip_run("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit() and int(p) != os.getpid()]


def _kill_namespace_processes(name: str, timeout: float = 10) -> list[int]:
    """SIGKILL every process in the namespace, until none is left (or timeout)."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while pids := _namespace_pids(name):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return killed


@dataclass(frozen=True)
class Host:
    index: int
    netns: str  # the namespace
    address: str  # its address on the bridge
    port: str  # its veth's other end, a port of the bridge in the switch namespace

    def __str__(self) -> str:
        return f"host {self.index} ({self.address})"


class Hosts:
    """`count` hosts on one bridge; a context manager (made on entry, removed on exit)."""

    def __init__(self, count: int = 2):
        if not 1 <= count <= 9:
            raise ValueError("1 to 9 hosts")
        tag = f"{PREFIX}{os.getpid()}-{next(_made)}"
        self.switch = f"{tag}-net"
        self.hosts = [Host(i, f"{tag}-h{i}", f"{SUBNET}.{10 + i}", f"h{i}") for i in range(count)]
        self.procs: list[subprocess.Popen] = []

    def __getitem__(self, index: int) -> Host:
        return self.hosts[index]

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> Hosts:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def names(self) -> list[str]:
        return [self.switch, *(h.netns for h in self.hosts)]

    # ---------------------------------------------------------------------------------------
    # Making and removing them
    # ---------------------------------------------------------------------------------------
    def create(self) -> Hosts:
        remove_leftovers()
        try:
            sw = self.switch
            _ip_run("netns", "add", sw)
            _ip_run("-n", sw, "link", "set", "lo", "up")
            _ip_run("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip_run("-n", sw, "addr", "add", f"{SWITCH_ADDRESS}/24", "dev", "br0")
            _ip_run("-n", sw, "link", "set", "br0", "up")
            for host in self.hosts:
                _ip_run("netns", "add", host.netns)
                _ip_run("-n", host.netns, "link", "set", "lo", "up")
                # Made in the switch's namespace, its peer straight in the host's: no end of
                # it is ever in the machine's own namespace.
                _ip_run("-n", sw, "link", "add", host.port, "type", "veth",
                        "peer", "name", IFACE, "netns", host.netns)  # fmt: skip
                _ip_run("-n", sw, "link", "set", host.port, "master", "br0")
                _ip_run("-n", sw, "link", "set", host.port, "up")
                _ip_run("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", IFACE)
                _ip_run("-n", host.netns, "link", "set", IFACE, "up")
            self._check_isolated()
        except BaseException:
            self.remove()
            raise
        return self

    def _check_isolated(self) -> None:
        """No namespace has a route beyond the bridge's subnet."""
        for name in self.names:
            routes = _ip_run("-n", name, "-4", "route", "show").stdout.splitlines()
            outside = [r for r in routes if not r.startswith(f"{SUBNET}.0/24 ")]
            if outside:
                raise HostsError(f"{name} has routes beyond {SUBNET}.0/24: {outside}")

    def remove(self) -> None:
        """Kill every process still on the hosts (and the switch), delete the namespaces."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for name in self.names:
            if name in namespaces():
                _kill_namespace_processes(name)
                _ip_run("netns", "delete", name, check=False)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.procs.clear()

    # ---------------------------------------------------------------------------------------
    # Commands on a host
    # ---------------------------------------------------------------------------------------
    def command(self, host: Host | str, args: list) -> list[str]:
        """`args` run in the host's namespace (`ip netns exec NAME ...`); `host` may also be
        the name of a namespace (the switch)."""
        netns = host if isinstance(host, str) else host.netns
        return [_ip() or "ip", "netns", "exec", netns, *(str(a) for a in args)]

    def run(
        self, host: Host | str, args: list, *, env: dict | None = None, cwd: Path | None = None,
        timeout: float = 300,
    ):  # fmt: skip
        """Run to the end on the host (support.processes.Result), with process_env()."""
        return run_command(self.command(host, args), cwd=cwd, timeout=timeout, env=env)

    def popen(self, host: Host | str, args: list, env: dict | None = None, **popen):
        """Start a command on the host and return at once, with process_env() (stdin closed);
        removing the hosts kills it if it still runs."""
        env = env if env is not None else process_env()
        proc = start(self.command(host, args), env=env, **popen)
        self.procs.append(proc)
        return proc

    def pids(self, host: Host | str) -> list[int]:
        """The processes now on the host (in its network namespace)."""
        return _namespace_pids(host if isinstance(host, str) else host.netns)

    def wait_until_empty(self, host: Host, timeout: float) -> list[int]:
        """Wait until no process is left on the host; returns those left after timeout."""
        deadline = time.monotonic() + timeout
        while (left := self.pids(host)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def listening(self, host: Host, port: int) -> bool:
        """Whether a process on the host listens on TCP `port` (its /proc/net/tcp, read
        through a process of the host: /proc/PID/net is that process's network's)."""
        for pid in self.pids(host):
            try:
                table = Path(f"/proc/{pid}/net/tcp").read_text()
                table += Path(f"/proc/{pid}/net/tcp6").read_text()
            except OSError:
                continue
            for line in table.splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
            return False
        return False

    def host_of(self, pid: int) -> Host | None:
        """The host a process runs on (`ip netns identify`), or None."""
        name = _ip_run("netns", "identify", str(pid), check=False).stdout.strip()
        return next((h for h in self.hosts if h.netns == name), None)

    def kill_all(self, host: Host) -> list[int]:
        """SIGKILL every process on the host: the machine is gone (its sockets close)."""
        return _kill_namespace_processes(host.netns)

    # ---------------------------------------------------------------------------------------
    # The network
    # ---------------------------------------------------------------------------------------
    def cut(self, host: Host) -> None:
        """The host loses the network: its port of the bridge goes down. Its packets are lost
        without an answer (no reset, no refusal), as when a cable or a switch fails."""
        _ip_run("-n", self.switch, "link", "set", host.port, "down")

    def heal(self, host: Host) -> None:
        _ip_run("-n", self.switch, "link", "set", host.port, "up")
