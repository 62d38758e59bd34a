"""Run `python -m fmnist_accel.train` with library calls watched or broken from outside.

    python tests/interpose.py [train options]          (or through accelerate launch)

Unlike faults.py, this patches only the libraries the package calls (torch, safetensors,
Python's own file opening), never the package itself, so the tests that use it hold whatever
the package's modules are called and however they write. Environment variables (optional):

  SPY_LOSS_DIR=DIR     append one JSON line per torch.nn.functional.cross_entropy call to
                       DIR/rank<R>.jsonl: {"train": grad enabled, "labels": [...] (training
                       calls only), "label_smoothing": x}
  TEAR_WRITE=NAME:N    the N-th file this process writes whose name contains NAME (e.g.
                       `last.safetensors`, which a temporary `.last.safetensors.x.tmp` also
                       contains) gets about half its bytes, then the process is SIGKILLed:
                       a write torn by a kill. Writes are counted however they are made:
                       open() or Path.write_bytes() in a write mode, safetensors'
                       save_file(), torch.save() to a path.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import runpy
import signal
import sys
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

RANK = int(os.environ.get("RANK", "0"))


def spy_on_cross_entropy(folder: Path) -> None:
    real = F.cross_entropy
    log = folder / f"rank{RANK}.jsonl"

    def watched(logits, labels, *args, **kwargs):
        train = torch.is_grad_enabled()
        entry = {"train": train, "label_smoothing": kwargs.get("label_smoothing", 0.0)}
        if train:
            entry["labels"] = labels.tolist()
        with open(log, "a") as f:
            f.write(json.dumps(entry) + "\n")
        return real(logits, labels, *args, **kwargs)

    F.cross_entropy = watched


class TornFile:
    """A file open for writing whose first write stops halfway, and the process with it."""

    def __init__(self, file):
        self.file = file

    def write(self, data) -> None:
        view = memoryview(data).cast("B")
        self.file.write(view[: len(view) // 2])
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def __getattr__(self, name):
        return getattr(self.file, name)


def tear_nth_write(name: str, n: int) -> None:
    writes = 0

    def is_nth(path) -> bool:
        nonlocal writes
        if not isinstance(path, str | os.PathLike) or name not in os.fspath(path):
            return False
        writes += 1
        return writes == n

    real_open = io.open

    def tearing_open(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        # "r+" opens (atomic_write's fsync) change nothing: only w, a and x count
        return TornFile(opened) if any(m in mode for m in "wax") and is_nth(file) else opened

    io.open = builtins.open = tearing_open

    # Libraries that write a path themselves (Rust, C++): write, cut in half, kill.
    def tearing_library(real, path_keyword):
        def call(*args, **kwargs):
            path = args[1] if len(args) > 1 else kwargs.get(path_keyword)
            result = real(*args, **kwargs)
            if is_nth(path):
                with real_open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    safetensors.torch.save_file = tearing_library(safetensors.torch.save_file, "filename")
    torch.save = tearing_library(torch.save, "f")


if __name__ == "__main__":
    if os.environ.get("SPY_LOSS_DIR"):
        spy_on_cross_entropy(Path(os.environ["SPY_LOSS_DIR"]))
    if os.environ.get("TEAR_WRITE"):
        name, count = os.environ["TEAR_WRITE"].rsplit(":", 1)
        tear_nth_write(name, int(count))
    sys.argv = ["python -m fmnist_accel.train", *sys.argv[1:]]
    runpy.run_module("fmnist_accel.train", run_name="__main__", alter_sys=True)
