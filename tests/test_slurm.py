"""slurm/: the batch scripts on a real one-node SLURM cluster, and slurm/lib.sh's decisions.

The tests marked `slurm` run on a cluster that tests/support/slurm_cluster.py starts (munged,
slurmctld and slurmd, as root) for this module and stops at its end. Each submits a script
with sbatch, as a user would, with CPU processes (ACCELERATE_USE_CPU=1, --gpus-per-node=0) on
small generated data, and checks what SLURM reports (`scontrol show job`, the job-completion
file), the run's files and the appended log. Without the SLURM programs (or without root) they
skip; with FMNIST_ACCEL_REQUIRE_SLURM=1 (CI, after .ci/install-slurm.sh) they fail instead.

The other tests run slurm/lib.sh's functions in bash with a stand-in `scontrol` that records
its arguments: the requeue decision and the exit code for every outcome, in a second each.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.fakedata import write_fashion_dir
from support.slurm_cluster import SlurmCluster, unavailable_reason

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "slurm"
ONE_NODE = SLURM_DIR / "train_1node.sbatch"
MULTI_NODE = SLURM_DIR / "train_multinode.sbatch"
SWEEP = SLURM_DIR / "sweep.sbatch"
LIB = SLURM_DIR / "lib.sh"
CPU_CONFIG = REPO / "launch_configs" / "slurm_cpu.yaml"
JOB_NAME = "fmnist-test"
# Generous for a loaded machine; a job takes 10-40 s here.
JOB_TIMEOUT = 240
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
# Options every test job trains with: the MLP, no early stopping (the fake data is learnt in
# one epoch; a stop would end the run before the epochs the tests count).
TRAIN_OPTIONS = ["--model", "mlp", "--valid-size", "200", "--no-early-stopping"]


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers
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
    """Fake data sets: `small` for quick runs, `slow` whose epochs last a few seconds."""
    root = tmp_path_factory.mktemp("data")
    return {
        "small": write_fashion_dir(root / "small", n_train=2000, n_test=100),
        "slow": write_fashion_dir(root / "slow", n_train=12000, n_test=100),
    }


def job_env(cluster: SlurmCluster, **settings: str) -> dict[str, str]:
    """What sbatch passes to the job: the test's Python environment, CPU processes, settings."""
    env = cluster.env(
        NUM_PROCESSES="2",
        ACCELERATE_USE_CPU="1",
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    for key in (
        "OUTPUT_DIR",
        "RUN_NAME",
        "MAIN_PROCESS_IP",
        "MAIN_PROCESS_PORT",
        "LAUNCH_ARGS",
        "MAX_REQUEUES",
        "MAX_RESTARTS",
        "SETUP_FILE",
        "SWEEP_NAME",
        "MACHINES_PER_NODE",
        "WARNING_LEAD",
        "START_MARGIN",
    ):
        env.pop(key, None)
    env.update(settings)
    return env


class Job:
    """A submitted job (or one task of an array): its id, its log and its run folder."""

    def __init__(self, cluster: SlurmCluster, workdir: Path, ref: str, log: Path, run_dir: Path):
        self.cluster = cluster
        self.workdir = workdir
        self.ref = ref  # what scontrol takes: JOBID, or ARRAYID_TASK for an array task
        self.log = log
        self.run_dir = run_dir

    @classmethod
    def submit(
        cls,
        cluster: SlurmCluster,
        workdir: Path,
        script: Path,
        *args: str,
        sbatch: tuple[str, ...] = (),
        **settings: str,
    ) -> Job:
        job_id = cluster.sbatch(
            f"--job-name={JOB_NAME}",
            f"--chdir={workdir}",
            "--gpus-per-node=0",
            f"--cpus-per-task={cluster.cpus}",
            *(["--nodes=1"] if script == MULTI_NODE else []),
            *sbatch,
            str(script),
            *args,
            env=job_env(cluster, **settings),
        )
        run_name = settings.get("RUN_NAME", f"{JOB_NAME}-{job_id}")
        return cls(
            cluster,
            workdir,
            str(job_id),
            workdir / f"{JOB_NAME}-{job_id}.out",
            workdir / "runs" / run_name,
        )

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
        return self.cluster.job(self.ref)

    def wait(self, *states: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
        try:
            return self.cluster.wait_for_job(self.ref, states or ENDED, timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\n{self.report()}") from None

    def wait_for(self, what: str, ready, timeout: float = JOB_TIMEOUT, poll: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            state = self.info().get("JobState")
            if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"):
                raise AssertionError(f"job ended ({state}) before {what}\n{self.report()}")
            time.sleep(poll)
        raise AssertionError(f"timed out waiting for {what}\n{self.report()}")

    def wait_for_log(self, text: str, timeout: float = JOB_TIMEOUT) -> None:
        self.wait_for(repr(text), lambda: text in self.log_text(), timeout)

    def signal(self, signal_name: str) -> None:
        """`scancel --batch --signal=NAME`: the signal to the batch shell only (as --signal=B:)."""
        self.cluster.run("scancel", "--batch", f"--signal={signal_name}", self.ref)

    def start_requeued_now(self, restarts: int = 1) -> None:
        """Wait for the requeue (the job's `restarts`-th), then start the job at once instead of
        after SLURM's delay."""
        self.wait_for(
            "the requeue",
            lambda: (
                self.info().get("JobState") == "PENDING"
                and self.info().get("Restarts") == str(restarts)
            ),
            timeout=120,
        )
        # Not in the second its last start was killed in: slurmd revokes a requeued job's
        # credentials at that time, and refuses a new one from the same second.
        job_id = self.info().get("JobId", self.ref)
        self.wait_for(
            "its last start to end",
            lambda: not self.cluster.job_has_processes(job_id),
            timeout=60,
        )
        time.sleep(1.5)
        self.cluster.run("scontrol", "update", f"JobId={self.ref}", "StartTime=now")

    def completion_states(self) -> list[str]:
        """JobState of each of the job's completion records (a requeue writes one too)."""
        job_id = self.info().get("JobId", self.ref)
        return [r["JobState"] for r in self.cluster.completions(job_id)]

    def report(self) -> str:
        """What a failing assertion shows: the job's record, its log and the daemons' logs."""
        return (
            f"--- scontrol show job {self.ref} ---\n{self.info()}\n"
            f"--- {self.log.name} ---\n{self.log_text()[-6000:]}\n"
            f"{self.cluster.logs(tail=15)}"
        )


def epoch_lines(log: str, epochs: int) -> list[int]:
    """The epochs whose result line ('epoch 3/5 | train loss ...') the log shows, in order."""
    return [int(m) for m in re.findall(rf"epoch (\d+)/{epochs} \| train loss", log)]


def first_step_done(job: Job) -> bool:
    """The training has passed its start-up (the toolkit prints this after its first step)."""
    return "first training step done" in job.log_text()


def slow_python(tmp_path: Path) -> Path:
    """A PYTHON whose launcher takes a minute to start: a start warned before it can save."""
    wrapper = tmp_path / "slow-python"
    wrapper.write_text(
        "#!/bin/bash\n"
        'if [[ " $* " == *" accelerate.commands.launch "* ]]; then sleep 60; fi\n'
        f'exec {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def slow_srun_path(tmp_path: Path) -> str:
    """A PATH whose `srun` starts its step 3 s late and drops the signals that come meanwhile,
    as srun drops those that come before its step has started."""
    bin_dir = tmp_path / "slow-srun"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        f"#!/bin/bash\ntrap '' USR1 USR2\nsleep 3\nexec {shutil.which('srun')} \"$@\"\n"
    )
    (bin_dir / "srun").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


# ---------------------------------------------------------------------------------------------
# On the local cluster: the scripts as a user runs them
# ---------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_one_node_job_completes(cluster, data, tmp_path):
    options = ["--epochs", "3", "--batch-size", "64", "--data-dir", str(data["small"])]
    job = Job.submit(cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *options)
    info = job.wait()
    assert info["JobState"] == "COMPLETED", job.report()
    assert info["ExitCode"] == "0:0", job.report()
    assert info["Restarts"] == "0", job.report()

    assert job.epochs() == [1, 2, 3], job.report()
    summary = job.summary()
    assert summary["status"] == "completed"
    assert summary["world_size"] == 2 and summary["distributed_type"] == "MULTI_CPU"

    log = job.log_text()
    assert "==== start 1 (warning requeues 0 of at most 3; other requeues 0," in log, log
    assert "processes: 2 per machine, 2 in all, on CPU" in log, log  # the layout it prints
    assert "hardware: 2 processes" in log and "CPU (gloo)" in log, log  # one group of two ranks
    # launcher and workers from the job's Python, with the repository's launch settings, as
    # an srun step (so that a signal to the job's steps reaches them); the run folder set by
    # the script
    launch = f"{sys.executable} -m accelerate.commands.launch --quiet --config_file {CPU_CONFIG}"
    assert f"machine 0 ({cluster.node}): {launch}" in log, log
    assert f"python: {sys.executable}; launch settings: {CPU_CONFIG}" in log, log
    assert "--resume auto" in log and "new run" in log, log
    assert epoch_lines(log, 3) == [1, 2, 3], log
    assert "requeue" not in log.split("====", 2)[2], log
    assert "job exit code 0: the run has ended" in log, log
    assert job.completion_states() == ["COMPLETED"]


@pytest.mark.slurm
def test_multinode_job_requeues_and_resumes(cluster, data, tmp_path):
    """USR1 (what --signal=B:USR1@120 sends before the time limit) to the batch shell of the
    several-machine script, run as two machines (launchers) of one process each: both save,
    the job requeues itself, and its next start resumes the run to its end."""
    epochs = 4
    options = ["--epochs", str(epochs), "--batch-size", "16", "--data-dir", str(data["slow"])]
    setup = tmp_path / "setup.sh"  # what a site's module loads would be: run on every machine
    setup.write_text('echo "setup file on ${FMNIST_MACHINES:+machine $SLURM_PROCID}"\n')
    job = Job.submit(
        cluster,
        tmp_path,
        MULTI_NODE,
        *TRAIN_OPTIONS,
        *options,
        NUM_PROCESSES="1",
        MACHINES_PER_NODE="2",
        SETUP_FILE=str(setup),
    )
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    assert job.epochs() != list(range(1, epochs + 1)), "the run ended before the signal"
    job.signal("USR1")
    job.start_requeued_now()
    info = job.wait()
    assert info["JobState"] == "COMPLETED", job.report()
    assert info["ExitCode"] == "0:0", job.report()
    assert info["Restarts"] == "1", job.report()

    # Every finished epoch exactly once: none lost, none redone.
    assert job.epochs() == list(range(1, epochs + 1)), job.report()
    log = job.log_text()
    assert epoch_lines(log, epochs) == list(range(1, epochs + 1)), log
    assert job.summary()["status"] == "completed"
    assert job.summary()["world_size"] == 2

    # The setup file ran in the batch shell and on each machine, at each start.
    assert log.count("setup file on \n") == 2, log
    assert log.count("0: setup file on machine 0") == log.count("1: setup file on machine 1") == 2
    # Two launchers met in a c10d rendezvous, machine 0 hosting it.
    assert "machines (launchers): 2" in log and "hardware: 2 processes" in log, log
    for rank in (0, 1):
        assert f"{rank}: machine {rank} (" in log and f"--machine_rank {rank}" in log, log
        assert f"is_host={1 - rank}" in log, log
        # the batch shell's request reached both launchers
        assert f"machine {rank} ({cluster.node}): stop requested" in log, log
    # One log, appended by both starts, tells the story.
    assert "==== start 2 (warning requeues 1 of at most 3; other requeues 0," in log, log
    # The signal may land mid-epoch or while epoch 1 is still being saved: both save.
    assert "SIGUSR1" in log and re.search(r"stopped by SIGTERM (in|after) epoch", log), log
    # Both machines stopped cleanly: the main process wrote summary.json before the step ended.
    assert "this start saved new state; run status: preempted" in log, log
    assert f"requeueing {job.ref} (warning requeue 1 of at most 3)" in log, log
    resumed = re.search(r"run folder: \S+ \(resuming after epoch (\d+)", log)
    assert resumed and 1 <= int(resumed.group(1)) < epochs, log
    assert log.index("requeueing") < log.index("==== start 2") < resumed.start(), log
    assert job.completion_states() == ["PENDING", "COMPLETED"]


@pytest.mark.slurm
def test_cancel_saves_on_every_machine(cluster, data, tmp_path):
    """A plain `scancel`: SIGTERM to every process of the job, on every machine. The training
    saves its state mid-epoch (resume.pt, with no epoch finished) and the job is not
    requeued."""
    options = ["--epochs", "50", "--batch-size", "8", "--data-dir", str(data["slow"])]
    job = Job.submit(
        cluster,
        tmp_path,
        MULTI_NODE,
        *TRAIN_OPTIONS,
        *options,
        NUM_PROCESSES="1",
        MACHINES_PER_NODE="2",
    )
    job.wait_for("the first training step", lambda: first_step_done(job))
    cluster.run("scancel", job.ref)
    info = job.wait()
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = job.info()
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", job.report()

    assert (job.run_dir / "resume.pt").is_file(), job.report()
    assert job.epochs() == [], "epoch 1 ended before the cancel: resume.pt proves nothing"
    summary = job.summary()
    assert summary["status"] == "preempted", summary
    assert summary["detail"].startswith("stopped by SIGTERM in epoch 1"), summary
    log = job.log_text()
    for rank in (0, 1):
        # SLURM's own SIGTERM, or the batch shell's request if that came first
        assert re.search(
            rf"machine {rank} \({cluster.node}\): (SIGTERM \(scancel|stop requested)", log
        ), log
    assert "SIGTERM (cancelled, preempted or out of time)" in log, log
    assert "requeueing" not in log, log


def machine_shells(job_id: str) -> list[int]:
    """The process ids of the job's per-machine shells (srun's tasks: `bash -c node_main...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            len(argv) > 3
            and argv[0].endswith(b"bash")
            and argv[1] == b"-c"
            and argv[3] == b"node"
            and f"SLURM_JOB_ID={job_id}".encode() in environ
        ):
            pids.append(int(proc.name))
    return pids


@pytest.mark.slurm
def test_term_to_the_machine_shells_saves(cluster, data, tmp_path):
    """SIGTERM to srun's tasks alone (each machine's shell), as where SLURM would end the step
    once those die (cgroups): the shells forward it to their launchers and wait, and the
    training saves. Without their TERM trap the shells die and nothing is saved."""
    options = ["--epochs", "50", "--batch-size", "8", "--data-dir", str(data["slow"])]
    job = Job.submit(
        cluster,
        tmp_path,
        MULTI_NODE,
        *TRAIN_OPTIONS,
        *options,
        NUM_PROCESSES="1",
        MACHINES_PER_NODE="2",
    )
    job.wait_for("the first training step", lambda: first_step_done(job))
    shells = machine_shells(job.ref)
    assert len(shells) == 2, (shells, job.report())
    for pid in shells:
        os.kill(pid, signal.SIGTERM)
    info = job.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), job.report()
    assert (job.run_dir / "resume.pt").is_file(), job.report()
    assert job.epochs() == [], "epoch 1 ended before the signal: resume.pt proves nothing"
    assert job.summary()["detail"].startswith("stopped by SIGTERM in epoch 1"), job.summary()


@pytest.mark.slurm
def test_plain_scancel_term_saves_despite_a_users_accelerate_config(cluster, data, tmp_path):
    """`scancel --signal=TERM JOB` without --batch reaches the training (an srun step), which
    saves: exit code 75, no requeue. The script is submitted from a path with a space in it,
    and the user's own ~/.cache/huggingface/accelerate/default_config.yaml says gpu_ids: '0'
    and a dynamo backend: the job uses the repository's launch settings and trains on 2 CPU
    processes, uncompiled."""
    home = tmp_path / "home"
    user_config = home / ".cache" / "huggingface" / "accelerate" / "default_config.yaml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\ngpu_ids: '0'\n"
        "num_processes: 1\ndynamo_backend: INDUCTOR\nmixed_precision: fp16\n"
    )
    spaced = tmp_path / "dir with space"
    spaced.mkdir()
    (spaced / "repo").symlink_to(REPO)
    script = spaced / "repo" / "slurm" / ONE_NODE.name
    options = ["--epochs", "50", "--batch-size", "8", "--data-dir", str(data["slow"])]
    env = {k: "" for k in ("HF_HOME", "XDG_CACHE_HOME", "ACCELERATE_CONFIG_FILE")}
    job = Job.submit(cluster, tmp_path, script, *TRAIN_OPTIONS, *options, HOME=str(home), **env)
    job.wait_for("the first training step", lambda: first_step_done(job))
    cluster.run("scancel", "--signal=TERM", job.ref)
    info = job.wait()
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = job.info()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), job.report()
    assert info["Restarts"] == "0", job.report()
    summary = job.summary()
    assert summary["status"] == "preempted" and summary["stopped_by"] == "SIGTERM", summary
    assert (summary["world_size"], summary["mixed_precision"]) == (2, "no"), summary
    assert (job.run_dir / "resume.pt").is_file(), job.report()
    log = job.log_text()
    assert f"launch settings: {spaced / 'repo' / 'launch_configs' / CPU_CONFIG.name}" in log, log
    assert "torch.compile" not in log, log
    assert "job exit code 75: stopped with its state saved" in log, log
    assert "requeueing" not in log, log


@pytest.mark.slurm
def test_plain_scancel_usr1_reaches_every_machine_and_requeues(cluster, data, tmp_path):
    """`scancel --signal=USR1 JOB` without --batch, on two machines: every launcher's
    training gets it, saves, and the job requeues itself (the batch shell reads the signal
    from summary.json) and completes with every epoch once."""
    epochs = 4
    options = ["--epochs", str(epochs), "--batch-size", "16", "--data-dir", str(data["slow"])]
    job = Job.submit(
        cluster, tmp_path, MULTI_NODE, *TRAIN_OPTIONS, *options,
        NUM_PROCESSES="1", MACHINES_PER_NODE="2",
    )  # fmt: skip
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    assert job.epochs() != list(range(1, epochs + 1)), "the run ended before the signal"
    cluster.run("scancel", "--signal=USR1", job.ref)
    job.start_requeued_now()
    info = job.wait()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        job.report()
    )
    assert job.epochs() == list(range(1, epochs + 1)), job.report()
    log = job.log_text()
    assert f"requeueing {job.ref} (warning requeue 1 of at most 3)" in log, log
    assert "==== start 2 (warning requeues 1 of at most 3; other requeues 0," in log, log
    assert job.completion_states() == ["PENDING", "COMPLETED"]


@pytest.mark.slurm
def test_a_preemption_requeue_does_not_spend_the_time_limit_budget(cluster, data, tmp_path):
    """`scontrol requeue JOB` (what a preemption or a node failure does): SLURM stops the
    job, the training saves, the job starts again and resumes. The next start counts it as
    another requeue, not as one of MAX_REQUEUES' warning requeues."""
    epochs = 4
    options = ["--epochs", str(epochs), "--batch-size", "16", "--data-dir", str(data["slow"])]
    job = Job.submit(cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *options, MAX_REQUEUES="1")
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    cluster.run("scontrol", "requeue", job.ref)
    job.start_requeued_now()
    info = job.wait()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        job.report()
    )
    assert job.epochs() == list(range(1, epochs + 1)), job.report()
    log = job.log_text()
    assert "==== start 2 (warning requeues 0 of at most 1; other requeues 1," in log, log
    assert "resuming after epoch" in log, log


@pytest.mark.slurm
def test_start_that_saves_nothing_is_not_requeued(cluster, data, tmp_path):
    """Starts warned before they could save must not requeue for ever on an earlier start's
    summary.json ("preempted"): with MAX_STARTS_WITHOUT_PROGRESS=1, the first such start ends
    the chain (exit code 79: stopped before it saved anything, below 128 as sacct needs)."""
    options = ["--epochs", "50", "--batch-size", "16", "--data-dir", str(data["slow"])]
    first = Job.submit(
        cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *options, RUN_NAME="no-progress"
    )
    first.wait_for("the first training step", lambda: first_step_done(first))
    first.signal("TERM")  # save and end, no requeue: exit code 75
    info = first.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "75:0"), first.report()
    assert first.summary()["status"] == "preempted"
    assert "job exit code 75: stopped with its state saved" in first.log_text()

    # The same run again, with a launcher too slow to start before the warning, which comes
    # before srun has started its step: the batch script sends the request again until the
    # step has it (once, it was lost and the run trained to its end).
    second = Job.submit(
        cluster,
        tmp_path,
        ONE_NODE,
        *TRAIN_OPTIONS,
        *options,
        RUN_NAME="no-progress",
        PYTHON=str(slow_python(tmp_path)),
        PATH=slow_srun_path(tmp_path),
        MAX_STARTS_WITHOUT_PROGRESS="1",
    )
    second.wait_for_log("command: ")
    assert "has saved state: resuming" in second.log_text()
    second.signal("USR1")
    info = second.wait()
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = second.info()
    assert info["Restarts"] == "0" and info["JobState"] == "FAILED", second.report()
    assert info["ExitCode"] == "79:0", second.report()  # stopped by SIGUSR1 unsaved
    log = second.log_text()
    assert "stop requested by the batch script" in log, log
    assert "not requeued: 1 starts in a row saved no new state" in log, log
    assert "requeueing" not in log, log
    assert second.completion_states() == ["FAILED"]


@pytest.mark.slurm
def test_requeue_limit_stops_the_job(cluster, data, tmp_path):
    """MAX_REQUEUES=1: the first warning requeues, the second (in the resumed start) ends the
    job with its state saved (exit code 75) instead of requeueing again."""
    options = ["--epochs", "50", "--batch-size", "16", "--data-dir", str(data["slow"])]
    job = Job.submit(cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *options, MAX_REQUEUES="1")
    job.wait_for("epoch 1 in metrics.jsonl", lambda: len(job.epochs()) >= 1)
    job.signal("USR1")
    job.start_requeued_now()
    job.wait_for_log("==== start 2")
    job.wait_for(
        "the resumed start's first step", lambda: job.log_text().count("first training step") >= 2
    )
    job.signal("USR1")
    info = job.wait()
    time.sleep(2)  # a requeue would turn it PENDING again within this
    info = job.info()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "1"), (
        job.report()
    )
    log = job.log_text()
    assert "==== start 2 (warning requeues 1 of at most 1; other requeues 0," in log, log
    assert "resuming after epoch" in log, log
    assert "not requeued: the requeue limit is reached (1 warning requeues, MAX_REQUEUES=1)" in log
    assert log.count("requeueing") == 1, log
    assert job.summary()["status"] == "preempted"
    assert job.completion_states() == ["PENDING", "FAILED"]


