"""Train a Fashion-MNIST model: one loop for CPU, one GPU, many GPUs and many machines.

    fmnist-accel train --model cnn --epochs 20                 # one process
    python -m fmnist_accel.train --model cnn                   # the same
    accelerate launch -m fmnist_accel.train                    # whatever `accelerate config` says
    accelerate launch --config_file launch_configs/cpu_2proc.yaml -m fmnist_accel.train
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m fmnist_accel.train

The launcher decides the hardware; this code does not change with it. Validation metrics are
exact over all ranks, so the plateau scheduler and early stopping see the global validation
loss and every rank takes the same decision at the same epoch. Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import elastic, rundir
from .agreement import main_process_writes, say_it_and_leave_together
from .averaging import WeightEMA
from .checkpoint import (
    atomic_copy,
    atomic_write_text,
    check_optimizer_state,
    checkpoint_epoch,
    resume_state_must_fit,
    save_model_checkpoint,
    save_resume_state,
)
from .config import (
    TrainConfig,
    check_config,
    config_from_dict,
    resolve_config,
    unused_options,
)
from .data import load_split, train_valid_split
from .device_data import EvalSet, TrainStream
from .engine import (
    STOP_NONFINITE,
    STOP_SIGNAL,
    EarlyStopping,
    EpochProgress,
    EpochResult,
    average_buffers,
    check_stop,
    evaluate,
    train_one_epoch,
)
from .errors import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    TrainingDiverged,
    UserError,
    WriteFailed,
)
from .hardware import describe, end_accelerator, make_accelerator, thread_note
from .models import build_model, count_parameters
from .preemption import StopRequest
from .report import Reporter, seconds_since_process_start
from .runplan import RunPlan, share_plan
from .writes import log_scalars


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------
def make_training_accelerator(cfg: TrainConfig):
    from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin

    ddp = DistributedDataParallelKwargs(
        # BatchNorm statistics are averaged over ranks once per epoch (engine.average_buffers)
        # instead of broadcast from rank 0 before every forward pass.
        broadcast_buffers=False,
        # Gradients live in the all-reduce buckets: one copy less per step.
        gradient_as_bucket_view=True,
        # The largest model (resnet9) has 6.6 MB of fp32 gradients: one bucket of 25 MB holds
        # it, so each step needs a single all-reduce; smaller buckets would overlap with the
        # backward pass but pay a fixed latency per bucket that is larger than these kernels.
        bucket_cap_mb=25,
    )
    # torch 2.14 deprecates broadcast_buffers in favour of forward_sync_buffers, which older
    # torch (and accelerate's DistributedDataParallelKwargs) lack; the meaning we want is the
    # same: no buffer broadcast before each forward.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    return make_accelerator(
        cfg.mixed_precision,
        collective_timeout=cfg.collective_timeout,
        log_with="tensorboard",
        # A placeholder: the run folder is only known once the main process has chosen it.
        project_dir=cfg.output_dir,
        kwargs_handlers=[ddp],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.compile else None,
    )


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    # One fused kernel per step instead of a dozen small ones: on GPUs only.
    fused = next(model.parameters()).device.type == "cuda"
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=fused)


def make_schedulers(cfg: TrainConfig, optimizer, total_steps: int):
    """(per-epoch plateau scheduler or None, per-step scheduler or None).

    Neither goes through accelerator.prepare(): a prepared ReduceLROnPlateau is stepped once
    per process per call (DESIGN.md 3). Every rank steps its own with the same global values.
    """
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        plateau = sched.ReduceLROnPlateau(
            optimizer, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        )
        return plateau, None
    if cfg.scheduler == "onecycle":
        onecycle = sched.OneCycleLR(
            optimizer,
            max_lr=optimizer.param_groups[0]["lr"],
            # +1: the scheduler also steps after the last optimizer step, and OneCycleLR's
            # linear annealing would extrapolate past its end there (to a negative lr).
            total_steps=total_steps + 1,
            pct_start=0.25,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
        return None, onecycle
    if cfg.scheduler == "cosine":
        return None, sched.CosineAnnealingLR(optimizer, T_max=total_steps)  # ends at lr 0
    return None, None


class BestTracker:
    """The best value of the monitored metric so far (strictly better replaces it)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.maximize = metric.endswith("accuracy")
        self.value: float | None = None
        self.epoch: int | None = None

    def update(self, value: float, epoch: int) -> bool:
        better = self.value is None or (value > self.value if self.maximize else value < self.value)
        if better:
            self.value, self.epoch = value, epoch
        return better

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.epoch = state["value"], state["epoch"]


