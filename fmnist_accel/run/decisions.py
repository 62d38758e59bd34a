"""What a run decides from its global validation values, once per epoch and identically on
every rank: the learning-rate schedule, early stopping, and which epoch is the best.

The values come from engine/evaluation.evaluate, which is exact over all ranks, so no rank
can decide differently from another; nothing here communicates.
"""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig

# Schedules stepped after every optimizer step; their learning rates are fixed in advance by
# the run's total number of steps.
PER_STEP_SCHEDULERS = ("onecycle", "cosine")


def make_schedulers(cfg: TrainConfig, optimizer, total_steps: int):
    """(per-epoch plateau scheduler or None, per-step scheduler or None).

    Neither goes through accelerator.prepare(): a prepared ReduceLROnPlateau is stepped once
    per process per call (docs/architecture.md, "Pitfalls"). Every rank steps its own with the
    same global values.
    """
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "plateau":
        plateau = sched.ReduceLROnPlateau(
            optimizer, mode="min", patience=cfg.plateau_patience, factor=cfg.plateau_factor
        )
        return plateau, None
    if cfg.scheduler == "onecycle":
        onecycle = sched.OneCycleLR(
            optimizer,
            max_lr=optimizer.param_groups[0]["lr"],
            # +1: the scheduler also steps after the last optimizer step, and OneCycleLR's
            # linear annealing would extrapolate past its end there (to a negative lr).
            total_steps=total_steps + 1,
            pct_start=0.25,
            anneal_strategy="linear",
            cycle_momentum=False,
        )
        return None, onecycle
    if cfg.scheduler == "cosine":
        return None, sched.CosineAnnealingLR(optimizer, T_max=total_steps)  # ends at lr 0
    return None, None


class EarlyStopping:
    """Stop when the monitored loss stops improving, with the seed's counting.

    An epoch improves when its loss is below the best so far by more than min_delta; it
    then becomes the best and the count of bad epochs returns to 0. Otherwise the count
    grows by one, and `step` returns True once the count exceeds `patience`: with
    patience 10, the 11th non-improving epoch in a row stops training (the seed's
    `trigger > patience`, and the same counting as torch's ReduceLROnPlateau).
    """

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf
        self.bad_epochs = 0

    def step(self, loss: float) -> bool:
        if loss < self.best - self.min_delta:
            self.best = loss
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs > self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state["best"])
        self.bad_epochs = int(state["bad_epochs"])


class BestTracker:
    """The best value of the monitored metric so far (strictly better replaces it)."""

    def __init__(self, metric: str):
        self.metric = metric
        self.maximize = metric.endswith("accuracy")
        self.value: float | None = None
        self.epoch: int | None = None

    def update(self, value: float, epoch: int) -> bool:
        better = self.value is None or (value > self.value if self.maximize else value < self.value)
        if better:
            self.value, self.epoch = value, epoch
        return better

    def state_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.epoch = state["value"], state["epoch"]
