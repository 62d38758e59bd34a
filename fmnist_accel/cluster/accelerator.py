"""One way to build the Accelerator, for training and evaluation alike; the hardware in
words; a collective that failed because another process hung or died, in one line."""

from __future__ import annotations

import ctypes
import os
import platform
import re
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
    if cpu:
        gloo_interface_toward_the_rendezvous()
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


# Words of gloo's errors when the processes cannot connect to each other as they form the
# group (or form it again after a restart).
_CONNECT_WORDS = ("connectFullMesh", "Connect timeout")
# ... and torch's, when they cannot all meet at the store the launcher gave them (MASTER_ADDR).
_STORE_WORDS = ("waiting for clients", "failed to connect to any network address")
# Words of gloo's (and NCCL's) errors when a peer stops answering or goes away.
_TIMEOUT_WORDS = ("Timed out waiting", "timeout caused pair closure", "Socket Timeout", "timed out")
_PEER_LOST_WORDS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "remote process exited",
)


def unreachable_peer(text: str) -> str:
    """What a failed connection of gloo's full mesh says, in words: the peer's address and the
    socket's error, and the loopback case (a peer that gave 127.x.x.x, as gloo does where a
    machine's name resolves to a loopback address) named."""
    remote = re.search(r"remote=\[?([0-9A-Fa-f.:]+?)\]?:(\d+)", text)
    errors = ("Connection refused", "No route to host", "Network is unreachable",
              "Connection reset by peer", "Connect timeout", "timed out connecting")  # fmt: skip
    error = next((e for e in errors if e in text), None)
    where = f" at {remote.group(1)}:{remote.group(2)}" if remote else ""
    why = f" ({error})" if error else ""
    said = f"cannot connect to another process of the run{where}{why}"
    if remote and remote.group(1).startswith("127."):
        return (
            f"{said}: that process gave a loopback address, which other machines cannot "
            "reach (GLOO_SOCKET_IFNAME names the loopback interface, or its machine's name "
            "resolves to 127.x.x.x); start every launcher with GLOO_SOCKET_IFNAME set to the "
            "network interface the machines share"
        )
    return f"{said}: its machine is unreachable or the process is gone"


def unreachable_store(timeout_s: float) -> str:
    """The processes did not all reach their store (MASTER_ADDR:MASTER_PORT) in time."""
    store = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    return (
        f"the processes did not all reach the run's store at {store} (the launcher's "
        f"MASTER_ADDR) within {timeout_s:g} s: a machine is unreachable, or that address is "
        "not the same machine for all of them (a host name that resolves to a loopback "
        "address: start each launcher with PET_LOCAL_ADDR, torchrun's --local_addr, set to "
        "its own address)"
    )


def gloo_interface_toward_the_rendezvous() -> str | None:
    """On several machines, the network interface gloo uses when gloo's own choice would be
    the loopback interface; returns its name (also set as GLOO_SOCKET_IFNAME), or None.

    Without GLOO_SOCKET_IFNAME gloo takes the address this machine's name resolves to, and
    the loopback address when that one is a loopback address (Debian's 127.0.1.1, a container's
    127.0.0.1) or none of this machine's: each process then gives the others 127.x.x.x, and
    processes on other machines cannot connect ("Connection refused"; the others wait for
    the collective timeout). Here the interface is the one that holds this machine's address
    on the route to the rendezvous (MASTER_ADDR), the network the machines share. Nothing is
    changed on one machine, for a rendezvous on a loopback address, where the user set
    GLOO_SOCKET_IFNAME, or where the name resolves to an address of this machine that is not a
    loopback one (what gloo takes then works).
    """
    import socket

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    master = os.environ.get("MASTER_ADDR")
    if world <= local or not master or os.environ.get("GLOO_SOCKET_IFNAME"):
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((master, int(os.environ.get("MASTER_PORT") or 9)))  # sends nothing
            mine = probe.getsockname()[0]
    except (OSError, ValueError):
        return None
    if mine.startswith("127."):
        return None  # the rendezvous is on this machine's loopback: every process is here
    try:
        named = {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        named = set()
    if any(_is_here(address) and not _is_loopback(address) for address in named):
        return None
    interface = _interface_of(mine)
    if interface is not None:
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    return interface


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address == "::1"


def _is_here(address: str) -> bool:
    """Whether a socket can bind to `address` (it is one of this machine's)."""
    import socket

    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def _interface_of(address: str) -> str | None:
    """The name of the network interface whose IPv4 address is `address` (Linux), or None."""
    import fcntl
    import socket
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name[:15].encode())
            try:
                answer = fcntl.ioctl(s.fileno(), siocgifaddr, request)
            except OSError:
                continue
            if socket.inet_ntoa(answer[20:24]) == address:
                return name
    return None


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
    if any(word in text for word in _STORE_WORDS):
        return CollectiveFailure(f"rank {rank}: {unreachable_store(timeout_s)}; {then}")
    if any(word in text for word in _CONNECT_WORDS):  # before the timeout: "timed out connecting"
        return CollectiveFailure(f"rank {rank}: {unreachable_peer(text)}; {then}")
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


