"""Train a Fashion-MNIST model: one loop for CPU, one GPU, many GPUs and many machines.

    fmnist-accel train --model cnn --epochs 20                 # one process
    python -m fmnist_accel.train --model cnn                   # the same
    accelerate launch -m fmnist_accel.train                    # whatever `accelerate config` says
    accelerate launch --config_file launch_configs/cpu_2proc.yaml -m fmnist_accel.train
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 -m fmnist_accel.train

This module is the `python -m fmnist_accel.train` entry point: the options are those of
`fmnist-accel train` (cli.py), and the run itself is run/training.py.
"""

from __future__ import annotations

import sys

from .cli import run_cli, train_command


def main(argv: list[str] | None = None) -> None:
    """`python -m fmnist_accel.train` and `accelerate launch -m fmnist_accel.train`."""
    run_cli(train_command, argv, prog_name="python -m fmnist_accel.train")


if __name__ == "__main__":
    main(sys.argv[1:])
