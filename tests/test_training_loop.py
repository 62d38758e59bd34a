"""The training step loop (engine/loop.py): train_one_epoch, check_stop, global_train_loss."""

from __future__ import annotations

import signal

import pytest
import torch


def one_sgd_step(grad_clip_norm: float) -> torch.Tensor:
    """The weight change of one train_one_epoch step (SGD, lr 1, no momentum) on a linear
    model whose inputs are large enough for a gradient norm far above 1."""
    from accelerate import Accelerator

    from fmnist_accel.engine.loop import EpochProgress, train_one_epoch

    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(32, 784) * 100, torch.randint(0, 10, (32,))
    result = train_one_epoch(
        model,
        optimizer,
        Accelerator(cpu=True),
        lambda step: (x, y),
        1,
        start=EpochProgress(),
        grad_clip_norm=grad_clip_norm,
    )
    assert result.progress.step == 1 and result.progress.count == 32
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_gradient_clipping_bounds_the_global_norm_of_a_step():
    unclipped = one_sgd_step(0.0).norm().item()
    assert unclipped > 10  # the case clipping exists for
    for max_norm in (0.5, 2.0):
        assert one_sgd_step(max_norm).norm().item() == pytest.approx(max_norm, rel=1e-4)
    # A bound above the gradient's norm changes nothing.
    assert torch.equal(one_sgd_step(unclipped * 2), one_sgd_step(0.0))


def test_between_epochs_only_stop_requests_are_checked():
    from accelerate import Accelerator

    from fmnist_accel.engine.loop import STOP_SIGNAL, EpochProgress, check_stop, global_train_loss

    accelerator = Accelerator(cpu=True)
    assert check_stop(accelerator, True)[:2] == (STOP_SIGNAL, [])
    assert check_stop(accelerator, False)[:2] == (None, [])
    # which signal: every rank learns it (several ranks: the lowest one's)
    assert check_stop(accelerator, int(signal.SIGUSR1)).signum == signal.SIGUSR1
    # in the step loop, a non-finite loss outranks a signal
    assert check_stop(accelerator, True, torch.tensor(float("nan")))[0] != STOP_SIGNAL
    assert global_train_loss(EpochProgress(step=3, loss_sum=6.0, count=4), accelerator) == 1.5