# CPU instructions that run bf16 natively (/proc/cpuinfo's names); without them PyTorch
# emulates bf16 on a CPU, slower than fp32.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPU_FLAGS_VARIABLE = "FMNIST_ACCEL_CPU_FLAGS"  # overrides /proc/cpuinfo (containers, tests)


def cpu_flags() -> set[str]:
    """The CPU's feature flags: FMNIST_ACCEL_CPU_FLAGS (space-separated) if set, else the
    first `flags` line of /proc/cpuinfo; empty where neither exists."""
    given = os.environ.get(CPU_FLAGS_VARIABLE)
    if given is not None:
        return set(given.split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def bf16_instructions() -> str | None:
    """The first of BF16_CPU_FLAGS this CPU has, or None."""
    flags = cpu_flags()
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


def launcher_chose_precision() -> bool:
    """True when a launcher asked for fp16 or bf16. `accelerate launch` always passes its
    config's mixed_precision, "no" where nobody chose one (its default, and the README's
    one_process.yaml), so a launcher's "no" is not taken as a choice: `--mixed-precision no`
    to the training keeps fp32."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower() not in ("", "no")


def cpu_precision(explicit_precision: str | None) -> tuple[str, str] | None:
    """(precision, why) on a CPU where neither the user (--mixed-precision) nor a launcher
    (launcher_chose_precision) chose one: bf16 where the CPU has bf16 instructions, else
    fp32. None on a GPU, or when the choice was made."""
    if explicit_precision is not None or launcher_chose_precision():
        return None
    if not wants_cpu():
        return None
    flag = bf16_instructions()
    if flag:
        return "bf16", f"this CPU has {flag}"
    return "no", "this CPU has no bf16 instructions"


def slow_bf16_note(accelerator) -> str | None:
    """A note when bf16 runs on a CPU that emulates it: slower than fp32 there."""
    if accelerator.device.type != "cpu" or accelerator.mixed_precision != "bf16":
        return None
    if bf16_instructions():
        return None
    return (
        "note: this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 is emulated and "
        "slower than fp32 here; --mixed-precision no trains faster"
    )


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
    """On a CPU, when the thread count is the launcher's default rather than anyone's choice
    (`accelerate launch` sets OMP_NUM_THREADS=1 for its processes when it is not set: half
    the speed on 2 cores), use the cores available to each local process instead, and say
    so. A user's OMP_NUM_THREADS (in the launcher's own environment) is kept."""
    if accelerator.device.type != "cpu" or not threads_are_launcher_default():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads = max(1, (cores or 1) // max(1, local))
    if threads <= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for any process this one starts
    return (
        f"note: {threads} CPU threads per process (the cores available to each of {local} "
        "local process(es)), not the launcher's default of 1; OMP_NUM_THREADS sets it"
    )


def threads_are_launcher_default() -> bool:
    """Whether OMP_NUM_THREADS was set by `accelerate launch` and not by the user: it is in
    this process's environment but not in the environment its launcher was started with."""
    if "OMP_NUM_THREADS" not in os.environ or not os.environ.get("ACCELERATE_MIXED_PRECISION"):
        return False  # no launcher's default: accelerate launch always sets that variable
    try:
        parent = open(f"/proc/{os.getppid()}/environ", "rb").read().split(b"\0")  # noqa: SIM115
    except OSError:
        return False  # cannot tell: keep what is set
    return not any(entry.startswith(b"OMP_NUM_THREADS=") for entry in parent)