def rank_state(progress: EpochProgress, device: torch.device) -> dict:
    """What differs between ranks: RNG streams (dropout) and the partial epoch's loss sums."""
    return {
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "loss_sum": progress.loss_sum,
        "count": progress.count,
    }


def restore_rank_state(state: dict, step: int, device: torch.device) -> EpochProgress:
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return EpochProgress(step=step, loss_sum=state["loss_sum"], count=state["count"])


# --------------------------------------------------------------------------------------------
# A run in progress
# --------------------------------------------------------------------------------------------
@dataclass
class Session:
    """Everything a run holds while it trains (plain data: the loop is in run_training)."""

    accelerator: Any
    cfg: TrainConfig
    run_dir: Path
    reporter: Reporter
    stream: TrainStream
    valid_set: EvalSet | None
    test_set: EvalSet | None
    model: nn.Module  # as prepared by accelerate (DDP, compiled...)
    plain_model: nn.Module  # the module itself: evaluation and checkpoints
    optimizer: Any
    plateau: Any
    step_scheduler: Any
    ema: Any
    stopper: EarlyStopping
    best: BestTracker
    metrics: rundir.MetricsLog
    lr: float
    start_epoch: int = 0
    progress: EpochProgress | None = None
    elapsed: float = 0.0  # training + validation seconds of earlier epochs, resumes included

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the weight average if there is one."""
        return self.ema.module if self.ema is not None else self.plain_model


def settle_config(accelerator, plan: RunPlan, explicit: dict[str, Any]) -> TrainConfig:
    """The run's config as this launch really runs it. The Accelerator was built before the
    main process found the run to resume: a resumed run must not change precision silently."""
    from accelerate.utils import DynamoBackend

    cfg = config_from_dict(plan.config)
    actual = accelerator.mixed_precision
    if (
        plan.resume_state is not None
        and explicit.get("mixed_precision") is None
        and cfg.mixed_precision != actual
    ):
        raise UserError(
            f"{plan.run_dir} trained with mixed precision {cfg.mixed_precision} but this launch "
            f"uses {actual}: resume with --mixed-precision {cfg.mixed_precision}, or give "
            f"--mixed-precision {actual} to change it"
        )
    return replace(
        cfg,
        mixed_precision=actual,
        compile=accelerator.state.dynamo_plugin.backend != DynamoBackend.NO,
        # eval and predict read the data of the run from wherever they are started
        data_dir=os.path.abspath(cfg.data_dir),
    )


def load_data(accelerator, cfg: TrainConfig):
    """(60k training split, test split or None), read by every rank, the local main process
    first (it may download). An error on any rank becomes the same UserError on every rank:
    a rank that raised inside local_main_process_first would leave the others in its barrier."""
    from accelerate.utils import gather_object

    def attempt():
        try:
            test = load_split(cfg.data_dir, "test") if cfg.test_every_epoch else None
            return (load_split(cfg.data_dir, "train"), test), None
        except UserError as exc:
            return None, str(exc)

    with accelerator.local_main_process_first():
        loaded, error = attempt()
    errors = [e for e in gather_object([error]) if e]
    if errors:
        raise UserError(errors[0])
    return loaded


def build_session(accelerator, plan: RunPlan, cfg: TrainConfig, reporter: Reporter) -> Session:
    """Data on the device, the model and its optimizer, restored from the plan's saved state."""
    from accelerate.utils import set_seed

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir, state = Path(plan.run_dir), plan.resume_state
    if cfg.deterministic:
        # On GPUs some kernels (e.g. adaptive max-pool backward) have no deterministic
        # version: warn there instead of failing. cuBLAS's setting is made in train().
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls

    try:
        full_train, test = load_data(accelerator, cfg)
        train_split, valid_split = train_valid_split(full_train, cfg.valid_size, cfg.seed)
        stream = TrainStream(
            train_split,
            device,
            cfg.batch_size,
            world,
            rank,
            cfg.seed,
            cfg.augment,
            cfg.channels_last,
        )
    except UserError:  # bad data, or too few images per process
        if accelerator.is_main_process and state is None:
            rundir.remove_unused(run_dir)  # made only to prove it writable: leave no empty run
        raise

    def eval_set(split):
        return EvalSet(split, device, world, rank, cfg.channels_last) if split else None

    # The same initial weights on every rank; each rank its own dropout stream afterwards.
    set_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr * (world if cfg.scale_lr else 1)
    optimizer = make_optimizer(cfg, model, lr)
    plateau, step_scheduler = make_schedulers(cfg, optimizer, cfg.epochs * stream.steps_per_epoch)
    ema = WeightEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    s = Session(
        accelerator=accelerator,
        cfg=cfg,
        run_dir=run_dir,
        reporter=reporter,
        stream=stream,
        valid_set=eval_set(valid_split),
        test_set=eval_set(test),
        model=model,
        plain_model=model,
        optimizer=optimizer,
        plateau=plateau,
        step_scheduler=step_scheduler,
        ema=ema,
        stopper=EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta),
        best=BestTracker(cfg.best_metric),
        metrics=rundir.MetricsLog(run_dir),
        lr=lr,
    )
    if state is not None:
        with resume_state_must_fit(run_dir / rundir.RESUME):  # edited by hand: one line
            load_state(s, state)
            check_optimizer_state(s.optimizer)
    s.model, s.optimizer = accelerator.prepare(model, optimizer)
    if state is not None and state.get("grad_scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    # The module itself, not its torch.compile wrapper (whose state_dict keys would carry an
    # `_orig_mod.` prefix that no other run or `eval` could load).
    s.plain_model = accelerator.unwrap_model(s.model, keep_torch_compile=False)
    set_seed((cfg.seed + rank) % 2**32)  # each rank its own dropout stream
    s.progress = EpochProgress()
    if state is not None:
        if state["world_size"] == world:
            s.progress = restore_rank_state(state["rank_states"][rank], state["step"], device)
        elif state["step"] or step_scheduler is not None:
            why = "mid-epoch" if state["step"] else f"with the per-step {cfg.scheduler} schedule"
            raise UserError(
                f"{run_dir} was stopped {why} on {state['world_size']} processes: resume it "
                f"on the same number (now {world})"
            )
        else:
            reporter.print(
                f"note: {run_dir} ran on {state['world_size']} processes, now {world}: it "
                "continues, but not bit for bit as it would have"
            )
    return s


def load_state(s: Session, state: dict) -> None:
    s.plain_model.load_state_dict(state["model"])
    s.optimizer.load_state_dict(state["optimizer"])
    if s.ema is not None:
        s.ema.load_state_dict(state["ema"])
    for scheduler, key in ((s.plateau, "plateau"), (s.step_scheduler, "step_scheduler")):
        if scheduler is not None:
            scheduler.load_state_dict(state[key])
    s.stopper.load_state_dict(state["early_stopping"])
    s.best.load_state_dict(state["best"])
    s.start_epoch, s.elapsed = state["epoch"], state["elapsed"]


def save_resume(s: Session, epoch_done: int, progress: EpochProgress) -> None:
    """Collective: every rank sends its RNG state; the main process writes one file."""
    from accelerate.utils import gather_object

    rank_states = gather_object([rank_state(progress, s.accelerator.device)])
    if s.accelerator.is_main_process:
        state = {
            "config": s.cfg.to_dict(),
            "epoch": epoch_done,
            "step": progress.step,
            "elapsed": s.elapsed,
            "world_size": s.accelerator.num_processes,
            "model": s.plain_model.state_dict(),
            "ema": s.ema.state_dict() if s.ema is not None else None,
            "optimizer": s.optimizer.state_dict(),
            "plateau": s.plateau.state_dict() if s.plateau is not None else None,
            "step_scheduler": s.step_scheduler.state_dict() if s.step_scheduler else None,
            # fp16's loss scale: without it a resumed run starts again at 2**16 and skips steps
            "grad_scaler": s.accelerator.scaler.state_dict() if s.accelerator.scaler else None,
            "early_stopping": s.stopper.state_dict(),
            "best": s.best.state_dict(),
            "rank_states": rank_states,
        }
    # Every rank waits for the write, and learns if it failed (a full disk).
    with main_process_writes(s.accelerator):
        if s.accelerator.is_main_process:
            save_resume_state(s.run_dir / rundir.RESUME, state)


def start_outputs(s: Session, state: dict | None) -> None:
    """config.json, metrics.jsonl cut back to the resume point, TensorBoard (main only)."""
    accelerator = s.accelerator
    with main_process_writes(accelerator):
        if accelerator.is_main_process:
            if state is None:
                config_text = json.dumps(s.cfg.to_dict(), indent=2) + "\n"
                atomic_write_text(s.run_dir / rundir.CONFIG, config_text)
            s.metrics.keep_epochs_up_to(s.start_epoch)
            if state is not None:
                repair_checkpoints(s, state)
    accelerator.project_configuration.set_directories(str(s.run_dir))
    accelerator.project_configuration.logging_dir = str(s.run_dir)
    accelerator.init_trackers(
        rundir.TENSORBOARD,
        config={k: (v if v is not None else "") for k, v in s.cfg.to_dict().items()},
        # Events of epochs after the resume point are dropped: they will be written again.
        init_kwargs={"tensorboard": {"purge_step": s.start_epoch + 1}},
    )


def print_header(s: Session, resumed: bool) -> None:
    cfg, world = s.cfg, s.accelerator.num_processes
    restart = elastic.restart_line(s.start_epoch if resumed else None, s.progress.step)
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
# One epoch's bookkeeping
# --------------------------------------------------------------------------------------------
class Diverged(Exception):
    """Internal: a non-finite training or validation loss; carries the user's message."""


def validate_epoch(
    s: Session, epoch: int, result: EpochResult, start: EpochProgress, train_time: float
) -> tuple[dict, bool]:
    """The epoch's record (global train loss, validation, lr) and whether to stop early.
    Steps the plateau scheduler and early stopping, identically on every rank."""
    accelerator, cfg = s.accelerator, s.cfg
    progress = result.progress
    totals = torch.tensor([progress.loss_sum, progress.count], dtype=torch.float64)
    loss_sum, count = accelerator.reduce(totals.to(accelerator.device), "sum").tolist()
    record: dict[str, Any] = {
        "epoch": epoch,
        "train_loss": loss_sum / count,
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


def log_epoch(s: Session, record: dict) -> None:
    """Main process only: the metrics line and the TensorBoard scalars."""
    s.metrics.append(record)
    scalars = {"Loss/train": record["train_loss"], "LearningRate": record["lr"]}
    if "valid_loss" in record:
        scalars.update(
            {"Loss/valid": record["valid_loss"], "Accuracy/valid": record["valid_accuracy"]}
        )
    if "test_loss" in record:
        scalars.update({"Loss/test": record["test_loss"], "Accuracy/test": record["test_accuracy"]})
    log_scalars(s.accelerator, scalars, record["epoch"], s.run_dir / rundir.TENSORBOARD)


def write_checkpoints(s: Session, record: dict) -> None:
    """Main process only: last.safetensors, and best.safetensors as a copy of it when this
    epoch is the best. Called after resume.pt is saved, so that a kill in between leaves
    checkpoints that repair_checkpoints can write again from resume.pt."""
    last = rundir.checkpoint_path(s.run_dir, "last")
    meta = checkpoint_metadata(s.cfg, record, count_parameters(s.plain_model))
    save_model_checkpoint(last, s.eval_model.state_dict(), meta)
    if record.get("is_best"):
        atomic_copy(last, rundir.checkpoint_path(s.run_dir, "best"))


def repair_checkpoints(s: Session, state: dict) -> None:
    """Main process, on resume: if the run was killed after saving resume.pt at the end of an
    epoch but before that epoch's checkpoints were written, write them now from the state."""
    if state["step"]:
        return  # stopped mid-epoch: the last epoch's checkpoints were complete before it
    record = next((r for r in s.metrics.read() if r["epoch"] == state["epoch"]), None)
    if record is None:
        return
    stale = [
        name
        for name in ("last", "best")
        if (name == "last" or record.get("is_best"))
        and checkpoint_epoch(rundir.checkpoint_path(s.run_dir, name)) != record["epoch"]
    ]
    if stale:
        write_checkpoints(s, record)
        s.reporter.print(f"rewrote {' and '.join(stale)} checkpoint(s) of epoch {record['epoch']}")


def nonfinite_message(run_dir: Path, epoch: int, ranks: list[int], what: str) -> str:
    where = f" on rank {', '.join(map(str, ranks))}" if ranks else ""
    last = rundir.checkpoint_path(run_dir, "last")
    kept = (
        f"last good checkpoint: {last} (epoch {epoch - 1})"
        if last.exists()
        else "no checkpoint was written before it"
    )
    return (
        f"training stopped: the {what} became non-finite{where} in epoch {epoch}; "
        f"{kept}; try a lower --lr"
    )


def checkpoint_metadata(cfg: TrainConfig, record: dict, n_params: int) -> dict:
    metric_names = ("train_loss", "valid_loss", "valid_accuracy")
    return {
        "model": cfg.model,
        "epoch": record["epoch"],
        "metrics": {k: v for k, v in record.items() if k in metric_names},
        "num_parameters": n_params,
        "config": cfg.to_dict(),
    }


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train(explicit: dict[str, Any]) -> int:
    """Run training with the options the user gave (None = not given). Returns the exit code."""
    explicit = elastic.restarted_options(explicit)  # a restarted group resumes the run
    cfg = resolve_config(explicit)
    try:
        check_config(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if cfg.deterministic:
        # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    accelerator = make_training_accelerator(cfg)
    try:
        return run_training(accelerator, explicit)
    except UserError as exc:  # the same on every rank: the main one says it before any exits
        say_it_and_leave_together(accelerator, exc)
        raise
    finally:
        rundir.release_locks()  # the run is over, whatever happens to this process next
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
    cfg = settle_config(accelerator, plan, explicit)
    for name in unused_options(explicit, cfg):
        reporter.print(f"note: --{name.replace('_', '-')} has no effect in this configuration")
    s = build_session(accelerator, plan, cfg, reporter)
    start_outputs(s, plan.resume_state)
    print_header(s, resumed)

    stop_request = StopRequest().install()
    try:
        status, exit_code, detail, epoch = train_epochs(s, stop_request)
    except WriteFailed as exc:  # every rank has it (agreement.main_process_writes)
        detail = f"{exc}; free some space, then resume with --resume {s.run_dir}"
        with suppress(WriteFailed):  # summary.json if the disk still takes it
            finish(s, "write-failed", detail, None)
        raise WriteFailed(detail) from None
    finally:
        stop_request.uninstall()
    finish(s, status, detail, epoch)
    if exit_code == EXIT_DIVERGED:
        raise TrainingDiverged(detail)  # one line on stderr, exit code 3
    if detail:
        reporter.print(detail)
    if exit_code == EXIT_OK:
        best = s.best
        reporter.print(
            f"done: {status}; best {best.metric} {best.value:.4f} at epoch {best.epoch}; "
            f"checkpoints in {s.run_dir}"
            if best.value is not None
            else f"done: {status}; checkpoints in {s.run_dir}"
        )
    return exit_code


def train_epochs(s: Session, stop_request: StopRequest) -> tuple[str, int, str, int]:
    """The epoch loop. Returns (status, exit code, detail for the user, last epoch reached)."""
    accelerator, cfg, reporter = s.accelerator, s.cfg, s.reporter
    steps = s.stream.steps_per_epoch
    first_step = [True]

    def on_step(step: int) -> None:
        if s.ema is not None:
            s.ema.update(s.plain_model)
        reporter.step(step)
        if first_step[0]:
            first_step[0] = False
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            startup = seconds_since_process_start()
            reporter.print(f"start-up: first training step done {startup:.1f} s after launch")

    epoch = s.start_epoch
    for epoch in range(s.start_epoch + 1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        epoch_data = s.stream.epoch(epoch)
        reporter.epoch_start(epoch, cfg.epochs, steps, done=s.progress.step)
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
            stop_requested=lambda: bool(stop_request),
            on_step=on_step,
        )
        train_time = time.perf_counter() - epoch_started
        if result.stop == STOP_NONFINITE:
            reporter.epoch_end(None, cfg.epochs)
            ranks = result.nonfinite_ranks
            return (
                "diverged",
                EXIT_DIVERGED,
                nonfinite_message(s.run_dir, epoch, ranks, "training loss"),
                epoch,
            )
        if result.stop == STOP_SIGNAL:
            reporter.epoch_end(None, cfg.epochs)
            s.elapsed += train_time
            save_resume(s, epoch - 1, result.progress)
            detail = (
                f"stopped by {stop_request.name or 'a signal'} in epoch {epoch} after step "
                f"{result.progress.step}; state saved: resume with --resume {s.run_dir}"
            )
            return "preempted", EXIT_PREEMPTED, detail, epoch
        try:
            record, stop_early = validate_epoch(s, epoch, result, start, train_time)
        except Diverged as exc:
            reporter.epoch_end(None, cfg.epochs)
            return "diverged", EXIT_DIVERGED, str(exc), epoch
        s.elapsed += time.perf_counter() - epoch_started
        record.update(epoch_time=time.perf_counter() - epoch_started, elapsed=s.elapsed)
        record_test_metrics(s, record)
        with main_process_writes(accelerator):
            if accelerator.is_main_process:
                log_epoch(s, record)
        s.progress = EpochProgress()
        save_resume(s, epoch, s.progress)
        with main_process_writes(accelerator):
            if accelerator.is_main_process:
                write_checkpoints(s, record)
        reporter.epoch_end(record, cfg.epochs)
        if stop_early:
            detail = (
                "early stopping: the validation loss did not improve for "
                f"{s.stopper.bad_epochs} epochs (patience {cfg.early_stopping_patience})"
            )
            return "early-stopped", EXIT_OK, detail, epoch
        # A signal that came during validation or saving: the state is already saved.
        nothing = torch.zeros((), device=accelerator.device)
        if epoch < cfg.epochs and check_stop(accelerator, bool(stop_request), nothing)[0]:
            signal_name = stop_request.name or "a signal"
            detail = f"stopped by {signal_name} after epoch {epoch}: resume with --resume"
            return "preempted", EXIT_PREEMPTED, detail, epoch
    return "completed", EXIT_OK, "", epoch


def finish(s: Session, status: str, detail: str, epoch: int | None) -> None:
    """summary.json, with where every rank ended: they must agree."""
    from accelerate.utils import gather_object

    ranks = gather_object(
        [
            {
                "rank": s.accelerator.process_index,
                "epoch": epoch,
                "lr": s.optimizer.param_groups[0]["lr"],
                "early_stopping_bad_epochs": s.stopper.bad_epochs,
            }
        ]
    )
    if s.accelerator.is_main_process:
        summary = {
            "status": status,
            "detail": detail,
            "epochs_completed": len(s.metrics.read()),
            "best": s.best.state_dict(),
            "world_size": s.accelerator.num_processes,
            "distributed_type": s.accelerator.distributed_type.value,
            "mixed_precision": s.accelerator.mixed_precision,
            "elapsed": s.elapsed,
            "ranks": ranks,
        }
    with main_process_writes(s.accelerator):
        if s.accelerator.is_main_process:
            atomic_write_text(s.run_dir / rundir.SUMMARY, json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """`python -m fmnist_accel.train` and `accelerate launch -m fmnist_accel.train`."""
    from .cli import run_cli, train_command

    run_cli(train_command, argv, prog_name="python -m fmnist_accel.train")


if __name__ == "__main__":
    main(sys.argv[1:])
