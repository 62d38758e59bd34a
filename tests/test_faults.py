"""Cluster faults beyond preemption, with real processes and real files (docs/faults.md):

- a rank killed (SIGKILL) in the middle of a 2-process run: torchrun's --max_restarts
  restarts the group, which resumes from the last saved epoch and ends exactly as a run
  never interrupted;
- a hung rank (SIGSTOP): the others stop at the collective timeout with one line naming it,
  and the restarted group finishes the run;
- a process that ends on purpose (a non-finite loss) is not restarted into "already ended";
- a full disk (a small tmpfs): one line naming the file and the free space, exit 74,
  summary.json written, nothing earlier damaged, and --resume finishes the run once there
  is space again, with the same results;
- temporary files of every writer are gone after a resume;
- multi-process eval and predict: an error on any rank is the same one line, every time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import save_file
from support.fakedata import N_TEST, N_TRAIN, write_fashion_dir
from support.processes import (
    BIN,
    HARNESS,
    REPO,
    assert_same_training,
    free_port,
    launch_command,
    metrics,
    process_env,
    run_command,
    summary,
    train,
    wait_for_port,
    why,
)

from fmnist_accel.errors import EXIT_DIVERGED, EXIT_PEER_FAILED, EXIT_WRITE_FAILED
from fmnist_accel.store.checkpoint import METADATA_KEY, load_model_checkpoint
from fmnist_accel.store.layout import CHECKPOINT_FILES as CHECKPOINTS

pytestmark = pytest.mark.slow

EPOCHS = 3
STEPS_PER_EPOCH = 10  # 500 training images, 2 processes at batch 25 (or 1 at batch 50)
SLOW_START = REPO / "tests" / "support" / "slow_start.py"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=100)


def options(data_dir: Path, out: Path, batch: int = 25) -> list[str]:
    return ["--model", "mlp", "--epochs", str(EPOCHS), "--batch-size", str(batch),
            "--deterministic", "--data-dir", str(data_dir), "--output-dir", str(out)]  # fmt: skip


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    """The same 2-process run, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    proc = train(2, [*options(data_dir, out), "--run-name", "ref"])
    assert proc.returncode == 0, why(proc)
    return out / "ref"


def assert_same_results(run: Path, reference: Path) -> None:
    """metrics.jsonl (but the timings) and both checkpoints' tensors, bit for bit."""
    assert_same_training(run, reference, EPOCHS)
    assert (run / "best.safetensors").exists()
    assert summary(run)["status"] == "completed"


def launch(nproc: int, target: list[str], env: dict, max_restarts: int | None, timeout=400):
    return subprocess.run(
        launch_command(nproc, target, max_restarts=max_restarts),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error: " in line]


def before_the_launchers_report(stderr: str) -> str:
    """stderr without the traceback that `accelerate launch` itself prints when a worker
    failed (ChildFailedError, with the workers' exit codes)."""
    cut = stderr.find(f'Traceback (most recent call last):\n  File "{BIN / "accelerate"}"')
    return stderr if cut < 0 else stderr[:cut]


# ------------------------------------------------------------------------------------------
# A crashed rank, a hung rank
# ------------------------------------------------------------------------------------------
def test_killed_rank_is_restarted_and_the_run_ends_as_if_never_interrupted(
    data_dir, reference, tmp_path
):
    """SIGKILL of rank 1 at step 4 of epoch 2, launched as a new user would (no --run-name,
    no --resume): the restarted group finds the run folder the first attempt chose, resumes
    after epoch 1, and the job ends by itself with exit 0 and the reference's results."""
    out = tmp_path / "runs"
    killed = tmp_path / "killed"  # created by the fault just before its SIGKILL
    env = process_env(
        FAULT_ONLY_RANK="1", FAULT_KILL_STEP=str(STEPS_PER_EPOCH + 4), FAULT_ONCE_FILE=str(killed)
    )
    proc = launch(2, [str(HARNESS), *options(data_dir, out)], env, max_restarts=2)
    assert proc.returncode == 0, why(proc)
    assert killed.exists()  # the kill did happen
    # The launcher reports whichever rank it sees fail first: the killed rank 1 (-9), or
    # rank 0, which noticed its peer's death at the next collective (exit 4).
    assert re.search(rf"failed \(exitcode: (-9\) local_rank: 1|{EXIT_PEER_FAILED}\) local_rank: 0)",
                     proc.stderr), proc.stderr[-3000:]  # fmt: skip
    restart = re.findall(r"^restart 1 of 2 .*: resuming after epoch 1$", proc.stdout, re.M)
    assert len(restart) == 1, proc.stdout
    [run] = out.iterdir()  # one run folder: the restart continued it
    assert_same_results(run, reference)
    assert [r["epoch"] for r in summary(run)["ranks"]] == [EPOCHS, EPOCHS]


def test_killed_rank_on_one_of_two_machines_is_restarted(data_dir, reference, tmp_path):
    """Two launchers on 127.0.0.1 (two "machines", c10d rendezvous), as docs/faults.md says
    to run them: --run-name, --resume auto and TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (without
    it, torch 2.14 reuses the rendezvous store and the restarted group cannot connect). Rank 1
    is killed in epoch 2: both launchers restart, and the run ends as if never interrupted."""
    port = free_port()
    env = process_env(
        ACCELERATE_USE_CPU="1",
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
        FAULT_ONLY_RANK="1",
        FAULT_KILL_STEP=str(STEPS_PER_EPOCH + 4),
        FAULT_ONCE_FILE=str(tmp_path / "killed-once"),
    )
    args = [*options(data_dir, tmp_path / "runs"), "--run-name", "mm", "--resume", "auto"]
    procs = []
    for machine_rank in (0, 1):
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(machine_rank), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "c10d", "--max_restarts", "2", str(HARNESS), *args]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
        if machine_rank == 0:
            wait_for_port(port, procs[0])
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert (tmp_path / "killed-once").exists()  # the kill did happen
    assert "resuming after epoch 1" in outs[0][0] + outs[1][0]
    assert_same_results(tmp_path / "runs" / "mm", reference)


