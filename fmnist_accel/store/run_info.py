"""What a run folder says about its run, read defensively: for `fmnist-accel runs`, `plot`
and the HParams entry.

Any folder may be damaged or half-written (a kill, a full disk, a hand edit): nothing here
raises on a folder's content; what is wrong is collected in RunInfo.problems. No torch:
`runs` and `plot` start fast on a login node.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import read_regular_text
from .layout import (
    CONFIG,
    LOCK,
    METRICS,
    PREEMPTED,
    PROVENANCE,
    RESUME,
    STATUSES,
    SUMMARY,
    WRITE_FAILED,
    checkpoint_file,
)

# What `runs` shows besides summary.json's STATUSES:
RUNNING = "running"
INTERRUPTED = "interrupted"  # no live process and no summary.json: killed before it could say
DAMAGED = "damaged"  # no readable config.json: not a run folder this toolkit can use
EMPTY = "empty"


@dataclass
class RunInfo:
    name: str
    path: str
    status: str
    model: str | None = None
    recipe: str | None = None
    epochs: int | None = None  # epochs finished (metrics.jsonl records)
    max_epochs: int | None = None
    best_valid_accuracy: float | None = None
    best_epoch: int | None = None
    test_accuracy: float | None = None
    test_accuracy_from: str | None = None  # "final_test" or "test_every_epoch"
    train_time: float | None = None  # seconds of training and validation, resumes included
    processes: int | None = None
    precision: str | None = None
    slurm_job: str | None = None  # the SLURM job of the latest start (1230_4: array task 4)
    sweep: str | None = None  # the sweep the run belongs to (slurm/sweep.sbatch)
    starts: int | None = None  # how many times the run was started (requeues, resumes)
    pid: int | None = None  # the process holding the run's lock, while it runs
    started: float | None = None  # config.json's modification time (written at the start)
    problems: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict, repr=False)
    summary: dict = field(default_factory=dict, repr=False)
    records: list[dict] = field(default_factory=list, repr=False)

    def public(self) -> dict[str, Any]:
        """The fields `runs --json` prints."""
        hidden = ("config", "summary", "records")
        return {k: v for k, v in self.__dict__.items() if k not in hidden}


def read_json_object(path: Path) -> tuple[dict | None, str | None]:
    """(the JSON object in path, None) or (None, what is wrong); (None, None) if absent."""
    try:
        text = read_regular_text(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path.name} unreadable ({exc.strerror or exc})"
    except UnicodeDecodeError:
        return None, f"{path.name} is not valid JSON (half-written?)"
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, f"{path.name} is not valid JSON (half-written?)"
    if not isinstance(value, dict):
        return None, f"{path.name} does not hold a JSON object"
    return value, None


def read_metrics(run_dir: Path) -> tuple[list[dict], int]:
    """(epoch records in order, count of unreadable lines). A line torn by a kill in
    mid-append is counted, not fatal; records without an integer epoch are dropped too."""
    try:
        text = read_regular_text(Path(run_dir) / METRICS)
    except (OSError, UnicodeDecodeError):
        return [], 0
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        else:
            bad += 1
    return records, bad


def number(value: Any) -> float | None:
    """value if it is a real number (not a bool, not NaN), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return value


def read_starts(run_dir: Path) -> list[dict]:
    """provenance.json's starts, oldest first; [] when absent or unreadable (an older run)."""
    value, _ = read_json_object(Path(run_dir) / PROVENANCE)
    starts = value.get("starts") if value else None
    if not isinstance(starts, list):
        return []
    return [s for s in starts if isinstance(s, dict)]


def best_valid(records: list[dict]) -> tuple[float | None, int | None]:
    """The highest validation accuracy and the first epoch that reached it."""
    best, epoch = None, None
    for r in records:
        acc = number(r.get("valid_accuracy"))
        if acc is not None and (best is None or acc > best):
            best, epoch = acc, r["epoch"]
    return best, epoch


def known_test_accuracy(summary: dict, records: list[dict], best_epoch: int | None):
    """(accuracy, where it comes from): the end-of-training test of the best checkpoint
    (summary.json's final_test), else the --test-every-epoch figure of the best epoch."""
    final = summary.get("final_test")
    if isinstance(final, dict) and number(final.get("accuracy")) is not None:
        return final["accuracy"], "final_test"
    for r in records:
        if r["epoch"] == best_epoch and number(r.get("test_accuracy")) is not None:
            return r["test_accuracy"], "test_every_epoch"
    return None, None


