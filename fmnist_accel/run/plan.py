"""A new run or a resumed one: where a training run writes, what it resumes from, and the
rules a resumed run must keep.

The main process decides (a new run folder, or an interrupted run to continue and its saved
state) and every other rank receives the same decision, or the same error. The rules: options
that would make a different run are refused (RESUMABLE_OVERRIDES lists the others); a fixed
per-step schedule keeps its --epochs; a run that has ended stays ended unless a completed one
is given more epochs; precision changes only when asked; a different number of processes
continues only at an epoch boundary without a per-step schedule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..cluster import restarts
from ..config import (
    RESUMABLE_OVERRIDES,
    TrainConfig,
    config_dict_problem,
    config_from_dict,
    resolve_config,
)
from ..errors import UserError
from ..store import run_folder
from ..store.checkpoint import load_resume_state
from ..store.layout import (
    CHECKPOINT_FILES,
    COMPLETED,
    CONFIG,
    ENDING_PENDING,
    FINISHED_STATUSES,
    RESUME,
    SUMMARY,
)
from ..store.run_info import read_metrics
from .decisions import PER_STEP_SCHEDULERS


@dataclass
class RunPlan:
    """What the main process decided about the run folder; broadcast to every rank."""

    run_dir: str = ""
    config: dict = field(default_factory=dict)
    resume_state: dict | None = None
    finished: str | None = None  # set when the run to resume has already ended
    end_only: bool = False  # it ended, but was stopped before its end was written: do that
    error: str | None = None
    notes: list[str] = field(default_factory=list)  # for the user, printed before training


def plan_run(explicit: dict[str, Any]) -> RunPlan:
    """Main process only: pick the run folder, and the state to resume from if any."""
    cfg = resolve_config(explicit)
    output_dir = Path(cfg.output_dir)
    resume_dir = find_resume_dir(cfg, output_dir, explicit)
    if resume_dir is None:
        run_dir, note = new_run_dir(cfg, output_dir)
        return RunPlan(run_dir=str(run_dir), config=cfg.to_dict(), notes=[note] if note else [])

    note = run_folder.claim_run_dir(resume_dir)  # before reading what another process may write
    if (resume_dir / RESUME).is_file():
        state = load_resume_state(resume_dir / RESUME)
        saved = state["config"]
        check_state_belongs(resume_dir, saved)
        # Damaged lines are named now, on the main process (every rank gets the error),
        # not when the start rewrites the file.
        run_folder.MetricsLog(resume_dir).read(strict=True)
    else:  # stopped in its first epoch, before any state was saved: it starts again there
        refuse_to_overwrite(resume_dir)
        state, saved = None, saved_config(resume_dir)
    conflicts = conflicting_options(explicit, saved)
    if conflicts:
        key = conflicts[0]
        raise UserError(
            f"--{key.replace('_', '-')} {explicit[key]} differs from the run being resumed "
            f"({resume_dir} has {saved.get(key)}); resume without it or start a new run"
        )
    resumed = {
        **saved,
        **{k: v for k, v in explicit.items() if v is not None and k in RESUMABLE_OVERRIDES},
    }
    resumed["run_name"] = resume_dir.name
    resumed["output_dir"] = str(resume_dir.parent)
    resumed["resume"] = cfg.resume
    if resumed["epochs"] != saved["epochs"] and saved["scheduler"] in PER_STEP_SCHEDULERS:
        raise UserError(
            f"--epochs cannot change when resuming a run with the {saved['scheduler']} "
            "schedule: its learning rates are fixed by the original length"
        )
    plan = RunPlan(
        run_dir=str(resume_dir), config=resumed, resume_state=state, notes=[note] if note else []
    )
    if state is None:
        plan.notes.append(
            f"note: {resume_dir} stopped before it saved any state: it trains again from epoch 1"
        )
    summary = run_folder.read_json(resume_dir / SUMMARY) or {}
    status = summary.get("status")
    # A completed run goes on only if --epochs now asks for more; the others have ended.
    if (
        state is not None
        and status in FINISHED_STATUSES
        and not (status == COMPLETED and state["epoch"] < resumed["epochs"])
    ):
        if summary.get("ending") == ENDING_PENDING:
            plan.end_only = True  # stopped during its final test or figures: finish those
        else:
            plan.finished = status
    return plan


def refuse_to_overwrite(run_dir: Path) -> None:
    """A folder with no resume.pt starts again from epoch 1 only if it holds no finished
    work: a run killed or stopped in its first epoch. One with finished epochs or checkpoints
    (resume.pt deleted by hand, or lost) is never overwritten by a new start."""
    records, _ = read_metrics(run_dir)
    kept = [name for name in CHECKPOINT_FILES if (run_dir / name).exists()]
    if records or kept:
        what = ", ".join(([f"{len(records)} finished epoch(s)"] if records else []) + kept)
        raise UserError(
            f"{run_dir} holds a run ({what}) but no {RESUME} to continue it from: its files "
            "are kept; choose another --run-name, or move the folder away to start it again"
        )


def check_state_belongs(run_dir: Path, saved: dict) -> None:
    """resume.pt must be this run's: its options agree with config.json's on everything a
    resume may not change (a resume.pt copied from another run would train that run in
    this folder, under this run's name)."""
    config = run_folder.read_json(run_dir / CONFIG)
    if config is None:
        return  # config.json is rewritten from the state at the start
    differ = sorted(
        k
        for k in set(config) | set(saved)
        if k not in RESUMABLE_OVERRIDES and k in config and k in saved and config[k] != saved[k]
    )
    if differ:
        key = differ[0]
        raise UserError(
            f"{run_dir / RESUME} is not this run's state: it says {key} {saved[key]!r}, "
            f"{run_dir / CONFIG} says {config[key]!r}; put back the run's own {RESUME}, or "
            "resume the run it came from"
        )


def saved_config(run_dir: Path) -> dict:
    """The config.json of a run that saved no state yet, checked like a resume state's."""
    values = run_folder.read_json(run_dir / CONFIG)
    problem = config_dict_problem(values) if values is not None else "it cannot be read"
    if problem is None and not {"epochs", "scheduler"} <= set(values):
        problem = "it lacks epochs or scheduler"
    if problem:
        raise UserError(f"{run_dir / CONFIG} is damaged: {problem}")
    return values


def new_run_dir(cfg: TrainConfig, output_dir: Path) -> tuple[Path, str | None]:
    """A writable folder for a new run, locked by this process; and the lock's note if any."""
    if cfg.run_name:
        run_dir = output_dir / cfg.run_name
        if cfg.resume is None and run_folder.has_run_files(run_dir):
            raise UserError(
                f"{run_dir} already exists: pass --resume auto to continue it, or choose "
                "another --run-name"
            )
        note = run_folder.claim_run_dir(run_dir)
        refuse_to_overwrite(run_dir)  # --resume auto found no resume.pt there
        return run_dir, note
    # Two runs started in the same second pick the same name; the one that loses the lock
    # takes the next (unique_run_dir skips the folder the other has created).
    for _ in range(10):
        run_dir = run_folder.unique_run_dir(output_dir, run_folder.default_run_name(cfg.model))
        try:
            return run_dir, run_folder.claim_run_dir(run_dir)
        except run_folder.RunInUse:
            continue
    raise UserError(f"no free run folder in {output_dir}: pass --run-name")


def conflicting_options(explicit: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """The options given now that would make a resumed run a different run."""
    return [
        key
        for key, value in explicit.items()
        if value is not None and key not in RESUMABLE_OVERRIDES and saved.get(key) != value
    ]


def find_resume_dir(cfg: TrainConfig, output_dir: Path, explicit: dict[str, Any]) -> Path | None:
    """The run folder to continue, or None for a new run."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if path.name == RESUME:
            path = path.parent
        if not (path / RESUME).is_file():
            run_folder.raise_if_in_use(path)  # a live run in its first epoch: say so instead
            if run_folder.is_run_dir(path):
                return path  # killed in its first epoch: plan_run starts it again there
            raise UserError(f"--resume {cfg.resume}: no {RESUME} there to resume from")
        return path
    if cfg.run_name:
        path = output_dir / cfg.run_name
        return path if (path / RESUME).is_file() else None
    # The newest run that has not ended and that the options given now describe.
    for path in run_folder.runs_newest_first(output_dir):
        saved = run_folder.read_json(path / CONFIG) or {}
        if (
            (path / RESUME).is_file()
            and run_folder.run_status(path) not in FINISHED_STATUSES
            and not conflicting_options(explicit, saved)
        ):
            return path
    return None


def resumed_precision(cfg: TrainConfig, explicit: dict[str, Any]) -> str | None:
    """The mixed precision of the run this launch resumes, when neither the user
    (--mixed-precision) nor a launcher (cluster/accelerator.launcher_chose_precision) chose
    one: a resumed run keeps its own. Read-only, on every rank, before the Accelerator is
    built (it fixes the precision): config.json of the run find_resume_dir picks. None
    otherwise."""
    if cfg.resume is None or explicit.get("mixed_precision") is not None:
        return None
    from ..cluster.accelerator import launcher_chose_precision

    if launcher_chose_precision():
        return None
    try:
        path = find_resume_dir(cfg, Path(cfg.output_dir), explicit)
    except UserError:
        return None  # plan_run says what is wrong, in its turn
    saved = run_folder.read_json(path / CONFIG) if path is not None else None
    precision = saved.get("mixed_precision") if saved else None
    return precision if precision in ("no", "fp16", "bf16") else None


def share_plan(accelerator, explicit: dict[str, Any]) -> RunPlan:
    """The main process plans the run; every rank gets the same plan (or the same error)."""
    from accelerate.utils import broadcast_object_list

    plan = RunPlan()
    if accelerator.is_main_process:
        try:
            plan = plan_run(explicit)
            restarts.remember_run_dir(plan.run_dir)  # where a restarted group goes on
        except (UserError, ValueError) as exc:
            plan = RunPlan(error=str(exc))
    if accelerator.num_processes > 1:
        box = [plan]
        broadcast_object_list(box, from_process=0)
        plan = box[0]
    if plan.error:
        raise UserError(plan.error)
    return plan


def settle_config(
    plan: RunPlan, explicit: dict[str, Any], mixed_precision: str, compiled: bool
) -> TrainConfig:
    """The run's config as this launch really runs it (mixed_precision and compiled: what the
    Accelerator uses). The Accelerator was built before the main process found the run to
    resume: a resumed run must not change precision silently."""
    cfg = config_from_dict(plan.config)
    if (
        plan.resume_state is not None
        and explicit.get("mixed_precision") is None
        and cfg.mixed_precision != mixed_precision
    ):
        raise UserError(
            f"{plan.run_dir} trained with mixed precision {cfg.mixed_precision} but this launch "
            f"uses {mixed_precision}: resume with --mixed-precision {cfg.mixed_precision}, or "
            f"give --mixed-precision {mixed_precision} to change it"
        )
    return replace(
        cfg,
        mixed_precision=mixed_precision,
        compile=compiled,
        # eval and predict read the data of the run from wherever they are started
        data_dir=os.path.abspath(cfg.data_dir),
    )


def check_process_count(state: dict, world: int, scheduler: str, run_dir: Path) -> str | None:
    """Whether a saved state can continue on `world` processes: None when nothing changed, a
    note for the user when it continues differently, a UserError when it cannot."""
    saved = state["world_size"]
    if saved == world:
        return None
    if state["step"] or scheduler in PER_STEP_SCHEDULERS:
        why = "mid-epoch" if state["step"] else f"with the per-step {scheduler} schedule"
        raise UserError(
            f"{run_dir} was stopped {why} on {saved} processes: resume it "
            f"on the same number (now {world})"
        )
    return (
        f"note: {run_dir} ran on {saved} processes, now {world}: it "
        "continues, but not bit for bit as it would have"
    )
