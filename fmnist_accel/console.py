"""What the user sees while training: a rich progress bar on a terminal, one plain line per
epoch elsewhere (SLURM logs, CI). Only the main process shows anything."""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

_IMPORTED_AT = time.time()


def epoch_line(record: dict, epochs: int) -> str:
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
    return " | ".join(parts)


class Reporter:
    def __init__(self, is_main: bool):
        self.enabled = is_main
        # Plain text when not on a terminal: no colour codes or bar redraws in log files.
        self.console = Console(file=sys.stdout, highlight=False)
        self.live = self.enabled and self.console.is_terminal
        self._progress: Progress | None = None
        self._task = None

    def print(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, markup=False, soft_wrap=True)
            if not self.live:
                sys.stdout.flush()

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if not self.live:
            return
        self._progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=steps, completed=done)

    def step(self, completed: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed)

    def epoch_end(self, record: dict | None, epochs: int) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if record is not None:
            self.print(epoch_line(record, epochs))


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
