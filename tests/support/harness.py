"""Run `python -m fmnist_accel.train` with faults put in, or library calls watched, from outside.

    python tests/support/harness.py [train options]          (or through accelerate launch)

It patches only the libraries the package calls (torch, safetensors, Python's own file
opening), never the package itself, so the tests that use it hold whatever the package's
modules are called and however they write. A training step is a call of
torch.nn.functional.cross_entropy with gradients enabled (evaluation runs without them).

Environment variables choose the faults (all optional):
  FAULT_PID_DIR=DIR      write DIR/rank<R>.pid, so a test can signal one rank
  FAULT_NAN_RANK=R       ...on this rank the training loss becomes NaN
  FAULT_NAN_STEP=K       ...from its K-th training step on (1-based, counted per process)
  FAULT_ONLY_RANK=R      the step and write faults below strike rank R only (default: all)
  FAULT_KILL_STEP=K      SIGKILL this process at its K-th training step
  FAULT_TERM_STEP=K      SIGTERM this process at its K-th training step (a graceful stop)
  FAULT_TERM_AGAIN_S=S   ...and once more S seconds later (the same request, twice)
  FAULT_STOP_STEP=K      SIGSTOP this process at its K-th training step (a hung process)
  FAULT_PAUSE_STEP=K     at its K-th training step, create the file FAULT_PAUSE_FILE and wait
                         (at most 120 s) until the test deletes it
  FAULT_STEP_SECONDS=S   every training step takes S seconds more (a slow step)
  FAULT_SLOW_STEP=K      ...and the K-th FAULT_SLOW_STEP_S seconds more: it creates the file
                         FAULT_SLOW_FILE when it begins, after the forward pass
  FAULT_TERM_EVAL=N      SIGTERM this process at its N-th evaluation call (a validation or test
                         batch: cross_entropy without gradients), FAULT_KILL_EVAL=N: SIGKILL
  FAULT_ONCE_FILE=PATH   the kill and stop faults strike once in all: the first creates PATH,
                         and none strikes while it exists
  TEAR_WRITE=NAME:N      the N-th file this process writes whose name contains NAME (e.g.
                         `last.safetensors`, which a temporary `.last.safetensors.x.tmp` also
                         contains) gets about half its bytes, then the process is SIGKILLed: a
                         write torn by a kill. Writes are counted however they are made: open()
                         or Path.write_bytes() in a write mode, safetensors' save_file(),
                         torch.save() to a path.
  SPY_LOSS_DIR=DIR       append one JSON line per cross_entropy call to DIR/rank<R>.jsonl:
                         {"train": grad enabled, "labels": [...] (training calls only),
                         "label_smoothing": x}

Under an elastic launcher (--max_restarts) the faults strike the first attempt only: the
processes of a restarted group (TORCHELASTIC_RESTART_COUNT > 0) run without them. Across
machines the count is each launcher's own (a launcher restarted for another's failure keeps
0), so tests there use FAULT_ONCE_FILE.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

RANK = int(os.environ.get("RANK", "0"))


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def faults_strike_here() -> bool:
    """Not in a restarted attempt, and on the rank FAULT_ONLY_RANK names (if any)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return False
    only_rank = env_int("FAULT_ONLY_RANK")
    return only_rank is None or only_rank == RANK