@pytest.mark.slurm
def test_exit_codes_say_what_happened(cluster, data, tmp_path):
    """The job's exit code follows the run, not the launcher (which exits 1 for any failed
    worker): 2 for bad input, 3 for a diverged run, 2 for a time limit too short to save."""
    small = ["--epochs", "2", "--batch-size", "64", "--data-dir", str(data["small"])]
    one_cpu = ("--cpus-per-task=1",)
    bad = Job.submit(
        cluster,
        tmp_path,
        ONE_NODE,
        *TRAIN_OPTIONS,
        *small,
        "--label-smoothing",
        "1",
        sbatch=one_cpu,
        MAX_RESTARTS="1",
    )
    diverged = Job.submit(
        cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *small, "--lr", "1e30", sbatch=one_cpu
    )
    short = Job.submit(
        cluster, tmp_path, ONE_NODE, *TRAIN_OPTIONS, *small, sbatch=(*one_cpu, "--time=2")
    )

    info = bad.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), bad.report()
    # (Not the toolkit's own error line: when rank 1 fails first, torchrun may stop rank 0,
    # which prints it, before it does. The code comes from torchrun's report.)
    log = bad.log_text()
    assert "failed (exitcode: 2)" in log and "job exit code 2: bad input" in log, log

    info = diverged.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0"), diverged.report()
    assert diverged.summary()["status"] == "diverged"
    assert "job exit code 3: diverged" in diverged.log_text()

    info = short.wait()
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), short.report()
    log = short.log_text()
    assert "error: time limit 00:02:00 is shorter than the warning's lead (120 s)" in log, log
    assert "--time=3 or more" in log, log
    assert not short.run_dir.exists(), "the refused job started training"


