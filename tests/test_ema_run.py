"""--ema-decay in a run: the average, not the raw weights, is what the run validates and saves
(the update formula itself: test_ema.py)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN_ARGS
from safetensors.torch import load_file


def test_a_run_validates_and_saves_the_average(tiny_run, cli, tmp_path):
    """The same run as the session's tiny run, with an average: training is the same (the
    raw weights in resume.pt are the tiny run's last weights), but what is saved and
    validated is the average."""
    res = cli(
        "train", *TINY_RUN_ARGS, "--ema-decay", "0.9", "--data-dir", tiny_run.data_dir,
        "--output-dir", tmp_path / "runs", "--run-name", "ema",
    )  # fmt: skip
    assert res.rc == 0, str(res)
    run = tmp_path / "runs" / "ema"
    raw = load_file(tiny_run.run_dir / "last.safetensors")
    trained = torch.load(run / "resume.pt", map_location="cpu", weights_only=True)["model"]
    assert trained.keys() == raw.keys()
    for key, value in raw.items():
        torch.testing.assert_close(trained[key], value, rtol=1e-6, atol=1e-7)
    saved = load_file(run / "last.safetensors")
    assert saved.keys() == raw.keys()
    assert all(not torch.allclose(saved[k], raw[k]) for k in raw), "the raw weights were saved"

    report = cli("eval", "last", "--run-dir", run, "--split", "valid", "--json")
    assert report.rc == 0, str(report)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert report.json()["accuracy"] == logged["valid_accuracy"]
    assert report.json()["loss"] == pytest.approx(logged["valid_loss"], rel=1e-6)