def step_faults():
    """fault(step) for every training step, or None when no step fault is asked for."""
    nan_rank, nan_step = env_int("FAULT_NAN_RANK"), env_int("FAULT_NAN_STEP")
    kill_step, term_step = env_int("FAULT_KILL_STEP"), env_int("FAULT_TERM_STEP")
    stop_step, pause_step = env_int("FAULT_STOP_STEP"), env_int("FAULT_PAUSE_STEP")
    step_seconds = float(os.environ.get("FAULT_STEP_SECONDS") or 0)
    again_s = (
        float(os.environ["FAULT_TERM_AGAIN_S"]) if os.environ.get("FAULT_TERM_AGAIN_S") else None
    )
    slow_step, slow_seconds = (
        env_int("FAULT_SLOW_STEP"),
        float(os.environ.get("FAULT_SLOW_STEP_S") or 0),
    )
    steps = (nan_step, kill_step, term_step, stop_step, pause_step, slow_step)
    if all(v is None for v in steps) and not step_seconds:
        return None
    once = Path(os.environ["FAULT_ONCE_FILE"]) if os.environ.get("FAULT_ONCE_FILE") else None

    def strike(signum: int) -> None:
        if once is not None:
            if once.exists():
                return
            once.touch()
        os.kill(os.getpid(), signum)

    def fault(step: int) -> bool:
        """Strike what is due at this step; True when the loss is to become NaN."""
        if step == kill_step:
            strike(signal.SIGKILL)
        if step == term_step:
            os.kill(os.getpid(), signal.SIGTERM)
            if again_s is not None:
                again = threading.Timer(again_s, os.kill, (os.getpid(), signal.SIGTERM))
                again.daemon = True
                again.start()
        if step == stop_step:
            strike(signal.SIGSTOP)
        if step == pause_step:
            pause = Path(os.environ["FAULT_PAUSE_FILE"])
            pause.touch()
            deadline = time.monotonic() + 120
            while pause.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        if step == slow_step:
            Path(os.environ["FAULT_SLOW_FILE"]).touch()
            sleep_through_signals(slow_seconds)
        if step_seconds:
            sleep_through_signals(step_seconds)
        return nan_rank == RANK and nan_step is not None and step >= nan_step

    return fault


def sleep_through_signals(seconds: float) -> None:
    """A step that is slow the way a long C++ call is: signals do not cut it short."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


def eval_faults():
    """fault(call) for every evaluation call, or None when none is asked for."""
    term, kill = env_int("FAULT_TERM_EVAL"), env_int("FAULT_KILL_EVAL")
    if term is None and kill is None:
        return None

    def fault(call: int) -> None:
        if call == term:
            os.kill(os.getpid(), signal.SIGTERM)
        if call == kill:
            os.kill(os.getpid(), signal.SIGKILL)

    return fault


def watch_cross_entropy(fault, eval_fault, spy_dir: Path | None) -> None:
    real = F.cross_entropy
    log = spy_dir / f"rank{RANK}.jsonl" if spy_dir else None
    steps = evaluations = 0

    def watched(logits, labels, *args, **kwargs):
        nonlocal steps, evaluations
        train = torch.is_grad_enabled()
        if not train and eval_fault is not None:
            evaluations += 1
            eval_fault(evaluations)
        if log is not None:
            entry = {"train": train, "label_smoothing": kwargs.get("label_smoothing", 0.0)}
            if train:
                entry["labels"] = labels.tolist()
            with open(log, "a") as f:
                f.write(json.dumps(entry) + "\n")
        loss = real(logits, labels, *args, **kwargs)
        if train and fault is not None:
            steps += 1
            if fault(steps):
                loss = loss * torch.tensor(float("nan"))
        return loss

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


def install() -> None:
    if os.environ.get("FAULT_PID_DIR"):
        Path(os.environ["FAULT_PID_DIR"], f"rank{RANK}.pid").write_text(str(os.getpid()))
    strikes = faults_strike_here()
    spy = Path(os.environ["SPY_LOSS_DIR"]) if os.environ.get("SPY_LOSS_DIR") else None
    fault = step_faults() if strikes else None
    eval_fault = eval_faults() if strikes else None
    if fault is not None or eval_fault is not None or spy is not None:
        watch_cross_entropy(fault, eval_fault, spy)
    if strikes and os.environ.get("TEAR_WRITE"):
        name, count = os.environ["TEAR_WRITE"].rsplit(":", 1)
        tear_nth_write(name, int(count))


if __name__ == "__main__":
    install()
    sys.argv = ["python -m fmnist_accel.train", *sys.argv[1:]]
    runpy.run_module("fmnist_accel.train", run_name="__main__", alter_sys=True)
