"""The run folder as a place: claiming and locking it, finding runs and checkpoints again,
and its metrics.jsonl. The names of its files and statuses are in layout.py. No torch.

Only the main process of a training run writes here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UserError
from .atomic import atomic_write_text, read_regular_bytes, read_regular_text, write_failed
from .layout import (
    CHECKPOINT_NAMES,
    CONFIG,
    LOCK,
    METRICS,
    RUN_FILES,
    SUMMARY,
    TENSORBOARD,
    checkpoint_path,
)


def default_run_name(model: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}"


def unique_run_dir(output_dir: Path, name: str) -> Path:
    """output_dir/name, or name-2, name-3, ... if that is taken (two runs in one second)."""
    candidate, n = Path(output_dir) / name, 2
    while candidate.exists():
        candidate, n = Path(output_dir) / f"{name}-{n}", n + 1
    return candidate


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def runs_newest_first(output_dir: Path) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    runs = [p for p in output_dir.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda p: (p / CONFIG).stat().st_mtime, reverse=True)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None (missing, unreadable, not JSON, or not an object:
    an edited summary.json holding a list must not break the code that reads it)."""
    try:
        value = json.loads(read_regular_text(Path(path)))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def run_status(run_dir: Path) -> str | None:
    summary = read_json(Path(run_dir) / SUMMARY)
    return summary.get("status") if summary else None


def resolve_run_dir(run_dir: str | None, output_dir: str) -> Path:
    """The run folder the user named, or the newest run in output_dir."""
    if run_dir is not None:
        path = Path(run_dir)
        if not is_run_dir(path):
            raise UserError(f"{path} is not a run folder (it has no {CONFIG})")
        return path
    runs = runs_newest_first(Path(output_dir))
    if not runs:
        raise UserError(
            f"no runs in {output_dir}/: train one first (fmnist-accel train) or pass --run-dir"
        )
    return runs[0]


def resolve_checkpoint(spec: str, run_dir: str | None, output_dir: str) -> Path:
    """'best' or 'last' of a run (--run-dir, else the newest), or a checkpoint file path."""
    if spec in CHECKPOINT_NAMES:
        folder = resolve_run_dir(run_dir, output_dir)
        path = checkpoint_path(folder, spec)
        if not path.is_file():
            config = read_json(folder / CONFIG) or {}
            hint = (
                "; it trained without validation: use last" if config.get("valid_size") == 0 else ""
            )
            raise UserError(f"run {folder} has no {spec} checkpoint ({path.name} not found{hint})")
        return path
    path = Path(spec)
    if path.is_dir():
        raise UserError(
            f"{path} is a folder: name a checkpoint file, or use best|last --run-dir {path}"
        )
    if path.exists() and not path.is_file():  # a FIFO or a device: reading it would block
        raise UserError(f"{path} is not a regular file: name a checkpoint file")
    if not path.is_file():
        raise UserError(
            f"no checkpoint {spec!r}: give best, last or the path of a .safetensors file"
        )
    return path


def check_writable(folder: Path) -> None:
    """Create `folder` and prove a file can be written there, before any training starts."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder: choose another name, or move it away")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink(missing_ok=True)  # a lock holder may have cleared it (remove_temp_files)
    except OSError as exc:
        raise UserError(f"cannot write to {folder}: {exc.strerror or exc}") from None


class RunInUse(UserError):
    """Another live process holds the run folder's lock."""


# The open lock files of this process: the kernel releases a flock when its holder exits,
# however it exits (a kill, a SLURM requeue), so a lock never outlives its run; a run that
# ends normally releases it itself (release_locks), for callers that go on in-process.
_held_locks: list = []


