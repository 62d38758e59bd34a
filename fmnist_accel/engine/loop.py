"""One training epoch: every collective of the step loop is here (the gradient all-reduce is
DDP's, inside backward), and those that close an epoch.

Nothing here reads a value back to the host inside the step loop except the periodic
`check_stop` (about every CHECK_SECONDS: CheckPace), which is also where all ranks agree to
stop: a signal or a non-finite loss on any one rank stops every rank at the same step. After
the epoch, `global_train_loss` and `average_buffers` each add up what every rank holds
(validation is in evaluation.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ema import WeightEMA

# How often the ranks meet to check for stop requests and non-finite losses: about every
# CHECK_SECONDS of training, whatever a step takes. Each check is one tiny all-reduce and one
# host synchronisation, so a fast GPU (a few ms a step) meets every few hundred steps and pays
# nothing measurable, while a slow CPU step (seconds) meets after every step and a stop waits
# for at most one step. The interval is derived from the step times measured between checks
# and all-reduced with them, so every rank derives the same one.
CHECK_SECONDS = 0.5
MAX_CHECK_EVERY = 1000
# A GPU step slower than this keeps a snapshot of what its forward pass changes (StepFence),
# so that a lone process can save the state of the last finished step while the step runs
# (a CPU step always does).
SNAPSHOT_SLOWER_THAN_S = 0.2

STOP_SIGNAL = "signal"
STOP_NONFINITE = "non-finite loss"


def training_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """Mean cross-entropy of a batch, computed in fp32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


@dataclass
class EpochProgress:
    """Where an epoch stands on this rank: enough to continue it after a resume."""

    step: int = 0  # next step to run
    loss_sum: float = 0.0  # sum of per-sample training losses so far on this rank
    count: int = 0  # training samples seen so far on this rank
    seconds: float = 0.0  # training time of the epoch so far, earlier starts included


@dataclass
class EpochResult:
    progress: EpochProgress
    stop: str | None = None  # None, STOP_SIGNAL or STOP_NONFINITE
    nonfinite_ranks: list[int] = field(default_factory=list)
    signum: int = 0  # STOP_SIGNAL: which signal (StopCheck.signum)


@dataclass
class CheckPace:
    """When the ranks meet next: every `every` steps. The same on every rank, because it is
    only ever changed from all-reduced figures (check_stop)."""

    every: int = 1
    seconds_per_step: float | None = None  # the ranks' mean, measured between two checks

    def update(self, seconds_per_step: float) -> None:
        if seconds_per_step > 0:
            self.seconds_per_step = seconds_per_step
            self.every = max(1, min(MAX_CHECK_EVERY, int(CHECK_SECONDS / seconds_per_step)))

    @property
    def slow(self) -> bool:
        """Steps long enough (or not measured yet) to be worth a snapshot (StepFence)."""
        return self.seconds_per_step is None or self.seconds_per_step > SNAPSHOT_SLOWER_THAN_S


