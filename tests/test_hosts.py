"""Several machines for real: two test hosts (network namespaces with addresses of their own,
tests/support/hosts.py), one `accelerate launch` per host as the README says, and a network
that fails.

- the hosts: their own addresses, each other in reach, nothing beyond; nothing left after a
  failed test, nor after a killed test session;
- 2 hosts x 1 process with launch_configs/multi_machine.yaml (--main_process_ip the first
  host's address; no GLOO_SOCKET_IFNAME: the toolkit finds the interface) against one process
  at the same global batch: training to the README's tolerance, a checkpoint's validation
  metrics exactly, every process in one group of 2;
- one host cut off the network in the middle of an epoch: both stop at the collective
  timeout with one line, exit 4, nothing left on either host; --resume on the healed network
  ends the run as if never cut;
- the rendezvous host killed: the other host ends in seconds, with one line;
- a training process killed on one host under --max_restarts: both hosts restart the group,
  which ends as a run never interrupted.

Needs root and iproute2 (skips otherwise; fails with FMNIST_ACCEL_REQUIRE_HOSTS=1, as in CI).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.fakedata import write_noisy_fashion_dir
from support.hosts import IFACE, PREFIX, REQUIRE_VAR, Hosts, namespaces, unavailable_reason
from support.processes import (
    BIN,
    HARNESS,
    REPO,
    assert_same_training,
    metrics,
    process_env,
    run_command,
    summary,
)

from fmnist_accel.cluster.accelerator import collective_failure
from fmnist_accel.errors import EXIT_PEER_FAILED

MULTI_MACHINE = REPO / "launch_configs" / "multi_machine.yaml"
EPOCHS = 3
STEPS_PER_EPOCH = 10  # 500 training images, 2 processes at batch 25
TIMEOUT = 5  # --collective-timeout of the fault tests
PORTS = itertools.count(29400)  # one per launch: a port in TIME_WAIT is not taken again


# ------------------------------------------------------------------------------------------
# Fixtures and helpers
# ------------------------------------------------------------------------------------------
def hosts_or_skip() -> None:
    reason = unavailable_reason()
    if reason:
        if os.environ.get(REQUIRE_VAR) == "1":
            pytest.fail(f"{REQUIRE_VAR}=1 but no test hosts: {reason}")
        pytest.skip(f"no test hosts: {reason}")


@pytest.fixture(scope="module")
def hosts():
    hosts_or_skip()
    with Hosts(2) as made:
        yield made


@pytest.fixture(autouse=True)
def healthy_network(request):
    """Every test starts with both hosts on the network and ends with nothing left on them."""
    if "hosts" not in request.fixturenames:
        yield
        return
    made: Hosts = request.getfixturevalue("hosts")
    yield
    for host in made:
        made.heal(host)
        made.kill_all(host)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Half the labels at random: the losses and the confusion matrix say something."""
    return write_noisy_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=101)


def options(data_dir: Path, out: Path, name: str, batch: int = 25) -> list[str]:
    return ["--model", "mlp", "--epochs", str(EPOCHS), "--batch-size", str(batch),
            "--deterministic", "--data-dir", str(data_dir), "--output-dir", str(out),
            "--run-name", name]  # fmt: skip


# A target that reports each process's own view of the group (accelerate's, and torch's) once
# the Accelerator is built, then trains: python PROBE [train options].
PROBE = textwrap.dedent(
    """\
    import os, runpy, sys
    import accelerate, torch.distributed as dist
    made = accelerate.Accelerator.__init__
    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        print(f"probe: rank {os.environ['RANK']} world {self.num_processes} "
              f"torch {dist.get_world_size()} gloo {os.environ.get('GLOO_SOCKET_IFNAME')}",
              flush=True)
    accelerate.Accelerator.__init__ = init
    sys.argv = [sys.argv[0], *sys.argv[1:]]
    runpy.run_module("fmnist_accel.train", run_name="__main__")
    """
)


