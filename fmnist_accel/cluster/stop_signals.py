"""Stop requests: SIGTERM, SIGUSR1 (SLURM's warning signal), SIGINT (Ctrl-C) and SIGHUP.

The first signal only sets a flag; the training loop sees it at its next cross-rank check,
every rank finishes the step it is in, saves the resume state together with the others,
and exits with EXIT_PREEMPTED. A second signal, more than a second after the first, exits at
once (files being written are safe: every write is atomic).
"""

from __future__ import annotations

import os
import signal
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
# Under a launcher each rank that gets a signal says so, with its rank.
WHO = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
# A second signal this soon after the first is the same request delivered twice: SLURM signals
# every process of a job (scancel, preemption, the time limit) and torchrun forwards its copy.
DUPLICATE_WINDOW_S = 1.0


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> StopRequest:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            if time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
                return
            _say(f"second stop signal ({signal.Signals(signum).name}): exiting now")
            os._exit(128 + signum)
        self.signum = signum
        self._first_at = time.monotonic()
        _say(
            f"{WHO}received {signal.Signals(signum).name}: finishing the current step and saving "
            "the resume state; send it again to exit at once"
        )


def _say(message: str) -> None:
    """One line on stderr, from a signal handler: os.write, not print, since the handler may
    interrupt a print in progress. On a terminal the line first clears the line the cursor is
    on (the progress bar and the terminal's ^C echo, which would otherwise run into it), but
    only while the process that started this one is still there: `accelerate launch` dies of
    Ctrl-C at once, and the line is then the shell's new prompt, which must stay."""
    if not os.isatty(2):
        lead = ""
    elif os.getppid() == _PARENT:
        lead = "\r\x1b[2K"
    else:
        lead = "\n"
    os.write(2, f"{lead}{message}\n".encode())


_PARENT = os.getppid()  # the launcher, the shell, or the batch system