def test_hung_rank_stops_the_others_at_the_collective_timeout_and_the_group_restarts(
    data_dir, reference, tmp_path
):
    """SIGSTOP of rank 1 in epoch 2: rank 0 waits 5 s (--collective-timeout 5), stops with
    one line naming that timeout (exit 4, which is not a deliberate exit), the launcher kills
    the stopped rank and restarts the group, which finishes the run."""
    out, pids = tmp_path / "runs", tmp_path / "pids"
    pids.mkdir()
    env = process_env(
        FAULT_ONLY_RANK="1", FAULT_STOP_STEP=str(STEPS_PER_EPOCH + 4), FAULT_PID_DIR=str(pids)
    )
    args = [*options(data_dir, out), "--run-name", "hung", "--collective-timeout", "5"]
    try:
        proc = launch(2, [str(HARNESS), *args], env, max_restarts=1)
    finally:
        for pid_file in pids.glob("rank*.pid"):  # a stopped rank must not outlive the test
            kill_if_still_stopped(int(pid_file.read_text()))
    assert proc.returncode == 0, why(proc)
    said = error_lines(proc.stderr)
    assert len(said) == 1, proc.stderr[-3000:]
    assert "rank 0: no answer from the other processes for 5 s (the collective timeout, " in said[0]
    assert f"failed (exitcode: {EXIT_PEER_FAILED}) local_rank: 0" in proc.stderr
    assert "Traceback" not in proc.stdout + before_the_launchers_report(proc.stderr)
    assert "restart 1 of 1 " in proc.stdout and "resuming after epoch 1" in proc.stdout
    assert_same_results(out / "hung", reference)


