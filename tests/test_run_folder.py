"""The run folder (store/run_folder.py): a real training process holds its lock while it runs,
and only then; its checkpoints found again by name; its JSON files read defensively."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.errors import assert_one_line_error
from support.fakedata import TINY_RUN_ARGS
from support.processes import CLI, HARNESS, process_env, run_command, why


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
    env = process_env(FAULT_PAUSE_STEP="3", FAULT_PAUSE_FILE=str(pause))
    first = subprocess.Popen(
        [sys.executable, str(HARNESS), *map(str, args)],
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
    from fmnist_accel.store import run_folder

    assert run_folder.claim_run_dir(tmp_path) is None
    assert not lock_is_free(tmp_path)  # a second open file of this very process is refused
    with pytest.raises(run_folder.RunInUse, match="in use by another training process"):
        run_folder.claim_run_dir(tmp_path)
    run_folder.release_locks()
    assert lock_is_free(tmp_path)


def test_best_of_a_run_without_validation_points_to_last(tmp_path):
    from fmnist_accel.errors import UserError
    from fmnist_accel.store.run_folder import resolve_checkpoint

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"valid_size": 0}))
    with pytest.raises(UserError, match="trained without validation: use last"):
        resolve_checkpoint("best", str(tmp_path / "r"), "runs")


@pytest.mark.parametrize("text", ["[1, 2]", '"completed"', "{bad json", "\xff\xfe"])
def test_run_files_edited_into_something_else_read_as_missing(tmp_path, text):
    """summary.json or config.json edited into a list, a string or garbage: read_json gives
    None (as for a missing file), so no caller meets a list where it expects an object (a
    summary.json holding a list made `train --resume` fail with an AttributeError)."""
    from fmnist_accel.store.run_folder import read_json, run_status

    (tmp_path / "summary.json").write_bytes(text.encode("latin-1"))
    assert read_json(tmp_path / "summary.json") is None
    assert run_status(tmp_path) is None
    (tmp_path / "summary.json").write_text('{"status": "completed"}')
    assert run_status(tmp_path) == "completed"
