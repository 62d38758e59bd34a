"""Errors that every process of a multi-process run must learn, and how they leave.

Under a launcher (torchrun), the moment one process exits with an error the launcher stops
all the others. Two rules follow:

- an error that only some processes meet (a file only the main process writes, a check one
  rank fails) must reach every rank through a collective before anyone acts on it, or the
  others wait for it until the collective timeout: share_error, agree and
  main_process_writes;
- the main process prints the error line, and every process waits for it (a barrier) before
  exiting: a rank that left first could get the main process killed before it printed
  (say_it_and_leave_together).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TypeVar

from ..errors import UserError, WriteFailed, error_line

T = TypeVar("T")


def share_error(accelerator, error: UserError | None) -> None:
    """Collective: raise on every rank the error of the lowest rank that has one (the same
    class, so the same exit code)."""
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    found = [e for e in gather_object([error]) if e is not None]  # pickled: class and message
    if found:
        raise found[0]


def agree(accelerator, work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it raises a UserError on any rank, every rank raises
    the same one, and none goes on alone."""
    try:
        result, error = work(), None
    except UserError as exc:
        result, error = None, exc
    share_error(accelerator, error)
    return result


@contextmanager
def main_process_writes(accelerator) -> Iterator[None]:
    """Wrap the writes that only the main process makes: when one fails (a full disk), every
    rank raises the same WriteFailed at the end of the block instead of going on to a
    collective that the main process never reaches. One small collective per use."""
    error = None
    try:
        yield
    except WriteFailed as exc:
        error = exc
    share_error(accelerator, error)


def say_it_and_leave_together(accelerator, error: UserError, program: str) -> None:
    """The main process prints `error` now (as `program: error: ...`), then every rank waits
    at a barrier for it, so the line is out before any process exits. For errors that every
    rank raised (agreed, or decided from the same data everywhere): a barrier that only some
    ranks reach would pair with another collective."""
    if accelerator.num_processes == 1 or error.reported:
        return
    if accelerator.is_main_process:
        print(error_line(program, str(error)), file=sys.stderr, flush=True)
    error.reported = True
    # RuntimeError: a process died meanwhile; the line is out, which is what this was for.
    with suppress(RuntimeError):
        accelerator.wait_for_everyone()
