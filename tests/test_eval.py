"""`fmnist-accel eval` beyond the command line's basics (test_cli.py): the confusion matrix's
rows are the true classes, and `--tta` on a model that never trained on mirror images warns,
once, on stderr."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.fakedata import write_noisy_fashion_dir
from support.processes import evaluate_json, train, why

from fmnist_accel.commands.eval import TTA_COST
from fmnist_accel.store.checkpoint import load_model_checkpoint, save_model_checkpoint


def stderr_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def test_tta_on_a_run_trained_without_flips_warns_why_and_what_it_costs(tiny_run, cli):
    best = tiny_run.run_dir / "best.safetensors"
    assert load_model_checkpoint(best)[1]["config"]["augment"] is False
    res = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--tta", "--json")
    assert res.rc == 0, str(res)
    assert res.json()["tta"] is True  # stdout stays one JSON object
    [line] = stderr_lines(res)
    assert line.startswith(f"fmnist-accel: warning: {best} was trained without flipped images")
    assert TTA_COST in line and "mlp 0.9016 -> 0.8571" in line
    # Without --tta, nothing to warn about.
    plain = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--json")
    assert plain.rc == 0 and stderr_lines(plain) == [], str(plain)


def test_tta_on_a_run_trained_with_flips_is_quiet(tiny_run, cli, tmp_path):
    """The same weights, saved as a run with --augment would save them."""
    state, meta = load_model_checkpoint(tiny_run.run_dir / "best.safetensors")
    meta["config"]["augment"] = True
    flipped = tmp_path / "augmented.safetensors"
    save_model_checkpoint(flipped, state, {k: v for k, v in meta.items() if k != "format"})
    res = cli("eval", flipped, "--tta", "--data-dir", tiny_run.data_dir, "--json")
    assert res.rc == 0, str(res)
    assert res.json()["tta"] is True and stderr_lines(res) == []


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory) -> Path:
    return write_noisy_fashion_dir(tmp_path_factory.mktemp("noisy") / "data")


@pytest.fixture(scope="module")
def noisy_run(noisy_data, tmp_path_factory) -> Path:
    """Two epochs of the MLP on labels half of which are random: wrong on many test images."""
    out = tmp_path_factory.mktemp("noisy-run")
    proc = train(1, ["--model", "mlp", "--epochs", "2", "--batch-size", "32", "--data-dir",
                     str(noisy_data), "--output-dir", str(out), "--run-name", "run"])  # fmt: skip
    assert proc.returncode == 0, why(proc)
    return out / "run"


def test_eval_confusion_matrix_rows_are_the_true_classes(noisy_run, noisy_data):
    """The only model of the suite that is wrong on half the test images: a transposed
    confusion matrix shows only where predictions and labels differ."""
    report = evaluate_json(1, ["best", "--run-dir", str(noisy_run)])
    raw = (noisy_data / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes()
    labels = torch.tensor(list(raw[8:]))
    matrix = report["confusion_matrix"]
    assert report["accuracy"] < 0.9
    assert [sum(row) for row in matrix] == torch.bincount(labels, minlength=10).tolist()
    assert torch.tensor(matrix).sum(0).tolist() != torch.tensor(matrix).sum(1).tolist()
    assert report["accuracy"] == sum(matrix[i][i] for i in range(10)) / len(labels)
