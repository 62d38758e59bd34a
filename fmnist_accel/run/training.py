"""A training run, top to bottom: plan, build, train, validate, save, end.

The launcher decides the hardware; this code does not change with it. Validation metrics are
exact over all ranks, so the plateau scheduler and early stopping see the global validation
loss and every rank takes the same decision at the same epoch. Only the main process writes,
in outputs.py; docs/architecture.md maps the modules. The entry points are
`fmnist-accel train` (cli.py) and `python -m fmnist_accel.train` (train.py).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..cluster import restarts
from ..cluster.accelerator import (
    collectives_fail_in_one_line,
    compiles,
    describe,
    end_accelerator,
    make_training_accelerator,
    thread_note,
)
from ..cluster.shared_errors import say_it_and_leave_together
from ..cluster.stop_signals import StopRequest
from ..config import check_config, resolve_config, unused_options
from ..engine.evaluation import evaluate
from ..engine.loop import (
    STOP_NONFINITE,
    STOP_SIGNAL,
    EpochProgress,
    EpochResult,
    average_buffers,
    check_stop,
    global_train_loss,
    train_one_epoch,
)
from ..engine.models import count_parameters
from ..errors import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    TrainingDiverged,
    UserError,
    WriteFailed,
)
from ..store import layout
from ..store.run_folder import release_locks
from . import outputs
from .console import Reporter, seconds_since_process_start
from .ending import end_of_run, final_test_line
from .plan import settle_config, share_plan
from .session import Session, build_session


class RunEnd(NamedTuple):
    """How the epoch loop ended."""

    status: str  # layout.COMPLETED, EARLY_STOPPED, DIVERGED or PREEMPTED: summary.json's
    exit_code: int
    detail: str  # for the user ("" when there is nothing to add)
    epoch: int  # the last epoch reached


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train(explicit: dict[str, Any], program: str = "fmnist-accel") -> int:
    """Run training with the options the user gave (None = not given). Returns the exit code.
    program: the command's name in error lines."""
    explicit = restarts.restarted_options(explicit)  # a restarted group resumes the run
    cfg = resolve_config(explicit)
    try:
        check_config(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Outside the error handling below: a process that hung or died cannot meet the others
    # at the barrier of say_it_and_leave_together, so every rank says that one itself.
    with collectives_fail_in_one_line(cfg.collective_timeout):
        accelerator = make_training_accelerator(cfg)
        try:
            return run_training(accelerator, explicit)
        except UserError as exc:  # the same on every rank: the main one says it before any exits
            say_it_and_leave_together(accelerator, exc, program)
            raise
        finally:
            release_locks()  # the run is over, whatever happens to this process next
            # Tear the process group down before exit: gloo's threads otherwise abort at exit.
            end_accelerator(accelerator)


def run_training(accelerator, explicit: dict[str, Any]) -> int:
    reporter = Reporter(accelerator.is_main_process)
    plan = share_plan(accelerator, explicit)
    if plan.finished:
        reporter.print(f"run {plan.run_dir} already ended ({plan.finished}); nothing to do")
        return EXIT_OK
    resumed = plan.resume_state is not None
    for note in plan.notes:
        reporter.print(note)
    cfg = settle_config(plan, explicit, accelerator.mixed_precision, compiles(accelerator))
    for name in unused_options(explicit, cfg):
        reporter.print(f"note: --{name.replace('_', '-')} has no effect in this configuration")
    try:
        s = build_session(accelerator, plan, cfg, reporter)
    except UserError:
        outputs.discard_unused_run(accelerator, plan)
        raise
    outputs.start_outputs(s, plan.resume_state)
    print_header(s, resumed)

    stop_request = StopRequest().install()
    try:
        end = train_epochs(s, stop_request)
    except WriteFailed as exc:  # every rank has it (shared_errors.main_process_writes)
        detail = f"{exc}; free some space, then resume with --resume {s.run_dir}"
        with suppress(WriteFailed):  # summary.json if the disk still takes it
            outputs.write_summary(s, layout.WRITE_FAILED, detail, None)
        raise WriteFailed(detail) from None
    finally:
        stop_request.uninstall()
    outputs.write_summary(s, end.status, end.detail, end.epoch)
    ending = end_of_run(accelerator, s.run_dir, cfg, end.status, reporter.print)
    for note in ending.notes:
        reporter.print(note)
    outputs.write_ending(accelerator, s.run_dir, ending, reporter.print)
    if end.exit_code == EXIT_DIVERGED:
        raise TrainingDiverged(end.detail)  # one line on stderr, exit code 3
    if end.detail:
        reporter.print(end.detail)
    if ending.final_test is not None:
        reporter.print(final_test_line(ending.final_test))
    if end.exit_code == EXIT_OK:
        best = s.best
        reporter.print(
            f"done: {end.status}; best {best.metric} {best.value:.4f} at epoch {best.epoch}; "
            f"checkpoints in {s.run_dir}"
            if best.value is not None
            else f"done: {end.status}; checkpoints in {s.run_dir}"
        )
    return end.exit_code


def print_header(s: Session, resumed: bool) -> None:
    cfg, world = s.cfg, s.accelerator.num_processes
    restart = restarts.restart_line(s.start_epoch if resumed else None, s.progress.step)
    if restart:
        s.reporter.print(restart)
    where = f"run folder: {s.run_dir}"
    if resumed:
        step = f", step {s.progress.step}" if s.progress.step else ""
        where += f" (resuming after epoch {s.start_epoch}{step})"
    s.reporter.print(where)
    s.reporter.print(
        f"hardware: {describe(s.accelerator)}" + (", torch.compile" if cfg.compile else "")
    )
    note = thread_note(s.accelerator)
    if note:
        s.reporter.print(note)
    scaled = f" (--lr {cfg.lr:g} x {world} processes)" if cfg.scale_lr else ""
    s.reporter.print(
        f"batch: {cfg.batch_size} per process, {cfg.batch_size * world} global; "
        f"lr {s.lr:.2e}{scaled}; {s.stream.steps_per_epoch} steps per epoch"
    )
    s.reporter.print(
        f"model: {cfg.model}, {count_parameters(s.plain_model):,} parameters; data: "
        f"{len(s.stream.labels):,} train, {s.valid_set.total if s.valid_set else 0:,} "
        f"validation images from {cfg.data_dir}"
    )


# --------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------
def train_epochs(s: Session, stop_request: StopRequest) -> RunEnd:
    """Train, validate, log and save each epoch, until the last one, early stopping, a stop
    signal or a non-finite loss."""
    accelerator, cfg, reporter = s.accelerator, s.cfg, s.reporter
    steps = s.stream.steps_per_epoch
    started = False

    def on_step(step: int, loss_sum: torch.Tensor, count: int) -> None:
        nonlocal started
        reporter.step(step, loss_sum, count)
        if not started:  # this process's first step: how long the start-up took
            started = True
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            startup = seconds_since_process_start()
            reporter.print(f"start-up: first training step done {startup:.1f} s after launch")

    epoch = s.start_epoch
    for epoch in range(s.start_epoch + 1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        epoch_data = s.stream.epoch(epoch)
        reporter.epoch_start(
            epoch,
            cfg.epochs,
            steps,
            done=s.progress.step,
            images_per_step=cfg.batch_size * accelerator.num_processes,
            may_stop_early=cfg.early_stopping and s.valid_set is not None,
        )
        start = s.progress
        result = train_one_epoch(
            s.model,
            s.optimizer,
            accelerator,
            lambda step, data=epoch_data: s.stream.batch(data, step),
            steps,
            start=start,
            label_smoothing=cfg.label_smoothing,
            grad_clip_norm=cfg.grad_clip_norm,
            step_scheduler=s.step_scheduler,
            ema=s.ema,
            stop_requested=lambda: bool(stop_request),
            on_step=on_step,
        )
        train_time = time.perf_counter() - epoch_started
        if result.stop == STOP_NONFINITE:
            reporter.epoch_end(None, cfg.epochs)
            ranks = result.nonfinite_ranks
            detail = nonfinite_message(s.run_dir, epoch, ranks, "training loss")
            return RunEnd(layout.DIVERGED, EXIT_DIVERGED, detail, epoch)
        if result.stop == STOP_SIGNAL:
            reporter.epoch_end(None, cfg.epochs)
            s.elapsed += train_time
            outputs.save_resume(s, epoch - 1, result.progress)
            detail = (
                f"stopped by {stop_request.name or 'a signal'} in epoch {epoch} after step "
                f"{result.progress.step}; state saved: resume with --resume {s.run_dir}"
            )
            return RunEnd(layout.PREEMPTED, EXIT_PREEMPTED, detail, epoch)
        try:
            record, stop_early = validate_epoch(s, epoch, result, start, train_time)
        except Diverged as exc:
            reporter.epoch_end(None, cfg.epochs)
            return RunEnd(layout.DIVERGED, EXIT_DIVERGED, str(exc), epoch)
        s.elapsed += time.perf_counter() - epoch_started
        record.update(epoch_time=time.perf_counter() - epoch_started, elapsed=s.elapsed)
        record_test_metrics(s, record)
        outputs.log_epoch(s, record)
        s.progress = EpochProgress()
        outputs.save_resume(s, epoch, s.progress)
        outputs.write_checkpoints(s, record)
        reporter.epoch_end(record, cfg.epochs)
        if stop_early:
            detail = (
                "early stopping: the validation loss did not improve for "
                f"{s.stopper.bad_epochs} epochs (patience {cfg.early_stopping_patience})"
            )
            return RunEnd(layout.EARLY_STOPPED, EXIT_OK, detail, epoch)
        # A signal that came during validation or saving: the state is already saved.
        if epoch < cfg.epochs and check_stop(accelerator, bool(stop_request))[0]:
            signal_name = stop_request.name or "a signal"
            detail = f"stopped by {signal_name} after epoch {epoch}: resume with --resume"
            return RunEnd(layout.PREEMPTED, EXIT_PREEMPTED, detail, epoch)
    return RunEnd(layout.COMPLETED, EXIT_OK, "", epoch)


class Diverged(Exception):
    """Internal: a non-finite training or validation loss; carries the user's message."""


def validate_epoch(
    s: Session, epoch: int, result: EpochResult, start: EpochProgress, train_time: float
) -> tuple[dict, bool]:
    """The epoch's record (global train loss, validation, lr) and whether to stop early.
    Takes the epoch's decisions (decisions.py) on the global values, identically on every
    rank: the plateau scheduler, the best epoch, early stopping."""
    accelerator, cfg = s.accelerator, s.cfg
    progress = result.progress
    record: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": global_train_loss(progress, accelerator),
        # the lr this epoch trained with (with a per-step schedule: the lr it ended at)
        "lr": s.optimizer.param_groups[0]["lr"],
    }
    average_buffers(s.plain_model, accelerator)
    if s.ema is not None:
        average_buffers(s.ema.module, accelerator)
    stop_early = False
    if s.valid_set is not None:
        valid = evaluate(s.eval_model, s.valid_set, accelerator, cfg.eval_batch_size)
        if not math.isfinite(valid.loss):
            raise Diverged(nonfinite_message(s.run_dir, epoch, [], "validation loss"))
        record.update(valid_loss=valid.loss, valid_accuracy=valid.accuracy)
        if s.plateau is not None:
            s.plateau.step(valid.loss)
        record["is_best"] = s.best.update(record[cfg.best_metric], epoch)
        stop_early = cfg.early_stopping and s.stopper.step(valid.loss)
    world = accelerator.num_processes
    record.update(
        train_time=train_time,
        # images this session trained in this epoch (a resumed epoch counts only its rest)
        images_per_sec=(progress.count - start.count) * world / train_time,
    )
    return record, stop_early


def record_test_metrics(s: Session, record: dict) -> None:
    """--test-every-epoch: test loss and accuracy, for learning curves; never used to decide."""
    if s.test_set is not None:
        test = evaluate(s.eval_model, s.test_set, s.accelerator, s.cfg.eval_batch_size)
        record.update(test_loss=test.loss, test_accuracy=test.accuracy)


def nonfinite_message(run_dir: Path, epoch: int, ranks: list[int], what: str) -> str:
    where = f" on rank {', '.join(map(str, ranks))}" if ranks else ""
    last = layout.checkpoint_path(run_dir, "last")
    kept = (
        f"last good checkpoint: {last} (epoch {epoch - 1})"
        if last.exists()
        else "no checkpoint was written before it"
    )
    return (
        f"training stopped: the {what} became non-finite{where} in epoch {epoch}; "
        f"{kept}; try a lower --lr"
    )
