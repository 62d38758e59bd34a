"""A real training process holds its run folder's lock while it runs, and only then."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLI, TINY_RUN_ARGS, assert_one_line_error, run_command
from launching import FAULTS, child_env, why


def lock_is_free(run_dir: Path) -> bool:
    with open(run_dir / ".lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def test_a_training_process_holds_its_run_folder_until_it_exits(readonly_data, tmp_path):
    runs, pause = tmp_path / "runs", tmp_path / "paused"
    args = [*TINY_RUN_ARGS, "--data-dir", readonly_data.path, "--output-dir", runs,
            "--run-name", "live", "--resume", "auto"]  # fmt: skip
    env = child_env(FAULT_PAUSE_STEP="3", FAULT_PAUSE_FILE=str(pause))
    first = subprocess.Popen(
        [sys.executable, str(FAULTS), *map(str, args)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not pause.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pause.exists(), "the first run never reached its pause"
        assert not lock_is_free(runs / "live")
        # Still in its first epoch: no resume.pt yet, so nothing else would stop a second run.
        assert not (runs / "live" / "resume.pt").exists()
        second = run_command([CLI, "train", *args], cwd=tmp_path)
        assert_one_line_error(second, f"{runs / 'live'} is in use by another training process")
        by_path = run_command([CLI, "train", "--resume", runs / "live"], cwd=tmp_path)
        assert_one_line_error(by_path, f"{runs / 'live'} is in use by another training process")
    finally:
        pause.unlink(missing_ok=True)
        try:
            stdout, stderr = first.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            first.kill()
            stdout, stderr = first.communicate()
    assert first.returncode == 0, why(subprocess.CompletedProcess([], 0, stdout, stderr))
    assert lock_is_free(runs / "live")  # released at exit
    assert "done: completed" in stdout


def test_release_locks_frees_the_folder_for_the_next_run_in_this_process(tmp_path):
    from fmnist_accel import rundir

    assert rundir.claim_run_dir(tmp_path) is None
    assert not lock_is_free(tmp_path)  # a second open file of this very process is refused
    with pytest.raises(rundir.RunInUse, match="in use by another training process"):
        rundir.claim_run_dir(tmp_path)
    rundir.release_locks()
    assert lock_is_free(tmp_path)