@dataclass
class StepFence:
    """Lets another thread save the state of the last finished step while a step runs (a
    lone process whose launcher kills it a few seconds after a stop signal, while a step takes
    longer than that).

    Until the optimizer steps, a step changes nothing that is saved except what its forward
    pass changes: BatchNorm statistics and the random number generators (dropout). So before
    such a step the loop snapshots those, and it changes the weights, the optimizer and the
    loss sums only while holding `lock`. A thread that holds the lock and finds the fence
    `armed` can save the last finished step: the weights as they are, the snapshot (or, with
    none, the state as it is: after an epoch's last step nothing changes it until the epoch is
    saved), and progress(); it then ends the process without letting go of the lock, so the
    running step never reaches its optimizer step. The resumed run does that step again, bit
    for bit.
    """

    module: nn.Module  # the plain module (not a DDP or compile wrapper): its state is saved
    lock: threading.Lock = field(default_factory=threading.Lock)
    armed: bool = False  # a consistent state can be saved now
    snapshot: dict | None = None  # {"buffers": {name: tensor}, "cpu_rng", "cuda_rng"}
    step: int = 0  # the last finished step's progress, as EpochProgress has it
    loss_sum: torch.Tensor | None = None
    count: int = 0
    seconds: float = 0.0

    def arm(self, snapshot: bool) -> None:
        """Hold `lock`: a consistent state can be saved from now on; snapshot: take one of
        what the next forward pass will change, which is then saved instead."""
        self.armed = True
        self.snapshot = None
        if snapshot:
            device = next(self.module.parameters()).device
            self.snapshot = {
                "buffers": {k: b.detach().clone() for k, b in self.module.named_buffers()},
                "cpu_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }

    def disarm(self) -> None:
        """Hold `lock`: the state is about to change (or is being saved by the loop itself)."""
        self.armed = False
        self.snapshot = None

    def progress(self) -> EpochProgress:
        """The last finished step's progress (hold `lock`)."""
        loss_sum = float(self.loss_sum) if self.loss_sum is not None else 0.0
        return EpochProgress(self.step, loss_sum, self.count, self.seconds)


def train_one_epoch(
    model: nn.Module,
    optimizer,
    accelerator,
    batches: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    *,
    start: EpochProgress,
    label_smoothing: float = 0.0,
    grad_clip_norm: float = 0.0,
    step_scheduler=None,
    ema: WeightEMA | None = None,
    stop_requested: Callable[[], int] = lambda: 0,
    on_step: Callable[[int, torch.Tensor, int], None] = lambda step, loss_sum, count: None,
    pace: CheckPace | None = None,
    fence: StepFence | None = None,
) -> EpochResult:
    """Run steps start.step .. steps-1 of one epoch; stop early if any rank asks to.
    on_step(step, loss_sum, count) is for reporting progress and changes nothing that is
    trained: the steps done, and this rank's summed training loss of the epoch so far (a
    device tensor: reading it waits for the device) over `count` images. pace: when the ranks
    meet (kept from epoch to epoch). fence: lets another thread save the last finished step
    while a step runs (StepFence; one process only)."""
    model.train()
    device = accelerator.device
    pace = pace if pace is not None else CheckPace()
    loss_sum = torch.tensor(start.loss_sum, device=device, dtype=torch.float64)
    count = start.count
    step = start.step
    started = time.perf_counter() - start.seconds  # the epoch's clock, earlier starts included
    measured_since = (step, time.perf_counter())  # (step, time) of the last synchronisation
    measured = 0.0  # seconds per step between the last two synchronisations (0: unknown)
    next_check = step + pace.every
    if fence is not None:
        with fence.lock:
            fence.step, fence.loss_sum, fence.count = step, loss_sum, count
            fence.seconds = start.seconds
    while step < steps:
        if fence is not None:
            # Savable while it runs, from a snapshot: a CPU step (a snapshot of a few kB costs
            # nothing next to it, and one may be slow unforeseen), a slow GPU step.
            with fence.lock:
                if pace.slow or device.type == "cpu":
                    fence.arm(snapshot=True)
                else:
                    fence.disarm()
        x, y = batches(step)
        loss = training_loss(model(x), y, label_smoothing)
        accelerator.backward(loss)
        with fence.lock if fence is not None else nullcontext():
            if fence is not None:
                fence.disarm()  # from here on the optimizer changes the state
            if grad_clip_norm:
                # accelerate unscales fp16 gradients first; the norm stays on the device
                accelerator.clip_grad_norm_(model.parameters(), grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # fp16: a step skipped for an overflowed loss scale does not advance the schedule
            if step_scheduler is not None and not accelerator.optimizer_step_was_skipped:
                step_scheduler.step()
            if ema is not None:
                ema.update()  # the average follows every optimizer step
            loss_sum.add_(loss.detach(), alpha=len(y))  # one kernel; summed in float64
            count += len(y)
            step += 1
            if fence is not None:
                fence.step, fence.count = step, count
                fence.seconds = time.perf_counter() - started
        on_step(step, loss_sum, count)  # loss_sum stays on the device: read it rarely
        # Alone, a process reads its own stop flag after every step for free; ranks must
        # agree on the step, so they meet when the pace says.
        alone_and_stopped = accelerator.num_processes == 1 and stop_requested()
        if step >= next_check or step == steps or alone_and_stopped:
            check = check_stop(accelerator, stop_requested(), loss_sum, measured)
            pace.update(check.seconds_per_step)
            now = time.perf_counter()  # after the reduce's synchronisation: the device is done
            measured = (now - measured_since[1]) / (step - measured_since[0])
            measured_since = (step, now)
            next_check = step + pace.every
            if check.reason:
                progress = EpochProgress(step, loss_sum.item(), count, now - started)
                return EpochResult(progress, check.reason, check.nonfinite_ranks, check.signum)
    if fence is not None:
        with fence.lock:
            fence.arm(snapshot=False)  # nothing changes the state until the epoch is saved
    seconds = time.perf_counter() - started
    return EpochResult(EpochProgress(step, loss_sum.item(), count, seconds))


class StopCheck(NamedTuple):
    reason: str | None  # None, STOP_SIGNAL or STOP_NONFINITE
    nonfinite_ranks: list[int]
    seconds_per_step: float  # the ranks' mean, measured between their last two checks
    signum: int = 0  # STOP_SIGNAL: the signal of the lowest rank that got one


def check_stop(
    accelerator, signalled: int, loss_sum: torch.Tensor | None = None, seconds_per_step=0.0
) -> StopCheck:
    """Collective: every rank must call it at the same step. signalled: the number of the stop
    signal this rank got (0: none; True counts as 1). The ranks learn which signal stopped
    them even where it reached one rank alone (a node's own shutdown, a signal sent by hand).
    loss_sum None: only stop requests are checked (between epochs, no loss is running).
    seconds_per_step: this rank's, measured between its last two checks (0: not measured; the
    mean is then 0 too, on every rank alike)."""
    world = accelerator.num_processes
    flags = torch.zeros(2 * world + 2, device=accelerator.device, dtype=torch.float64)
    flags[accelerator.process_index] = float(signalled)
    if loss_sum is not None:
        flags[world + accelerator.process_index] = float(not torch.isfinite(loss_sum))
    flags[2 * world] = seconds_per_step
    flags[2 * world + 1] = float(seconds_per_step <= 0)  # a rank that has not measured yet
    flags = accelerator.reduce(flags, "sum").tolist()
    mean_seconds = flags[2 * world] / world if not flags[2 * world + 1] else 0.0
    nonfinite = [r for r in range(world) if flags[world + r]]
    if nonfinite:
        return StopCheck(STOP_NONFINITE, nonfinite, mean_seconds)
    signals = [int(f) for f in flags[:world] if f]
    if signals:
        return StopCheck(STOP_SIGNAL, [], mean_seconds, signals[0])
    return StopCheck(None, [], mean_seconds)


def global_train_loss(progress: EpochProgress, accelerator) -> float:
    """Collective: the epoch's mean training loss over the samples of every rank."""
    totals = torch.tensor([progress.loss_sum, progress.count], dtype=torch.float64)
    loss_sum, count = accelerator.reduce(totals.to(accelerator.device), "sum").tolist()
    return loss_sum / count


def average_buffers(module: nn.Module, accelerator) -> None:
    """Make floating-point buffers (BatchNorm running statistics) the mean over ranks.

    DDP runs with broadcast_buffers=False (no broadcast before every forward), so each rank's
    running statistics follow its own shard; averaging them once before validation and
    checkpointing gives every rank the same model, built from all ranks' data.
    """
    if accelerator.num_processes == 1:
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    flat = accelerator.reduce(flat, "mean")
    offset = 0
    for b in buffers:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
