"""Per-step learning-rate schedules end where they should: with OneCycle or cosine, every
learning rate a run logs is non-negative and the last one, after the last optimizer step of
the last epoch, is near zero."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.fakedata import write_fashion_dir
from support.processes import metrics, summary, train, why

PEAK = 3e-3
EPOCHS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=100)


@pytest.mark.parametrize("scheduler", ["onecycle", "cosine"])
def test_per_step_schedule_ends_near_zero_and_never_below(scheduler, data_dir, tmp_path):
    # 500 training images at batch 32: 16 steps per epoch, the last one partial.
    args = ["--model", "mlp", "--epochs", str(EPOCHS), "--batch-size", "32", "--lr", str(PEAK),
            "--scheduler", scheduler, "--no-early-stopping", "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path), "--run-name", "r"]  # fmt: skip
    proc = train(1, args)
    assert proc.returncode == 0, why(proc)
    lrs = [r["lr"] for r in metrics(tmp_path / "r")]
    final = [r["lr"] for r in summary(tmp_path / "r")["ranks"]]
    assert len(lrs) == EPOCHS
    assert all(lr >= 0 for lr in lrs + final), lrs + final
    # It did follow a schedule: the lr of every epoch but the last is far from zero...
    assert all(lr > PEAK / 100 for lr in lrs[:-1]), lrs
    # ...and the schedule ends at (about) zero.
    assert lrs[-1] <= PEAK * 1e-3 and final == [lrs[-1]], (lrs, final)
