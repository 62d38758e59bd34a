"""`fmnist-accel runs`: every run folder with its status, read from real run folders (live,
completed, preempted, diverged, killed, write-failed) and from damaged ones, never with a
traceback."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.errors import assert_one_line_error
from support.fakedata import TINY_RUN_ARGS
from support.processes import CLI, HARNESS, process_env, run_command, train, why

from fmnist_accel.store import layout, run_info


def test_every_status_a_run_can_end_with_is_shown_as_it_is(tiny_run, tmp_path):
    """Each status summary.json may hold (layout.STATUSES, the one vocabulary training writes
    with) is shown as itself, write-failed included, and named in `runs --help`."""
    out = tmp_path / "runs"
    for status in layout.STATUSES:
        shutil.copytree(tiny_run.run_dir, out / status)
        summary = json.loads((out / status / "summary.json").read_text())
        (out / status / "summary.json").write_text(json.dumps({**summary, "status": status}))
        (out / status / "resume.pt").write_bytes(b"")  # what a stopped run leaves
    listed = run_command([CLI, "runs", "--output-dir", out, "--json"], cwd=tmp_path)
    assert listed.rc == 0, str(listed)
    shown = {r["name"]: r for r in listed.json()}
    assert {name: r["status"] for name, r in shown.items()} == {s: s for s in layout.STATUSES}
    assert all(r["problems"] == [] for r in shown.values()), shown
    help_text = run_command([CLI, "runs", "--help"], cwd=tmp_path).stdout
    help_text = " ".join(re.sub(r"-\n\s*", "-", help_text).split())  # click wraps at hyphens
    assert all(status in help_text for status in layout.STATUSES)


def test_a_held_lock_is_seen_without_taking_any_lock(tmp_path, monkeypatch):
    lock = tmp_path / ".lock"
    lock.touch()
    assert run_info.lock_holder(lock) is None
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)

        def no_flock(*args):
            raise AssertionError("runs must not try the lock: a starting trainer would fail")

        monkeypatch.setattr(fcntl, "flock", no_flock)
        assert run_info.lock_holder(lock) == os.getpid()
        monkeypatch.undo()
    assert run_info.lock_holder(lock) is None  # closed: released


def test_proc_locks_lines_that_are_not_a_holder_are_skipped(tmp_path):
    lock = tmp_path / ".lock"
    lock.touch()
    st = lock.stat()
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    table = tmp_path / "locks"
    table.write_text(
        f"1: POSIX  ADVISORY  WRITE 11 {where} 0 EOF\n"  # fcntl locks are not flock
        f"2: FLOCK  ADVISORY  WRITE 22 {where}9 0 EOF\n"  # another inode
        f"2: -> FLOCK  ADVISORY  WRITE 33 {where} 0 EOF\n"  # a waiter
        "garbage\n"
    )
    assert run_info.lock_holder(lock, str(table)) is None
    table.write_text(table.read_text() + f"3: FLOCK  ADVISORY  WRITE 44 {where} 0 EOF\n")
    assert run_info.lock_holder(lock, str(table)) == 44


def damage(output_dir: Path, tiny_run) -> dict[str, str]:
    """Damaged and half-written folders beside the real runs: name -> expected problem."""
    (output_dir / "empty").mkdir()
    torn = output_dir / "torn-config"
    shutil.copytree(tiny_run.run_dir, torn)
    (torn / "config.json").write_text('{"model": "ml')
    no_config = output_dir / "no-config"
    shutil.copytree(tiny_run.run_dir, no_config)
    (no_config / "config.json").unlink()
    torn_metrics = output_dir / "torn-metrics"
    shutil.copytree(tiny_run.run_dir, torn_metrics)
    with open(torn_metrics / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')
    lost = output_dir / "lost-checkpoint"
    shutil.copytree(tiny_run.run_dir, lost)
    (lost / "last.safetensors").unlink()
    bad_summary = output_dir / "bad-summary"
    shutil.copytree(tiny_run.run_dir, bad_summary)
    (bad_summary / "summary.json").write_text("[1, 2]")
    # SIGKILL leaves a run without summary.json (and no live lock holder)
    killed = output_dir / "killed"
    shutil.copytree(tiny_run.run_dir, killed)
    (killed / "summary.json").unlink()
    return {
        "empty": "empty folder",
        "torn-config": "config.json is not valid JSON",
        "no-config": "no config.json",
        "torn-metrics": "metrics.jsonl: 1 unreadable line",
        "lost-checkpoint": "last.safetensors missing",
        "bad-summary": "summary.json does not hold a JSON object",
        "killed": "no summary.json: its process was killed",
    }


@pytest.mark.slow
def test_runs_lists_live_ended_and_damaged_runs(readonly_data, tiny_run, tmp_path):
    out, pause = tmp_path / "runs", tmp_path / "paused"
    common = [*TINY_RUN_ARGS, "--data-dir", str(readonly_data.path), "--output-dir", str(out)]
    live = subprocess.Popen(
        [sys.executable, str(HARNESS), *common, "--run-name", "live"],
        env=process_env(FAULT_PAUSE_STEP="3", FAULT_PAUSE_FILE=str(pause)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Meanwhile (the live run waits at its pause): runs that ended in other ways.
        stopped = train(1, [*common, "--run-name", "stopped"], faults={"FAULT_TERM_STEP": "8"})
        assert stopped.returncode == 75, why(stopped)
        nan = {"FAULT_NAN_RANK": "0", "FAULT_NAN_STEP": "8"}
        diverged = train(1, [*common, "--run-name", "diverged", "--epochs", "3"], faults=nan)
        assert diverged.returncode == 3, why(diverged)
        shutil.copytree(tiny_run.run_dir, out / "done")
        problems = damage(out, tiny_run)
        deadline = time.monotonic() + 120
        while not pause.exists() and live.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pause.exists(), "the live run never reached its pause"

        listed = run_command([CLI, "runs", "--output-dir", out, "--json"], cwd=tmp_path)
        table = run_command([CLI, "runs", "--output-dir", out], cwd=tmp_path)
    finally:
        pause.unlink(missing_ok=True)
        try:
            stdout, stderr = live.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            live.kill()
            stdout, stderr = live.communicate()
    assert live.returncode == 0, stderr[-3000:]
    assert listed.rc == 0, str(listed)
    runs = {r["name"]: r for r in listed.json()}
    assert runs["live"]["status"] == "running" and runs["live"]["pid"] == live.pid
    assert runs["done"]["status"] == "completed"
    assert runs["stopped"]["status"] == "preempted"
    assert runs["stopped"]["epochs"] == 1 and runs["stopped"]["problems"] == []
    assert runs["diverged"]["status"] == "diverged"
    assert runs["killed"]["status"] == "interrupted"
    assert runs["torn-config"]["status"] == runs["no-config"]["status"] == "damaged"
    assert runs["empty"]["status"] == "empty"
    for name, problem in problems.items():
        assert any(problem in p for p in runs[name]["problems"]), (name, runs[name])

    done = runs["done"]
    summary = json.loads((tiny_run.run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (tiny_run.run_dir / "metrics.jsonl").open()]
    assert (done["model"], done["recipe"], done["precision"]) == ("mlp", "default", "fp32")
    assert (done["epochs"], done["max_epochs"], done["processes"]) == (2, 2, 1)
    assert done["best_valid_accuracy"] == max(r["valid_accuracy"] for r in records)
    assert done["best_epoch"] == summary["best"]["epoch"]
    assert done["train_time"] == summary["elapsed"]
    assert done["problems"] == []

    assert table.rc == 0 and "Traceback" not in table.stdout + table.stderr, str(table)
    for name, run in runs.items():
        line = next(line for line in table.stdout.splitlines() if f" {name} " in line)
        assert run["status"] in line

    # Ended now: no longer running.
    after = run_command([CLI, "runs", "--output-dir", out, "--json"], cwd=tmp_path).json()
    assert next(r for r in after if r["name"] == "live")["status"] == "completed"


def test_runs_reads_final_test_accuracy_and_sorts(tiny_run, tmp_path):
    out = tmp_path / "runs"
    for name, accuracy in (("a", 0.5), ("b", None), ("c", 0.9)):
        shutil.copytree(tiny_run.run_dir, out / name)
        summary = json.loads((out / name / "summary.json").read_text())
        summary["final_test"] = {"accuracy": accuracy} if accuracy else "not a dict"
        (out / name / "summary.json").write_text(json.dumps(summary))
    result = run_command([CLI, "runs", "--output-dir", out, "--sort", "test", "--json"], tmp_path)
    assert result.rc == 0, str(result)
    runs = result.json()
    assert [(r["name"], r["test_accuracy"]) for r in runs] == [
        ("c", 0.9),
        ("a", 0.5),
        ("b", None),
    ]
    assert runs[0]["test_accuracy_from"] == "final_test"


def test_runs_without_the_folder_is_one_line(tmp_path):
    result = run_command([CLI, "runs", "--output-dir", tmp_path / "nothing"], cwd=tmp_path)
    assert_one_line_error(result, f"no folder {tmp_path / 'nothing'}")


def test_runs_names_the_slurm_job_and_marks_the_best_run_of_a_sweep(
    readonly_data, tiny_run, tmp_path
):
    """A run started in a SLURM array task records the job, the sweep and the code it ran
    (provenance.json); `runs` shows the job, `--sweep` keeps one sweep's runs and marks the
    best by validation accuracy; a later start that runs other code says so in one line."""
    out = tmp_path / "runs"
    slurm = {"SLURM_JOB_ID": "79", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "2"}
    args = [*TINY_RUN_ARGS, "--data-dir", str(readonly_data.path), "--output-dir", str(out)]
    first = run_command(
        [CLI, "train", *args, "--run-name", "grid-2"],
        cwd=tmp_path,
        env=process_env(**slurm, FMNIST_SWEEP="grid"),
    )
    assert first.rc == 0, str(first)
    starts = json.loads((out / "grid-2" / "provenance.json").read_text())["starts"]
    assert [(s["slurm_job"], s["sweep"]) for s in starts] == [("77_2", "grid")]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    assert starts[0]["code"]["commit"] == head and isinstance(starts[0]["code"]["dirty"], bool)

    # A second run of the sweep with a lower validation accuracy, and a run of no sweep.
    shutil.copytree(out / "grid-2", out / "grid-1")
    records = [json.loads(line) for line in (out / "grid-1" / "metrics.jsonl").open()]
    for r in records:
        r["valid_accuracy"] = r["valid_accuracy"] / 2
    (out / "grid-1" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    shutil.copytree(tiny_run.run_dir, out / "alone")

    listed = run_command([CLI, "runs", "--output-dir", out, "--sweep", "grid", "--json"], tmp_path)
    assert listed.rc == 0, str(listed)
    runs = {r["name"]: r for r in listed.json()}
    assert set(runs) == {"grid-1", "grid-2"}
    assert (runs["grid-2"]["best_in_sweep"], runs["grid-1"]["best_in_sweep"]) == (True, False)
    assert runs["grid-2"]["slurm_job"] == "77_2" and runs["grid-2"]["starts"] == 1
    table = run_command([CLI, "runs", "--output-dir", out, "--sweep", "grid"], tmp_path)
    assert table.rc == 0, str(table)
    assert "* grid-2" in table.stdout and "* grid-1" not in table.stdout, table.stdout
    assert "77_2" in table.stdout and "alone" not in table.stdout, table.stdout
    unknown = run_command([CLI, "runs", "--output-dir", out, "--sweep", "other"], tmp_path)
    assert_one_line_error(unknown, "no runs of sweep 'other'")
    assert "sweeps there: grid" in unknown.stderr

    # The run's first start ran other code: a resume says so, and records its own start.
    (out / "grid-2" / "provenance.json").write_text(
        json.dumps({"starts": [{**starts[0], "code": {**starts[0]["code"], "commit": "0" * 40}}]})
    )
    resume = [CLI, "train", *args, "--resume", out / "grid-2", "--epochs", "3"]
    more = run_command(resume, cwd=tmp_path, env=process_env(SLURM_JOB_ID="80"))
    assert more.rc == 0, str(more)
    notes = [line for line in more.stdout.splitlines() if "this run started with code" in line]
    assert len(notes) == 1 and "000000000000" in notes[0] and head[:12] in notes[0], more.stdout
    starts = json.loads((out / "grid-2" / "provenance.json").read_text())["starts"]
    assert [s["slurm_job"] for s in starts] == ["77_2", "80"]
