"""A stop signal saves in time, whatever a step takes, and does not cost the end of a run.

Real processes, with steps made slow from outside (tests/support/harness.py sleeps in the
training step the way a long C++ call would, signals do not cut it short):

- two processes whose steps take 2 s each: a SIGTERM to their launcher is acted on within a
  step (the ranks meet about every half second of training, so after every such step), well
  inside torchrun's 30 s before it kills, where a check every 25 steps needed 50 s;
- one process whose step takes a minute, under the README's `accelerate launch` (which kills
  5 s after it passes SIGTERM on) and under `fmnist-accel train`: the last finished step is
  saved at once, and the resumed run ends bit for bit as one never stopped;
- a SIGTERM during the final test changes nothing: the run finishes its end and exits 0; a
  kill there leaves summary.json's ending pending, and the next start completes the end;
- two SIGTERMs 0.2 s apart are one request: exit 75, not a kill by the second.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.fakedata import N_TEST, N_TRAIN, TINY_RUN_ARGS, write_fashion_dir
from support.processes import (
    BIN,
    HARNESS,
    REPO,
    assert_same_training,
    launch_command,
    process_env,
    run_command,
    start,
    summary,
)

ONE_PROCESS = REPO / "launch_configs" / "one_process.yaml"
# The epochs' evaluation calls of a TINY_RUN_ARGS run (its validation split fits one batch):
# the next one is the end's final test.
VALIDATIONS = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("stop") / "data", N_TRAIN, N_TEST)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def resume_state(run: Path) -> dict:
    import torch

    return torch.load(run / "resume.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_stop_reaches_two_processes_within_a_slow_step(data, tmp_path):
    # batch 2: 83 steps an epoch per rank, 2 s each
    args = ["--model", "mlp", "--epochs", "1", "--batch-size", "2", "--data-dir", data,
            "--output-dir", tmp_path, "--run-name", "slow"]  # fmt: skip
    reached = tmp_path / "reached"
    env = process_env(FAULT_STEP_SECONDS="2", FAULT_SLOW_STEP="3", FAULT_SLOW_STEP_S="0",
                      FAULT_SLOW_FILE=str(reached), FAULT_ONLY_RANK="0")  # fmt: skip
    proc = start(launch_command(2, [str(HARNESS), *map(str, args)]), env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(reached, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # the launcher, which passes it on to both ranks
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - signalled
    run = tmp_path / "slow"
    assert summary(run)["status"] == "preempted", out + err
    assert "rank 0: received SIGTERM" in err and "rank 1: received SIGTERM" in err
    state = resume_state(run)
    assert 3 <= state["step"] <= 5 and state["epoch"] == 0, state["step"]
    # Rank 0's steps take 2 s: within two of them, far inside torchrun's 30 s.
    assert took < 15, f"{took:.1f} s from SIGTERM to the end of the launcher"


@pytest.mark.slow
def test_a_lone_process_under_accelerate_launch_saves_a_step_it_cannot_finish(data, tmp_path):
    """accelerate 1.16's one-process launcher kills 5 s after it passes SIGTERM on; the 6th
    step takes a minute. What step 5 left is saved at once; the resumed run does step 6 again
    and ends bit for bit as a run never stopped (cnn-bn: BatchNorm statistics and dropout,
    which step 6's forward pass had already changed, come from before it)."""
    args = ["--model", "cnn-bn", "--epochs", "2", "--batch-size", "32", "--deterministic",
            "--data-dir", data, "--output-dir", tmp_path]  # fmt: skip
    reached = tmp_path / "reached"
    env = process_env(FAULT_SLOW_STEP="6", FAULT_SLOW_STEP_S="60", FAULT_SLOW_FILE=str(reached))
    launch = [BIN / "accelerate", "launch", "--config_file", ONE_PROCESS, HARNESS]
    proc = start([*launch, *args, "--run-name", "stopped"], env=env,
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(reached, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - signalled < 10
    run = tmp_path / "stopped"
    assert summary(run)["status"] == "preempted", out + err
    assert "stopped by SIGTERM in epoch 1 after step 5; state saved" in out
    assert resume_state(run)["step"] == 5

    resumed = run_command([sys.executable, "-m", "fmnist_accel.train", "--resume", run], tmp_path)
    assert resumed.rc == 0, str(resumed)
    assert "resuming after epoch 0, at step 5 of epoch 1" in resumed.stdout
    reference = run_command([sys.executable, "-m", "fmnist_accel.train", *args, "--run-name",
                             "reference"], tmp_path)  # fmt: skip
    assert reference.rc == 0, str(reference)
    assert_same_training(run, tmp_path / "reference", 2)


def test_fmnist_accel_train_saves_at_once_in_a_slow_step(data, tmp_path):
    """No launcher: the process itself saves the last finished step and exits 75 at once,
    without waiting for a step of a minute."""
    args = ["--model", "cnn-bn", "--epochs", "1", "--batch-size", "32", "--data-dir", data,
            "--output-dir", tmp_path, "--run-name", "r"]  # fmt: skip
    reached = tmp_path / "reached"
    env = process_env(FAULT_SLOW_STEP="3", FAULT_SLOW_STEP_S="60", FAULT_SLOW_FILE=str(reached))
    proc = start([sys.executable, HARNESS, *args], env=env, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)  # fmt: skip
    wait_for(reached, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    assert time.monotonic() - signalled < 10
    assert resume_state(tmp_path / "r")["step"] == 2
    assert "Traceback" not in err


def test_a_stop_during_the_final_test_changes_nothing(data, tmp_path):
    args = [*TINY_RUN_ARGS, "--data-dir", data, "--output-dir", tmp_path, "--run-name", "r"]
    env = process_env(FAULT_TERM_EVAL=str(VALIDATIONS + 1))
    res = run_command([sys.executable, HARNESS, *args], tmp_path, env=env)
    assert res.rc == 0, str(res)
    assert "received SIGTERM after the last epoch: finishing the run's end" in res.stderr
    done = summary(tmp_path / "r")
    assert (done["status"], done["ending"]) == ("completed", "done")
    assert done["final_test"]["num_samples"] == N_TEST
    assert "test: accuracy" in res.stdout


def test_a_run_killed_during_its_end_has_the_end_completed_by_the_next_start(data, tmp_path):
    args = [*TINY_RUN_ARGS, "--data-dir", data, "--output-dir", tmp_path, "--run-name", "r"]
    env = process_env(FAULT_KILL_EVAL=str(VALIDATIONS + 1))
    killed = run_command([sys.executable, HARNESS, *args], tmp_path, env=env)
    assert killed.rc == -signal.SIGKILL, str(killed)
    run = tmp_path / "r"
    cut = summary(run)
    assert (cut["status"], cut["ending"]) == ("completed", "pending") and "final_test" not in cut
    trained = (run / "metrics.jsonl").read_bytes()

    again = run_command([BIN / "fmnist-accel", "train", "--resume", "auto", "--run-name", "r",
                         "--output-dir", tmp_path, "--data-dir", data], tmp_path)  # fmt: skip
    assert again.rc == 0, str(again)
    assert "its end was cut short: completing its final test and figures" in again.stdout
    assert "test: accuracy" in again.stdout and "epoch 1/2" not in again.stdout
    done = summary(run)
    assert (done["status"], done["ending"]) == ("completed", "done")
    assert done["final_test"]["num_samples"] == N_TEST
    assert (run / "metrics.jsonl").read_bytes() == trained  # nothing trained again
    # and then it has ended
    last = run_command([BIN / "fmnist-accel", "train", "--resume", str(run)], tmp_path)
    assert last.rc == 0 and "already ended (completed)" in last.stdout, str(last)


@pytest.mark.slow
def test_a_signal_to_one_rank_alone_stops_both_and_is_named(data, tmp_path):
    """SIGTERM to rank 1 only (a node's own shutdown, a signal sent by hand to one process):
    both ranks stop at the same step and save; the main process, which got no signal, names
    the one that stopped the run in summary.json (a SLURM job requeues for SIGUSR1 alone)."""
    args = ["--model", "mlp", "--epochs", "2", "--batch-size", "8", "--data-dir", data,
            "--output-dir", tmp_path, "--run-name", "one"]  # fmt: skip
    env = process_env(FAULT_TERM_STEP="5", FAULT_ONLY_RANK="1", FAULT_STEP_SECONDS="0.05")
    res = run_command(launch_command(2, [str(HARNESS), *map(str, args)]), tmp_path, env=env)
    done = summary(tmp_path / "one")
    assert done["status"] == "preempted" and done["stopped_by"] == "SIGTERM", str(res)
    assert done["detail"].startswith("stopped by SIGTERM in epoch 1 after step "), done
    assert [r["epoch"] for r in done["ranks"]] == [1, 1], done
    assert "rank 1: received SIGTERM" in res.stderr and "rank 0: received" not in res.stderr
    assert "stopped by SIGTERM in epoch 1" in res.stdout, str(res)
    assert resume_state(tmp_path / "one")["epoch"] == 0


STOP_REQUEST_ADOPTED_SCRIPT = """
import os, signal, time
from fmnist_accel.cluster.stop_signals import StopRequest
stop = StopRequest().install()
assert not stop.adopt(0) and not stop
assert stop.adopt(signal.SIGUSR1) and stop.name == "SIGUSR1"
time.sleep(1.5)
os.kill(os.getpid(), signal.SIGUSR1)  # the rank's own copy, late: the same request
time.sleep(0.5)
print("alive", stop.name, stop.adopted)
"""


def test_a_late_copy_of_an_adopted_signal_is_the_same_request():
    res = run_command([sys.executable, "-c", STOP_REQUEST_ADOPTED_SCRIPT])
    assert (res.rc, res.stdout.strip(), res.stderr) == (0, "alive SIGUSR1 False", ""), str(res)


def test_two_signals_within_a_second_are_one_request(data, tmp_path):
    """The second SIGTERM, 0.2 s after the first, comes while the stopped run writes and
    exits: it is the same request, not a kill."""
    args = [*TINY_RUN_ARGS, "--data-dir", data, "--output-dir", tmp_path, "--run-name", "r"]
    env = process_env(FAULT_TERM_STEP="3", FAULT_TERM_AGAIN_S="0.2")
    res = run_command([sys.executable, HARNESS, *args], tmp_path, env=env)
    assert res.rc == 75, str(res)
    assert summary(tmp_path / "r")["status"] == "preempted"
    assert "second stop signal" not in res.stderr


STOP_REQUEST_SCRIPT = """
import os, signal, sys, time
from fmnist_accel.cluster.stop_signals import StopRequest
stop = StopRequest().install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(float(sys.argv[1]))
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(1)
print("alive", stop.name)
"""


@pytest.mark.parametrize(("gap", "alive"), [(0.2, True), (1.5, False)])
def test_a_second_signal_is_the_same_request_within_a_second_and_an_exit_after(gap, alive):
    res = run_command([sys.executable, "-c", STOP_REQUEST_SCRIPT, str(gap)])
    said = res.stderr.splitlines()
    assert said[0].startswith("received SIGTERM: finishing the current step"), str(res)
    if alive:
        assert (res.rc, res.stdout.strip(), len(said)) == (0, "alive SIGTERM", 1), str(res)
    else:
        assert res.rc == 128 + signal.SIGTERM and res.stdout == "", str(res)
        assert said[1] == "second stop signal (SIGTERM): exiting now"
