"""A process killed in the middle of writing a checkpoint or resume.pt leaves the previous
file whole: the test looks at the files themselves. tests/interpose.py lets the N-th write of
a file whose name contains `last.safetensors` (or `resume.pt`) put down half its bytes and
SIGKILLs the process, whichever file the package wrote to (its own temporary file, or the
checkpoint itself) and however (open(), safetensors, torch.save)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from fakedata import write_fashion_dir
from launching import REPO, child_env, launch_command, metrics, run, summary, why
from safetensors import safe_open
from safetensors.torch import load_file

INTERPOSE = REPO / "tests" / "interpose.py"


def train_tearing(args: list[str], tear: str | None):
    env = child_env(OMP_NUM_THREADS="1", **({"TEAR_WRITE": tear} if tear else {}))
    return run(launch_command(1, [str(INTERPOSE), *args]), env=env)


def checkpoint_epoch(path: Path) -> int:
    """The epoch of a checkpoint that must be whole: every tensor is read."""
    assert all(torch.isfinite(t).all() for t in load_file(path).values())
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["fmnist_accel"])["epoch"]


def resume_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["epoch"]


def test_writes_killed_halfway_leave_the_previous_files_whole(tmp_path):
    data = write_fashion_dir(tmp_path / "data", n_train=600, n_test=100)
    args = ["--model", "mlp", "--epochs", "3", "--batch-size", "50", "--data-dir", str(data),
            "--output-dir", str(tmp_path / "runs"), "--run-name", "r",
            "--resume", "auto"]  # fmt: skip
    folder = tmp_path / "runs" / "r"

    # Epoch 2 saves resume.pt, then dies halfway through its last.safetensors.
    proc = train_tearing(args, "last.safetensors:2")
    assert proc.returncode == -signal.SIGKILL, why(proc)
    assert checkpoint_epoch(folder / "last.safetensors") == 1
    assert checkpoint_epoch(folder / "best.safetensors") == 1
    assert resume_epoch(folder / "resume.pt") == 2

    # The resume writes epoch 2's checkpoints again, trains epoch 3, and dies halfway
    # through its resume.pt.
    proc = train_tearing(args, "resume.pt:1")
    assert proc.returncode == -signal.SIGKILL, why(proc)
    assert "resuming after epoch 2" in proc.stdout
    assert resume_epoch(folder / "resume.pt") == 2
    assert checkpoint_epoch(folder / "last.safetensors") == 2

    # The next resume finishes, and no piece of a torn write is left in the folder.
    proc = train_tearing(args, None)
    assert proc.returncode == 0, why(proc)
    assert "resuming after epoch 2" in proc.stdout
    assert [r["epoch"] for r in metrics(folder)] == [1, 2, 3]
    assert summary(folder)["status"] == "completed"
    assert checkpoint_epoch(folder / "last.safetensors") == 3
    assert resume_epoch(folder / "resume.pt") == 3
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == [".lock"]
