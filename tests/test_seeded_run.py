"""One run with a non-zero seed and label smoothing, watched from outside (tests/support/harness.py
records what every cross-entropy call saw): each epoch draws a new data order, `eval --split
valid` rebuilds this run's own split, and the validation loss is the plain cross-entropy.
"""

from __future__ import annotations

import json
import math

import pytest
from support.fakedata import write_fashion_dir
from support.processes import (
    HARNESS,
    evaluate_json,
    launch_command,
    metrics,
    process_env,
    run_command,
    why,
)

EPOCHS = 3
BATCH = 50
N_TRAIN = 600  # 500 training and 100 validation images: 10 steps per epoch
SEED = 3
SMOOTHING = 0.3


def smoothed_target_entropy(smoothing: float, classes: int = 10) -> float:
    """The least value a label-smoothed cross-entropy can take: the entropy of its target
    (1 - s + s/K on the true class, s/K on every other), reached when the prediction is it."""
    on, off = 1 - smoothing + smoothing / classes, smoothing / classes
    return -(on * math.log(on) + (classes - 1) * off * math.log(off))


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """(run folder, [one entry per cross-entropy call]) of a 3-epoch MLP run, seed 3."""
    base = tmp_path_factory.mktemp("seeded")
    data = write_fashion_dir(base / "data", n_train=N_TRAIN, n_test=100)
    spy = base / "spy"
    spy.mkdir()
    args = ["--model", "mlp", "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
            "--seed", str(SEED), "--label-smoothing", str(SMOOTHING), "--data-dir", str(data),
            "--output-dir", str(base / "runs"), "--run-name", "r"]  # fmt: skip
    proc = run_command(
        launch_command(1, [str(HARNESS), *args]),
        env=process_env(SPY_LOSS_DIR=str(spy), OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, why(proc)
    calls = [json.loads(line) for line in (spy / "rank0.jsonl").read_text().splitlines()]
    return base / "runs" / "r", calls


@pytest.fixture(scope="module")
def valid_report(seeded_run) -> dict:
    """`eval last --split valid --json` of the seeded run."""
    return evaluate_json(1, ["last", "--run-dir", str(seeded_run[0]), "--split", "valid"])


def epoch_label_orders(calls: list[dict]) -> list[list[int]]:
    """The labels of every training step, in step order, cut into epochs."""
    steps = [c["labels"] for c in calls if c["train"]]
    per_epoch = len(steps) // EPOCHS
    assert per_epoch * EPOCHS == len(steps) and per_epoch == (N_TRAIN * 5 // 6) // BATCH
    return [sum(steps[e * per_epoch : (e + 1) * per_epoch], []) for e in range(EPOCHS)]


def test_every_epoch_draws_a_new_order(seeded_run):
    """With no augmentation, only a new permutation per epoch makes epochs differ."""
    _, calls = seeded_run
    orders = epoch_label_orders(calls)
    # Every epoch sees the same images (the same labels, counted)...
    assert all(sorted(order) == sorted(orders[0]) for order in orders)
    assert len(orders[0]) == N_TRAIN * 5 // 6
    # ...in an order of its own.
    for a in range(EPOCHS):
        for b in range(a + 1, EPOCHS):
            assert orders[a] != orders[b], f"epochs {a + 1} and {b + 1} saw the same order"


def test_eval_of_the_validation_split_uses_the_runs_own_seed(seeded_run, valid_report):
    """`eval --split valid` must rebuild the split of seed 3: another seed's validation
    images would give other figures than the ones the run logged."""
    logged = metrics(seeded_run[0])[-1]
    assert valid_report["epoch"] == logged["epoch"] == EPOCHS
    assert valid_report["num_samples"] == N_TRAIN // 6
    assert valid_report["accuracy"] == logged["valid_accuracy"]
    assert valid_report["loss"] == pytest.approx(logged["valid_loss"], rel=1e-6)


def test_validation_loss_is_plain_cross_entropy_whatever_the_label_smoothing(
    seeded_run, valid_report
):
    run_dir, calls = seeded_run
    # A smoothed loss cannot fall below its target's entropy (1.18 at 0.3)...
    floor = smoothed_target_entropy(SMOOTHING)
    records = metrics(run_dir)
    assert all(r["train_loss"] >= floor for r in records), (floor, records)
    # ...while the validation loss of a model that learned the (easy) fake data does, and
    # equals what `eval` computes (plain cross-entropy, checked against torch in test_cli).
    assert records[-1]["valid_accuracy"] > 0.9
    assert records[-1]["valid_loss"] < floor - 0.3
    assert valid_report["loss"] == pytest.approx(records[-1]["valid_loss"], rel=1e-6)
    # And in the calls themselves: the option reached training, and only training.
    assert {c["label_smoothing"] for c in calls if c["train"]} == {SMOOTHING}
    assert {c["label_smoothing"] for c in calls if not c["train"]} == {0.0}
