"""One training epoch: every collective of the step loop is here (the gradient all-reduce is
DDP's, inside backward), and those that close an epoch.

Nothing here reads a value back to the host inside the step loop except the periodic
`check_stop` (every CHECK_EVERY steps), which is also where all ranks agree to stop: a signal
or a non-finite loss on any one rank stops every rank at the same step. After the epoch,
`global_train_loss` and `average_buffers` each add up what every rank holds (validation is in
evaluation.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .ema import WeightEMA

# Steps between two cross-rank checks for stop requests and non-finite losses: each check
# is one tiny all-reduce and one host synchronisation.
CHECK_EVERY = 25

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


@dataclass
class EpochResult:
    progress: EpochProgress
    stop: str | None = None  # None, STOP_SIGNAL or STOP_NONFINITE
    nonfinite_ranks: list[int] = field(default_factory=list)


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
    stop_requested: Callable[[], bool] = lambda: False,
    on_step: Callable[[int, torch.Tensor, int], None] = lambda step, loss_sum, count: None,
) -> EpochResult:
    """Run steps start.step .. steps-1 of one epoch; stop early if any rank asks to.
    on_step(step, loss_sum, count) is for reporting progress and changes nothing that is
    trained: the steps done, and this rank's summed training loss of the epoch so far (a
    device tensor: reading it waits for the device) over `count` images."""
    model.train()
    device = accelerator.device
    loss_sum = torch.tensor(start.loss_sum, device=device, dtype=torch.float64)
    count = start.count
    step = start.step
    while step < steps:
        x, y = batches(step)
        loss = training_loss(model(x), y, label_smoothing)
        accelerator.backward(loss)
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
        on_step(step, loss_sum, count)  # loss_sum stays on the device: read it rarely
        # Alone, a process reads its own stop flag after every step for free; ranks must
        # agree on the step, so they meet every CHECK_EVERY steps.
        alone_and_stopped = accelerator.num_processes == 1 and stop_requested()
        if step % CHECK_EVERY == 0 or step == steps or alone_and_stopped:
            stop, bad_ranks = check_stop(accelerator, stop_requested(), loss_sum)
            if stop:
                return EpochResult(EpochProgress(step, loss_sum.item(), count), stop, bad_ranks)
    return EpochResult(EpochProgress(step, loss_sum.item(), count))


def check_stop(
    accelerator, signalled: bool, loss_sum: torch.Tensor | None = None
) -> tuple[str | None, list[int]]:
    """Collective: every rank must call it at the same step. Returns (reason, bad ranks).
    loss_sum None: only stop requests are checked (between epochs, no loss is running)."""
    world = accelerator.num_processes
    flags = torch.zeros(2 * world, device=accelerator.device)
    flags[accelerator.process_index] = float(signalled)
    if loss_sum is not None:
        flags[world + accelerator.process_index] = float(not torch.isfinite(loss_sum))
    flags = accelerator.reduce(flags, "sum").tolist()
    nonfinite = [r for r in range(world) if flags[world + r]]
    if nonfinite:
        return STOP_NONFINITE, nonfinite
    if any(flags[:world]):
        return STOP_SIGNAL, []
    return None, []


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
