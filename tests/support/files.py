"""Files as the tests compare them: digests, listings, read-only folders."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path


def file_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under root."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def listing(root: Path) -> dict[str, tuple]:
    """Relative path -> (kind, size, mtime_ns, mode) of everything under root, root included."""
    root = Path(root)
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (
            "dir" if p.is_dir() else "file",
            st.st_size if p.is_file() else 0,
            st.st_mtime_ns,
            stat.S_IMODE(st.st_mode),
        )
    return out


def make_read_only(root: Path) -> None:
    for p in sorted(Path(root).rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    Path(root).chmod(0o555)


def make_writable(root: Path) -> None:
    Path(root).chmod(0o755)
    for p in sorted(Path(root).rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)
