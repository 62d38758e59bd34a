"""The exponential moving average of the weights (--ema-decay): its formula and its state."""

from __future__ import annotations

import torch
from torch import nn

from fmnist_accel.ema import WeightEMA


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
