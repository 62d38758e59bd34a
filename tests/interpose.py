"""Run `python -m fmnist_accel.train` with library calls watched or broken from outside.

    python tests/interpose.py [train options]          (or through accelerate launch)

Unlike faults.py, this patches only the libraries the package calls (torch, safetensors),
never the package itself, so the tests that use it hold whatever the package's modules are
called. Environment variables (all optional):

  SPY_LOSS_DIR=DIR     append one JSON line per torch.nn.functional.cross_entropy call to
                       DIR/rank<R>.jsonl: {"train": grad enabled, "labels": [...] (training
                       calls only), "label_smoothing": x}
  TEAR_WRITE=LIB:N     at the N-th file this process writes with LIB (`safetensors`:
                       safetensors.torch.save_file, `torch`: torch.save), write it, cut it to
                       half its size, then SIGKILL this process: a write torn by a kill
"""

from __future__ import annotations

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


def tear_nth_write(library: str, n: int) -> None:
    module, name, path_keyword = {
        "safetensors": (safetensors.torch, "save_file", "filename"),
        "torch": (torch, "save", "f"),
    }[library]
    real = getattr(module, name)
    calls = 0

    def tearing(*args, **kwargs):
        nonlocal calls
        calls += 1
        result = real(*args, **kwargs)
        if calls == n:
            path = args[1] if len(args) > 1 else kwargs[path_keyword]
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, tearing)


if __name__ == "__main__":
    if os.environ.get("SPY_LOSS_DIR"):
        spy_on_cross_entropy(Path(os.environ["SPY_LOSS_DIR"]))
    if os.environ.get("TEAR_WRITE"):
        library, count = os.environ["TEAR_WRITE"].split(":")
        tear_nth_write(library, int(count))
    sys.argv = ["python -m fmnist_accel.train", *sys.argv[1:]]
    runpy.run_module("fmnist_accel.train", run_name="__main__", alter_sys=True)
