"""Stop requests: SIGTERM, SIGUSR1 (SLURM's warning signal), SIGINT (Ctrl-C) and SIGHUP.

A signal is seen at once, whatever the main thread is doing: Python runs a signal handler
only between two bytecodes of the main thread, which may be inside one long C++ call (a
backward pass of several seconds on a CPU), so the handler here only wakes a thread of its
own (signal.set_wakeup_fd), and that thread answers:

- the first signal sets the request that the training loop sees at its next check (every
  rank finishes its step, they save together and exit with EXIT_PREEMPTED), and calls
  `on_first_signal` at once: a lone process uses it to save the last finished step while a
  slow step runs (engine/loop.StepFence), before a launcher that kills a few seconds after a
  stop signal (accelerate 1.16's one-process launcher: 5 s) gets to it;
- copies of the same request within DUPLICATE_WINDOW_S of the first are ignored;
- a later signal exits at once (files being written are safe: every write is atomic).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)
# Under a launcher each rank that gets a signal says so, with its rank.
WHO = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
# A second signal this soon after the first is the same request delivered twice: SLURM signals
# every process of a job (scancel, preemption, the time limit) and torchrun forwards its copy;
# accelerate's one-process launcher forwards SIGTERM after the terminal's SIGINT.
DUPLICATE_WINDOW_S = 1.0


class StopRequest:
    """Install with install(), remove with uninstall(); true once a stop signal came."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.on_first_signal: Callable[[int], None] | None = None  # runs in the watcher
        self.after_last_epoch = False  # the run is finishing its end: nothing to save
        self.adopted = False  # signum is another rank's signal, not yet one of this process's
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        self._previous_fd = -1
        self._sockets: tuple[socket.socket, socket.socket] | None = None
        self._thread: threading.Thread | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def number(self) -> int:
        """The signal's number, 0 for none: what the ranks tell each other (engine/loop.py)."""
        return self.signum or 0

    def adopt(self, signum: int) -> bool:
        """The ranks agreed to stop for `signum`, which another rank may have got alone: this
        process stops for it too, and names it. A copy of the signal that reaches this process
        later is the same request, however late: the stop is under way. True if stopping."""
        if signum and self.signum is None:
            self.signum = signum
            self.adopted = True
        return bool(signum)

    def install(self) -> StopRequest:
        """From the main thread (Python allows signal handlers nowhere else). A request kept
        in STOP_FILE_VARIABLE's file by whatever started this process counts as received."""
        receive, send = socket.socketpair()
        send.setblocking(False)
        self._sockets = (receive, send)
        self._previous_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            # The handler does nothing: the C-level handler has already written the signal's
            # number to the wakeup socket, which the watcher reads at once.
            self._previous[signum] = signal.signal(signum, _ignore_here)
        self._thread = threading.Thread(target=self._watch, name="stop-signals", daemon=True)
        self._thread.start()
        kept = _kept_request()
        if kept is not None and self.signum is None:
            self._first_at = time.monotonic()
            self.signum = kept
            _say(f"{WHO}a stop request ({signal.Signals(kept).name}) came during the start-up")
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._sockets is not None:
            signal.set_wakeup_fd(self._previous_fd)
            self._sockets[1].close()  # the watcher's recv returns b"": it ends
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._sockets[0].close()
            self._sockets = None

    def _watch(self) -> None:
        receive = self._sockets[0]
        while True:
            try:
                data = receive.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in STOP_SIGNALS:
                    self.handle(signum)

    def handle(self, signum: int) -> None:
        """What a stop signal does (in the watcher thread)."""
        if self.signum is not None:
            if self.adopted:  # the stop it asks for is under way: this copy is not a second
                self.adopted = False
                self._first_at = time.monotonic()
                return
            if time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
                return
            _say(f"{WHO}second stop signal ({signal.Signals(signum).name}): exiting now")
            os._exit(128 + signum)
        self._first_at = time.monotonic()
        self.signum = signum
        name = signal.Signals(signum).name
        if self.after_last_epoch:
            _say(
                f"{WHO}received {name} after the last epoch: finishing the run's end (its final "
                "test and figures, seconds); send it again to exit at once (the next start "
                "completes the end)"
            )
        else:
            _say(
                f"{WHO}received {name}: finishing the current step and saving the resume "
                "state; send it again to exit at once"
            )
        if self.on_first_signal is not None:
            self.on_first_signal(signum)


# A file where the SLURM scripts' per-machine shell keeps a stop request (its signal's name)
# that came while this process was starting, with the stop signals still ignored (slurm/lib.sh).
STOP_FILE_VARIABLE = "FMNIST_ACCEL_STOP_FILE"


def _kept_request() -> int | None:
    path = os.environ.get(STOP_FILE_VARIABLE)
    if not path:
        return None
    try:
        with open(path) as f:
            name = f.read().strip()
    except OSError:
        return None
    return getattr(signal, name, signal.SIGTERM) if name.startswith("SIG") else signal.SIGTERM


def _ignore_here(signum, frame) -> None:
    """The main thread's handler: the watcher thread does the work (see the module doc)."""


def _say(message: str) -> None:
    """One line on stderr: os.write, not print, since the main thread may be in a print of
    its own. On a terminal the line first clears the line the cursor is on (the progress bar
    and the terminal's ^C echo, which would otherwise run into it), but only while the process
    that started this one is still there: `accelerate launch` dies of Ctrl-C at once, and the
    line is then the shell's new prompt, which must stay."""
    if not os.isatty(2):
        lead = ""
    elif os.getppid() == _PARENT:
        lead = "\r\x1b[2K"
    else:
        lead = "\n"
    os.write(2, f"{lead}{message}\n".encode())


_PARENT = os.getppid()  # the launcher, the shell, or the batch system
