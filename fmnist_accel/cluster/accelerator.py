"""One way to build the Accelerator, for training and evaluation alike; the hardware in
words; a collective that failed because another process hung or died, in one line."""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config import TrainConfig
from ..errors import CollectiveFailure, UserError
from . import restarts

# The timeout of collectives (--collective-timeout; its default is explained in config.py).
DEFAULT_COLLECTIVE_TIMEOUT_S = TrainConfig.collective_timeout


def wants_cpu() -> bool:
    """True without a GPU, or when the launcher asked for CPU (ACCELERATE_USE_CPU)."""
    from accelerate.utils.environment import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def make_accelerator(
    mixed_precision: str | None = None,
    collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
    **kwargs,
):
    """An Accelerator whose processes really form one group, or a one-line UserError.

    Accelerator(cpu=True) whenever there is no GPU: a plain Accelerator() started by a
    multi-process launcher on a CPU machine runs N unconnected copies (docs/architecture.md), so
    the
    world size is also checked against what the launcher started. Every collective of the
    group fails after `collective_timeout` seconds without an answer
    (collectives_fail_in_one_line turns that into one line).
    """
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    cpu = wants_cpu()
    if cpu:
        keep_large_allocations_in_heap()
    handlers = [
        *(kwargs.pop("kwargs_handlers", None) or []),
        InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout)),
    ]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        restarts.join_restarted_group("gloo" if cpu else "nccl", collective_timeout)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers, **kwargs
    )
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


def make_training_accelerator(cfg: TrainConfig):
    """make_accelerator with training's settings: its precision, collective timeout and
    torch.compile, TensorBoard, and the DDP settings below."""
    import warnings

    from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin

    ddp = DistributedDataParallelKwargs(
        # BatchNorm statistics are averaged over ranks once per epoch (engine/loop.average_buffers)
        # instead of broadcast from rank 0 before every forward pass.
        broadcast_buffers=False,
        # Gradients live in the all-reduce buckets: one copy less per step.
        gradient_as_bucket_view=True,
        # The largest model (resnet9) has 6.6 MB of fp32 gradients: one bucket of 25 MB holds
        # it, so each step needs a single all-reduce; smaller buckets would overlap with the
        # backward pass but pay a fixed latency per bucket that is larger than these kernels.
        bucket_cap_mb=25,
    )
    # torch 2.14 deprecates broadcast_buffers in favour of forward_sync_buffers, which older
    # torch (and accelerate's DistributedDataParallelKwargs) lack; the meaning we want is the
    # same: no buffer broadcast before each forward.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated")
    return make_accelerator(
        cfg.mixed_precision,
        collective_timeout=cfg.collective_timeout,
        log_with="tensorboard",
        # A placeholder: the run folder is only known once the main process has chosen it.
        project_dir=cfg.output_dir,
        kwargs_handlers=[ddp],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.compile else None,
    )


def compiles(accelerator) -> bool:
    """Whether the Accelerator torch.compiles the model (--compile, or the launcher's dynamo)."""
    from accelerate.utils import DynamoBackend

    return accelerator.state.dynamo_plugin.backend != DynamoBackend.NO


# Words of gloo's (and NCCL's) errors when a peer stops answering or goes away.
_TIMEOUT_WORDS = ("Timed out waiting", "timeout caused pair closure", "Socket Timeout", "timed out")
_PEER_LOST_WORDS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
)


def end_accelerator(accelerator) -> None:
    """accelerator.end_training(), and the process group torn down even when a tracker's
    last flush fails (TensorBoard on a full disk: the epoch that hit it has said so)."""
    try:
        accelerator.end_training()
    except OSError:
        accelerator.state.destroy_process_group()


@contextmanager
def collectives_fail_in_one_line(timeout_s: float) -> Iterator[None]:
    """Around everything a command does with a process group: a collective that failed
    because another process hung (no answer within timeout_s, the group's collective timeout)
    or died becomes CollectiveFailure, one line and exit code 4, instead of a traceback."""
    try:
        yield
    except RuntimeError as exc:
        failure = collective_failure(exc, timeout_s)
        if failure is None:
            raise
        raise failure from None