@pytest.mark.slurm
def test_sweep_runs_every_line_and_requeues_only_its_task(cluster, data, tmp_path):
    """A 3-line grid as a job array: three runs, one folder each, named from the sweep and the
    line. The task signalled mid-run is requeued and completes; the others are not requeued.
    It is the task whose own job id is the array's id, for which a plain `scontrol requeue
    $SLURM_JOB_ID` would requeue every task of the array."""
    grid = tmp_path / "tiny.txt"
    grid.write_text(
        "# three tiny runs\n"
        f"--epochs 1 --data-dir {data['small']}\n"
        "\n"
        f"--epochs 2 --seed 1 --data-dir {data['small']}   # a comment\n"
        f"--epochs 4 --batch-size 16 --data-dir {data['slow']}\n"
    )
    array_id = cluster.sbatch(
        f"--job-name={JOB_NAME}",
        f"--chdir={tmp_path}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--array=1-3",
        str(SWEEP),
        str(grid),
        *TRAIN_OPTIONS,
        env=job_env(cluster, NUM_PROCESSES="1"),
    )
    tasks = {
        task: Job(
            cluster,
            tmp_path,
            f"{array_id}_{task}",
            tmp_path / f"{JOB_NAME}-{array_id}_{task}.out",
            tmp_path / "runs",  # the run folder is read from the log below
        )
        for task in (1, 2, 3)
    }
    slow = tasks[3]
    slow.wait_for_log("run folder: ")
    slow.run_dir = tmp_path / "runs" / re.search(r"run folder: runs/(\S+)", slow.log_text())[1]
    assert slow.info()["JobId"] == str(array_id), "task 3 should hold the array's own job id"
    slow.wait_for("epoch 1 of task 3", lambda: len(slow.epochs()) >= 1)
    slow.signal("USR1")
    slow.start_requeued_now()

    for task, job in tasks.items():
        info = job.wait()
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.report()
        assert info["Restarts"] == ("1" if task == 3 else "0"), job.report()
    # One folder per line, named from the sweep (the grid's name), the task and the line.
    run_dirs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    prefixes = ["tiny-1-epochs-1-data-dir-", "tiny-2-epochs-2-seed-1-data-dir-", "tiny-3-epochs-4"]
    assert [d[: len(p)] for d, p in zip(run_dirs, prefixes, strict=True)] == prefixes, run_dirs
    for run_dir, epochs, seed in zip(run_dirs, (1, 2, 4), (0, 1, 0), strict=True):
        summary = json.loads((tmp_path / "runs" / run_dir / "summary.json").read_text())
        config = json.loads((tmp_path / "runs" / run_dir / "config.json").read_text())
        assert summary["status"] == "completed", (run_dir, summary)
        assert (config["epochs"], config["seed"], config["model"]) == (epochs, seed, "mlp")
    assert slow.epochs() == [1, 2, 3, 4], slow.report()
    log = slow.log_text()
    assert f"sweep tiny: task 3 of 3 lines in {grid}" in log, log
    assert f"requeueing {array_id}_3 (warning requeue 1 of at most 3)" in log, log
    assert "resuming after epoch" in log, log
    for task in (1, 2):
        assert tasks[task].completion_states() == ["COMPLETED"], tasks[task].report()
    assert slow.completion_states() == ["PENDING", "COMPLETED"]


