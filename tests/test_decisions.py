"""Early stopping, the plateau scheduler and best-checkpoint selection, driven by scripted
validation losses: the exact semantics the help text states."""

from __future__ import annotations

import pytest
import torch

from fmnist_accel.config import TrainConfig
from fmnist_accel.decisions import BestTracker, EarlyStopping, make_schedulers


def stop_epoch(losses: list[float], patience: int, min_delta: float = 0.0) -> int | None:
    """The 1-based epoch at which EarlyStopping says stop, or None."""
    stopper = EarlyStopping(patience, min_delta)
    for epoch, loss in enumerate(losses, start=1):
        if stopper.step(loss):
            return epoch
    return None


def test_patience_counts_bad_epochs_and_stops_when_exceeded():
    # best at epoch 2; epochs 3.. are bad: with patience 10 the 11th bad epoch (13) stops,
    # exactly where the seed's `trigger > patience` stops.
    losses = [1.0, 0.5] + [0.6] * 20
    assert stop_epoch(losses, patience=10) == 13
    assert stop_epoch(losses, patience=0) == 3
    assert stop_epoch(losses, patience=2) == 5


def test_an_improvement_resets_the_count():
    losses = [1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 1.0]
    assert stop_epoch(losses, patience=2) == 7  # bad: 2, 3; improved at 4; bad: 5, 6, 7


def test_equal_loss_is_not_an_improvement_and_min_delta_is_a_margin():
    assert stop_epoch([1.0, 1.0, 1.0], patience=1) == 3
    # 0.995 beats 1.0 by 0.005 < min_delta 0.01: not an improvement
    assert stop_epoch([1.0, 0.995, 0.99], patience=1, min_delta=0.01) == 3
    assert stop_epoch([1.0, 0.98, 0.96], patience=1, min_delta=0.01) is None


def test_early_stopping_state_round_trips():
    a = EarlyStopping(3)
    for loss in [1.0, 0.8, 0.9, 0.95]:
        a.step(loss)
    b = EarlyStopping(3)
    b.load_state_dict(a.state_dict())
    assert (b.best, b.bad_epochs) == (0.8, 2)
    assert b.step(0.9) == a.step(0.9) is False
    assert b.step(0.9) == a.step(0.9) is True


def plateau_lrs(losses: list[float], **options) -> list[float]:
    """The lr each epoch trains with, when the toolkit's plateau scheduler sees `losses`."""
    cfg = TrainConfig(**options)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([param], lr=cfg.lr)
    plateau, per_step = make_schedulers(cfg, optimizer, total_steps=100)
    assert per_step is None
    lrs = []
    for loss in losses:
        lrs.append(optimizer.param_groups[0]["lr"])
        plateau.step(loss)
    return lrs


def test_plateau_with_the_seeds_defaults():
    # patience 5, factor 0.1: epochs 2-7 do not improve; after the 6th bad one (epoch 7)
    # the lr drops, so epoch 8 trains with a tenth of it.
    lrs = plateau_lrs([1.0] + [1.0] * 9, lr=1e-3)
    assert lrs[:7] == pytest.approx([1e-3] * 7)
    assert lrs[7:] == pytest.approx([1e-4] * 3)


def test_plateau_needs_a_relative_improvement_of_1e_4():
    # each epoch improves by a relative 5e-5: not enough, so the lr still drops
    losses = [1.0 * (1 - 5e-5) ** i for i in range(4)]
    assert plateau_lrs(losses, lr=1e-3, plateau_patience=1, plateau_factor=0.5)[3] == pytest.approx(
        5e-4
    )
    losses = [1.0 * (1 - 1e-3) ** i for i in range(4)]
    assert plateau_lrs(losses, lr=1e-3, plateau_patience=1, plateau_factor=0.5)[3] == pytest.approx(
        1e-3
    )


@pytest.mark.parametrize(
    ("metric", "values", "improved"),
    [
        # strictly better only (the seed's `valid_accuracy > max_accuracy`)
        ("valid_accuracy", [0.80, 0.85, 0.85, 0.84, 0.86], [True, True, False, False, True]),
        ("valid_loss", [0.5, 0.4, 0.45, 0.4, 0.39], [True, True, False, False, True]),
    ],
)
def test_best_checkpoint_selection(metric, values, improved):
    best = BestTracker(metric)
    assert [best.update(v, e) for e, v in enumerate(values, start=1)] == improved
    assert (best.value, best.epoch) == (values[-1], len(values))