class Launch:
    """One `accelerate launch` per host, as the README's several-machine command: the config
    file, --machine_rank R, --main_process_ip the first host's address. Output in files."""

    def __init__(self, hosts: Hosts, target: list[str], workdir: Path, *, env: dict,
                 max_restarts: int | None = None):  # fmt: skip
        self.hosts = hosts
        self.port = next(PORTS)
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        restarts = [] if max_restarts is None else ["--max_restarts", str(max_restarts)]
        tag = f"launch-{self.port}"
        for host in hosts:
            cmd = [
                BIN / "accelerate", "launch", "--config_file", MULTI_MACHINE,
                "--machine_rank", str(host.index), "--num_processes", str(len(hosts)),
                "--main_process_ip", hosts[0].address, "--main_process_port", str(self.port),
                "--mixed_precision", "no", *restarts, *target,
            ]  # fmt: skip
            log = workdir / f"{tag}-host{host.index}.log"
            with log.open("w") as out:
                proc = hosts.popen(host, cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            self.logs.append(log)
            if host.index == 0:  # the rendezvous first, as on a cluster
                self.wait_for(lambda: hosts.listening(hosts[0], self.port), "the rendezvous")

    def text(self, index: int) -> str:
        return self.logs[index].read_text(errors="replace")

    def all_text(self) -> str:
        return "\n".join(f"--- host {i} ---\n{self.text(i)[-5000:]}" for i in range(len(self.logs)))

    def wait_for(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}\n{self.all_text()}")

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"a launcher still runs\n{self.all_text()}") from None
        return codes


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line]


def assert_nothing_left(hosts: Hosts, within: float = 15) -> None:
    for host in hosts:
        left = hosts.wait_until_empty(host, within)
        assert not left, f"processes left on {host}: {left}"


# ------------------------------------------------------------------------------------------
# The hosts themselves
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.hosts
def test_hosts_have_their_own_addresses_and_no_way_out(hosts):
    """Each host has its address on eth0 and the loopback, reaches the other host, and nothing
    else: no default route; an address beyond the subnet is unreachable."""
    reach = textwrap.dedent(
        """\
        import socket, sys
        for address in sys.argv[1:]:
            try:
                socket.create_connection((address, 9), timeout=3).close()
                print(address, "open")
            except OSError as exc:
                print(address, exc.strerror or exc)
        """
    )
    for host in hosts:
        addrs = run_command(hosts.command(host, ["ip", "-4", "-o", "addr"])).stdout
        assert f"{IFACE}    inet {host.address}/24" in addrs, addrs
        assert "lo    inet 127.0.0.1/8" in addrs, addrs
        routes = run_command(hosts.command(host, ["ip", "-4", "route"])).stdout
        assert "default" not in routes, routes
    other = hosts[1].address
    out = hosts.run(hosts[0], [sys.executable, "-c", reach, other, "192.0.2.1", "8.8.8.8"]).stdout
    # The other host answers (nothing listens on port 9 there: refused, not unreachable).
    assert f"{other} Connection refused" in out, out
    assert "192.0.2.1 Network is unreachable" in out and "8.8.8.8 Network is unreachable" in out


@pytest.mark.slow
@pytest.mark.hosts
def test_toolkit_picks_the_interface_toward_the_rendezvous(hosts):
    """This machine's name resolves to 127.0.0.1 on every host (as Debian's 127.0.1.1 does), so
    gloo alone would give the other machine a loopback address. With a rendezvous on another
    host and no GLOO_SOCKET_IFNAME, the toolkit sets it to the interface toward the
    rendezvous; a user's choice is kept; on one machine nothing changes."""
    script = (
        "from fmnist_accel.cluster.accelerator import gloo_interface_toward_the_rendezvous as f;"
        "import os; print(f(), os.environ.get('GLOO_SOCKET_IFNAME'))"
    )
    several = {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "MASTER_PORT": "29500"}
    env = process_env(**several, MASTER_ADDR=hosts[0].address)
    env.pop("GLOO_SOCKET_IFNAME", None)
    for host in hosts:  # the rendezvous host too: its route to itself is its own address
        assert hosts.run(host, [sys.executable, "-c", script], env=env).stdout.split() == [
            IFACE,
            IFACE,
        ]
    mine = hosts.run(
        hosts[1], [sys.executable, "-c", script], env={**env, "GLOO_SOCKET_IFNAME": "x"}
    )
    assert mine.stdout.split() == ["None", "x"], mine
    one = hosts.run(hosts[1], [sys.executable, "-c", script], env={**env, "LOCAL_WORLD_SIZE": "2"})
    assert one.stdout.split() == ["None", "None"], one