# ---------------------------------------------------------------------------------------------
# slurm/lib.sh's decisions, without a cluster
# ---------------------------------------------------------------------------------------------
def run_lib(tmp_path: Path, script: str, argv0: Path = ONE_NODE, **env: str):
    """bash: source slurm/lib.sh, run `script`; `scontrol` is a stand-in that logs its
    arguments to tmp_path/scontrol.calls. Returns the CompletedProcess."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/bash\necho "$*" >> {tmp_path / "scontrol.calls"}\n')
    fake.chmod(0o755)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))} | {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        **env,
    }
    return subprocess.run(
        ["bash", "-c", f"set -uo pipefail; source {LIB}\n{script}", str(argv0)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def scontrol_calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "scontrol.calls"
    return path.read_text().splitlines() if path.exists() else []


SAVE_RESUME = 'echo state > "$RUN_DIR/.r" && mv "$RUN_DIR/.r" "$RUN_DIR/resume.pt"'


def write_summary(status: str, **fields: str) -> str:
    summary = json.dumps({"status": status, **fields})
    return f'echo \'{summary}\' > "$RUN_DIR/.s" && mv "$RUN_DIR/.s" "$RUN_DIR/summary.json"'


TORCHRUN_REPORT = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  exitcode  : 2 (pid: 12)
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 11)
"""
KILLED_REPORT = TORCHRUN_REPORT.replace("exitcode  : 2", "exitcode  : -9")
PEER_REPORT = TORCHRUN_REPORT.replace("exitcode  : 2", "exitcode  : 4")
SAVED_PREEMPTED = f"{SAVE_RESUME}; {write_summary('preempted')}"

