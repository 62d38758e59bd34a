"""One way to build the Accelerator, for training and evaluation alike."""

from __future__ import annotations

import os

import torch

from .errors import UserError


def wants_cpu() -> bool:
    """True without a GPU, or when the launcher asked for CPU (ACCELERATE_USE_CPU)."""
    from accelerate.utils.environment import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def make_accelerator(mixed_precision: str | None = None, **kwargs):
    """An Accelerator whose processes really form one group, or a one-line UserError.

    Accelerator(cpu=True) whenever there is no GPU: a plain Accelerator() started by a
    multi-process launcher on a CPU machine runs N unconnected copies (DESIGN.md 3), so the
    world size is also checked against what the launcher started.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=wants_cpu(), mixed_precision=mixed_precision, **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise UserError(
            f"the launcher started {launched} processes but they did not join one group "
            f"(accelerate sees {accelerator.num_processes}); on CPU use a launch config from "
            "launch_configs/ or ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ..."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.end_training()  # the process group goes down before the error exits
        raise UserError("fp16 mixed precision needs a GPU (on CPU accelerate ignores it); use bf16")
    return accelerator


def describe(accelerator) -> str:
    return (
        f"{accelerator.distributed_type.value}, {accelerator.num_processes} process(es), "
        f"device {accelerator.device}, mixed precision {accelerator.mixed_precision}"
    )
