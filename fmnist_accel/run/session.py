"""Building a run: the Accelerator, the data on the device, the model, its optimizer,
schedulers and weight average, and the state restored from resume.pt.

A Session is plain data: training.py runs the loop over it, outputs.py writes what it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..engine.data import data_identity, ensure_files, load_split, train_valid_split
from ..engine.device_data import EvalSet, TrainStream, normalise
from ..engine.ema import WeightEMA
from ..engine.loop import EpochProgress
from ..engine.models import WHITENING_IMAGES, build_model
from ..errors import UserError
from ..store.checkpoint import check_optimizer_state, resume_state_must_fit
from ..store.layout import RESUME
from ..store.run_folder import MetricsLog
from .console import Reporter
from .decisions import BestTracker, EarlyStopping, make_schedulers
from .plan import RunPlan, check_process_count


@dataclass
class Session:
    """Everything a run holds while it trains."""

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
    ema: WeightEMA | None
    stopper: EarlyStopping
    best: BestTracker
    metrics: MetricsLog
    lr: float
    data: dict | None = None  # what identifies the training data (engine/data.data_identity)
    start_epoch: int = 0
    progress: EpochProgress | None = None
    elapsed: float = 0.0  # training + validation seconds of earlier epochs, resumes included

    @property
    def eval_model(self) -> nn.Module:
        """What is validated and saved: the weight average if there is one."""
        return self.ema.module if self.ema is not None else self.plain_model


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


def load_data(accelerator, cfg: TrainConfig):
    """(60k training split, test split or None), read by every rank, the local main process
    first (it may download). An error on any rank becomes the same UserError on every rank:
    a rank that raised inside local_main_process_first would leave the others in its barrier."""
    from accelerate.utils import gather_object

    needs_test = cfg.test_every_epoch or cfg.final_test

    def attempt():
        try:
            # Every file the run will read, the final test's included, before it starts.
            ensure_files(cfg.data_dir, ("train", "test") if needs_test else ("train",))
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


def set_torch_flags(cfg: TrainConfig, device: torch.device) -> None:
    if cfg.deterministic:
        # On GPUs some kernels (e.g. adaptive max-pool backward) have no deterministic
        # version: warn there instead of failing. cuBLAS's setting is made in training.train().
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv kernels once
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls


def build_session(accelerator, plan: RunPlan, cfg: TrainConfig, reporter: Reporter) -> Session:
    """Data on the device, the model and its optimizer, restored from the plan's saved state."""
    from accelerate.utils import set_seed

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir, state = Path(plan.run_dir), plan.resume_state
    set_torch_flags(cfg, device)
    full_train, test = load_data(accelerator, cfg)
    data = data_identity(full_train)
    if state is not None:
        check_same_data(state.get("data"), data, cfg.data_dir, run_dir)
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
        cfg.crop_padding,
        cfg.random_erasing,
        cfg.alternating_flips,
    )

    if state is not None and state["step"] >= stream.steps_per_epoch:
        raise UserError(
            f"{run_dir / RESUME} is damaged: it stopped at step {state['step']} of an epoch of "
            f"{stream.steps_per_epoch} steps; resume from another copy or start anew"
        )

    def eval_set(split):
        return EvalSet(split, device, world, rank, cfg.channels_last) if split else None

    # The same initial weights on every rank; each rank its own dropout stream afterwards.
    set_seed(cfg.seed)
    model = build_model(cfg.model)
    # airbench-*: first-layer filters from the data (0.4 s, 0.4 GB at its peak). A resumed
    # run loads them from resume.pt with the other weights, so it skips the fit.
    if state is None and hasattr(model, "fit_whitening"):
        model.fit_whitening(normalise(train_split.images[:WHITENING_IMAGES]))
    model = model.to(device)
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
        metrics=MetricsLog(run_dir),
        lr=lr,
        data=data,
    )
    if state is not None:
        with resume_state_must_fit(run_dir / RESUME):  # edited by hand: one line
            restore_training_state(s, state)
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
        note = check_process_count(state, world, cfg.scheduler, run_dir)
        if note:
            reporter.print(note)
        else:
            s.progress = restore_rank_state(state["rank_states"][rank], state["step"], device)
    return s


def check_same_data(saved: dict | None, now: dict, data_dir: str, run_dir: Path) -> None:
    """A resumed run trains on the data it started with: the same validation split, the same
    images in the same order. (A resume.pt from before this check has no record: trusted.)"""
    if saved is None or saved == now:
        return
    raise UserError(
        f"--data-dir {data_dir} holds other training data than {run_dir} started with "
        f"({now['images']} images, fingerprint {now['fingerprint']}; it started with "
        f"{saved.get('images')}, {saved.get('fingerprint')}): resume with the data it started "
        "with, or start a new run"
    )


def restore_training_state(s: Session, state: dict) -> None:
    """What every rank shares, from resume.pt (outputs.save_resume writes it)."""
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


def restore_rank_state(state: dict, step: int, device: torch.device) -> EpochProgress:
    """What differs between ranks (outputs.rank_state saves it): RNG streams and the partial
    epoch's loss sums."""
    torch.set_rng_state(state["cpu_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    # seconds: the epoch's training time in earlier starts (absent in older resume states)
    seconds = float(state.get("seconds", 0.0))
    return EpochProgress(step, state["loss_sum"], state["count"], seconds)
