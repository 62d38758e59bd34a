"""slurm/train_multinode.sbatch on a real two-node SLURM cluster: one slurmd per test host
(tests/support/hosts.py: network namespaces with addresses of their own), the controller on
the hosts' bridge (tests/support/slurm_hosts.py). Submitted as slurm/README.md says, with
`--nodes=2` and one CPU process per node:

- the job trains on both nodes as one group (the head's NodeAddr as the rendezvous, each
  node its machine rank); the warning (USR1 to the batch shell) saves on every node, the
  job requeues and completes, with every epoch in metrics.jsonl exactly once;
- `scancel --signal=TERM` saves on every node; the job's exit code is summary.json's (75).

Needs the SLURM programs and root, like tests/test_slurm.py, and test hosts: skips without
them, fails with FMNIST_ACCEL_REQUIRE_SLURM=1 or FMNIST_ACCEL_REQUIRE_HOSTS=1.
"""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from support.fakedata import write_fashion_dir
from support.hosts import REQUIRE_VAR, Hosts
from support.hosts import unavailable_reason as hosts_unavailable
from support.slurm_cluster import unavailable_reason as slurm_unavailable
from support.slurm_hosts import TwoNodeCluster
from test_slurm import MULTI_NODE, TRAIN_OPTIONS, Job, epoch_lines, first_step_done

pytestmark = [pytest.mark.slurm, pytest.mark.hosts, pytest.mark.slow]


