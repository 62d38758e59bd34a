"""Crashed processes and the launcher's restarts (torchrun's `--max_restarts`).

Under `accelerate launch --max_restarts N` (torchrun's elastic agent), when one process of the
group dies (an OOM kill, a node fault) or stops answering, the agent stops all of them and
starts the whole group again, up to N times. A restarted group continues the run from its
last saved state:

- the processes of a restart see TORCHELASTIC_RESTART_COUNT > 0; `--resume auto` is then
  implied, and without --run-name the run folder the first attempt chose is resumed (the main
  process notes it in a small file of the launch, in the temp folder);
- a process that ends on purpose (bad input, a non-finite loss, a stop signal, a full disk)
  notes its exit code there too: the processes of a later attempt exit at once with the same
  code (before importing torch) instead of doing the same thing again;
- torch reuses the agent's key-value store across restarts without separating the attempts,
  so a restarted gloo/NCCL group can read its peers' addresses from the attempt before and
  fail to connect; on one machine join_restarted_group gives each attempt keys of its own.

"The launch" is the agent process: the parent of every worker it starts, the same process
for every attempt. It is identified by its pid and its start time, so that a recycled pid
never mixes two launches up.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

RECORD_PREFIX = "fmnist-accel-launch-"


def restart_count() -> int:
    """0 for the first attempt of a launch (and outside torchrun), then 1, 2, ..."""
    return _env_int("TORCHELASTIC_RESTART_COUNT")


def max_restarts() -> int:
    return _env_int("TORCHELASTIC_MAX_RESTARTS")


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0"))
    except ValueError:
        return 0


def restart_line(resumed_after: int | None, step: int = 0) -> str | None:
    """What a restarted group says first: which restart, and where it goes on from."""
    n = restart_count()
    if n == 0:
        return None
    head = f"restart {n} of {max_restarts()} (a process failed; the launcher restarted them all)"
    if resumed_after is None:
        return f"{head}: nothing was saved yet: starting again from epoch 1"
    where = f"resuming after epoch {resumed_after}" + (
        f", at step {step} of epoch {resumed_after + 1}" if step else ""
    )
    return f"{head}: {where}"


# --------------------------------------------------------------------------------------------
# The launch's record: the run folder it trains, and a deliberate exit
# --------------------------------------------------------------------------------------------
def _process_start_ticks(pid: int) -> int | None:
    """When a process started, in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _launch_id() -> str | None:
    """'<agent pid>-<agent start>' under a launcher that may restart us; else None."""
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or max_restarts() == 0:
        return None
    agent = os.getppid()
    if agent <= 1:
        return None  # orphaned: the launcher is gone, no attempt will follow to read it
    started = _process_start_ticks(agent)
    return None if started is None else f"{agent}-{started}"


def _record(kind: str) -> Path | None:
    launch = _launch_id()
    if launch is None:
        return None
    return Path(tempfile.gettempdir()) / f"{RECORD_PREFIX}{launch}.{kind}"


def _write_record(kind: str, text: str) -> None:
    path = _record(kind)
    if path is None:
        return
    _remove_records_of_ended_launches()
    try:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        pass  # no record: a restart then behaves as a fresh launch would


def _read_record(kind: str) -> str | None:
    path = _record(kind)
    try:
        return path.read_text() if path is not None else None
    except OSError:
        return None


def _remove_records_of_ended_launches() -> None:
    """The records of launches whose agent has exited (its pid gone or reused)."""
    for path in Path(tempfile.gettempdir()).glob(f"{RECORD_PREFIX}*"):
        launch = path.name[len(RECORD_PREFIX) :].split(".", 1)[0]
        pid, _, started = launch.partition("-")
        if not (pid.isdigit() and started.isdigit()):
            continue
        if int(pid) <= 1 or _process_start_ticks(int(pid)) != int(started):
            path.unlink(missing_ok=True)


def remember_run_dir(run_dir: str) -> None:
    """Main process: the run folder this launch trains, for a restart without --run-name."""
    if restart_count() < max_restarts():
        _write_record("run", run_dir)


def restarted_options(explicit: dict) -> dict:
    """The training options of a restarted attempt: `--resume auto` implied, and without
    --run-name the folder that the first attempt chose. Unchanged on a first attempt."""
    if restart_count() == 0 or explicit.get("resume") not in (None, "auto"):
        return explicit
    options = {**explicit, "resume": "auto"}
    run_dir = _read_record("run")
    if options.get("run_name") is None and run_dir:
        # --resume auto with this --run-name: resumed if it saved state, else started again
        # in the same folder.
        options.update(output_dir=str(Path(run_dir).parent), run_name=Path(run_dir).name)
    return options


def forget_launch() -> None:
    """The run has ended as planned: no attempt of this launch will follow, so its records
    go (nothing of a run outlives it outside its folder)."""
    for kind in ("exit", "run"):
        path = _record(kind)
        if path is not None:
            path.unlink(missing_ok=True)


def remember_deliberate_exit(code: int) -> None:
    """This process ends on purpose with `code`: a restart would only do it again."""
    if restart_count() < max_restarts():
        _write_record("exit", str(code))


def exit_if_an_earlier_attempt_chose_to() -> None:
    """In a restarted attempt, exit at once with the code an earlier attempt of this launch
    chose to end with (its message is out already). Called when the package is imported,
    before torch is: the launcher restarts the same command, and a restart that only exits
    then takes a fraction of a second instead of a start-up. The last attempt also removes the
    launch's records: nothing will read them after that."""
    if restart_count() == 0:
        return
    text = _read_record("exit")
    if restart_count() >= max_restarts():
        for kind in ("exit", "run"):
            path = _record(kind)
            if path is not None:
                path.unlink(missing_ok=True)
    if text and text.strip().isdigit():
        os._exit(int(text))


# --------------------------------------------------------------------------------------------
# Joining the group of a restarted attempt
# --------------------------------------------------------------------------------------------
def join_restarted_group(backend: str, timeout_s: float) -> bool:
    """Initialise the process group of a restarted attempt with keys of its own; True if it
    did (the Accelerator then uses this group), False where it is not needed or not safe.

    torch's env:// rendezvous connects the workers to the agent's store and, since torch 2.5,
    adds no per-attempt prefix (it expects a fresh store per attempt, which the static and
    c10d rendezvous of torch 2.14 do not create): the new gloo ranks can then read the
    addresses of the dead ones and fail with "Connection refused". On one machine every
    process sees the same restart count, so a prefix made of it is shared by exactly the
    processes of one attempt. Across machines each agent counts its own restarts, so the
    prefix could differ: there, run the launcher with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    (docs/faults.md), which gives each attempt a fresh store.
    """
    if restart_count() == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return False
    world, local_world = _env_int("WORLD_SIZE"), _env_int("LOCAL_WORLD_SIZE")
    if world <= 1 or world != local_world:
        return False
    from datetime import timedelta

    import torch.distributed as dist

    if dist.is_initialized():
        return False
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=False,
        timeout=timeout,
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"fmnist-accel/attempt-{restart_count()}/", store),
        rank=_env_int("RANK"),
        world_size=world,
        timeout=timeout,
    )
    return True