@pytest.mark.slow
@pytest.mark.hosts
def test_a_failed_test_leaves_no_namespace_and_leftovers_are_removed(tmp_path):
    """A test that fails while its hosts run a process: the fixture still removes every
    namespace it made (`ip netns list` shows none of them). Namespaces of a session that was
    killed (its pid is gone) are removed by the next one that makes hosts."""
    hosts_or_skip()
    failing = tmp_path / "test_fails.py"
    failing.write_text(
        textwrap.dedent(
            """\
            import os, subprocess, sys
            from support.hosts import Hosts

            def test_fails():
                with Hosts(3) as hosts:
                    hosts.popen(hosts[2], [sys.executable, "-c", "import time; time.sleep(60)"])
                    print("namespaces", " ".join(hosts.names), flush=True)
                    assert False, "this test fails on purpose"
            """
        )
    )
    inner = run_command(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", failing],
        cwd=tmp_path,
        env=process_env(PYTHONPATH=str(REPO / "tests")),
        timeout=120,
    )
    assert inner.rc == 1 and "this test fails on purpose" in inner.stdout, inner
    made = next(line for line in inner.stdout.splitlines() if "namespaces " in line).split()[1:]
    assert len(made) == 4 and all(name.startswith(PREFIX) for name in made), made
    assert not set(made) & set(namespaces()), namespaces()

    # A session killed before its teardown: its namespaces stay until the next session.
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    left = f"{PREFIX}{dead.pid}-h0"
    subprocess.run(["ip", "netns", "add", left], check=True)
    assert left in namespaces()
    with Hosts(1):
        assert left not in namespaces()


