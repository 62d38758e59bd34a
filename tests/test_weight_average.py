"""--ema-decay: the update is `decay * old + (1 - decay) * new` for parameters and BatchNorm
statistics, and the average (not the raw weights) is what a run validates and saves."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_RUN_ARGS
from safetensors.torch import load_file
from torch import nn

from fmnist_accel.averaging import WeightEMA

DECAY = 0.75


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def step(model: nn.Module, seed: int) -> None:
    """Change every parameter and BatchNorm statistic, as a training step does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    model.train()(torch.randn(8, 4, generator=g) * 3 + seed)


def test_the_update_is_decay_times_old_plus_one_minus_decay_times_new():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = WeightEMA(model, DECAY)
    assert all(not p.requires_grad for p in ema.module.parameters())
    average = snapshot(ema.module)
    assert average.keys() == snapshot(model).keys()
    for seed in (1, 2, 3):
        step(model, seed)
        new = snapshot(model)
        ema.update(model)
        got = snapshot(ema.module)
        for key, value in new.items():
            if value.is_floating_point():  # weights, biases, running mean and variance
                expected = DECAY * average[key] + (1 - DECAY) * value
                torch.testing.assert_close(got[key], expected, rtol=1e-6, atol=1e-6)
                assert not torch.allclose(got[key], value), f"{key} was copied, not averaged"
            else:  # BatchNorm's step counter: copied
                assert torch.equal(got[key], value), key
        assert snapshot(model).keys() == new.keys()
        assert all(torch.equal(snapshot(model)[k], v) for k, v in new.items())  # untouched
        average = got


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
