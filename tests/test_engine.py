"""The training step loop (train_one_epoch, check_stop, global_train_loss); and, until they
have test files of their own, config.unused_options and rundir.resolve_checkpoint."""

from __future__ import annotations

import pytest
import torch


def test_options_that_have_no_effect_are_named():
    from fmnist_accel.config import resolve_config, unused_options

    explicit = {"momentum": 0.8, "plateau_patience": 3, "lr": 0.01}
    assert unused_options(explicit, resolve_config(explicit)) == ["momentum"]
    explicit = {"optimizer": "sgd", "momentum": 0.8, "scheduler": "cosine", "plateau_factor": 0.5}
    assert unused_options(explicit, resolve_config(explicit)) == ["plateau_factor"]


def test_best_of_a_run_without_validation_points_to_last(tmp_path):
    import json

    from fmnist_accel.errors import UserError
    from fmnist_accel.rundir import resolve_checkpoint

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({"valid_size": 0}))
    with pytest.raises(UserError, match="trained without validation: use last"):
        resolve_checkpoint("best", str(tmp_path / "r"), "runs")


def one_sgd_step(grad_clip_norm: float) -> torch.Tensor:
    """The weight change of one train_one_epoch step (SGD, lr 1, no momentum) on a linear
    model whose inputs are large enough for a gradient norm far above 1."""
    from accelerate import Accelerator

    from fmnist_accel.engine import EpochProgress, train_one_epoch

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
