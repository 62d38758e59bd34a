"""The per-epoch decisions (run/decisions.py): early stopping, the plateau scheduler and
best-checkpoint selection, first driven by scripted validation losses (the exact semantics the
help text states), then in real runs, whose decisions follow their logged validation figures
by those rules: the best checkpoint by --best-metric (strictly better only), the plateau
scheduler and early stopping on the validation loss; and a run resumed in the middle of its
patience decides exactly as one never interrupted.

The runs' data are the fake Fashion-MNIST with half the labels replaced by random ones: the
MLP overfits them, so the validation loss turns up while the accuracy stalls at a level
several epochs share; the best epoch by accuracy is not the best by loss, ties happen, the
plateau scheduler acts and early stopping stops, all within a dozen one-second epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support.fakedata import write_noisy_fashion_dir
from support.processes import metrics, summary, train, why

from fmnist_accel.config import TrainConfig
from fmnist_accel.run.decisions import BestTracker, EarlyStopping, make_schedulers


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


# ------------------------------------------------------------------------------------------
# In real runs
# ------------------------------------------------------------------------------------------


EPOCHS = 12
PLATEAU_PATIENCE, PLATEAU_FACTOR = 1, 0.5
EARLY_STOPPING_PATIENCE = 3
LR = 3e-3


def options(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", "mlp", "--batch-size", "32", "--lr", str(LR),
            "--best-metric", "valid_accuracy",
            "--plateau-patience", str(PLATEAU_PATIENCE), "--plateau-factor", str(PLATEAU_FACTOR),
            "--early-stopping-patience", str(EARLY_STOPPING_PATIENCE),
            "--data-dir", str(data), "--output-dir", str(out), "--run-name", "run",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory) -> Path:
    return write_noisy_fashion_dir(tmp_path_factory.mktemp("noisy") / "data")


@pytest.fixture(scope="module")
def uninterrupted(noisy_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = train(1, options(noisy_data, out, "--epochs", str(EPOCHS)), timeout=300)
    assert proc.returncode == 0, why(proc)
    return out / "run"


# The documented rules, applied to the logged figures ------------------------------------
def best_epochs(values: list[float], maximize: bool) -> list[bool]:
    """is_best of each epoch: strictly better than every earlier epoch."""
    flags, best = [], None
    for v in values:
        better = best is None or (v > best if maximize else v < best)
        flags.append(better)
        best = v if better else best
    return flags


def run_plateau_lrs(losses: list[float], lr: float) -> tuple[list[float], float]:
    """(lr each epoch trained with, lr after the last epoch): ReduceLROnPlateau, mode min,
    relative threshold 1e-4, cooldown 0, stepped once per epoch on the validation loss."""
    best, bad, used = math.inf, 0, []
    for loss in losses:
        used.append(lr)
        if loss < best * (1 - 1e-4):
            best, bad = loss, 0
        else:
            bad += 1
        if bad > PLATEAU_PATIENCE:
            lr, bad = lr * PLATEAU_FACTOR, 0
    return used, lr


def early_stop(losses: list[float]) -> tuple[int | None, int]:
    """(epoch that stops, bad epochs in a row then): the seed's `trigger > patience`."""
    best, bad = math.inf, 0
    for epoch, loss in enumerate(losses, start=1):
        if loss < best:
            best, bad = loss, 0
        else:
            bad += 1
        if bad > EARLY_STOPPING_PATIENCE:
            return epoch, bad
    return None, bad


def checkpoint_epoch(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["fmnist_accel"])["epoch"]


# -------------------------------------------------------------------------------------------
def test_decisions_follow_the_logged_validation_figures(uninterrupted):
    records = metrics(uninterrupted)
    losses = [r["valid_loss"] for r in records]
    accuracies = [r["valid_accuracy"] for r in records]

    # What makes this run a test of the rules (if the data stop doing this, fix the data):
    best_by_accuracy = accuracies.index(max(accuracies)) + 1
    best_by_loss = losses.index(min(losses)) + 1
    assert best_by_accuracy != best_by_loss, (accuracies, losses)
    assert accuracies.count(max(accuracies)) > 1, "no later epoch ties the best accuracy"
    used, final_lr = run_plateau_lrs(losses, LR)
    assert final_lr < LR, "the plateau scheduler never acted"
    stop, bad = early_stop(losses)
    assert stop is not None and stop < EPOCHS, "early stopping never stopped"

    # Best checkpoint: by validation accuracy, strictly better only.
    assert [r["is_best"] for r in records] == best_epochs(accuracies, maximize=True)
    assert checkpoint_epoch(uninterrupted / "best.safetensors") == best_by_accuracy
    s = summary(uninterrupted)
    assert s["best"] == {"metric": "valid_accuracy", "value": max(accuracies),
                         "epoch": best_by_accuracy}  # fmt: skip
    # Plateau scheduler and early stopping: on the validation loss.
    assert [r["lr"] for r in records] == pytest.approx(used, rel=1e-12)
    assert s["ranks"][0]["lr"] == pytest.approx(final_lr, rel=1e-12)
    assert [r["epoch"] for r in records] == list(range(1, stop + 1))
    assert s["status"] == "early-stopped"
    assert s["ranks"][0]["early_stopping_bad_epochs"] == bad
    assert checkpoint_epoch(uninterrupted / "last.safetensors") == stop


def test_a_run_resumed_in_the_middle_of_its_patience_decides_as_if_never_stopped(
    uninterrupted, noisy_data, tmp_path
):
    reference = metrics(uninterrupted)
    stop = reference[-1]["epoch"]
    # Stop two epochs before the end: inside early stopping's patience, after the best
    # epochs, with the plateau scheduler's own count running.
    pause = stop - 2
    losses = [r["valid_loss"] for r in reference]
    assert early_stop(losses[:pause])[1] > 0, "the pause must fall inside the patience"
    first = train(1, options(noisy_data, tmp_path, "--epochs", str(pause)))
    assert first.returncode == 0, why(first)
    resumed = train(1, options(noisy_data, tmp_path, "--epochs", str(EPOCHS), "--resume", "auto"))
    assert resumed.returncode == 0, why(resumed)
    assert f"resuming after epoch {pause}" in resumed.stdout

    run = tmp_path / "run"
    got = metrics(run)
    decisions = ("epoch", "lr", "is_best", "valid_accuracy")
    assert [{k: r[k] for k in decisions} for r in got] == [
        {k: r[k] for k in decisions} for r in reference
    ]
    assert [r["valid_loss"] for r in got] == pytest.approx(losses, rel=1e-6)
    want, have = summary(uninterrupted), summary(run)
    for key in ("status", "best", "epochs_completed"):
        assert have[key] == want[key], key
    assert have["ranks"] == want["ranks"]
    for name in ("best", "last"):
        assert checkpoint_epoch(run / f"{name}.safetensors") == checkpoint_epoch(
            uninterrupted / f"{name}.safetensors"
        )
