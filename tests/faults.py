"""Run `fmnist_accel.train` with faults injected, for tests that need real failures.

    python tests/faults.py [train options]          (or through accelerate launch)

Environment variables choose the faults (all optional):
  FAULT_PID_DIR=DIR          write DIR/rank<R>.pid, so a test can signal one rank
  FAULT_NAN_RANK=R           ...on this rank the training loss becomes NaN
  FAULT_NAN_STEP=K           ...from its K-th training step on (1-based, counted per process)
  FAULT_ONLY_RANK=R          the step and write faults below strike rank R only (default: all)
  FAULT_KILL_STEP=K          SIGKILL this process at its K-th training step
  FAULT_TERM_STEP=K          SIGTERM this process at its K-th training step (a graceful stop)
  FAULT_STOP_STEP=K          SIGSTOP this process at its K-th training step (a hung process)
  FAULT_PAUSE_STEP=K         at its K-th training step, create the file FAULT_PAUSE_FILE and
                             wait (at most 120 s) until the test deletes it
  FAULT_KILL_WRITE=NAME:N    SIGKILL this process during its N-th atomic write of a file named
                             NAME, after half of the new file is on disk and before it
                             replaces the old one
  FAULT_ONCE_FILE=PATH       the kill and stop faults strike once in all: the first creates
                             PATH, and none strikes while it exists
Under an elastic launcher (--max_restarts) the faults strike the first attempt only: the
processes of a restarted group (TORCHELASTIC_RESTART_COUNT > 0) run without them. Across
machines the count is each launcher's own (a launcher restarted for another's failure
keeps 0), so tests there use FAULT_ONCE_FILE.
The package code has no hooks for this: the faults are patched in from outside.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

import fmnist_accel.checkpoint as checkpoint
import fmnist_accel.engine as engine
from fmnist_accel.train import main

RANK = int(os.environ.get("RANK", "0"))


def env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def install_faults() -> None:
    if os.environ.get("FAULT_PID_DIR"):
        Path(os.environ["FAULT_PID_DIR"], f"rank{RANK}.pid").write_text(str(os.getpid()))
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    only_rank = env_int("FAULT_ONLY_RANK")
    if only_rank is not None and only_rank != RANK:
        return

    nan_rank, nan_step = env_int("FAULT_NAN_RANK"), env_int("FAULT_NAN_STEP")
    kill_step = env_int("FAULT_KILL_STEP")
    term_step = env_int("FAULT_TERM_STEP")
    stop_step = env_int("FAULT_STOP_STEP")
    pause_step = env_int("FAULT_PAUSE_STEP")
    real_loss = engine.training_loss
    steps = 0

    once = Path(os.environ["FAULT_ONCE_FILE"]) if os.environ.get("FAULT_ONCE_FILE") else None

    def strike(signum: int) -> None:
        if once is not None:
            if once.exists():
                return
            once.touch()
        os.kill(os.getpid(), signum)

    def faulty_loss(logits, labels, label_smoothing):
        nonlocal steps
        steps += 1
        if kill_step is not None and steps == kill_step:
            strike(signal.SIGKILL)
        if term_step is not None and steps == term_step:
            os.kill(os.getpid(), signal.SIGTERM)
        if stop_step is not None and steps == stop_step:
            strike(signal.SIGSTOP)
        if pause_step is not None and steps == pause_step:
            pause = Path(os.environ["FAULT_PAUSE_FILE"])
            pause.touch()
            deadline = time.monotonic() + 120
            while pause.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        loss = real_loss(logits, labels, label_smoothing)
        if nan_rank == RANK and nan_step is not None and steps >= nan_step:
            loss = loss * torch.tensor(float("nan"))
        return loss

    engine.training_loss = faulty_loss

    if os.environ.get("FAULT_KILL_WRITE"):
        kill_name, kill_count = os.environ["FAULT_KILL_WRITE"].rsplit(":", 1)
        real_write = checkpoint.atomic_write
        writes = 0

        def faulty_atomic_write(path, write):
            nonlocal writes
            writes += Path(path).name == kill_name
            if Path(path).name != kill_name or writes != int(kill_count):
                return real_write(path, write)

            def half_then_die(tmp):
                write(tmp)
                size = os.path.getsize(tmp)
                with open(tmp, "r+b") as f:
                    f.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

            return real_write(path, half_then_die)

        checkpoint.atomic_write = faulty_atomic_write


if __name__ == "__main__":
    install_faults()
    main(sys.argv[1:])