def collective_failure(exc: BaseException, timeout_s: float) -> CollectiveFailure | None:
    """The one-line error for a collective operation that failed because another process of
    the run hung or died, or None for any other error. Such an error is no bad input: it ends
    with exit code 4 and is not remembered as deliberate, so `--max_restarts` restarts the
    group."""
    # From the launcher's variables: the process group is already torn down when this runs.
    if not isinstance(exc, RuntimeError) or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    text = str(exc)
    rank = os.environ.get("RANK", "?")
    then = "this process stops (the launcher restarts the group if --max_restarts allows)"
    if any(word in text for word in _TIMEOUT_WORDS):
        return CollectiveFailure(
            f"rank {rank}: no answer from the other processes for {timeout_s:g} s "
            f"(the collective timeout, --collective-timeout): one of them has hung or died; {then}"
        )
    lost = next((word for word in _PEER_LOST_WORDS if word in text), None)
    if lost:
        return CollectiveFailure(f"rank {rank}: another process of the run died ({lost}); {then}")
    return None


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
HEAP_THRESHOLD = 1 << 30  # 1 GiB: above any activation of these models at batch 2048
OLD_GLIBC_MMAP_LIMIT = 32 << 20  # older glibc refuses mmap thresholds above HEAP_MAX_SIZE/2
# Where any of these is set, the user has chosen the allocator's settings (or the allocator).
USER_MALLOC_SETTINGS = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "GLIBC_TUNABLES",
    "LD_PRELOAD",
)


def keep_large_allocations_in_heap() -> int:
    """Let glibc reuse freed memory for large tensors instead of mapping fresh pages.

    glibc serves every allocation above 32 MiB with its own mmap and unmaps it on free, so
    each training step on a CPU faults in its activations page by page again (at batch 512,
    cnn-bn's first activation is 51 MB). Raising the mmap and trim thresholds keeps that
    memory in the heap for the next step, the effect jemalloc or tcmalloc would have: with
    the faster dropout mask, cnn-bn's default fp32 run went from 1.4x to 2.2x the seed loop's
    images/s on the 2-core machine (benchmarks/RESULTS.md). The process keeps its peak memory
    until it exits. Skipped where the user already tunes malloc (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES), where anything is preloaded (LD_PRELOAD: often
    jemalloc or tcmalloc), and off glibc.
    Returns the mmap threshold set, in bytes: 0 where nothing was changed.
    """
    user_set = any(os.environ.get(name) for name in USER_MALLOC_SETTINGS)
    if user_set or platform.libc_ver()[0] != "glibc":
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return 0
    for threshold in (HEAP_THRESHOLD, OLD_GLIBC_MMAP_LIMIT):
        if libc.mallopt(M_MMAP_THRESHOLD, threshold):
            libc.mallopt(M_TRIM_THRESHOLD, threshold)
            return threshold
    return 0


PRECISION_WORDS = {"no": "fp32", "fp16": "fp16 mixed precision", "bf16": "bf16 mixed precision"}


def describe(accelerator) -> str:
    """The hardware in words a user knows: '1 process, CPU, 2 threads; fp32',
    '2 processes, CPU (gloo), 1 thread each; fp32', '1 GPU: NVIDIA H100 80GB HBM3; bf16 mixed
    precision', '16 GPUs on 2 machines: NVIDIA H100 80GB HBM3 (nccl); ...'."""
    n = accelerator.num_processes
    device = accelerator.device
    local = int(os.environ.get("LOCAL_WORLD_SIZE", n) or n)
    machines = f" on {n // local} machines" if 0 < local < n else ""
    processes = f"{n} process{'es' if n > 1 else ''}{machines}"
    backend = f" ({accelerator.state.backend})" if n > 1 and accelerator.state.backend else ""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        what = f"1 GPU: {name}" if n == 1 else f"{n} GPUs{machines}: {name}{backend}"
    elif device.type == "cpu":
        threads = torch.get_num_threads()
        each = " each" if n > 1 else ""
        what = f"{processes}, CPU{backend}, {threads} thread{'s' if threads > 1 else ''}{each}"
    else:  # mps, xpu, ...
        what = f"{processes}, {device.type.upper()}{backend}"
    precision = accelerator.mixed_precision
    return f"{what}; {PRECISION_WORDS.get(precision, precision)}"


def thread_note(accelerator) -> str | None:
    """A hint when a CPU run uses fewer threads than the machine has cores to spare: plain
    `accelerate launch` sets OMP_NUM_THREADS=1 for its process (half the speed on 2 cores)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    spare = (cores or 1) // accelerator.num_processes
    if accelerator.device.type != "cpu" or torch.get_num_threads() >= spare:
        return None
    return (
        f"note: {torch.get_num_threads()} CPU thread(s) per process of {spare} available "
        "(OMP_NUM_THREADS, which plain `accelerate launch` sets to 1): set OMP_NUM_THREADS, or "
        "launch with --config_file launch_configs/cpu_1proc.yaml, or run fmnist-accel train"
    )
