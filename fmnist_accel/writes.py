"""A write that fails (a full disk, a quota, an I/O error) becomes one line that names the
file and the free space left; the files written before it stay intact (checkpoint.py writes
every file atomically)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import WriteFailed


def free_space(folder: Path) -> str:
    """'12.3 MB free' on the file system that holds `folder` (or its nearest parent)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if free >= size:
            return f"{free / size:.1f} {unit} free"
    return f"{free} bytes free"


def write_failed(path: Path, exc: OSError) -> WriteFailed:
    reason = exc.strerror or type(exc).__name__
    return WriteFailed(
        f"cannot write {path}: {reason} ({free_space(Path(path).parent)} there); the files "
        "written before it are intact"
    )


def log_scalars(accelerator, scalars: dict, step: int, folder: Path) -> None:
    """Main process: TensorBoard scalars, written to disk now, so that a full disk shows up
    here, as one line naming `folder`, and not later in a background thread or at exit."""
    quiet_tensorboard_thread_errors()
    try:
        accelerator.log(scalars, step=step)
        for tracker in accelerator.trackers:
            flush = getattr(tracker.tracker, "flush", None)
            if flush is not None:
                flush()
    except OSError as exc:
        raise write_failed(folder, exc) from None


_quiet_installed = False


def quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes its events from a background thread; on a full disk that thread
    dies with a traceback on stderr, and the main thread gets the same OSError at its next
    write (reported there as one line). Leave that thread's traceback out."""
    global _quiet_installed
    if _quiet_installed:
        return
    import threading

    previous = threading.excepthook

    def hook(args) -> None:
        from_tensorboard = type(args.thread).__module__.startswith("tensorboard.")
        if not (from_tensorboard and issubclass(args.exc_type, OSError)):
            previous(args)

    threading.excepthook = hook
    _quiet_installed = True