def claim_run_dir(folder: Path) -> str | None:
    """Create folder, prove it writable (check_writable), then hold folder/.lock until the
    run ends (release_locks) or this process exits; raise RunInUse if another process
    holds it. Then remove the temporary files that interrupted writes left there, whether
    the run is resumed or started again in the same folder.

    Two processes training into one folder (a job resumed twice, a requeued job whose first
    copy still runs) would overwrite each other's checkpoints and delete each other's
    half-written files. The lock file is opened for appending and never written, so a
    refused run changes none of the folder's files. Returns a note for the user when this
    file system refuses flock: the run then goes on unguarded.
    """
    refuse_links(folder)
    check_writable(folder)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; runs there are not guarded
        return None
    try:
        # O_NOFOLLOW: a .lock made a link after refuse_links looked is not followed either
        fd = os.open(folder / LOCK, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        handle = os.fdopen(fd, "a")
    except OSError as exc:
        raise UserError(f"cannot open {folder / LOCK}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise run_in_use(folder) from None
    except OSError as exc:
        handle.close()
        remove_temp_files(folder)
        return (
            f"note: {folder} could not be locked ({exc.strerror or exc}): nothing stops a "
            "second training process from using it at the same time"
        )
    _held_locks.append(handle)
    check_layout(folder)
    remove_temp_files(folder)  # of writes a kill interrupted, in this folder before
    return None


def refuse_links(folder: Path) -> None:
    """A run folder, and its lock, must be what they are named, not symbolic links: a link
    would have the run write (and its clean-up delete) wherever it points, outside
    --output-dir."""
    folder = Path(folder)
    for path, what in ((folder, "run folder"), (folder / LOCK, "run's lock file")):
        if path.is_symlink():
            raise UserError(
                f"{path} is a symbolic link (to {os.readlink(path)}): a {what} must not be "
                "one; remove the link, or give the folder it points to as --output-dir"
            )


def check_layout(folder: Path) -> None:
    """Raise UserError when a name the run writes is taken by the wrong kind of entry (a
    folder called summary.json, a file called tensorboard): found now, before training, not
    as a traceback at the first write or at the end of the run."""
    for name in RUN_FILES:
        path = folder / name
        if path.exists() and not path.is_file():
            kind = "a folder" if path.is_dir() else "not a regular file"
            raise UserError(f"{path} is {kind}: the run writes a file there; move it away")
    events = folder / TENSORBOARD
    if events.exists() and not events.is_dir():
        raise UserError(
            f"{events} is a file: the run writes its TensorBoard folder there; move it away"
        )


def raise_if_in_use(folder: Path) -> None:
    """Raise RunInUse if a live process holds folder/.lock; take nothing, change nothing.

    A shared lock on a read-only handle: it conflicts with the training process's exclusive
    one, needs no write access, and is dropped when the handle closes."""
    try:
        import fcntl

        with open(folder / LOCK, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise run_in_use(folder) from None
    except (ImportError, OSError):
        pass  # no lock file, no flock here: nothing says the run is live


def run_in_use(folder: Path) -> RunInUse:
    return RunInUse(
        f"{folder} is in use by another training process (it holds {LOCK} there); wait for "
        "it to end or stop it, or choose another run"
    )


def release_locks() -> None:
    """Let other processes use the run folders this one has locked (closing drops a flock)."""
    while _held_locks:
        _held_locks.pop().close()


def has_run_files(folder: Path) -> bool:
    """Whether folder holds anything besides a lock file."""
    return folder.is_dir() and any(p.name != LOCK for p in folder.iterdir())


def remove_unused(folder: Path) -> None:
    """Remove a folder made for a run that failed before writing anything."""
    if not has_run_files(folder):
        try:
            (folder / LOCK).unlink(missing_ok=True)
            folder.rmdir()
        except OSError:
            pass  # something appeared meanwhile: leave it; the data error matters more


# The temporary files that writers in a run folder make: atomic.atomic_write's
# .<target>.<random>.tmp, check_writable's probe, and .tmp + 6 letters or digits, the name
# that safetensors' save_file (Rust's tempfile crate) used before checkpoints were written
# through atomic_write alone: a run folder from an older version may hold one.
TEMP_FILE_PATTERNS = (".*.tmp", ".write-test-*", ".tmp" + "[A-Za-z0-9]" * 6)


def remove_temp_files(folder: Path) -> None:
    """Delete the temporary files of writes that a kill interrupted; the files they were to
    replace are intact. Only the holder of the folder's lock may call it."""
    for pattern in TEMP_FILE_PATTERNS:
        for tmp in Path(folder).glob(pattern):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)


class MetricsLog:
    """metrics.jsonl: one object per finished epoch, appended and flushed."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / METRICS

    def keep_epochs_up_to(self, last_epoch: int) -> None:
        """On resume, drop records of epochs after the resume point (they will be redone)."""
        if not self.path.exists():
            return
        kept = [r for r in self.read(strict=True) if r["epoch"] <= last_epoch]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        """A failed write (a full disk) may leave a torn last line: read() skips it, and a
        resume rewrites the file without it (keep_epochs_up_to)."""
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        except OSError as exc:
            raise write_failed(self.path, exc) from None

    def read(self, strict: bool = False) -> list[dict]:
        """The epoch records. The last line may be torn by a kill in mid-append: skipped.
        Another line that is not an epoch record (binary bytes, a list, no epoch: damage or a
        hand edit) is skipped too, or with strict (a resume, which rewrites the file) refused
        in one line, so that nothing is dropped without the user's word."""
        try:
            lines = read_regular_bytes(self.path).split(b"\n")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise UserError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = epoch_record(line)
            if record is not None:
                records.append(record)
            elif strict and number - 1 != last:
                raise UserError(
                    f"{self.path} line {number} is not an epoch record (a JSON object with an "
                    "integer epoch): the file is damaged; repair or delete that line, then "
                    "resume"
                )
        return records


def epoch_record(line: bytes) -> dict | None:
    """The metrics.jsonl line as a record, or None when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    epoch = record.get("epoch")
    return record if isinstance(epoch, int) and not isinstance(epoch, bool) else None
