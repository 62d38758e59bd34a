"""The per-epoch decisions of a real run follow its logged validation figures by the rules
the help text states: the best checkpoint by --best-metric (strictly better only), the
plateau scheduler and early stopping on the validation loss; and a run resumed in the middle
of its patience decides exactly as one never interrupted.

The data are the fake Fashion-MNIST with half the labels replaced by random ones: the MLP
overfits them, so the validation loss turns up while the accuracy stalls at a level several
epochs share; the best epoch by accuracy is not the best by loss, ties happen, the plateau
scheduler acts and early stopping stops, all within a dozen one-second epochs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fakedata import fake_split, idx_bytes
from launching import evaluate_json, metrics, summary, train, why
from safetensors import safe_open

EPOCHS = 12
PLATEAU_PATIENCE, PLATEAU_FACTOR = 1, 0.5
EARLY_STOPPING_PATIENCE = 3
LR = 3e-3


def write_noisy_fashion_dir(root: Path, n_train: int = 600, n_test: int = 100) -> Path:
    """fakedata's images with half the labels (train and test) drawn at random."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(99)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = fake_split(n, seed)
        noisy = torch.rand(n, generator=g) < 0.5
        random_labels = torch.randint(0, 10, (n,), generator=g).to(torch.uint8)
        labels = torch.where(noisy, random_labels, labels)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root


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


def plateau_lrs(losses: list[float], lr: float) -> tuple[list[float], float]:
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
    used, final_lr = plateau_lrs(losses, LR)
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


def test_eval_confusion_matrix_rows_are_the_true_classes(uninterrupted, noisy_data):
    """The only model of the suite that is wrong on half the test images: a transposed
    confusion matrix shows only where predictions and labels differ."""
    report = evaluate_json(1, ["best", "--run-dir", str(uninterrupted)])
    raw = (noisy_data / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    labels = torch.tensor(list(raw[8:]))
    matrix = report["confusion_matrix"]
    assert report["accuracy"] < 0.9
    assert [sum(row) for row in matrix] == torch.bincount(labels, minlength=10).tolist()
    assert torch.tensor(matrix).sum(0).tolist() != torch.tensor(matrix).sum(1).tolist()
    assert report["accuracy"] == sum(matrix[i][i] for i in range(10)) / len(labels)