# Each case: (earlier state, what this start did, the batch shell's stop signal, the step's
#             code, the job's Comment (its requeue counts), exit code, requeued)
END_CASES = {
    "completed": ("", write_summary("completed"), "", 0, "", 0, False),
    "warned, saved: requeue": (
        write_summary("preempted"), SAVED_PREEMPTED, "USR1", 1, "", 75, True,
    ),
    "warned, nothing saved, after progress: requeue once": (
        SAVED_PREEMPTED, "", "USR1", 143, "fmnist:time=1,idle=0", 75, True,
    ),
    "warned, nothing saved, the second start in a row": (
        SAVED_PREEMPTED, "", "USR1", 143, "fmnist:time=2,idle=1", 79, False,
    ),
    "warned, saved, requeue limit reached": (
        "", SAVED_PREEMPTED, "USR1", 1, "fmnist:time=3,idle=0", 75, False,
    ),
    "warned in the last epoch: completed": (
        "", f"{SAVE_RESUME}; {write_summary('completed', ending='done')}", "USR1", 1, "", 0, False,
    ),
    "warned during the end, which was cut short: requeue": (
        "", write_summary("completed", ending="pending"), "USR1", 1, "", 75, True,
    ),
    "SIGUSR1 to the step alone (scancel --signal=USR1): requeue": (
        "", f"{SAVE_RESUME}; {write_summary('preempted', stopped_by='SIGUSR1')}", "", 0, "", 75,
        True,
    ),
    "SIGTERM to the step alone: saved, not requeued": (
        "", f"{SAVE_RESUME}; {write_summary('preempted', stopped_by='SIGTERM')}", "", 0, "", 75,
        False,
    ),
    "diverged": ("", f"{SAVE_RESUME}; {write_summary('diverged')}", "", 1, "", 3, False),
    "write failed": ("", write_summary("write-failed"), "", 1, "", 74, False),
    "bad input under torchrun": (
        "", 'printf \'%s\' "$REPORT" >> "$STDERR_FILE"', "", 1, "", 2, False,
    ),
    "a process killed by SIGKILL: not 137, which sacct would show as 9": (
        "", 'printf \'%s\' "$KILLED" >> "$STDERR_FILE"', "", 1, "", 1, False,
    ),
    "bad input, report from an earlier start": (
        'printf \'%s\' "$REPORT" >> "$STDERR_FILE"', "", "", 1, "", 1, False,
    ),
    "a node or the network failed (exit 4), saved: requeue": (
        SAVED_PREEMPTED, f'{SAVE_RESUME}; printf \'%s\' "$PEER" >> "$STDERR_FILE"', "", 1, "",
        4, True,
    ),
    "exit 4, nothing saved, once after progress: requeue": (
        SAVED_PREEMPTED, 'printf \'%s\' "$PEER" >> "$STDERR_FILE"', "", 1, "", 4, True,
    ),
    "exit 4, nothing saved, the second start in a row: not requeued": (
        SAVED_PREEMPTED, 'printf \'%s\' "$PEER" >> "$STDERR_FILE"', "", 1,
        "fmnist:time=0,idle=1", 4, False,
    ),
    "exit 4 after the run ended: not requeued": (
        write_summary("completed", ending="done"), 'printf \'%s\' "$PEER" >> "$STDERR_FILE"', "",
        1, "", 4, False,
    ),
    "already ended: completed": (write_summary("completed"), "", "", 0, "", 0, False),
    "already ended: diverged": (write_summary("diverged"), "", "", 0, "", 3, False),
    "cancelled, saved": ("", SAVED_PREEMPTED, "TERM", 1, "", 75, False),
    "cancelled, saved, no summary": ("", SAVE_RESUME, "TERM", 0, "", 75, False),
    "cancelled before it saved anything": ("", "", "TERM", 143, "", 79, False),
}  # fmt: skip


