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
    explicit = {"crop_padding": 1}  # the default recipe does not augment
    assert unused_options(explicit, resolve_config(explicit)) == ["crop_padding"]
    explicit = {"recipe": "accurate", "crop_padding": 1}  # it does: flips, now with shifts
    assert unused_options(explicit, resolve_config(explicit)) == []


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


def test_every_optimizer_step_updates_the_weight_average():
    """train_one_epoch steps the EMA itself, after each optimizer step: the same average as
    one built by hand from the same steps."""
    from accelerate import Accelerator

    from fmnist_accel.ema import WeightEMA
    from fmnist_accel.engine import EpochProgress, train_one_epoch, training_loss

    torch.manual_seed(0)
    batches = [(torch.randn(8, 784), torch.randint(0, 10, (8,))) for _ in range(3)]
    model, by_hand = torch.nn.Linear(784, 10), torch.nn.Linear(784, 10)
    by_hand.load_state_dict(model.state_dict())
    ema, ema_by_hand = WeightEMA(model, 0.5), WeightEMA(by_hand, 0.5)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, optimizer, Accelerator(cpu=True), lambda step: batches[step],
                    len(batches), start=EpochProgress(), ema=ema)  # fmt: skip

    optimizer = torch.optim.SGD(by_hand.parameters(), lr=0.1)
    for x, y in batches:
        training_loss(by_hand(x), y, 0.0).backward()
        optimizer.step()
        optimizer.zero_grad()
        ema_by_hand.update()
    assert torch.equal(model.weight, by_hand.weight)
    assert not torch.equal(ema.module.weight, model.weight)  # an average, not a copy
    for a, b in zip(ema.module.parameters(), ema_by_hand.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_between_epochs_only_stop_requests_are_checked():
    from accelerate import Accelerator

    from fmnist_accel.engine import STOP_SIGNAL, EpochProgress, check_stop, global_train_loss

    accelerator = Accelerator(cpu=True)
    assert check_stop(accelerator, True) == (STOP_SIGNAL, [])
    assert check_stop(accelerator, False) == (None, [])
    # in the step loop, a non-finite loss outranks a signal
    assert check_stop(accelerator, True, torch.tensor(float("nan")))[0] != STOP_SIGNAL
    assert global_train_loss(EpochProgress(step=3, loss_sum=6.0, count=4), accelerator) == 1.5
