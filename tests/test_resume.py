"""A run killed at any moment and resumed ends exactly like a run never interrupted.

Single process on the CPU, same seed, --deterministic, with every kind of state in play:
cnn-bn (dropout RNG, BatchNorm buffers), on-device augmentation, an EMA of the weights, Adam
and the plateau scheduler. Faults are real: SIGKILL at a training step, SIGKILL in the middle
of a checkpoint write, SIGTERM (the graceful stop that saves mid-epoch).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from support.fakedata import write_fashion_dir
from support.processes import BIN, assert_same_training, metrics, run_command, train, why

pytestmark = pytest.mark.slow

EPOCHS = 4
STEPS_PER_EPOCH = 10  # 500 training images at batch 50


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=100)


def options(data_dir: Path, out: Path) -> list[str]:
    return ["--model", "cnn-bn", "--epochs", str(EPOCHS), "--batch-size", "50", "--augment",
            "--ema-decay", "0.9", "--deterministic", "--data-dir", str(data_dir),
            "--output-dir", str(out), "--run-name", "run", "--resume", "auto"]  # fmt: skip


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    proc = train(1, options(data_dir, out))
    assert proc.returncode == 0, why(proc)
    return out / "run"


def assert_same_run(run: Path, reference: Path) -> None:
    assert_same_training(run, reference, EPOCHS)
    for name in ("best", "last"):
        with (
            safe_open(run / f"{name}.safetensors", "pt") as fa,
            safe_open(reference / f"{name}.safetensors", "pt") as fb,
        ):
            meta_a = json.loads(fa.metadata()["fmnist_accel"])
            meta_b = json.loads(fb.metadata()["fmnist_accel"])
        meta_a["config"].pop("output_dir"), meta_b["config"].pop("output_dir")
        assert meta_a == meta_b
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert not list(run.glob(".*.tmp")), "temporary files of interrupted writes were left"


def killed(proc, sig: int) -> None:
    assert proc.returncode in (-sig, 128 + sig, 75), why(proc)


def test_kills_at_several_points_resume_to_identical_results(data_dir, reference, tmp_path):
    args = options(data_dir, tmp_path)
    run = tmp_path / "run"

    # 1. SIGKILL in the middle of epoch 2 (its 7th step): resumes from the end of epoch 1.
    killed(train(1, args, faults={"FAULT_KILL_STEP": str(STEPS_PER_EPOCH + 7)}), signal.SIGKILL)
    assert [r["epoch"] for r in metrics(run)] == [1]

    # 2. SIGKILL while last.safetensors of epoch 2 is half written (resume.pt of epoch 2 is
    # already saved): the old file survives.
    proc = train(1, args, faults={"TEAR_WRITE": "last.safetensors:1"})
    killed(proc, signal.SIGKILL)
    assert list(run.glob(".last.safetensors.*.tmp")), "the kill should come mid-write"
    meta = safe_open(run / "last.safetensors", "pt").metadata()
    assert json.loads(meta["fmnist_accel"])["epoch"] == 1

    # 3. The next start writes epoch 2's checkpoints again from resume.pt, trains epoch 3, and
    # is killed while resume.pt is half written.
    proc = train(1, args, faults={"TEAR_WRITE": "resume.pt:1"})
    killed(proc, signal.SIGKILL)
    assert "resuming after epoch 2" in proc.stdout and "rewrote last" in proc.stdout
    meta = safe_open(run / "last.safetensors", "pt").metadata()
    assert json.loads(meta["fmnist_accel"])["epoch"] == 2  # repaired; epoch 3's never came

    # 4. SIGTERM in step 5 of the next epoch: saves step 4's state at once and exits 75.
    proc = train(1, args, faults={"FAULT_TERM_STEP": "5"})
    assert proc.returncode == 75, why(proc)
    assert "state saved" in proc.stdout

    # 5. Resume to the end.
    proc = train(1, args)
    assert proc.returncode == 0, why(proc)
    assert "resuming after epoch" in proc.stdout and ", at step 4 of epoch " in proc.stdout
    assert_same_run(run, reference)


def test_compiled_model_checkpoints_load_and_resume(data_dir, tmp_path):
    """torch.compile wraps the model; its checkpoints and resume state must hold the plain
    module's keys. The launcher's dynamo setting (here the fast 'eager' backend) compiles
    without --compile, as a default accelerate config with dynamo_backend set would."""
    args = ["--model", "cnn", "--epochs", "2", "--batch-size", "50", "--data-dir", str(data_dir),
            "--output-dir", str(tmp_path), "--run-name", "c", "--resume", "auto"]  # fmt: skip
    faults = {"ACCELERATE_DYNAMO_BACKEND": "EAGER", "FAULT_TERM_STEP": "13"}
    stopped = train(1, args, faults=faults)
    assert stopped.returncode == 75, why(stopped)
    assert "torch.compile" in stopped.stdout
    resumed = train(1, args, faults={"ACCELERATE_DYNAMO_BACKEND": "EAGER"})
    assert resumed.returncode == 0, why(resumed)
    assert "resuming after epoch 1, at step 2 of epoch 2" in resumed.stdout
    for name in ("best", "last"):
        keys = load_file(tmp_path / "c" / f"{name}.safetensors").keys()
        assert keys and not any(k.startswith("_orig_mod.") for k in keys)
    eval_proc = run_command(
        [str(BIN / "fmnist-accel"), "eval", "last", "--run-dir", str(tmp_path / "c"), "--json"]
    )
    assert eval_proc.returncode == 0, eval_proc.stderr
    assert json.loads(eval_proc.stdout)["num_samples"] == 100