def kill_if_still_stopped(pid: int) -> None:
    """SIGKILL `pid` if it is still this test's stopped rank (not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return  # gone: the launcher killed it
    if stat.rsplit(")", 1)[1].split()[0] == "T" and str(HARNESS).encode() in cmdline:
        os.kill(pid, signal.SIGKILL)


def test_a_deliberate_exit_is_not_restarted(tmp_path):
    """A non-finite loss ends the run on purpose (exit 3, summary 'diverged'). Restarted, the
    group would find the run ended and exit 0: the job would seem to succeed. The processes
    of later attempts exit at once with the first one's code instead; the line is said once."""
    data = write_fashion_dir(tmp_path / "data", N_TRAIN, N_TEST)
    args = ["--model", "mlp", "--epochs", "2", "--optimizer", "sgd", "--momentum", "0",
            "--lr", "1e5", "--batch-size", str(N_TRAIN // 4), "--valid-size", "0",
            "--scheduler", "none", "--no-early-stopping", "--data-dir", str(data),
            "--output-dir", str(tmp_path / "runs"), "--run-name", "boom"]  # fmt: skip
    proc = launch(2, ["-m", "fmnist_accel.train", *args], process_env(), max_restarts=2)
    assert proc.returncode != 0, why(proc)
    said = error_lines(proc.stderr)
    assert len(said) == 1 and "non-finite" in said[0], proc.stderr[-3000:]
    assert "already ended" not in proc.stdout
    # the first attempt and both restarts end with the deliberate code
    assert len(re.findall(r"failed \(exitcode: 3\)", proc.stderr)) == 3, proc.stderr[-3000:]
    assert summary(tmp_path / "runs" / "boom")["status"] == "diverged"


# ------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (root only; CI runs as root), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about `leave` bytes free on `disk`."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def digests(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("nproc", [1, 2])
def test_full_disk_stops_with_one_line_and_resume_finishes_the_run(
    data_dir, reference, small_disk, nproc
):
    """Epoch 1 fits; then the disk is filled to ~300 kB free, less than resume.pt needs, and
    the run resumes: epoch 2's resume.pt cannot be written. One line names the file and the
    free space; exit 74; summary.json says write-failed; the files of epoch 1 are intact;
    no temporary file is left. Once the space is freed, --resume auto ends the run with the
    results of a run never interrupted (the reference ran on 2 processes at batch 25; one
    process at batch 50 trains on the same images per step, but not bit for bit, so it is
    compared with its own uninterrupted run)."""
    batch = 25 if nproc == 2 else 50
    args = [*options(data_dir, small_disk / "runs", batch), "--run-name", "r", "--resume", "auto"]
    first = train(nproc, [*args, "--epochs", "1"])
    assert first.returncode == 0, why(first)
    run = small_disk / "runs" / "r"
    epoch1 = digests(run)
    filler = fill(small_disk, 300_000)

    proc = train(nproc, args)
    assert proc.returncode == (EXIT_WRITE_FAILED if nproc == 1 else 1), why(proc)
    said = error_lines(proc.stderr)
    assert len(said) == 1, proc.stderr[-3000:]
    assert "Traceback" not in before_the_launchers_report(proc.stderr), proc.stderr[-3000:]
    assert re.search(
        rf"cannot write {re.escape(str(run / 'resume.pt'))}: No space left on device "
        r"\(\d+\.\d kB free there\); the files written before it are intact; free some space, "
        rf"then resume with --resume {re.escape(str(run))}$",
        said[0],
    ), said[0]
    if nproc == 2:  # every rank stopped with the code; the launcher reports 1
        assert len(re.findall(rf"exitcode: {EXIT_WRITE_FAILED}\)", proc.stderr)) >= 1
    after = digests(run)
    for name in ("best.safetensors", "last.safetensors", "resume.pt"):
        assert after[name] == epoch1[name], f"{name} changed"
    # config.json says what the start ran with: the resume's 3 epochs, nothing else changed
    config_before, config_after = (
        json.loads(epoch1["config.json"]),
        json.loads(after["config.json"]),
    )
    assert config_after == {**config_before, "epochs": config_after["epochs"]}
    assert json.loads(after["summary.json"])["status"] == "write-failed"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    filler.unlink()
    resumed = train(nproc, args)
    assert resumed.returncode == 0, why(resumed)
    assert "resuming after epoch 1" in resumed.stdout
    if nproc == 1:
        reference = run.parent / "uninterrupted"
        whole = train(1, [*options(data_dir, run.parent, batch), "--run-name", reference.name])
        assert whole.returncode == 0, why(whole)
    assert_same_results(run, reference)


# ------------------------------------------------------------------------------------------
# Temporary files
# ------------------------------------------------------------------------------------------
LEFTOVERS = (
    ".last.safetensors.k3j2h1.tmp",  # atomic.atomic_write
    ".resume.pt.x9y8z7.tmp",
    ".tmpAb3xYz",  # safetensors' save_file (Rust tempfile), as older versions wrote it
    ".write-test-4242",  # run_folder.check_writable's probe
)


@pytest.mark.parametrize("how", ["resume", "restart-in-epoch-1"])
def test_no_temporary_file_survives_a_resume(tiny_run, tmp_path, how):
    """Leftovers of every writer in a run folder are gone once a run takes the folder again:
    a resumed run, and one killed in epoch 1 (no resume.pt) started again with --resume."""
    run = tmp_path / "runs" / "r"
    shutil.copytree(tiny_run.run_dir, run)
    if how == "restart-in-epoch-1":  # what a kill in epoch 1 leaves: no epoch, no checkpoint
        for name in ("resume.pt", "metrics.jsonl", "summary.json", *CHECKPOINTS):
            (run / name).unlink()
    for name in LEFTOVERS:
        (run / name).write_bytes(b"\0" * 1000)
    res = run_command(
        [BIN / "fmnist-accel", "train", "--resume", run, "--epochs", "3", "--data-dir",
         tiny_run.data_dir],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.rc == 0, str(res)
    assert not [name for name in LEFTOVERS if (run / name).exists()]
    assert [r["epoch"] for r in metrics(run)][-1] == 3


# ------------------------------------------------------------------------------------------
# Multi-process eval and predict: errors
# ------------------------------------------------------------------------------------------
def test_eval_and_predict_errors_on_several_processes_are_one_line_every_time(tmp_path):
    """A checkpoint that is not one, evaluated on 2 processes, 5 times: 3 plain launches and
    2 with the main process starting 3 s late (tests/support/slow_start.py), the case where rank 1
    meets the error first; the launcher used to stop the main process before it printed.
    Then predict, with the main process late too."""
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not weights\n")
    expected = f"fmnist-accel: error: {bad} is not a readable checkpoint"
    for slow in ("0", "0", "0", "3", "3"):
        env = process_env(SLOW_START=slow)
        proc = launch(2, [str(SLOW_START), "eval", str(bad), "--json"], env, max_restarts=None)
        assert proc.returncode != 0
        said = error_lines(proc.stderr)
        assert len(said) == 1 and said[0].startswith(expected), f"slow {slow}: {proc.stderr}"
        assert proc.stdout.strip() == ""
    proc = launch(2, [str(SLOW_START), "predict", str(bad), "--index", "0"],
                  process_env(SLOW_START="3"), max_restarts=None)  # fmt: skip
    said = error_lines(proc.stderr)
    assert len(said) == 1 and said[0].startswith(expected), proc.stderr


def test_predict_on_several_processes_answers_once(tiny_run):
    proc = launch(2, ["-m", "fmnist_accel", "predict", "best", "--run-dir",
                      str(tiny_run.run_dir), "--index", "3", "--json"],
                  process_env(), max_restarts=None)  # fmt: skip
    assert proc.returncode == 0, why(proc)
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    assert json.loads(line)["source"] == "test image 3"


def test_eval_json_says_overflowing_outputs_in_one_line(tiny_run, tmp_path, cli):
    """Finite weights, 1e30 times too large: the logits overflow and the loss is nan. No
    half-valid JSON (a NaN, or a null loss beside an accuracy of garbage): one line on
    stderr and exit code 3, as for a non-finite loss in training."""
    weights, meta = load_model_checkpoint(tiny_run.run_dir / "best.safetensors")
    huge = tmp_path / "huge.safetensors"
    save_file({k: v * 1e30 for k, v in weights.items()}, huge,
              metadata={METADATA_KEY: json.dumps(meta)})  # fmt: skip
    res = cli("eval", huge, "--data-dir", tiny_run.data_dir, "--json")
    assert res.rc == EXIT_DIVERGED and res.stdout == "", str(res)
    said = error_lines(res.stderr)
    assert len(said) == 1 and "the model's outputs overflow on the test split" in said[0], said


def test_error_of_a_process_cannot_be_lost_to_a_faster_one(tmp_path):
    """The bad checkpoint of the earlier test, with the main process 3 s late, under a
    launcher that restarts: the line is still said once, and the restarted attempts exit
    at once with the same code instead of repeating it."""
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not weights\n")
    proc = launch(2, [str(SLOW_START), "eval", str(bad)], process_env(SLOW_START="3"),
                  max_restarts=2)  # fmt: skip
    said = error_lines(proc.stderr)
    assert len(said) == 1 and "is not a readable checkpoint" in said[0], proc.stderr
    assert len(re.findall(r"failed \(exitcode: 2\)", proc.stderr)) == 3, proc.stderr[-3000:]