# ------------------------------------------------------------------------------------------
# Training on two hosts
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.hosts
def test_two_hosts_train_as_one_group_like_one_process_at_the_same_global_batch(
    hosts, data_dir, tmp_path
):
    """README: 2 hosts x 1 process at batch 25 against 1 process at batch 50: training to 1e-4
    (the MLP over 3 epochs), and a checkpoint's validation metrics exactly (eval on the two
    hosts and on one process). No GLOO_SOCKET_IFNAME is set."""
    out = tmp_path / "runs"
    one = run_command(
        [sys.executable, "-m", "fmnist_accel.train", *options(data_dir, out, "one", batch=50)],
        timeout=300,
    )
    assert one.rc == 0, one

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = process_env(ACCELERATE_USE_CPU="1")
    env.pop("GLOO_SOCKET_IFNAME", None)
    launch = Launch(hosts, [probe, *options(data_dir, out, "two")], tmp_path, env=env)
    assert launch.wait() == [0, 0], launch.all_text()
    said = [launch.text(i) for i in (0, 1)]
    assert "hardware: 2 processes on 2 machines, CPU (gloo)" in said[0] + said[1]
    # Every process: one group of two, on each host its own interface.
    probes = sorted(line for text in said for line in text.splitlines() if "probe:" in line)
    assert probes == [f"probe: rank {r} world 2 torch 2 gloo {IFACE}" for r in (0, 1)], probes
    s = summary(out / "two")
    assert s["world_size"] == 2 and [r["epoch"] for r in s["ranks"]] == [EPOCHS, EPOCHS]

    m1, m2 = metrics(out / "one"), metrics(out / "two")
    assert [m["epoch"] for m in m1] == [m["epoch"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
        assert a["valid_accuracy"] == pytest.approx(b["valid_accuracy"], abs=0.011)
    w1, w2 = (
        load_file(out / "one" / "last.safetensors"),
        load_file(out / "two" / "last.safetensors"),
    )
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-4)

    # The same checkpoint evaluated on one process and on the two hosts: the same numbers.
    args = ["-m", "fmnist_accel", "eval", "--json", "last", "--run-dir", out / "two",
            "--split", "valid", "--batch-size", "16"]  # fmt: skip
    alone = run_command([sys.executable, *args])
    assert alone.rc == 0, alone
    both = Launch(hosts, args, tmp_path, env=env)
    assert both.wait() == [0, 0], both.all_text()
    answers = [line for i in (0, 1) for line in both.text(i).splitlines() if line.startswith("{")]
    assert len(answers) == 1, both.all_text()  # printed once, by the main process
    a, b = alone.json(), json.loads(answers[0])
    assert (a["num_processes"], b["num_processes"]) == (1, 2)
    assert a["num_samples"] == b["num_samples"] > 0
    assert a["confusion_matrix"] == b["confusion_matrix"] and a["accuracy"] == b["accuracy"]
    assert abs(a["loss"] - b["loss"]) < 1e-6
    assert_nothing_left(hosts)


# ------------------------------------------------------------------------------------------
# Faults between hosts
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(hosts, data_dir, tmp_path_factory) -> Path:
    """The run the fault tests make, on the two hosts, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    env = process_env(ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME=IFACE)
    launch = Launch(hosts, [HARNESS, *options(data_dir, out, "ref")], out, env=env)
    assert launch.wait() == [0, 0], launch.all_text()
    return out / "ref"


@pytest.mark.slow
@pytest.mark.hosts
def test_network_cut_stops_both_hosts_at_the_collective_timeout_and_resume_completes(
    hosts, data_dir, reference, tmp_path
):
    """Rank 1 pauses at step 4 of epoch 2; its host loses the network (its link goes down);
    rank 1 goes on. Each rank waits for the other in the step's all-reduce: both stop within
    the collective timeout (5 s) with one line naming it, exit 4, and both hosts are empty.
    Healed, `--resume auto` ends the run with the results of one never cut."""
    out, pause, pids = tmp_path / "runs", tmp_path / "pause", tmp_path / "pids"
    pids.mkdir()
    env = process_env(
        ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME=IFACE, FAULT_ONLY_RANK="1",
        FAULT_PAUSE_STEP=str(STEPS_PER_EPOCH + 4), FAULT_PAUSE_FILE=str(pause),
        FAULT_PID_DIR=str(pids),
    )  # fmt: skip
    args = [*options(data_dir, out, "cut"), "--collective-timeout", str(TIMEOUT)]
    launch = Launch(hosts, [HARNESS, *args], tmp_path, env=env)
    launch.wait_for(pause.exists, "rank 1 at step 4 of epoch 2")
    cut = hosts.host_of(int((pids / "rank1.pid").read_text()))
    assert cut is not None, launch.all_text()
    other = hosts[1 - cut.index]
    hosts.cut(cut)
    cut_at = time.monotonic()
    pause.unlink()
    launch.procs[other.index].wait(timeout=TIMEOUT + 60)
    other_s = time.monotonic() - cut_at
    codes = launch.wait(timeout=120)
    assert codes == [1, 1], launch.all_text()  # torchrun's code for a failed worker
    assert other_s < TIMEOUT + 10, (other_s, launch.all_text())
    for host in hosts:
        text = launch.text(host.index)
        said = error_lines(text)
        assert len(said) == 1, text
        assert (
            f"no answer from the other processes for {TIMEOUT} s (the collective timeout"
            in (said[0])
        )
        assert f"failed (exitcode: {EXIT_PEER_FAILED})" in text, text
    assert_nothing_left(hosts)
    print(f"network cut: the other host's launcher ended {other_s:.1f} s after the cut")

    hosts.heal(cut)
    env = process_env(ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME=IFACE)
    resumed = Launch(hosts, [HARNESS, *args, "--resume", "auto"], tmp_path, env=env)
    assert resumed.wait() == [0, 0], resumed.all_text()
    assert "resuming after epoch 1" in resumed.text(0) + resumed.text(1)
    assert_same_training(out / "cut", reference, EPOCHS)
    assert_nothing_left(hosts)


@pytest.mark.slow
@pytest.mark.hosts
def test_network_cut_under_max_restarts_ends_both_launchers_in_seconds(hosts, data_dir, tmp_path):
    """multi_machine.yaml's restart recipe (--max_restarts, TORCH_DISABLE_SHARE_RDZV_TCP_STORE
    and TORCH_ELASTIC_WORKER_IDENTICAL): a host cut off for good in the middle of an epoch.
    Both ranks stop at the collective timeout; each launcher restarts its process once, which
    cannot reach the other and exits 4, and the launchers end: nothing is left on either host
    within a minute. Without TORCH_ELASTIC_WORKER_IDENTICAL the cut-off host's launcher waited
    in torch's exchange of ranks through the unreachable store for minutes (torch's store
    timeout is 15)."""
    out, pause, pids = tmp_path / "runs", tmp_path / "pause", tmp_path / "pids"
    pids.mkdir()
    env = process_env(
        ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME=IFACE, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        TORCH_ELASTIC_WORKER_IDENTICAL="1",
        FAULT_ONLY_RANK="1", FAULT_PAUSE_STEP=str(STEPS_PER_EPOCH + 4),
        FAULT_PAUSE_FILE=str(pause), FAULT_PID_DIR=str(pids),
    )  # fmt: skip
    args = [
        *options(data_dir, out, "cut"),
        "--resume",
        "auto",
        "--collective-timeout",
        str(TIMEOUT),
    ]
    launch = Launch(hosts, [HARNESS, *args], tmp_path, env=env, max_restarts=1)
    launch.wait_for(pause.exists, "rank 1 at step 4 of epoch 2")
    cut = hosts.host_of(int((pids / "rank1.pid").read_text()))
    assert cut is not None, launch.all_text()
    hosts.cut(cut)
    cut_at = time.monotonic()
    pause.unlink()
    try:
        codes = launch.wait(timeout=TIMEOUT + 120)
        ended_s = time.monotonic() - cut_at
    finally:
        hosts.heal(cut)
    assert codes == [1, 1], launch.all_text()
    assert ended_s < TIMEOUT + 50, (ended_s, launch.all_text())
    for host in hosts:
        said = error_lines(launch.text(host.index))
        assert said and f"no answer from the other processes for {TIMEOUT} s" in said[0], (
            launch.all_text()
        )
    assert_nothing_left(hosts)
    print(f"network cut under --max_restarts 1: both launchers ended {ended_s:.1f} s after it")


@pytest.mark.slow
@pytest.mark.hosts
def test_killed_rendezvous_host_ends_the_other_in_seconds_with_one_line(hosts, data_dir, tmp_path):
    """Every process on the first host (the rendezvous store, its launcher, its rank) is
    SIGKILLed in epoch 2, under --max_restarts 2: the other host's rank says in one line that
    another process died and exits 4, and its launcher, which cannot reach the store to
    restart, ends within seconds."""
    out, pause = tmp_path / "runs", tmp_path / "pause"
    env = process_env(
        ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME=IFACE, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        FAULT_PAUSE_STEP=str(STEPS_PER_EPOCH + 4), FAULT_PAUSE_FILE=str(pause),
        FAULT_ONLY_RANK="0",
    )  # fmt: skip
    args = [*options(data_dir, out, "k"), "--resume", "auto", "--collective-timeout", "60"]
    launch = Launch(hosts, [HARNESS, *args], tmp_path, env=env, max_restarts=2)
    launch.wait_for(pause.exists, "rank 0 at step 4 of epoch 2")
    killed = hosts.kill_all(hosts[0])
    killed_at = time.monotonic()
    assert killed, launch.all_text()
    launch.procs[1].wait(timeout=120)
    other_s = time.monotonic() - killed_at
    assert launch.procs[1].returncode == 1, launch.all_text()
    text = launch.text(1)
    said = error_lines(text)
    assert len(said) == 1 and "another process of the run died (" in said[0], text
    assert other_s < 30, (other_s, launch.all_text())
    assert_nothing_left(hosts)
    print(f"rendezvous host killed: the other host's launcher ended {other_s:.1f} s later")


@pytest.mark.slow
@pytest.mark.hosts
def test_killed_process_on_one_host_restarts_the_group_on_both(
    hosts, data_dir, reference, tmp_path
):
    """multi_machine.yaml's recipe for restarts: --max_restarts 2, --run-name, --resume auto,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1. Rank 1 is SIGKILLed at step 4 of epoch 2: both
    hosts restart the group, which resumes after epoch 1 and ends as if never interrupted."""
    out, once = tmp_path / "runs", tmp_path / "killed-once"
    env = process_env(
        ACCELERATE_USE_CPU="1", GLOO_SOCKET_IFNAME=IFACE, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        TORCH_ELASTIC_WORKER_IDENTICAL="1",
        FAULT_ONLY_RANK="1", FAULT_KILL_STEP=str(STEPS_PER_EPOCH + 4), FAULT_ONCE_FILE=str(once),
    )  # fmt: skip
    args = [*options(data_dir, out, "restarted"), "--resume", "auto"]
    launch = Launch(hosts, [HARNESS, *args], tmp_path, env=env, max_restarts=2)
    assert launch.wait() == [0, 0], launch.all_text()
    assert once.exists()  # the kill did happen
    text = launch.text(0) + launch.text(1)
    assert "resuming after epoch 1" in text, text
    # Each host's launcher restarted its worker (the killed one's, and the other's).
    for i in (0, 1):
        assert "failed (exitcode: " in launch.text(i), launch.text(i)
    assert_same_training(out / "restarted", reference, EPOCHS)
    assert summary(out / "restarted")["status"] == "completed"
    assert_nothing_left(hosts)


# ------------------------------------------------------------------------------------------
# What a process says when it cannot reach the others (no hosts needed)
# ------------------------------------------------------------------------------------------
GLOO_REFUSED = (
    "Gloo connectFullMesh failed with [third_party/gloo/gloo/transport/tcp/pair.cc:152] timed "
    "out connecting: SO_ERROR: Connection refused, remote=[127.0.0.1]:16257$1"
)
GLOO_CONNECT_TIMEOUT = (
    "Gloo connectFullMesh failed with [third_party/gloo/gloo/transport/tcp/pair.h:311] "
    "Connect timeout [none]"
)
STORE_TIMEOUT = "Timed out after 31 seconds waiting for clients. 1/2 clients joined."


@pytest.mark.parametrize(
    ("error", "said"),
    [
        # The peer gave a loopback address (what two machines saw without the interface fix):
        # not "no answer for 600 s", which it said before, after 2 s.
        (GLOO_REFUSED, "rank 1: cannot connect to another process of the run at "
         "127.0.0.1:16257 (Connection refused): that process gave a loopback address"),
        # A restarted group whose peer's host is cut off (a traceback and exit 1 before).
        (GLOO_CONNECT_TIMEOUT, "rank 1: cannot connect to another process of the run "
         "(Connect timeout): its machine is unreachable"),
        # Workers given a store address that is not the same machine for all (a traceback
        # and exit 1 after the collective timeout before).
        (STORE_TIMEOUT, "rank 1: the processes did not all reach the run's store at "
         "localhost:41000 (the launcher's MASTER_ADDR) within 30 s"),
    ],
    ids=["loopback-peer", "connect-timeout", "store"],
)  # fmt: skip
def test_unreachable_peers_are_one_line_and_exit_4(monkeypatch, error, said):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "41000"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    failure = collective_failure(RuntimeError(error), 30)
    assert failure is not None and failure.exit_code == EXIT_PEER_FAILED
    assert str(failure).startswith(said), str(failure)
    assert "\n" not in str(failure)
