"""Every file is written whole or not at all (store/atomic.py): a new file renamed over the
old one, a failed write that leaves the old file and no temporary one, checkpoints written
through one temporary file of ours; and a process killed in the middle of writing a
checkpoint or resume.pt leaves the previous file whole: the test looks at the files
themselves. tests/support/harness.py lets the N-th write of a file whose name contains
`last.safetensors` (or `resume.pt`) put down half its bytes and SIGKILLs the process,
whichever file the package wrote to (its own temporary file, or the checkpoint itself) and
however (open(), safetensors, torch.save)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support.errors import one_line
from support.fakedata import write_fashion_dir
from support.processes import (
    HARNESS,
    launch_command,
    metrics,
    process_env,
    run_command,
    summary,
    why,
)

from fmnist_accel.engine.models import build_model
from fmnist_accel.errors import WriteFailed
from fmnist_accel.store.atomic import atomic_write, atomic_write_text
from fmnist_accel.store.checkpoint import save_model_checkpoint


def tmp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def mlp_checkpoint(path: Path, seed: int = 0, **meta) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp")
    save_model_checkpoint(path, model.state_dict(), {"model": "mlp", "epoch": 3, **meta})
    return model


# ------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_write_replaces_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "last.safetensors"
    atomic_write_text(target, "old")
    old_inode = target.stat().st_ino
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_ino != old_inode  # a new file renamed over, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "best.safetensors"
    atomic_write_text(target, "good")

    def half_then_fail(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteFailed) as failed:
        atomic_write(target, half_then_fail)
    message = one_line(failed)
    assert f"cannot write {target}: No space left on device (" in message
    assert re.search(r"\(\d+(\.\d)? (GB|MB|kB|bytes) free there\)", message), message
    assert target.read_text() == "good"
    assert tmp_leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_checkpoint_overwrite_is_atomic(tmp_path):
    path = tmp_path / "last.safetensors"
    mlp_checkpoint(path, seed=0)
    first = load_file(path)
    second_model = mlp_checkpoint(path, seed=1)
    second = load_file(path)
    assert not torch.equal(first["net.1.weight"], second["net.1.weight"])
    assert torch.equal(second["net.1.weight"], second_model.state_dict()["net.1.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]


def test_checkpoint_writes_go_through_one_temporary_file_of_ours(tmp_path):
    """Every name that appears in the folder while checkpoints are written is the target or
    atomic_write's .<target>.<random>.tmp. safetensors' save_file writes through a
    .tmpXXXXXX file of its own first: a kill during it left that file behind, unknown to the
    cleanup of the time (run_folder.TEMP_FILE_PATTERNS now also removes such leftovers)."""
    import threading

    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(os.listdir(tmp_path))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for seed in range(3):  # 40 MB each: long enough writes to be seen
            save_model_checkpoint(
                tmp_path / "last.safetensors", {"w": torch.full((10_000_000,), float(seed))}, {}
            )
    finally:
        done.set()
        watcher.join()
    temporary = seen - {"last.safetensors"}
    assert temporary, "the watcher saw no temporary file: it proves nothing"
    others = [n for n in temporary if not Path(n).match(".last.safetensors.*.tmp")]
    assert others == [], others


def train_tearing(args: list[str], tear: str | None):
    env = process_env(OMP_NUM_THREADS="1", **({"TEAR_WRITE": tear} if tear else {}))
    return run_command(launch_command(1, [str(HARNESS), *args]), env=env)


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
