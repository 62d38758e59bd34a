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
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import rundir
from .checkpoint import (
    atomic_write_text,
    load_resume_state,
    save_model_checkpoint,
    save_resume_state,
)
from .config import (
    RESUMABLE_OVERRIDES,
    TrainConfig,
    check_config,
    config_from_dict,
    resolve_config,
)
from .data import load_split, train_valid_split
from .device_data import EvalSet, TrainStream
from .engine import (
    STOP_NONFINITE,
    STOP_SIGNAL,
    EarlyStopping,
    EpochProgress,
    average_buffers,
    check_stop,
    evaluate,
    train_one_epoch,
)
from .errors import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, TrainingDiverged, UserError
from .hardware import describe, make_accelerator
from .models import build_model, count_parameters
from .preemption import StopRequest
from .report import Reporter, seconds_since_process_start


# --------------------------------------------------------------------------------------------
# Set-up
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
        log_with="tensorboard",
        # A placeholder: the run folder is only known once the main process has chosen it.
        project_dir=cfg.output_dir,
        kwargs_handlers=[ddp],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.compile else None,
    )


@dataclass
class RunPlan:
    """What the main process decided about the run folder; broadcast to every rank."""

    run_dir: str = ""
    config: dict = field(default_factory=dict)
    resume_state: dict | None = None
    finished: str | None = None  # set when the run to resume has already ended
    error: str | None = None


def plan_run(explicit: dict[str, Any]) -> RunPlan:
    """Main process only: pick the run folder, and the state to resume from if any."""
    cfg = resolve_config(explicit)
    output_dir = Path(cfg.output_dir)
    resume_dir = find_resume_dir(cfg, output_dir)
    if resume_dir is None:
        if cfg.run_name:
            run_dir = output_dir / cfg.run_name
            if cfg.resume is None and run_dir.exists() and any(run_dir.iterdir()):
                raise UserError(
                    f"{run_dir} already exists: pass --resume auto to continue it, or choose "
                    "another --run-name"
                )
        else:
            run_dir = rundir.unique_run_dir(output_dir, rundir.default_run_name(cfg.model))
        rundir.check_writable(run_dir)
        return RunPlan(run_dir=str(run_dir), config=cfg.to_dict())

    state = load_resume_state(resume_dir / rundir.RESUME)
    saved = state["config"]
    for key, value in explicit.items():
        if value is None or key in RESUMABLE_OVERRIDES or key == "recipe":
            continue
        if saved.get(key) != value:
            raise UserError(
                f"--{key.replace('_', '-')} {value} differs from the run being resumed "
                f"({resume_dir} has {saved.get(key)}); resume without it or start a new run"
            )
    resumed = {
        **saved,
        **{k: v for k, v in explicit.items() if v is not None and k in RESUMABLE_OVERRIDES},
    }
    resumed["run_name"] = resume_dir.name
    resumed["output_dir"] = str(resume_dir.parent)
    resumed["resume"] = cfg.resume
    if resumed["epochs"] != saved["epochs"] and saved["scheduler"] in ("onecycle", "cosine"):
        raise UserError(
            f"--epochs cannot change when resuming a run with the {saved['scheduler']} "
            "schedule: its learning rates are fixed by the original length"
        )
    rundir.check_writable(resume_dir)
    plan = RunPlan(run_dir=str(resume_dir), config=resumed, resume_state=state)
    status = rundir.run_status(resume_dir)
    if status == "early-stopped" or (status == "completed" and state["epoch"] >= resumed["epochs"]):
        plan.finished = status
    return plan