@pytest.mark.parametrize("case", list(END_CASES))
def test_end_of_start_decision(tmp_path, case):
    before, during, stop, rc, comment, expected_code, requeued = END_CASES[case]
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    stderr_file = tmp_path / "job.out"
    stderr_file.write_text("earlier starts' lines\n")
    script = f"""
        RUN_DIR={run_dir} RUN_NAME=r STDERR_FILE={stderr_file} MAX_REQUEUES=3 RESTARTS=0
        MAX_STARTS_WITHOUT_PROGRESS=2 JOB_RECORD="JobId=7 Comment={comment or "(null)"}"
        read_chain
        {before or ":"}
        STDERR_OFFSET=$(stat -c %s "$STDERR_FILE")
        START_STATE=$(run_files_state)
        {during or ":"}
        STOP={stop} CHILD_RC={rc}
        end_job
    """
    env = {"REPORT": TORCHRUN_REPORT, "KILLED": KILLED_REPORT, "PEER": PEER_REPORT,
           "SLURM_JOB_ID": "7"}  # fmt: skip
    result = run_lib(tmp_path, script, **env)
    output = result.stdout + result.stderr
    assert result.returncode == expected_code, output
    calls = scontrol_calls(tmp_path)
    assert [c for c in calls if c.startswith("requeue")] == (["requeue 7"] * requeued), output
    if not requeued:
        assert f"job exit code {expected_code}" in output, output
    assert expected_code < 128  # sacct shows 128 + N as the signal N


