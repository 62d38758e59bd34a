"""The errors a user can cause, and the exit codes the toolkit documents.

A UserError is printed as one line (no traceback) by the command-line entry points.
"""

# Exit codes (also in the README).
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad input: missing/corrupt data, bad checkpoint, bad option
EXIT_DIVERGED = 3  # a non-finite loss stopped training; the last good checkpoint is kept
EXIT_PEER_FAILED = 4  # another process of a multi-process run hung or died
EXIT_WRITE_FAILED = 74  # a file could not be written (disk full...); older files intact (EX_IOERR)
EXIT_PREEMPTED = 75  # a stop signal arrived; resume state saved (EX_TEMPFAIL: try again)


def error_line(program: str, message: str) -> str:
    """The one line a user error is: `fmnist-accel: error: ...` (program: the command's name
    as it was called, e.g. `python -m fmnist_accel.train`)."""
    return f"{program}: error: {message}"


class UserError(Exception):
    """Something the user can fix; its message is one line that says what and where."""

    exit_code = EXIT_USER_ERROR
    every_rank_says_it = False  # else only the main process prints it (every rank has it)
    reported = False  # already printed (cluster/shared_errors.py) before every rank exits


class TrainingDiverged(UserError):
    """A non-finite loss stopped training; the message names the last good checkpoint."""

    exit_code = EXIT_DIVERGED


class OutputsOverflowed(UserError):
    """A checkpoint's weights are finite but its outputs are not (logits overflow): the
    model is as unusable as one whose loss went non-finite in training."""

    exit_code = EXIT_DIVERGED


class CollectiveFailure(UserError):
    """Another process of the run stopped answering (the collective timeout) or died. Not the
    user's input, and not deliberate: a launcher with --max_restarts restarts the group."""

    exit_code = EXIT_PEER_FAILED
    every_rank_says_it = True  # the process that noticed it may not be the main one


class WriteFailed(UserError):
    """A file of the run could not be written (a full disk, a quota, an I/O error); the
    message names the file and the free space. Every file written before is intact."""

    exit_code = EXIT_WRITE_FAILED
