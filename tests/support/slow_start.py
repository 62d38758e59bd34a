"""`fmnist-accel ARGS`, with the main process starting SLOW_START seconds late.

    accelerate launch ... tests/support/slow_start.py eval FILE --json

The case of issue 13: another rank meets an error first and exits while the main process,
which alone prints errors, has not got that far yet.
"""

from __future__ import annotations

import os
import sys
import time

if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":
        time.sleep(float(os.environ.get("SLOW_START", "0")))
    from fmnist_accel.cli import cli, run_cli

    run_cli(cli, sys.argv[1:], prog_name="fmnist-accel")