def read_run(folder: Path, live_check: bool = True) -> RunInfo:
    """Everything `runs` shows about one folder. Never raises on the folder's content.

    live_check=False: do not look for a live process holding the folder (for the run's own
    process, which holds it until it exits)."""
    folder = Path(folder)
    info = RunInfo(name=folder.name, path=str(folder), status=INTERRUPTED)
    try:
        entries = {p.name for p in folder.iterdir()}
    except OSError as exc:
        info.status = DAMAGED
        info.problems.append(f"cannot list the folder ({exc.strerror or exc})")
        return info
    info.pid = lock_holder(folder / LOCK) if live_check and LOCK in entries else None
    if not entries - {LOCK}:
        info.status = RUNNING if info.pid is not None else EMPTY
        if info.pid is None:
            info.problems.append("empty folder (a run that failed before it started?)")
        return info

    config, problem = read_json_object(folder / CONFIG)
    if config is None:
        info.problems.append(problem or f"no {CONFIG}")
    else:
        info.config = config
        with contextlib.suppress(OSError):  # removed meanwhile: it is only for sorting
            info.started = (folder / CONFIG).stat().st_mtime
    summary, problem = read_json_object(folder / SUMMARY)
    if problem:
        info.problems.append(problem)
    info.summary = summary or {}
    info.records, bad_lines = read_metrics(folder)
    if bad_lines:
        info.problems.append(f"{METRICS}: {bad_lines} unreadable line(s) (torn by a kill?)")

    info.status = status_of(info, config is not None)
    fill_facts(info)
    info.problems.extend(missing_files(info, entries))
    return info


def status_of(info: RunInfo, has_config: bool) -> str:
    if info.pid is not None:
        return RUNNING
    if not has_config:
        return DAMAGED
    status = info.summary.get("status")
    if status in STATUSES:
        return status
    if info.summary:
        info.problems.append(f"{SUMMARY} has an unknown status {status!r}")
    elif info.records and not Path(info.path, SUMMARY).exists():
        info.problems.append(f"no {SUMMARY}: its process was killed (--resume continues it)")
    return INTERRUPTED


def text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def fill_facts(info: RunInfo) -> None:
    config, summary, records = info.config, info.summary, info.records
    info.model = text(config.get("model"))
    info.recipe = text(config.get("recipe"))
    info.max_epochs = integer(config.get("epochs"))
    info.epochs = max((r["epoch"] for r in records), default=None)
    info.best_valid_accuracy, info.best_epoch = best_valid(records)
    info.test_accuracy, info.test_accuracy_from = known_test_accuracy(
        summary, records, info.best_epoch
    )
    # summary.json is from the latest start: newer than the records only if not running.
    elapsed = number(summary.get("elapsed")) if info.status != RUNNING else None
    if elapsed is None and records:
        elapsed = number(records[-1].get("elapsed"))
    info.train_time = elapsed
    info.processes = integer(summary.get("world_size"))
    info.precision = text(summary.get("mixed_precision")) or text(config.get("mixed_precision"))
    if info.precision == "no":
        info.precision = "fp32"
    starts = read_starts(Path(info.path))
    if starts:
        info.starts = len(starts)
        info.slurm_job = text(starts[-1].get("slurm_job"))
        info.sweep = next((text(s.get("sweep")) for s in starts if text(s.get("sweep"))), None)


def missing_files(info: RunInfo, entries: set[str]) -> list[str]:
    """Files a run in this state should have and that are not there."""
    if info.status in (RUNNING, DAMAGED):
        return []
    if not info.records:
        return ["no finished epoch"] if info.status == INTERRUPTED else []
    wanted = [checkpoint_file("last")]
    if info.best_epoch is not None:
        wanted.append(checkpoint_file("best"))
    if info.status in (PREEMPTED, WRITE_FAILED, INTERRUPTED):
        wanted.append(RESUME)
    return [f"{name} missing" for name in wanted if name not in entries]


def list_runs(output_dir: Path) -> list[RunInfo]:
    """Every folder in output_dir (hidden ones aside), in name order."""
    folders = sorted(p for p in Path(output_dir).iterdir() if p.is_dir() and p.name[0] != ".")
    return [read_run(p) for p in folders]


# --------------------------------------------------------------------------------------------
# Is a run live? Its training process holds an flock on RUN/.lock.
# --------------------------------------------------------------------------------------------
PROC_LOCKS = "/proc/locks"


def lock_holder(lock_path: Path, proc_locks: str = PROC_LOCKS) -> int | None:
    """The pid of a process on this machine holding an flock on lock_path, else None.

    Read from the kernel's table of locks, /proc/locks, which takes no lock and opens
    nothing in the run folder. A probe with flock itself could make a starting trainer fail:
    for the instant the probe holds its lock, the trainer's non-blocking attempt is refused
    and it stops with "in use by another training process". Where there is no /proc/locks
    (not Linux), or the lock is held on another machine (a cluster-wide file system), a run
    is not seen as running.
    """
    try:
        st = os.stat(lock_path)
        table = Path(proc_locks).read_text()
    except OSError:
        return None
    for line in table.splitlines():
        # "12: FLOCK  ADVISORY  WRITE 4242 fe:00:5327110 0 EOF"; waiters have "->" after the id
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            pid = int(fields[4])
            major, minor, inode = fields[5].split(":")
            same_device = (int(major, 16), int(minor, 16)) == (
                os.major(st.st_dev),
                os.minor(st.st_dev),
            )
            same_inode = int(inode) == st.st_ino
        except ValueError:
            continue
        # Some file systems (overlayfs) show another device number there than stat() gives:
        # then the holder must have the lock file itself open.
        if same_inode and (same_device or has_open(pid, lock_path)):
            return pid
    return None


def has_open(pid: int, path: Path) -> bool:
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.path.samefile(fd, path):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False