def test_requeue_counts_live_in_the_jobs_comment(tmp_path):
    """A requeue for the warning counts in the job's Comment (time=), a start that saved
    nothing too (idle=); SLURM's own requeues (SLURM_RESTART_COUNT) spend neither."""
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    script = f"""
        RUN_DIR={run_dir} RUN_NAME=r STDERR_FILE=/nonexistent MAX_REQUEUES=3 RESTARTS=5
        MAX_STARTS_WITHOUT_PROGRESS=2 JOB_RECORD="JobId=7 Comment=fmnist:time=1,idle=0"
        read_chain
        START_STATE=$(run_files_state)
        STOP=USR1 CHILD_RC=143
        end_job
    """
    result = run_lib(tmp_path, script, SLURM_JOB_ID="7")
    assert result.returncode == 75, result.stdout + result.stderr
    assert scontrol_calls(tmp_path) == [
        "update JobId=7 Comment=fmnist:time=2,idle=1",
        "requeue 7",
    ]


def test_array_task_requeues_only_itself(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    script = f"""
        RUN_DIR={run_dir} RUN_NAME=r STDERR_FILE=/nonexistent MAX_REQUEUES=3 RESTARTS=0
        MAX_STARTS_WITHOUT_PROGRESS=2 JOB_RECORD="JobId=40"
        read_chain
        START_STATE=$(run_files_state)
        {SAVE_RESUME}
        STOP=USR1 CHILD_RC=1
        end_job
    """
    env = {"SLURM_JOB_ID": "40", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "3"}
    result = run_lib(tmp_path, script, **env)
    assert result.returncode == 75, result.stdout + result.stderr
    assert [c for c in scontrol_calls(tmp_path) if c.startswith("requeue")] == ["requeue 40_3"]
    assert "update JobId=40_3 Comment=fmnist:time=1,idle=0" in scontrol_calls(tmp_path)


def test_machine_shell_keeps_a_request_that_comes_during_its_set_up(tmp_path):
    """srun's task (node_main's bash) signalled while SETUP_FILE still runs: the shell, which
    SIGUSR2 would end by default, keeps the request and hands it to the training it starts."""
    node_script = run_lib(tmp_path, "node_script").stdout
    ready = tmp_path / "setup-running"
    setup = tmp_path / "setup.sh"
    setup.write_text(f"touch {ready}\nsleep 2\n")
    training = tmp_path / "python"  # stands for PYTHON: says what the stop file asks
    training.write_text(
        '#!/bin/bash\necho "training started; stop file: $(cat $FMNIST_ACCEL_STOP_FILE)"\n'
    )
    training.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))} | {
        "SLURM_PROCID": "0",
        "SLURM_JOB_ID": "41",
        "TMPDIR": str(tmp_path),
        "FMNIST_MACHINES": "1",
        "FMNIST_PROCESSES_TOTAL": "1",
        "FMNIST_PYTHON": str(training),
        "FMNIST_NODE_SETUP": str(setup),
    }
    shell = subprocess.Popen(
        ["bash", "-c", node_script, "node", "-m", "fmnist_accel.train"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shell.send_signal(signal.SIGUSR2)  # the batch script's request
    out, _ = shell.communicate(timeout=30)
    assert shell.returncode == 0, out
    assert "stop requested by the batch script: SIGTERM to the training" in out, out
    assert "training started; stop file: SIGTERM" in out, out


@pytest.mark.parametrize(
    ("limit", "refused"),
    [("00:02:00", True), ("00:02:59", True), ("00:03:00", False), ("1-00:00:00", False)],
)
def test_time_limit_check(tmp_path, limit, refused):
    """The warning's lead comes from the script's own #SBATCH --signal line (120 s); with the
    default START_MARGIN (60 s) a limit under 3 minutes is refused."""
    script = f"""
        JOB_RECORD="JobId=7 TimeLimit={limit} TimeMin=N/A" START_MARGIN=60
        check_time_limit
        echo "lead $WARNING_S"
    """
    result = run_lib(tmp_path, script)
    output = result.stdout + result.stderr
    if refused:
        assert result.returncode == 2, output
        assert f"error: time limit {limit} is shorter than the warning's lead (120 s)" in output
    else:
        assert result.returncode == 0 and "lead 120" in output, output


def test_seed_table_grid_is_the_write_ups_three_models(tmp_path):
    lines = []
    for task in (1, 2, 3):
        result = run_lib(tmp_path, f"grid_line {SLURM_DIR / 'grids' / 'seed-table.txt'} {task}")
        assert result.returncode == 0, result.stderr
        count, name, options = result.stdout.splitlines()
        assert count == "3"
        lines.append((name, options))
    assert [options for _, options in lines] == ["--model mlp", "--model cnn", "--model cnn-bn"]
    assert [name for name, _ in lines] == ["model-mlp", "model-cnn", "model-cnn-bn"]

    result = run_lib(tmp_path, f"grid_line {SLURM_DIR / 'grids' / 'seed-table.txt'} 4")
    assert result.returncode != 0
    assert "array task 4, but" in result.stderr and "--array=1-3" in result.stderr


@pytest.mark.parametrize("script", [LIB, ONE_NODE, MULTI_NODE, SWEEP], ids=lambda p: p.name)
def test_script_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_failing_setup_file_is_refused(tmp_path):
    setup = tmp_path / "setup.sh"
    setup.write_text("module load does-not-exist 2>/dev/null || false\n")
    result = run_lib(tmp_path, "source_setup_file; echo went on", SETUP_FILE=str(setup))
    assert result.returncode == 2, result.stdout
    assert f"error: SETUP_FILE={setup} failed (exit status 1)" in result.stderr
    assert "went on" not in result.stdout


def test_run_folder_options_are_refused(tmp_path):
    result = run_lib(tmp_path, "check_run_options --epochs 3 --run-name=x")
    assert result.returncode == 2
    assert "--run-name among the training options" in result.stdout + result.stderr
