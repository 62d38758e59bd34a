"""The errors a user can cause, and the exit codes the toolkit documents.

A UserError is printed as one line (no traceback) by the command-line entry points.
"""

# Exit codes (also in the README).
EXIT_OK = 0
EXIT_USER_ERROR = 2  # bad input: missing/corrupt data, bad checkpoint, bad option
EXIT_DIVERGED = 3  # a non-finite loss stopped training; the last good checkpoint is kept
EXIT_PREEMPTED = 75  # a stop signal arrived; resume state saved (EX_TEMPFAIL: try again)


class UserError(Exception):
    """Something the user can fix; its message is one line that says what and where."""

    exit_code = EXIT_USER_ERROR


class TrainingDiverged(UserError):
    """A non-finite loss stopped training; the message names the last good checkpoint."""

    exit_code = EXIT_DIVERGED
