"""slurm/*.sbatch on a real one-node SLURM cluster, with CPU processes instead of GPUs.

tests/slurm_cluster.py starts munged, slurmctld and slurmd (as root) for this module and stops
them at its end. Each test submits a script with sbatch, as a user would, with two CPU
processes (NUM_PROCESSES=2 ACCELERATE_USE_CPU=1, --gpus-per-node=0) on small generated data,
and checks what SLURM reports (`scontrol show job`, the job-completion file), the run's files
and the appended log.

Without the SLURM programs (or without root) the tests skip; with FMNIST_ACCEL_REQUIRE_SLURM=1
(CI, after .ci/install-slurm.sh) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from fakedata import write_fashion_dir
from slurm_cluster import SlurmCluster, unavailable_reason

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
ONE_NODE = REPO / "slurm" / "train_1node.sbatch"
MULTI_NODE = REPO / "slurm" / "train_multinode.sbatch"
JOB_NAME = "fmnist-test"
# Generous for a loaded machine; a job takes 10-40 s here.
JOB_TIMEOUT = 240
# Options every test job trains with: the MLP, no early stopping (the fake data is learnt in
# one epoch; a stop would end the run before the epochs the tests count).
TRAIN_OPTIONS = ["--model", "mlp", "--valid-size", "200", "--no-early-stopping"]


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        if os.environ.get("FMNIST_ACCEL_REQUIRE_SLURM") == "1":
            pytest.fail(f"FMNIST_ACCEL_REQUIRE_SLURM=1 but no local SLURM cluster: {reason}")
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two fake data sets: `small` for quick runs, `slow` whose epochs last a few seconds."""
    root = tmp_path_factory.mktemp("data")
    return {
        "small": write_fashion_dir(root / "small", n_train=2000, n_test=100),
        "slow": write_fashion_dir(root / "slow", n_train=12000, n_test=100),
    }


