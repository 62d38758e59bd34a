"""`python -m fmnist_accel ...` and `accelerate launch -m fmnist_accel eval ...`."""

from .cli import cli, run_cli

run_cli(cli, None, prog_name="fmnist-accel")
