"""Every file the toolkit writes is written whole or not at all, and a write that fails says so
in one line.

A write goes to a temporary file in the same folder, is flushed to disk, and then
os.replace()s the old file: a kill at any moment leaves either the old or the new file, never
a torn one. A write that fails (no space left, a quota, an I/O error) removes its temporary
file and raises WriteFailed (exit code 74), one line that names the file and the free space
left; every file written before it is intact. No torch here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import WriteFailed

_UMASK = os.umask(0)
os.umask(_UMASK)


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


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync it, then rename it over `path` in one step. An OSError
    (no space left, a quota, an I/O error) becomes WriteFailed; `path` is left as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_failed(path, exc) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_failed(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(path, write)


def atomic_write_bytes(path: Path, data: bytes | memoryview) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_copy(source: Path, target: Path) -> None:
    """target becomes a copy of source, atomically. A hard link when the file system allows
    (no bytes copied; source is itself only ever replaced, never rewritten in place)."""

    def write(tmp: str) -> None:
        os.unlink(tmp)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)

    atomic_write(target, write)


# --------------------------------------------------------------------------------------------
# Reading: only regular files
# --------------------------------------------------------------------------------------------
class NotARegularFile(OSError):
    """A run file that is a FIFO, a socket or a device (made by hand or by a hostile folder):
    reading it would block for ever or never end."""


def read_regular_bytes(path: Path) -> bytes:
    """The bytes of the regular file at path (a symbolic link to one is fine). Raises
    FileNotFoundError when it is missing, NotARegularFile for anything else: opened without
    blocking (a FIFO with no writer) and checked before a byte is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_regular_text(path: Path) -> str:
    return read_regular_bytes(path).decode("utf-8")


def special_file_kind(path: str | Path) -> str | None:
    """None for a regular file (or a link to one); else what it is, in words a user knows:
    'missing', 'a folder', 'a FIFO', 'a socket', 'a device', or 'unreadable (REASON)'."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
