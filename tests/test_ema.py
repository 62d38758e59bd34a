"""The exponential moving average of the weights (--ema-decay): its formula and its state,
its update after every optimizer step, and in a run: the average, not the raw weights, is
what the run validates and saves."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from support.fakedata import TINY_RUN_ARGS
from torch import nn

from fmnist_accel.engine.ema import WeightEMA


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_the_average_moves_a_fraction_of_the_way_to_the_weights():
    model = small_model()
    ema = WeightEMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    ema.update()
    now, weights = ema.module.state_dict(), model.state_dict()
    for key in ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"):
        expected = 0.9 * before[key] + 0.1 * weights[key]
        assert torch.allclose(now[key], expected, atol=1e-6), key
    assert now["1.num_batches_tracked"].item() == 5  # integer buffers are copied
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_the_state_round_trips_and_older_states_still_load():
    model = small_model()
    ema = WeightEMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    ema.update()
    restored = WeightEMA(small_model(), decay=0.5)
    # resume.pt files written before the update counter was dropped carry it: it is ignored.
    restored.load_state_dict({**ema.state_dict(), "updates": 7})
    for key, value in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[key], value), key


def test_every_optimizer_step_updates_the_weight_average():
    """train_one_epoch steps the EMA itself, after each optimizer step: the same average as
    one built by hand from the same steps."""
    from accelerate import Accelerator

    from fmnist_accel.engine.ema import WeightEMA
    from fmnist_accel.engine.loop import EpochProgress, train_one_epoch, training_loss

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