def job_env(cluster: SlurmCluster) -> dict[str, str]:
    """What sbatch passes to the job: the test's Python environment and two CPU processes."""
    bin_dir = str(Path(sys.executable).parent)
    env = cluster.env(
        NUM_PROCESSES="2",
        ACCELERATE_USE_CPU="1",
        PYTHON=sys.executable,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    for key in ("OUTPUT_DIR", "RUN_NAME", "MAIN_PROCESS_PORT", "LAUNCH_ARGS"):
        env.pop(key, None)
    try:
        socket.gethostbyname(cluster.node)
    except OSError:
        # The scripts give the head node's name to the rendezvous; here it does not resolve.
        env["MAIN_PROCESS_IP"] = "127.0.0.1"
    return env


class Job:
    """A submitted job: its id, its log and its run folder (in the submission folder)."""

    def __init__(self, cluster: SlurmCluster, workdir: Path, script: Path, *args: str):
        self.cluster = cluster
        self.workdir = workdir
        self.id = cluster.sbatch(
            f"--job-name={JOB_NAME}",
            f"--chdir={workdir}",
            "--gpus-per-node=0",
            f"--cpus-per-task={cluster.cpus}",
            *(["--nodes=1"] if script == MULTI_NODE else []),
            str(script),
            *args,
            env=job_env(cluster),
        )
        self.log = workdir / f"{JOB_NAME}-{self.id}.out"
        self.run_dir = workdir / "runs" / f"{JOB_NAME}-{self.id}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def epochs(self) -> list[int]:
        """The "epoch" field of each line of metrics.jsonl (a line being written is skipped)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return []
        epochs = []
        for line in path.read_text().splitlines():
            try:
                epochs.append(json.loads(line)["epoch"])
            except (json.JSONDecodeError, KeyError):
                continue
        return epochs

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def info(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def wait(self, *states: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        try:
            return self.cluster.wait_for_job(self.id, states, timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.report()}") from None

    def wait_for(self, what: str, ready, timeout: float = JOB_TIMEOUT, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            state = self.info().get("JobState")
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                raise AssertionError(f"job ended ({state}) before {what}\n{self.report()}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}\n{self.report()}")

    def report(self) -> str:
        """What a failing assertion shows: the job's record, its log and the daemons' logs."""
        return (
            f"--- scontrol show job {self.id} ---\n{self.info()}\n"
            f"--- {self.log.name} ---\n{self.log_text()[-6000:]}\n"
            f"{self.cluster.logs(tail=15)}"
        )


def epoch_lines(log: str, epochs: int) -> list[int]:
    """The epochs whose result line ('epoch 3/5 | train loss ...') the log shows, in order."""
    return [int(m) for m in re.findall(rf"epoch (\d+)/{epochs} \| train loss", log)]


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------
def test_one_node_job_completes(cluster, data, tmp_path):
    options = ["--epochs", "3", "--batch-size", "64", "--data-dir", str(data["small"])]
    job = Job(cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *options)
    info = job.wait("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    assert info["JobState"] == "COMPLETED", job.report()
    assert info["ExitCode"] == "0:0", job.report()
    assert info["Restarts"] == "0", job.report()

    assert job.epochs() == [1, 2, 3], job.report()
    summary = job.summary()
    assert summary["status"] == "completed"
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"

    log = job.log_text()
    assert "processes: 2 on CPU" in log, log  # the layout the script prints
    assert "hardware: 2 processes" in log and "CPU (gloo)" in log, log  # one group of two ranks
    assert "--resume auto" in log and "new run" in log, log
    assert epoch_lines(log, 3) == [1, 2, 3], log
    assert "requeue" not in log, log

    records = cluster.completions(job.id)
    assert [r["JobState"] for r in records] == ["COMPLETED"], records


@pytest.mark.parametrize("script", [ONE_NODE, MULTI_NODE], ids=["1node", "multinode"])
def test_signalled_job_requeues_and_resumes(cluster, data, tmp_path, script):
    """USR1 (what --signal=B:USR1@120 sends before the time limit) to the batch shell: the
    training saves its state, the job requeues itself, and its next start resumes the run."""
    epochs = 4
    options = ["--epochs", str(epochs), "--batch-size", "16", "--data-dir", str(data["slow"])]
    job = Job(cluster, tmp_path, script, *TRAIN_OPTIONS, *options)
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    assert job.epochs() != list(range(1, epochs + 1)), "the run ended before the signal"
    cluster.run("scancel", "--batch", "--signal=USR1", str(job.id))

    # The script requeues the job; SLURM then holds it ~2 minutes (BeginTime) unless told.
    job.wait_for(
        "the requeue",
        lambda: job.info().get("JobState") == "PENDING" and job.info().get("Restarts") == "1",
        timeout=120,
    )
    # Start it now. Not in the second its last start was killed in: slurmd revokes a requeued
    # job's credentials at that time, and refuses a new one from the same second.
    job.wait_for("the node to be idle", cluster.node_idle, timeout=60)
    time.sleep(1.5)
    cluster.run("scontrol", "update", f"JobId={job.id}", "StartTime=now")
    info = job.wait("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")
    assert info["JobState"] == "COMPLETED", job.report()
    assert info["ExitCode"] == "0:0", job.report()
    assert info["Restarts"] == "1", job.report()

    # Every finished epoch exactly once: none lost, none redone.
    assert job.epochs() == list(range(1, epochs + 1)), job.report()
    log = job.log_text()
    assert epoch_lines(log, epochs) == list(range(1, epochs + 1)), log
    assert job.summary()["status"] == "completed"

    # One log, appended by both starts, tells the story.
    assert "==== start 1 (SLURM_RESTART_COUNT=0)" in log, log
    assert "==== start 2 (SLURM_RESTART_COUNT=1)" in log, log
    # the script turns SLURM's SIGUSR1 into one SIGTERM for the training
    assert "SIGUSR1" in log and "stopped by SIGTERM in epoch" in log, log
    assert f"requeueing job {job.id}" in log, log
    resumed = re.search(r"run folder: \S+ \(resuming after epoch (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < epochs, log
    assert log.index("requeueing job") < log.index("==== start 2") < resumed.start(), log
    if script == MULTI_NODE:
        # srun's task 0 (node 0) ran accelerate launch with machine rank 0, c10d rendezvous.
        assert "0: node 0 (" in log and "--machine_rank 0" in log, log
        assert "--rdzv_backend c10d" in log and f"head node: {cluster.node}" in log, log
        assert "node 0: stop requested" in log, log

    # The completion log has the requeue (the job went back to PENDING) and the final end.
    records = cluster.completions(job.id)
    assert [r["JobState"] for r in records] == ["PENDING", "COMPLETED"], records


def test_cancelled_job_is_not_requeued(cluster, data, tmp_path):
    """scancel ends the job for good: the script's TERM trap must not requeue it."""
    options = ["--epochs", "50", "--batch-size", "16", "--data-dir", str(data["slow"])]
    job = Job(cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *options)
    job.wait_for("the training to start", lambda: "command: " in job.log_text())
    cluster.run("scancel", str(job.id))
    job.wait("CANCELLED", "COMPLETED", "FAILED", "PENDING", timeout=60)
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = job.info()
    assert info["JobState"] == "CANCELLED", job.report()
    assert info["Restarts"] == "0", job.report()
    log = job.log_text()
    assert "SIGTERM (cancelled, preempted or out of time)" in log, log
    assert "requeueing" not in log, log
