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
import signal
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..cluster import restarts
from ..cluster.accelerator import (
    collectives_fail_in_one_line,
    compiles,
    cpu_precision,
    describe,
    end_accelerator,
    make_training_accelerator,
    slow_bf16_note,
    thread_note,
)
from ..cluster.shared_errors import say_it_and_leave_together
from ..cluster.stop_signals import StopRequest
from ..config import TrainConfig, check_config, resolve_config, unused_options
from ..engine.evaluation import evaluate
from ..engine.loop import (
    STOP_NONFINITE,
    STOP_SIGNAL,
    CheckPace,
    EpochProgress,
    EpochResult,
    StepFence,
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
    EXIT_WRITE_FAILED,
    TrainingDiverged,
    UserError,
    WriteFailed,
    error_line,
)
from ..recipes import CPU_PRECISION_RECIPES
from ..store import layout
from ..store.run_folder import release_locks, run_status
from . import outputs
from .console import Reporter, seconds_since_process_start
from .ending import Ending, end_of_run, final_test_line
from .plan import RunPlan, resumed_precision, settle_config, share_plan
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
def train(
    explicit: dict[str, Any],
    program: str = "fmnist-accel",
    stop_request: StopRequest | None = None,
) -> int:
    """Run training with the options the user gave (None = not given). Returns the exit code.
    program: the command's name in error lines; stop_request: installed already (cli.py)."""
    explicit = restarts.restarted_options(explicit)  # a restarted group resumes the run
    cfg = resolve_config(explicit)
    try:
        check_config(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # From the start: a stop request during the start-up (reading the data, joining the
    # group) is kept and acted on at the first check. Never uninstalled: a copy of the same
    # request that comes while this process writes its last lines and exits is ignored (the
    # default handling would kill it), and a later signal still exits at once.
    if stop_request is None:
        stop_request = StopRequest().install()
    # The precision, where no one chose it: a resumed run keeps its own; a CPU recipe picks
    # bf16 where the CPU has bf16 instructions. It is fixed when the Accelerator is built.
    kept_precision = resumed_precision(cfg, explicit)
    precision_note = None
    if kept_precision:
        cfg = replace(cfg, mixed_precision=kept_precision)
        if kept_precision != "no":
            precision_note = (
                f"note: the run keeps its own mixed precision, {kept_precision} "
                "(--mixed-precision changes it)"
            )
    else:
        chosen = cpu_precision(explicit.get("mixed_precision"))
        if chosen and cfg.recipe in CPU_PRECISION_RECIPES:
            cfg = replace(cfg, mixed_precision=chosen[0])
            words = "bf16" if chosen[0] == "bf16" else "fp32"
            precision_note = (
                f"precision: {words} chosen by --recipe {cfg.recipe}: {chosen[1]} "
                "(--mixed-precision decides instead)"
            )
    # Outside the error handling below: a process that hung or died cannot meet the others
    # at the barrier of say_it_and_leave_together, so every rank says that one itself.
    with collectives_fail_in_one_line(cfg.collective_timeout):
        accelerator = make_training_accelerator(cfg)
        try:
            code = run_training(accelerator, explicit, program, stop_request, precision_note)
            if code == EXIT_OK and accelerator.is_main_process:
                restarts.forget_launch()  # ended as planned: no restart will read its records
            return code
        except UserError as exc:  # the same on every rank: the main one says it before any exits
            say_it_and_leave_together(accelerator, exc, program)
            raise
        finally:
            release_locks()  # the run is over, whatever happens to this process next
            # Tear the process group down before exit: gloo's threads otherwise abort at exit.
            end_accelerator(accelerator)


def run_training(
    accelerator,
    explicit: dict[str, Any],
    program: str,
    stop_request: StopRequest,
    precision_note: str | None = None,
) -> int:
    reporter = Reporter(accelerator.is_main_process)
    plan = share_plan(accelerator, explicit)
    if stop_request.adopt(check_stop(accelerator, stop_request.number).signum):  # before writes
        if plan.resume_state is None:
            outputs.discard_unused_run(accelerator, plan)
        reporter.print(f"stopped by {stop_request.name} before training began: nothing saved")
        return EXIT_PREEMPTED
    if plan.finished:
        reporter.print(f"run {plan.run_dir} already ended ({plan.finished}); nothing to do")
        return EXIT_OK
    resumed = plan.resume_state is not None
    for note in plan.notes:
        reporter.print(note)
    cfg = settle_config(plan, explicit, accelerator.mixed_precision, compiles(accelerator))
    if plan.end_only:
        return complete_the_end(accelerator, plan, cfg, reporter)
    for name in unused_options(explicit, cfg):
        reporter.print(f"note: --{name.replace('_', '-')} has no effect in this configuration")
    try:
        s = build_session(accelerator, plan, cfg, reporter)
    except UserError:
        outputs.discard_unused_run(accelerator, plan)
        raise
    outputs.start_outputs(s, plan.resume_state)
    print_header(s, resumed, precision_note)

    try:
        end = train_epochs(s, stop_request, program)
    except WriteFailed as exc:  # every rank has it (shared_errors.main_process_writes)
        detail = f"{exc}; free some space, then resume with --resume {s.run_dir}"
        with suppress(WriteFailed):  # summary.json if the disk still takes it
            outputs.write_summary(s, layout.WRITE_FAILED, detail, None)
        raise WriteFailed(detail) from None
    stopped_by = stop_request.name if end.status == layout.PREEMPTED else None
    outputs.write_summary(s, end.status, end.detail, end.epoch, stopped_by)
    # A stop signal from here on changes nothing: the end takes seconds, and a run cut short
    # in it has its end completed by the next start (summary.json: ending pending).
    stop_request.after_last_epoch = True
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
        figures = (
            f"; best {best.metric} {best.value:.4f} at epoch {best.epoch}"
            if best.value is not None
            else ""
        )
        reporter.print(
            f"done: {end.status} after {training_time(s.elapsed)} of training{figures}; "
            f"checkpoints in {s.run_dir}"
        )
    return end.exit_code


def complete_the_end(accelerator, plan: RunPlan, cfg: TrainConfig, reporter: Reporter) -> int:
    """A run that ended but was stopped (or killed) during its end: write what the end lacks,
    its final test, figures and HParams entry, and train nothing."""
    run_dir = Path(plan.run_dir)
    status = run_status(run_dir)
    reporter.print(
        f"run {run_dir} ended ({status}) but its end was cut short: completing its final test "
        "and figures"
    )
    outputs.open_tensorboard(accelerator, run_dir, plan.resume_state["epoch"] + 1)
    ending = end_of_run(accelerator, run_dir, cfg, status, reporter.print)
    for note in ending.notes:
        reporter.print(note)
    outputs.write_ending(accelerator, run_dir, ending, reporter.print)
    if ending.final_test is not None:
        reporter.print(final_test_line(ending.final_test))
    reporter.print(f"done: {status}; checkpoints in {run_dir}")
    return EXIT_OK


def training_time(seconds: float) -> str:
    """Training and validation time as the README's tables count it, resumes included."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return (
        f"{minutes} min {secs:02d} s"
        if minutes < 60
        else f"{minutes // 60} h {minutes % 60:02d} min"
    )


def print_header(s: Session, resumed: bool, precision_note: str | None = None) -> None:
    cfg, world = s.cfg, s.accelerator.num_processes
    restart = restarts.restart_line(s.start_epoch if resumed else None, s.progress.step)
    if restart:
        s.reporter.print(restart)
    where = f"run folder: {s.run_dir}"
    if resumed:
        step = (
            f", at step {s.progress.step} of epoch {s.start_epoch + 1}" if s.progress.step else ""
        )
        where += f" (resuming after epoch {s.start_epoch}{step})"
    s.reporter.print(where)
    note = thread_note(s.accelerator)  # first: it may raise the thread count described next
    s.reporter.print(
        f"hardware: {describe(s.accelerator)}" + (", torch.compile" if cfg.compile else "")
    )
    for line in (note, precision_note, slow_bf16_note(s.accelerator)):
        if line:
            s.reporter.print(line)
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
def train_epochs(s: Session, stop_request: StopRequest, program: str) -> RunEnd:
    """Train, validate, log and save each epoch, until the last one, early stopping, a stop
    signal or a non-finite loss."""
    accelerator, cfg, reporter = s.accelerator, s.cfg, s.reporter
    steps = s.stream.steps_per_epoch
    started = False
    pace = CheckPace()  # when the ranks meet to check for a stop (engine/loop.py)
    # One process alone may save the last finished step from the signal's own thread, while a
    # slow step runs; ranks cannot (they must agree on the step), and meet within a step.
    fence = StepFence(s.plain_model) if accelerator.num_processes == 1 else None
    epoch = s.start_epoch

    def on_step(step: int, loss_sum: torch.Tensor, count: int) -> None:
        nonlocal started
        reporter.step(step, loss_sum, count)
        if not started:  # this process's first step: how long the start-up took
            started = True
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            startup = seconds_since_process_start()
            reporter.print(f"start-up: first training step done {startup:.1f} s after launch")

    if fence is not None:
        stop_request.on_first_signal = lambda signum: save_at_once(s, fence, epoch, signum, program)
    for epoch in range(s.start_epoch + 1, cfg.epochs + 1):
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
        try:
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
                stop_requested=lambda: stop_request.number,
                on_step=on_step,
                pace=pace,
                fence=fence,
            )
            if result.stop == STOP_NONFINITE:
                reporter.epoch_end(None, cfg.epochs)
                ranks = result.nonfinite_ranks
                detail = nonfinite_message(s.run_dir, epoch, ranks, "training loss")
                return RunEnd(layout.DIVERGED, EXIT_DIVERGED, detail, epoch)
            if result.stop == STOP_SIGNAL:
                stop_request.adopt(result.signum)  # where another rank's signal stopped this one
                reporter.epoch_end(None, cfg.epochs)
                with fence.lock if fence is not None else nullcontext():
                    if fence is not None:
                        fence.disarm()  # this thread saves
                    s.elapsed += result.progress.seconds - start.seconds
                    outputs.save_resume(s, epoch - 1, result.progress)
                step = result.progress.step
                detail = stopped_detail(stop_request.name, epoch, step, s.run_dir)
                return RunEnd(layout.PREEMPTED, EXIT_PREEMPTED, detail, epoch)
            record, stop_early = validate_epoch(s, epoch, result, start)
            if fence is not None:
                with fence.lock:
                    fence.disarm()  # from here on this thread saves the epoch
        except Diverged as exc:
            reporter.epoch_end(None, cfg.epochs)
            return RunEnd(layout.DIVERGED, EXIT_DIVERGED, str(exc), epoch)
        epoch_time = result.progress.seconds + record.pop("validation_time")
        s.elapsed += epoch_time - start.seconds
        record.update(epoch_time=epoch_time, elapsed=s.elapsed)
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
        if epoch < cfg.epochs and stop_request.adopt(
            check_stop(accelerator, stop_request.number).signum
        ):
            detail = f"stopped by {stop_request.name} after epoch {epoch}: resume with --resume"
            return RunEnd(layout.PREEMPTED, EXIT_PREEMPTED, detail, epoch)
    return RunEnd(layout.COMPLETED, EXIT_OK, "", epoch)


def stopped_detail(signal_name: str, epoch: int, step: int, run_dir: Path) -> str:
    return (
        f"stopped by {signal_name or 'a signal'} in epoch {epoch} after step {step}; "
        f"state saved: resume with --resume {run_dir}"
    )


def save_at_once(s: Session, fence: StepFence, epoch: int, signum: int, program: str) -> None:
    """In the stop signal's thread, while the main thread may be in the middle of a step that
    takes longer than a launcher waits (accelerate's one-process launcher kills 5 s after it
    passes a signal on): save the last finished step (engine/loop.StepFence) and summary.json,
    say so and exit, holding the fence's lock, so that the running step changes nothing more.
    One process only: nothing here meets another rank."""
    with fence.lock:
        if not fence.armed:
            return  # nothing consistent to save now: the loop saves at its next check
        progress = fence.progress()
        s.elapsed += progress.seconds - s.progress.seconds
        try:
            outputs.save_resume(s, epoch - 1, progress, fence.snapshot)
            detail = stopped_detail(signal.Signals(signum).name, epoch, progress.step, s.run_dir)
            outputs.write_summary(s, layout.PREEMPTED, detail, epoch, signal.Signals(signum).name)
            outputs.write_ending(s.accelerator, s.run_dir, Ending(), s.reporter.print)  # HParams
        except WriteFailed as exc:
            detail = f"{exc}; free some space, then resume with --resume {s.run_dir}"
            s.reporter.close()
            print(error_line(program, detail), file=sys.stderr, flush=True)
            exit_now(EXIT_WRITE_FAILED)
        s.reporter.close()
        s.reporter.print(detail)
        exit_now(EXIT_PREEMPTED)


def exit_now(code: int) -> None:
    """End the process from a thread other than the main one, as run_cli would end it."""
    restarts.remember_deliberate_exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Diverged(Exception):
    """Internal: a non-finite training or validation loss; carries the user's message."""


def validate_epoch(
    s: Session, epoch: int, result: EpochResult, start: EpochProgress
) -> tuple[dict, bool]:
    """The epoch's record (global train loss, validation, lr) and whether to stop early.
    Takes the epoch's decisions (decisions.py) on the global values, identically on every
    rank: the plateau scheduler, the best epoch, early stopping."""
    accelerator, cfg = s.accelerator, s.cfg
    progress = result.progress
    validation_started = time.perf_counter()
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
        # the whole epoch's, over its starts when it was stopped and resumed in the middle
        train_time=progress.seconds,
        images_per_sec=progress.count * world / progress.seconds,
        validation_time=time.perf_counter() - validation_started,  # for epoch_time
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
