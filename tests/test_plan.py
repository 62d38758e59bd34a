"""The rules of resuming (run/plan.py), on real run folders: which options may change,
when --epochs may change, when a run has ended, how the config is settled for this launch,
and what a different number of processes means."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from fmnist_accel.config import resolve_config
from fmnist_accel.errors import UserError
from fmnist_accel.run.plan import (
    RunPlan,
    check_process_count,
    plan_run,
    settle_config,
)
from fmnist_accel.store import layout, run_folder
from fmnist_accel.store.checkpoint import save_resume_state


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    run_folder.release_locks()  # plan_run locks the folder it chooses, as a training process does


def saved_run(
    folder: Path, epoch: int = 2, status: str | None = None, **options
) -> tuple[Path, dict]:
    """A run folder as training leaves it after `epoch` epochs: config.json, resume.pt and,
    when the run has ended, summary.json. Returns (folder, the saved config)."""
    config = resolve_config({"epochs": 4, **options}).to_dict()
    folder.mkdir(parents=True)
    (folder / layout.CONFIG).write_text(json.dumps(config))
    state = {  # every field a real resume.pt has (checkpoint.resume_state_problem checks)
        "config": config,
        "epoch": epoch,
        "step": 0,
        "elapsed": 1.0,
        "world_size": 1,
        "model": {},
        "ema": None,
        "optimizer": {},
        "plateau": None,
        "step_scheduler": None,
        "grad_scaler": None,
        "early_stopping": {},
        "best": {},
        "rank_states": [
            {"cpu_rng": torch.get_rng_state(), "cuda_rng": None, "loss_sum": 0.0, "count": 0}
        ],
    }
    save_resume_state(folder / layout.RESUME, state)
    if status is not None:
        (folder / layout.SUMMARY).write_text(json.dumps({"status": status}))
    return folder, config


def resume(run: Path, **options) -> RunPlan:
    """The plan of `fmnist-accel train --resume RUN [options]`; the folder's lock is released
    afterwards, as when that process exits."""
    try:
        return plan_run({"resume": str(run), **options})
    finally:
        run_folder.release_locks()


# --- options -------------------------------------------------------------------------------
def test_an_option_that_would_make_another_run_is_refused(tmp_path):
    run, _ = saved_run(tmp_path / "run", lr=0.003)
    message = (
        f"--lr 0.1 differs from the run being resumed ({run} has 0.003); resume without it or "
        "start a new run"
    )
    with pytest.raises(UserError) as error:
        resume(run, lr=0.1)
    assert str(error.value) == message


def test_options_that_leave_the_run_the_same_are_accepted(tmp_path):
    run, saved = saved_run(tmp_path / "run", lr=0.003)
    # The saved value given again is no conflict; a resumable override is taken over.
    plan = resume(run, lr=0.003, eval_batch_size=77)
    assert plan.run_dir == str(run) and plan.resume_state["epoch"] == 2
    assert plan.config == {**saved, "eval_batch_size": 77, "resume": str(run),
                           "run_name": "run", "output_dir": str(tmp_path)}  # fmt: skip
    assert plan.finished is None


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_epochs_of_a_per_step_schedule_cannot_change(tmp_path, scheduler):
    run, _ = saved_run(tmp_path / "run", scheduler=scheduler)
    with pytest.raises(UserError) as error:
        resume(run, epochs=6)
    assert str(error.value) == (
        f"--epochs cannot change when resuming a run with the {scheduler} schedule: its "
        "learning rates are fixed by the original length"
    )
    assert resume(run, epochs=4).config["epochs"] == 4  # the same length is no change


def test_epochs_of_a_per_epoch_schedule_can_change(tmp_path):
    run, _ = saved_run(tmp_path / "run", scheduler="plateau")
    assert resume(run, epochs=6).config["epochs"] == 6


# --- runs that have ended ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "epochs", "finished"),
    [
        ("completed", None, "completed"),  # all 4 epochs done
        ("completed", 6, None),  # asked for more: it goes on
        ("early-stopped", 6, "early-stopped"),  # more epochs do not undo early stopping
        ("diverged", 6, "diverged"),
        ("preempted", None, None),  # stopped by a signal: resumable
        (None, None, None),  # killed: no summary at all
    ],
)
def test_a_run_that_has_ended_stays_ended(tmp_path, status, epochs, finished):
    epoch_done = 4 if status == "completed" else 2
    run, _ = saved_run(tmp_path / "run", epoch=epoch_done, status=status)
    plan = resume(run) if epochs is None else resume(run, epochs=epochs)
    assert plan.finished == finished


def test_resume_auto_continues_the_newest_run_that_has_not_ended(tmp_path):
    older, _ = saved_run(tmp_path / "older", status="preempted")
    newer, _ = saved_run(tmp_path / "newer", status="completed", epoch=4)
    other, _ = saved_run(tmp_path / "other-model", model="mlp")
    for age, run in enumerate((newer, other, older)):  # older files get older mtimes
        stamp = 1_000_000_000 - age * 1000
        os.utime(run / layout.CONFIG, (stamp, stamp))
    plan = plan_run({"resume": "auto", "output_dir": str(tmp_path), "model": "cnn-bn"})
    assert plan.run_dir == str(older)  # newer has ended; other-model trains another model
    assert plan.finished is None


# --- the config of this launch ----------------------------------------------------------------
def resumed_plan(mixed_precision: str | None) -> RunPlan:
    config = resolve_config({"mixed_precision": mixed_precision, "data_dir": "data"}).to_dict()
    return RunPlan(run_dir="runs/r", config=config, resume_state={"epoch": 1})


def test_a_resumed_run_keeps_its_precision_unless_told(tmp_path):
    with pytest.raises(UserError) as error:
        settle_config(resumed_plan("bf16"), {}, mixed_precision="no", compiled=False)
    assert str(error.value) == (
        "runs/r trained with mixed precision bf16 but this launch uses no: resume with "
        "--mixed-precision bf16, or give --mixed-precision no to change it"
    )
    explicit = {"mixed_precision": "no"}
    cfg = settle_config(resumed_plan("bf16"), explicit, mixed_precision="no", compiled=False)
    assert cfg.mixed_precision == "no"
    same = settle_config(resumed_plan("bf16"), {}, mixed_precision="bf16", compiled=False)
    assert same.mixed_precision == "bf16"


def test_the_settled_config_is_what_this_launch_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # A new run takes the launcher's precision and torch.compile whatever it asked for, and
    # records its data folder as an absolute path (eval and predict start elsewhere).
    plan = RunPlan(run_dir="runs/new", config=resolve_config({"data_dir": "data"}).to_dict())
    cfg = settle_config(plan, {}, mixed_precision="fp16", compiled=True)
    assert (cfg.mixed_precision, cfg.compile) == ("fp16", True)
    assert cfg.data_dir == str(tmp_path / "data")


# --- the number of processes --------------------------------------------------------------------
def process_state(world_size: int, step: int) -> dict:
    return {"world_size": world_size, "step": step, "epoch": 2}


def test_the_same_number_of_processes_continues_bit_for_bit():
    assert check_process_count(process_state(2, 7), 2, "cosine", Path("runs/r")) is None


def test_another_number_of_processes_continues_only_at_an_epoch_boundary():
    note = check_process_count(process_state(2, 0), 1, "plateau", Path("runs/r"))
    assert note == (
        "note: runs/r ran on 2 processes, now 1: it continues, but not bit for bit as it would have"
    )
    with pytest.raises(UserError) as error:
        check_process_count(process_state(2, 7), 1, "plateau", Path("runs/r"))
    assert str(error.value) == (
        "runs/r was stopped mid-epoch on 2 processes: resume it on the same number (now 1)"
    )


def test_another_number_of_processes_cannot_continue_a_per_step_schedule():
    with pytest.raises(UserError) as error:
        check_process_count(process_state(1, 0), 3, "onecycle", Path("runs/r"))
    assert str(error.value) == (
        "runs/r was stopped with the per-step onecycle schedule on 1 processes: resume it on "
        "the same number (now 3)"
    )