def find_resume_dir(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The run folder to continue, or None for a new run."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        path = Path(cfg.resume)
        if path.name == rundir.RESUME:
            path = path.parent
        if not (path / rundir.RESUME).is_file():
            raise UserError(f"--resume {cfg.resume}: no {rundir.RESUME} there to resume from")
        return path
    if cfg.run_name:
        path = output_dir / cfg.run_name
        return path if (path / rundir.RESUME).is_file() else None
    for path in rundir.runs_newest_first(output_dir):
        if (path / rundir.RESUME).is_file() and rundir.run_status(
            path
        ) not in rundir.FINISHED_STATUSES:
            return path
    return None


def share_plan(accelerator, explicit: dict[str, Any]) -> RunPlan:
    """The main process plans the run; every rank gets the same plan (or the same error)."""
    from accelerate.utils import broadcast_object_list

    plan = RunPlan()
    if accelerator.is_main_process:
        try:
            plan = plan_run(explicit)
        except (UserError, ValueError) as exc:
            plan = RunPlan(error=str(exc))
    if accelerator.num_processes > 1:
        box = [plan]
        broadcast_object_list(box, from_process=0)
        plan = box[0]
    if plan.error:
        raise UserError(plan.error)
    return plan


def make_optimizer(cfg: TrainConfig, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


def make_schedulers(cfg: TrainConfig, optimizer, total_steps: int):
    """(per-epoch plateau scheduler or None, per-step scheduler or None).

    Neither goes through accelerator.prepare(): a prepared ReduceLROnPlateau is stepped once
    per process per call (DESIGN.md 3). Every rank steps its own with the same global values.
    """
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        return sched.ReduceLROnPlateau(
            optimizer, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        ), None
    if cfg.scheduler == "onecycle":
        return None, sched.OneCycleLR(
            optimizer,
            max_lr=optimizer.param_groups[0]["lr"],
            total_steps=total_steps,
            pct_start=0.25,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
    if cfg.scheduler == "cosine":
        return None, sched.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None, None


def make_ema(model: nn.Module, decay: float):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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


# --------------------------------------------------------------------------------------------
# Resume state
# --------------------------------------------------------------------------------------------
def rank_state(progress: EpochProgress) -> dict:
    """What differs between ranks: RNG streams (dropout) and the partial epoch's loss sums."""
    return {
        "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "loss_sum": progress.loss_sum,
        "count": progress.count,
    }


def restore_rank_state(state: dict) -> EpochProgress:
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    return EpochProgress(loss_sum=state["loss_sum"], count=state["count"])


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
def train(explicit: dict[str, Any]) -> int:
    """Run training with the options the user gave (None = not given). Returns the exit code."""
    cfg = resolve_config(explicit)
    try:
        check_config(cfg)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    accelerator = make_training_accelerator(cfg)
    try:
        return run_training(accelerator, explicit)
    finally:
        # Tear the process group down before exit: gloo's threads otherwise abort at exit.
        accelerator.end_training()


def run_training(accelerator, explicit: dict[str, Any]) -> int:
    from accelerate.utils import gather_object, set_seed

    rank, world = accelerator.process_index, accelerator.num_processes
    reporter = Reporter(accelerator.is_main_process)
    stop_request = StopRequest().install()

    plan = share_plan(accelerator, explicit)
    cfg = config_from_dict(plan.config)
    run_dir = Path(plan.run_dir)
    if plan.finished:
        reporter.print(f"run {run_dir} already ended ({plan.finished}); nothing to do")
        return EXIT_OK
    device = accelerator.device
    cfg = replace(cfg, mixed_precision=accelerator.mixed_precision)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    state = plan.resume_state

    # Data: every rank reads the files (the local main process first, in case it downloads).
    try:
        with accelerator.local_main_process_first():
            full_train = load_split(cfg.data_dir, "train")
    except UserError:
        if accelerator.is_main_process and state is None and not any(run_dir.iterdir()):
            run_dir.rmdir()  # made only to prove it writable: leave no empty run behind
        raise
    train_split, valid_split = train_valid_split(full_train, cfg.valid_size, cfg.seed)
    stream = TrainStream(
        train_split, device, cfg.batch_size, world, rank, cfg.seed, cfg.augment, cfg.channels_last
    )
    valid_set = (
        EvalSet(valid_split, device, world, rank, cfg.channels_last) if len(valid_split) else None
    )

    # Model, optimizer, schedules: the same initial weights on every rank, then each rank
    # its own dropout stream.
    set_seed(cfg.seed)
    model = build_model(cfg.model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr * (world if cfg.scale_lr else 1)
    optimizer = make_optimizer(cfg, model, lr)
    steps = stream.steps_per_epoch
    plateau, step_scheduler = make_schedulers(cfg, optimizer, cfg.epochs * steps)
    stopper = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    best = BestTracker(cfg.best_metric)
    ema = make_ema(model, cfg.ema_decay) if cfg.ema_decay else None
    start_epoch, progress = 0, EpochProgress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        for obj, key in ((plateau, "plateau"), (step_scheduler, "step_scheduler")):
            if obj is not None:
                obj.load_state_dict(state[key])
        stopper.load_state_dict(state["early_stopping"])
        best.load_state_dict(state["best"])
        start_epoch, progress.step = state["epoch"], state["step"]
    model, optimizer = accelerator.prepare(model, optimizer)
    if ema is not None:
        ema.to(device)
    set_seed(cfg.seed, device_specific=True)
    if state is not None:
        if state["world_size"] == world:
            progress = replace(restore_rank_state(state["rank_states"][rank]), step=progress.step)
        elif progress.step:
            raise UserError(
                f"{run_dir} was stopped mid-epoch with {state['world_size']} processes; "
                f"resume it with the same number (now {world})"
            )
    plain_model = accelerator.unwrap_model(model)

    metrics = rundir.MetricsLog(run_dir)
    if accelerator.is_main_process:
        if state is None:
            atomic_write_text(run_dir / rundir.CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
        metrics.keep_epochs_up_to(start_epoch)
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.project_configuration.logging_dir = str(run_dir)
    accelerator.init_trackers(
        rundir.TENSORBOARD,
        config={k: (v if v is not None else "") for k, v in cfg.to_dict().items()},
        init_kwargs={"tensorboard": {"purge_step": start_epoch + 1}},
    )

    n_params = count_parameters(plain_model)
    reporter.print(
        f"run folder: {run_dir}"
        + (
            f" (resuming after epoch {start_epoch}"
            + (f", step {progress.step}" if progress.step else "")
            + ")"
            if state
            else ""
        )
    )
    reporter.print(
        f"hardware: {describe(accelerator)}" + (", torch.compile" if cfg.compile else "")
    )
    reporter.print(
        f"batch: {cfg.batch_size} per process, {cfg.batch_size * world} global; lr {lr:.2e}"
        + (f" (--lr {cfg.lr:g} x {world} processes)" if cfg.scale_lr else "")
        + f"; {steps} steps per epoch"
    )
    reporter.print(
        f"model: {cfg.model}, {n_params:,} parameters; data: {len(train_split):,} train, "
        f"{len(valid_split):,} validation images from {cfg.data_dir}"
    )

    status, exit_code, detail = "completed", EXIT_OK, ""
    started = time.perf_counter()
    first_step_reported = False

    def on_step(step: int) -> None:
        nonlocal first_step_reported
        if ema is not None:
            ema.update_parameters(plain_model)
        reporter.step(step)
        if not first_step_reported:
            first_step_reported = True
            if device.type == "cuda":
                torch.cuda.synchronize()
            reporter.print(
                f"start-up: first training step done {seconds_since_process_start():.1f} s "
                "after launch"
            )

    def save_resume(epoch_done: int, progress: EpochProgress) -> None:
        """Collective: every rank sends its RNG state; the main process writes one file."""
        rank_states = gather_object([rank_state(progress)])
        if accelerator.is_main_process:
            save_resume_state(
                run_dir / rundir.RESUME,
                {
                    "config": cfg.to_dict(),
                    "epoch": epoch_done,
                    "step": progress.step,
                    "world_size": world,
                    "model": plain_model.state_dict(),
                    "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": optimizer.state_dict(),
                    "plateau": plateau.state_dict() if plateau is not None else None,
                    "step_scheduler": step_scheduler.state_dict()
                    if step_scheduler is not None
                    else None,
                    "early_stopping": stopper.state_dict(),
                    "best": best.state_dict(),
                    "rank_states": rank_states,
                },
            )
        accelerator.wait_for_everyone()

    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            epoch_started = time.perf_counter()
            epoch_data = stream.epoch(epoch)
            reporter.epoch_start(epoch, cfg.epochs, steps, done=progress.step)
            result = train_one_epoch(
                model,
                optimizer,
                accelerator,
                lambda s, data=epoch_data: stream.batch(data, s),
                steps,
                start=progress,
                label_smoothing=cfg.label_smoothing,
                step_scheduler=step_scheduler,
                stop_requested=lambda: bool(stop_request),
                on_step=on_step,
            )
            train_time = time.perf_counter() - epoch_started
            if result.stop == STOP_NONFINITE:
                reporter.epoch_end(None, cfg.epochs)
                status, exit_code = "diverged", EXIT_DIVERGED
                detail = nonfinite_message(run_dir, epoch, result.nonfinite_ranks, "training loss")
                break
            if result.stop == STOP_SIGNAL:
                reporter.epoch_end(None, cfg.epochs)
                save_resume(epoch - 1, result.progress)
                status, exit_code = "preempted", EXIT_PREEMPTED
                detail = (
                    f"stopped by a signal in epoch {epoch} after step {result.progress.step}; "
                    f"state saved: resume with --resume {run_dir}"
                )
                break

            totals = accelerator.reduce(
                torch.tensor(
                    [result.progress.loss_sum, result.progress.count],
                    device=device,
                    dtype=torch.float64,
                ),
                "sum",
            ).tolist()
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": totals[0] / totals[1],
                "lr": optimizer.param_groups[0]["lr"],
            }
            eval_model = ema.module if ema is not None else plain_model
            average_buffers(plain_model, accelerator)
            if ema is not None:
                average_buffers(ema.module, accelerator)
            stop_early = False
            if valid_set is not None:
                valid = evaluate(eval_model, valid_set, accelerator, cfg.eval_batch_size)
                if not math.isfinite(valid.loss):
                    reporter.epoch_end(None, cfg.epochs)
                    status, exit_code = "diverged", EXIT_DIVERGED
                    detail = nonfinite_message(run_dir, epoch, [], "validation loss")
                    break
                record.update(valid_loss=valid.loss, valid_accuracy=valid.accuracy)
                if plateau is not None:
                    plateau.step(valid.loss)
                record["is_best"] = best.update(record[cfg.best_metric], epoch)
                stop_early = cfg.early_stopping and stopper.step(valid.loss)
            record.update(
                train_time=train_time,
                # images this session trained in this epoch (a resumed epoch counts its rest)
                images_per_sec=(result.progress.count - progress.count) * world / train_time,
                epoch_time=time.perf_counter() - epoch_started,
            )
            if accelerator.is_main_process:
                metrics.append(record)
                accelerator.log(
                    {
                        "Loss/train": record["train_loss"],
                        **(
                            {
                                "Loss/valid": record["valid_loss"],
                                "Accuracy/valid": record["valid_accuracy"],
                            }
                            if valid_set is not None
                            else {}
                        ),
                        "LearningRate": record["lr"],
                    },
                    step=epoch,
                )
                weights = eval_model.state_dict()
                meta = checkpoint_metadata(cfg, epoch, record, n_params)
                if record.get("is_best"):
                    save_model_checkpoint(
                        rundir.checkpoint_path(run_dir, "best"), weights, {**meta, "kind": "best"}
                    )
                save_model_checkpoint(
                    rundir.checkpoint_path(run_dir, "last"), weights, {**meta, "kind": "last"}
                )
            progress = EpochProgress()
            save_resume(epoch, progress)
            reporter.epoch_end(record, cfg.epochs)
            if stop_early:
                status = "early-stopped"
                detail = (
                    f"early stopping: validation loss did not improve for "
                    f"{stopper.bad_epochs} epochs (patience {cfg.early_stopping_patience})"
                )
                break
            # A signal that came during validation or saving: the state is already saved.
            if check_stop(accelerator, bool(stop_request), torch.zeros((), device=device))[0]:
                status, exit_code = "preempted", EXIT_PREEMPTED
                detail = f"stopped by a signal after epoch {epoch}; resume with --resume {run_dir}"
                break
    finally:
        stop_request.uninstall()

    # Every rank reports where it ended: they must agree.
    ranks = gather_object(
        [
            {
                "rank": rank,
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "early_stopping_bad_epochs": stopper.bad_epochs,
            }
        ]
    )
    if accelerator.is_main_process:
        summary = {
            "status": status,
            "detail": detail,
            "epochs_completed": len(metrics.read()),
            "best": best.state_dict(),
            "world_size": world,
            "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision,
            "train_seconds": time.perf_counter() - started,
            "ranks": ranks,
        }
        atomic_write_text(run_dir / rundir.SUMMARY, json.dumps(summary, indent=2) + "\n")
    if exit_code == EXIT_DIVERGED:
        raise TrainingDiverged(detail)  # one line on stderr, exit code 3
    if detail:
        reporter.print(detail)
    if exit_code == EXIT_OK:
        reporter.print(
            f"done: {status}; best {cfg.best_metric} {best.value} at epoch {best.epoch}; "
            f"checkpoints in {run_dir}"
            if best.value is not None
            else f"done: checkpoints in {run_dir}"
        )
    return exit_code


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


def checkpoint_metadata(cfg: TrainConfig, epoch: int, record: dict, n_params: int) -> dict:
    return {
        "model": cfg.model,
        "epoch": epoch,
        "metrics": {
            k: v for k, v in record.items() if k in ("train_loss", "valid_loss", "valid_accuracy")
        },
        "num_parameters": n_params,
        "channels_last": cfg.channels_last,
        "config": cfg.to_dict(),
    }


def main(argv: list[str] | None = None) -> None:
    """`python -m fmnist_accel.train` and `accelerate launch -m fmnist_accel.train`."""
    from .cli import run_cli, train_command

    run_cli(train_command, argv, prog_name="python -m fmnist_accel.train")


if __name__ == "__main__":
    main(sys.argv[1:])
