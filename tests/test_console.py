"""What a training run shows: the hardware line and the progress bar's figures, and that the
bar reads the running loss from the device only when it redraws."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from fmnist_accel.cluster import accelerator as hardware
from fmnist_accel.run.console import Reporter, clock, epoch_line


# ------------------------------------------------------------------------------------------
# The hardware line
# ------------------------------------------------------------------------------------------
def fake_accelerator(device: str, processes: int, precision: str = "no", backend=None):
    return SimpleNamespace(
        device=torch.device(device),
        num_processes=processes,
        mixed_precision=precision,
        state=SimpleNamespace(backend=backend),
    )


@pytest.fixture
def threads(monkeypatch):
    def set_threads(n: int) -> None:
        monkeypatch.setattr(hardware.torch, "get_num_threads", lambda: n)

    return set_threads


def test_hardware_in_words_on_cpus(threads, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    threads(2)
    assert hardware.describe(fake_accelerator("cpu", 1)) == "1 process, CPU, 2 threads; fp32"
    threads(1)
    two = fake_accelerator("cpu", 2, "bf16", backend="gloo")
    assert hardware.describe(two) == "2 processes, CPU (gloo), 1 thread each; bf16 mixed precision"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one rank on each of two machines
    assert hardware.describe(two).startswith("2 processes on 2 machines, CPU (gloo)")


def test_hardware_in_words_on_gpus(monkeypatch):
    monkeypatch.setattr(hardware.torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    one = fake_accelerator("cuda:0", 1, "bf16")
    assert hardware.describe(one) == "1 GPU: NVIDIA H200; bf16 mixed precision"
    many = fake_accelerator("cuda:0", 16, "fp16", backend="nccl")
    assert hardware.describe(many) == (
        "16 GPUs on 2 machines: NVIDIA H200 (nccl); fp16 mixed precision"
    )


# ------------------------------------------------------------------------------------------
# The progress bar
# ------------------------------------------------------------------------------------------
@dataclass
class DeviceLoss:
    """Stands for the device tensor of the summed loss: counts how often it is read."""

    value: float
    reads: list = field(default_factory=list)

    def __float__(self) -> float:
        self.reads.append(self.value)
        return self.value


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def terminal_reporter(clock: FakeClock) -> tuple[Reporter, io.StringIO]:
    """A Reporter that draws its bar into a string, as on a 200-column terminal."""
    screen = io.StringIO()
    reporter = Reporter(True, now=clock)
    reporter.console = Console(file=screen, force_terminal=True, width=200, color_system=None)
    reporter.live = True
    return reporter, screen


def test_the_loss_is_read_only_when_the_bar_redraws():
    """1000 steps of a millisecond: the running loss is read at the first and last step and
    about every REFRESH_SECONDS in between, never once per step."""
    now = FakeClock()
    reporter, _ = terminal_reporter(now)
    loss = DeviceLoss(0.5 * 64)
    reporter.epoch_start(1, 1, 1000, images_per_step=64)
    for step in range(1, 1001):
        now.t += 0.001
        reporter.step(step, loss, 64)
    reporter.epoch_end(None, 1)
    redraws = 1 + 1.0 / Reporter.REFRESH_SECONDS + 1
    assert 3 <= len(loss.reads) <= redraws


@pytest.mark.parametrize("is_main", [True, False])
def test_without_a_bar_the_loss_is_never_read(is_main):
    """Not on a terminal (a log file, a SLURM job) or not the main process: no bar, and
    the device is never asked for the loss."""
    reporter = Reporter(is_main)
    reporter.console = Console(file=io.StringIO(), force_terminal=False)
    reporter.live = is_main and reporter.console.is_terminal
    loss = DeviceLoss(1.0)
    reporter.epoch_start(1, 1, 10)
    for step in range(1, 11):
        reporter.step(step, loss, 64)
    assert loss.reads == []


def test_the_bar_shows_loss_speed_and_time_left_for_the_epoch_then_the_run():
    now = FakeClock()
    reporter, screen = terminal_reporter(now)
    record = {"epoch": 1, "train_loss": 0.5, "lr": 1e-3, "epoch_time": 25.0, "images_per_sec": 1}
    # Epoch 1: 10 steps of 2 s; the first one is slow (start-up) and does not count.
    reporter.epoch_start(1, 3, 10, images_per_step=64, may_stop_early=True)
    now.t = 9.0
    reporter.step(1, DeviceLoss(2.0 * 64), 64)
    assert "loss 2.0000" in screen.getvalue() and "left" not in screen.getvalue()
    for step in range(2, 6):
        now.t += 2.0
        reporter.step(step, DeviceLoss(1.5 * 64 * step), 64 * step)
    # 2 s a step, 64 images a step: 32 images/s; 5 steps to go: 10 s left; no run time yet.
    assert "5/10 loss 1.5000, 32 img/s, 0:10 left" in screen.getvalue()
    assert "run" not in screen.getvalue()
    now.t = 25.0
    reporter.epoch_end(record, 3)  # the epoch took 25 s, validation included
    # Epoch 2: its own speed, and the run's time once an epoch is known: this epoch's 14 s
    # left plus one more epoch of 25 s, "at most" because early stopping may end it sooner.
    screen.seek(0)
    screen.truncate()
    reporter.epoch_start(2, 3, 10, images_per_step=64, may_stop_early=True)
    now.t = 27.0
    reporter.step(1, DeviceLoss(64.0), 64)
    now.t = 28.2
    reporter.step(3, DeviceLoss(64.0), 128)
    assert "3/10 loss 0.5000, 107 img/s, 0:04 left (run ≤0:29)" in screen.getvalue()


def test_at_80_columns_the_bar_keeps_its_step_count_and_the_epoch_line_does_not_wrap():
    now = FakeClock()
    reporter, screen = terminal_reporter(now)
    reporter.console = Console(file=screen, force_terminal=True, width=80, color_system=None)
    reporter._epoch_seconds = 300.0
    reporter.epoch_start(12, 50, 1172, images_per_step=512, may_stop_early=True)
    now.t = 1.0
    reporter.step(1, DeviceLoss(0.5 * 512), 512)
    now.t = 3.5
    reporter.step(1000, DeviceLoss(0.5 * 512 * 1000), 512 * 1000)
    drawn = [line for line in screen.getvalue().split("\r") if "1000/1172" in line]
    assert drawn and "(run ≤" in drawn[-1], screen.getvalue()
    record = {"epoch": 12, "train_loss": 0.2345, "valid_loss": 0.2567,
              "valid_accuracy": 0.9123, "lr": 1e-3, "epoch_time": 123.4,
              "images_per_sec": 123456, "is_best": True}  # fmt: skip
    screen.seek(0)
    screen.truncate()
    reporter.epoch_end(record, 50)
    # The bar is cleared (escape codes), then the line: one line of at most 80 characters.
    # (rich draws the bar once more as it stops, then clears it)
    printed = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", screen.getvalue()).strip("\n")
    printed = printed.splitlines()[-1]
    assert printed.startswith("epoch 12/50  train") and len(printed) <= 80, printed
    assert "valid 0.2567 acc 0.9123" in printed and printed.endswith("best"), printed
    wide = epoch_line(record, 50)  # a log file keeps every figure
    assert "123,456 img/s" in wide and "train loss 0.2345" in wide


def test_no_estimate_before_a_second_of_steps_is_measured():
    now = FakeClock()
    reporter, screen = terminal_reporter(now)
    reporter.epoch_start(1, 1, 100, images_per_step=64)
    shown = []
    for step in range(1, 6):  # 0.3 s a step; the first one only starts the measurement
        now.t += 0.3
        reporter.step(step, DeviceLoss(64.0 * step), 64 * step)
        shown.append("left" in screen.getvalue())
    assert shown == [False, False, False, False, True]  # 1.2 s after the first step


def test_clock_format():
    assert [clock(s) for s in (0, 7.4, 59.6, 750, 3723)] == [
        "0:00",
        "0:07",
        "1:00",
        "12:30",
        "1:02:03",
    ]


# ------------------------------------------------------------------------------------------
# A stop signal's message
# ------------------------------------------------------------------------------------------
def test_the_stop_message_clears_the_bar_line_only_while_the_parent_lives(monkeypatch):
    """On a terminal the message replaces the progress bar's line; once the launcher that
    started the run has died of the same Ctrl-C, that line is the shell's prompt: the message
    goes below it instead. In a log file, the bare line."""
    from fmnist_accel.cluster import stop_signals as preemption

    written, tty, parent = [], [True], [preemption._PARENT]
    fake_os = SimpleNamespace(
        write=lambda fd, data: written.append((fd, data)),
        isatty=lambda fd: tty[0],
        getppid=lambda: parent[0],
    )
    monkeypatch.setattr(preemption, "os", fake_os)
    preemption._say("bar still there")
    parent[0] = 1  # reparented: the launcher has gone
    preemption._say("launcher gone")
    tty[0] = False
    preemption._say("log file")
    assert written == [
        (2, b"\r\x1b[2Kbar still there\n"),
        (2, b"\nlauncher gone\n"),
        (2, b"log file\n"),
    ]
