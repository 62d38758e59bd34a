"""BatchNorm running statistics are averaged over the ranks before validation and saving
(DDP runs with broadcast_buffers=False): a real 2-process gloo run of cnn-bn saves the model
it validated, and its statistics are those of all ranks' images, not of rank 0's.

Plain SGD at lr 1e-6 keeps the weights at their (seeded) initial values to ~1e-6, so the
statistics of the first two BatchNorm layers (no dropout before them) depend only on the
images: two ranks at batch 50, averaged, give what one process at batch 100 gives (global
step k holds the same images on both), up to float rounding. Without the averaging the saved
model holds rank 0's statistics alone, and validation mixed two different models.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.fakedata import write_fashion_dir
from support.processes import evaluate_json, metrics, summary, train, why

# BatchNorm layers with nothing random before them: conv1's and conv2's.
DETERMINISTIC_BN = ("conv1.1", "conv2.1")


def options(data: Path, out: Path, name: str, batch: int, *extra: str) -> list[str]:
    return ["--model", "cnn-bn", "--epochs", "1", "--batch-size", str(batch),
            "--optimizer", "sgd", "--momentum", "0", "--lr", "1e-6",
            "--data-dir", str(data), "--output-dir", str(out), "--run-name", name,
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    # 500 training images: 5 steps of 2 x 50, or of 1 x 100
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=100)


def assert_saved_model_is_the_validated_one(run_dir: Path) -> None:
    """`eval --split valid` of the saved model, on one process, gives the figures the
    2-process run logged for it."""
    report = evaluate_json(1, ["last", "--run-dir", str(run_dir), "--split", "valid"])
    logged = metrics(run_dir)[-1]
    assert report["epoch"] == logged["epoch"] and report["num_samples"] == 100
    assert report["accuracy"] == logged["valid_accuracy"]
    assert report["loss"] == pytest.approx(logged["valid_loss"], rel=1e-6)


def test_two_ranks_validate_and_save_the_model_with_averaged_statistics(data_dir, tmp_path):
    two = train(2, options(data_dir, tmp_path, "two", 50))
    assert two.returncode == 0, why(two)
    assert [r["rank"] for r in summary(tmp_path / "two")["ranks"]] == [0, 1]  # 2 real ranks
    one = train(1, options(data_dir, tmp_path, "one", 100))
    assert one.returncode == 0, why(one)
    averaged, reference = (load_file(tmp_path / n / "last.safetensors") for n in ("two", "one"))
    for layer in DETERMINISTIC_BN:
        for stat in ("running_mean", "running_var"):
            key = f"{layer}.{stat}"
            torch.testing.assert_close(averaged[key], reference[key], rtol=1e-4, atol=1e-5)
    assert_saved_model_is_the_validated_one(tmp_path / "two")


@pytest.mark.slow
def test_two_ranks_validate_and_save_the_weight_average_with_averaged_statistics(
    data_dir, tmp_path
):
    """With --ema-decay the average is what is validated and saved: its statistics must be
    averaged over the ranks too."""
    proc = train(2, options(data_dir, tmp_path, "ema", 50, "--ema-decay", "0.5"))
    assert proc.returncode == 0, why(proc)
    assert_saved_model_is_the_validated_one(tmp_path / "ema")
