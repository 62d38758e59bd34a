"""What the user sees while training: a rich progress bar on a terminal, one plain line per
epoch elsewhere (SLURM logs, CI). Only the main process shows anything."""

from __future__ import annotations

import math
import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Column

_IMPORTED_AT = time.time()


def epoch_line(record: dict, epochs: int, width: int | None = None) -> str:
    """The epoch's one line; on a terminal narrower than it (width), a shorter form that
    keeps every figure but the speed, so that it does not wrap."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    if record.get("valid_loss") is not None:
        parts.append(f"valid loss {record['valid_loss']:.4f} acc {record['valid_accuracy']:.4f}")
    parts += [
        f"lr {record['lr']:.2e}",
        f"{record['epoch_time']:.1f} s",
        f"{record['images_per_sec']:,.0f} img/s",
    ]
    if record.get("is_best"):
        parts.append("best")
    line = " | ".join(parts)
    if width is None or len(line) <= width:
        return line
    short = [f"epoch {record['epoch']}/{epochs}", f"train {record['train_loss']:.4f}"]
    if record.get("valid_loss") is not None:
        short.append(f"valid {record['valid_loss']:.4f} acc {record['valid_accuracy']:.4f}")
    short += [f"lr {record['lr']:.1e}", f"{record['epoch_time']:.1f}s"]
    if record.get("is_best"):
        short.append("best")
    return "  ".join(short)


class Reporter:
    """The main process's output. On a terminal, a progress bar per epoch with the running
    training loss, images/s and the time left; elsewhere only the epoch lines."""

    # The bar is redrawn at most this often, and only then is the running loss read from the
    # device: the step loop itself never waits for the device.
    REFRESH_SECONDS = 0.25

    def __init__(self, is_main: bool, now=time.monotonic):
        self.enabled = is_main
        self.now = now  # the clock of the bar's estimates
        # Plain text when not on a terminal: no colour codes or bar redraws in log files.
        self.console = Console(file=sys.stdout, highlight=False)
        self.live = self.enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None
        self._clock = EpochClock()
        self._epoch_seconds: float | None = None  # of the latest whole epoch, for the run's time

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False, soft_wrap=True)
            if not self.live:
                sys.stdout.flush()

    def epoch_start(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        done: int = 0,
        images_per_step: int = 0,
        may_stop_early: bool = False,
    ) -> None:
        if not self.live:
            return
        self._clock = EpochClock(
            epoch, epochs, steps, done, images_per_step, may_stop_early, self._epoch_seconds
        )
        self._clock.opened = self.now()
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            # A short bar: at 80 columns the step count and the status must still fit.
            BarColumn(bar_width=12),
            # The step count keeps its width; the status is what a narrow terminal cuts.
            MofNCompleteColumn(
                table_column=Column(no_wrap=True, min_width=2 * len(str(steps)) + 1)
            ),
            TextColumn(
                "{task.fields[status]}", table_column=Column(no_wrap=True, overflow="ellipsis")
            ),
            console=self.console,
            transient=True,
            auto_refresh=False,  # redrawn by step(), never by a thread of its own
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, completed=done, status="")
        self._progress.refresh()

    def close(self) -> None:
        """Take the bar off the screen (a stop that ends the process from another thread:
        without this the bar stays drawn, and the shell's prompt follows it on its line)."""
        progress, self._progress = self._progress, None
        if progress is not None:
            progress.stop()

    def step(self, completed: int, loss_sum=None, count: int = 0) -> None:
        """After each training step. loss_sum: this epoch's summed training loss so far on
        this rank (a device tensor), count: its number of images."""
        progress = self._progress  # once: close() may run in the stop signal's thread
        if progress is None:
            return
        now = self.now()
        if not self._clock.due(completed, now, self.REFRESH_SECONDS):
            return
        loss = float(loss_sum) / count if loss_sum is not None and count else None
        progress.update(
            self._task, completed=completed, status=self._clock.status(completed, now, loss)
        )
        progress.refresh()

    def epoch_end(self, record: dict | None, epochs: int) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            if record is not None and self._clock.started_at_step == 0:
                self._epoch_seconds = self.now() - self._clock.opened
        if record is not None:
            self.print(epoch_line(record, epochs, self.console.width if self.live else None))


class EpochClock:
    """Speed and time left of one epoch, measured from its first finished step on (the first
    step of a run includes one-off start-up work that would skew every estimate), and shown
    once a second of steps has been measured."""

    MEASURE_SECONDS = 1.0

    def __init__(
        self,
        epoch: int = 0,
        epochs: int = 0,
        steps: int = 0,
        done: int = 0,
        images_per_step: int = 0,
        may_stop_early: bool = False,
        epoch_seconds: float | None = None,
    ):
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.started_at_step = done
        self.images_per_step = images_per_step
        self.may_stop_early = may_stop_early
        self.epoch_seconds = epoch_seconds
        self.opened = 0.0  # when the epoch started
        self.first: tuple[int, float] | None = None  # (step, time) of the first step seen
        self.last_refresh = -math.inf

    def due(self, completed: int, now: float, every: float) -> bool:
        """Whether to redraw now: the first step, the last one, and then every `every` s."""
        if self.first is None:
            self.first = (completed, now)
            self.last_refresh = now
            return True
        if completed < self.steps and now - self.last_refresh < every:
            return False
        self.last_refresh = now
        return True

    def status(self, completed: int, now: float, loss: float | None) -> str:
        """'loss 0.5000, 107 img/s, 0:04 left (run ≤0:29)': short enough for 80 columns
        with the epoch, the bar and the step count before it."""
        parts = [f"loss {loss:.4f}"] if loss is not None else []
        run = ""
        step0, t0 = self.first or (completed, now)
        if completed > step0 and now - t0 >= self.MEASURE_SECONDS:
            seconds_per_step = (now - t0) / (completed - step0)
            if self.images_per_step:
                parts.append(f"{self.images_per_step / seconds_per_step:,.0f} img/s")
            epoch_left = (self.steps - completed) * seconds_per_step
            parts.append(f"{clock(epoch_left)} left")
            if self.epoch_seconds is not None and self.epoch < self.epochs:
                run_left = epoch_left + (self.epochs - self.epoch) * self.epoch_seconds
                bound = "≤" if self.may_stop_early else ""  # early stopping may end it sooner
                run = f" (run {bound}{clock(run_left)})"
        return ", ".join(parts) + run


def clock(seconds: float) -> str:
    """0:07, 12:30, 1:02:03."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def seconds_since_process_start() -> float:
    """Wall time since this process was started by the OS (Linux), else since import."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time() - _IMPORTED_AT
