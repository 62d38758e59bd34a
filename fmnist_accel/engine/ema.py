"""An exponential moving average of a model's weights (--ema-decay)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA:
    """ema = decay * ema + (1 - decay) * weights, after every optimizer step.

    Parameters and floating-point buffers (BatchNorm statistics) are averaged with one
    foreach kernel each; integer buffers are copied. Unlike torch's AveragedModel, which
    reads a counter tensor back from the device at every update, nothing here synchronises
    with the host.
    """

    def __init__(self, model: nn.Module, decay: float):
        # The module the optimizer trains, not a DDP or torch.compile wrapper of it: those
        # wrap this same object, so its tensors are the ones each step changes.
        self.source = model
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay

    @staticmethod
    def _tensors(model: nn.Module) -> tuple[list, list, list]:
        buffers = list(model.buffers())
        return (
            list(model.parameters()),
            [b for b in buffers if b.is_floating_point()],
            [b for b in buffers if not b.is_floating_point()],
        )

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average towards the source's current weights."""
        mine, theirs = self._tensors(self.module), self._tensors(self.source)
        for ours, source in zip(mine[:2], theirs[:2], strict=True):
            if ours:
                torch._foreach_lerp_(ours, [t.detach() for t in source], 1.0 - self.decay)
        for ours, source in zip(mine[2], theirs[2], strict=True):
            ours.copy_(source)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