@pytest.fixture(scope="module")
def hosts():
    for reason, var in (
        (slurm_unavailable(), "FMNIST_ACCEL_REQUIRE_SLURM"),
        (hosts_unavailable(), REQUIRE_VAR),
    ):
        if reason:
            if os.environ.get(var) == "1":
                pytest.fail(f"{var}=1 but no two-node cluster on test hosts: {reason}")
            pytest.skip(reason)
    with Hosts(2) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(hosts, tmp_path_factory):
    with TwoNodeCluster(hosts, tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Epochs of a few seconds on two processes."""
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=12000, n_test=100)


def submit(
    cluster: TwoNodeCluster, tmp_path: Path, *options: str, sbatch=(), **settings: str
) -> Job:
    return Job.submit(
        cluster, tmp_path, MULTI_NODE, *TRAIN_OPTIONS, *options,
        sbatch=("--nodes=2", "--cpus-per-task=1", *sbatch), **{"NUM_PROCESSES": "1", **settings},
    )  # fmt: skip


def training_on(hosts: Hosts, host_index: int) -> list[int]:
    """The training processes (python -m fmnist_accel.train) running on a host."""
    found = []
    for pid in hosts.pids(hosts[host_index]):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = os.path.basename(argv[0])
        if (
            program.startswith(b"python")
            and b"fmnist_accel.train" in argv
            and b"accelerate.commands.launch" not in argv
        ):
            found.append(pid)
    return found


def completes_after_one_requeue(job: Job, epochs: int) -> str:
    """Starts the requeued job now; it must complete in that second start with every epoch
    once in metrics.jsonl. Returns its log."""
    job.start_requeued_now()
    info = job.wait()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        job.report()
    )
    assert job.epochs() == list(range(1, epochs + 1)), job.report()  # each epoch once
    return job.log_text()


def test_two_node_job_trains_as_one_group_requeues_on_the_warning_and_completes(
    cluster, hosts, data, tmp_path
):
    epochs = 6
    options = ["--epochs", str(epochs), "--batch-size", "8", "--data-dir", str(data)]
    job = submit(cluster, tmp_path, *options)
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    # One training process on each host.
    assert [len(training_on(hosts, i)) for i in (0, 1)] == [1, 1], job.report()
    assert job.epochs() != list(range(1, epochs + 1)), "the run ended before the signal"
    job.signal("USR1")
    log = completes_after_one_requeue(job, epochs)
    assert epoch_lines(log, epochs) == list(range(1, epochs + 1)), log
    summary = job.summary()
    assert summary["status"] == "completed" and summary["world_size"] == 2, summary

    # Two nodes, the head's own address (its NodeAddr) as the rendezvous, one launcher each.
    head = hosts[0].address
    assert re.search(rf"nodes: 2 \(node\[0-1\]\); machines \(launchers\): 2; head: node0 "
                     rf"\(rendezvous {re.escape(head)}:\d+\)", log), log  # fmt: skip
    assert log.count("hardware: 2 processes on 2 machines, CPU (gloo)") == 2, log
    for rank in (0, 1):
        assert f"{rank}: machine {rank} (node{rank}): " in log, log
        assert f"--machine_rank {rank} --num_processes 2 --main_process_ip {head}" in log, log
        # the batch shell's request reached each node's training
        assert f"machine {rank} (node{rank}): stop requested by the batch script" in log, log
    assert "this start saved new state; run status: preempted" in log, log
    assert f"requeueing {job.ref} (warning requeue 1 of at most 3)" in log, log
    assert "==== start 2 (warning requeues 1 of at most 3; other requeues 0," in log, log
    resumed = re.search(r"run folder: \S+ \(resuming after epoch (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < epochs, log
    assert "job exit code 0: the run has ended" in log, log
    assert job.completion_states() == ["PENDING", "COMPLETED"]


def test_two_node_time_limit_warns_saves_on_both_nodes_requeues_and_completes(
    cluster, hosts, data, tmp_path
):
    """SLURM's own warning, not a signal sent by the test: `--time=2 --signal=B:USR1@60`
    (sent 60 to 90 s before the limit: SLURM checks limits every 30 s). Each start is warned
    after 30 to 60 s, saves on both nodes and requeues itself; the run of about 70 s of
    training completes, with every epoch in metrics.jsonl exactly once."""
    epochs = 27
    options = ["--epochs", str(epochs), "--batch-size", "8", "--data-dir", str(data)]
    job = submit(cluster, tmp_path, *options, sbatch=("--time=2", "--signal=B:USR1@60"),
                 WARNING_LEAD="60", START_MARGIN="0", MAX_REQUEUES="10")  # fmt: skip
    restarts, deadline = 0, time.monotonic() + 600
    while (info := job.info())["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        assert time.monotonic() < deadline, job.report()
        if info["JobState"] == "PENDING" and int(info["Restarts"]) > restarts:
            restarts = int(info["Restarts"])
            job.start_requeued_now(restarts)
        time.sleep(0.5)
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.report()
    assert int(info["Restarts"]) >= 1, job.report()
    assert job.epochs() == list(range(1, epochs + 1)), job.report()  # each epoch once
    log = job.log_text()
    # Every start but the last was warned, saved on both nodes and requeued itself; the last
    # may be warned too, in its last epoch, and complete all the same.
    requeues = log.count(f"requeueing {job.ref} (warning requeue ")
    warnings = log.count("SIGUSR1 (time limit near, or scancel --signal=USR1)")
    assert requeues == int(info["Restarts"]) and warnings in (requeues, requeues + 1), log
    for rank in (0, 1):  # the warnings reached both nodes
        stops = f"machine {rank} (node{rank}): stop requested by the batch script"
        assert log.count(stops) >= requeues, log
    assert log.count("this start saved new state; run status: preempted") == requeues, log
    assert f"requeueing {job.ref} (warning requeue 1 of at most 10)" in log, log
    assert "job exit code 0: the run has ended" in log, log
    stamps = re.findall(r"\[(\S+ \S+) job \S+\] (==== start 1 |SIGUSR1 \(time limit)", log)
    started, warned = (datetime.fromisoformat(t) for t, _ in stamps[:2])
    print(
        f"time limit: warned {(warned - started).total_seconds():.0f} s into start 1; "
        f"{warnings} warning requeue(s), then completed"
    )


def test_two_node_term_saves_on_every_node(cluster, hosts, data, tmp_path):
    """`scancel --signal=TERM` (the whole step, both nodes): the training saves mid-epoch, the
    job is not requeued, and its exit code is summary.json's: 75, stopped with its state
    saved."""
    options = ["--epochs", "50", "--batch-size", "8", "--data-dir", str(data)]
    job = submit(cluster, tmp_path, *options)
    job.wait_for("the first training step", lambda: first_step_done(job))
    cluster.run("scancel", "--signal=TERM", job.ref)
    info = job.wait()
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = job.info()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), (
        job.report()
    )
    summary = job.summary()
    assert summary["status"] == "preempted" and summary["stopped_by"] == "SIGTERM", summary
    assert summary["detail"].startswith("stopped by SIGTERM in epoch 1"), summary
    assert len(summary["ranks"]) == 2, summary  # both ranks reached the save
    assert (job.run_dir / "resume.pt").is_file(), job.report()
    log = job.log_text()
    for rank in (0, 1):
        assert re.search(
            rf"machine {rank} \(node{rank}\): (SIGTERM \(scancel|stop requested)", log
        ), log
    assert "job exit code 75: stopped with its state saved" in log, log
    assert "requeueing" not in log, log
    assert not training_on(hosts, 0) and not training_on(hosts, 1)


def test_two_node_network_cut_requeues_and_the_next_start_completes(cluster, hosts, data, tmp_path):
    """node1 loses the network in the middle of an epoch (its bridge port down, as a failed
    cable or switch): the processes on both nodes stop at the collective timeout with one
    line and exit 4; once the network is back the job requeues itself, and its next start
    resumes and completes the run with every epoch once."""
    timeout, epochs = 5, 4
    options = ["--epochs", str(epochs), "--batch-size", "8", "--data-dir", str(data),
               "--collective-timeout", str(timeout)]  # fmt: skip
    job = submit(cluster, tmp_path, *options, MAX_RESTARTS="0")
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    assert [len(training_on(hosts, i)) for i in (0, 1)] == [1, 1], job.report()
    hosts.cut(hosts[1])
    cut_at = time.monotonic()
    try:
        job.wait_for(
            "the training processes to end on both nodes",
            lambda: not training_on(hosts, 0) and not training_on(hosts, 1),
            timeout=timeout + 60,
        )
        ended_s = time.monotonic() - cut_at
    finally:
        hosts.heal(hosts[1])
    print(f"network cut: both nodes' training ended {ended_s:.1f} s after the cut")
    assert ended_s < timeout + 30, job.report()
    assert len(job.epochs()) < epochs, "the run ended before the cut"
    log = completes_after_one_requeue(job, epochs)
    assert f"no answer from the other processes for {timeout} s (the collective timeout" in log, log
    assert f"requeueing {job.ref} after a failure between processes (exit code 4" in log, log
    assert "==== start 2 (warning requeues 0 of at most 3; other requeues 1," in log, log
    assert "job exit code 0: the run has ended" in log, log
    assert job.summary()["status"] == "completed", job.summary()


def test_one_nodes_sigterm_well_before_the_others_saves_on_both(cluster, hosts, data, tmp_path):
    """SIGTERM reaches node1's training process alone (a node's own shutdown, or a signal
    sent there by hand), and the whole step's SIGTERM comes seconds later: the ranks agree to
    stop at the same step, save once, and the job ends with 75, not requeued; the late signal
    finds the save done or joins it, and loses nothing."""
    options = ["--epochs", "50", "--batch-size", "8", "--data-dir", str(data)]
    job = submit(cluster, tmp_path, *options)
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    (early,) = training_on(hosts, 1)
    os.kill(early, signal.SIGTERM)
    signalled_at = time.monotonic()
    job.wait_for("the stop on node1", lambda: "stopped by SIGTERM" in job.log_text(), timeout=60)
    stop_s = time.monotonic() - signalled_at
    time.sleep(3)
    cluster.run("scancel", "--signal=TERM", job.ref, check=False)  # may find the job ended
    info = job.wait()
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = job.info()
    print(f"one node's SIGTERM: stopped {stop_s:.1f} s after it")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), (
        job.report()
    )
    summary = job.summary()
    assert summary["status"] == "preempted" and summary["stopped_by"] == "SIGTERM", summary
    # Both ranks saved, at one place: in the middle of an epoch, or at its end when the signal
    # came while the epoch was validated.
    epochs = {r["epoch"] for r in summary["ranks"]}
    assert len(summary["ranks"]) == 2 and len(epochs) == 1, summary
    stopped = re.match(r"stopped by SIGTERM (in epoch (\d+) after step (\d+);|after epoch (\d+):)",
                       summary["detail"])  # fmt: skip
    assert stopped, summary
    state = torch.load(job.run_dir / "resume.pt", map_location="cpu", weights_only=True)
    if stopped.group(2):
        saved = (int(stopped.group(2)) - 1, int(stopped.group(3)))
    else:
        saved = (int(stopped.group(4)), 0)
    assert (state["epoch"], state["step"]) == saved and epochs == {saved[0] + (saved[1] > 0)}, (
        summary
    )
    log = job.log_text()
    assert "job exit code 75: stopped with its state saved" in log, log
    assert "requeueing" not in log, log
    # None of ours: torchrun itself may print a traceback when the launcher holding the
    # rendezvous store exits before the other (its shutdown finds the store gone).
    assert not re.search(r'File "[^"]*fmnist_accel/', log), log
    assert not training_on(hosts, 0) and not training_on(hosts, 1)
