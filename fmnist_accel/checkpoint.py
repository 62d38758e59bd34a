"""Checkpoint files: atomic writes, safe reads.

- best.safetensors / last.safetensors: model weights in safetensors, with the JSON metadata
  that rebuilds the model (model name, config, epoch, metrics) stored in the same file's
  header, so weights and metadata can never disagree.
- resume.pt: the whole training state (see train.py), a plain dict of tensors and numbers
  read back with torch.load(weights_only=True), which refuses arbitrary pickled objects.

Every write goes to a temporary file in the same folder, is flushed to disk, and then
os.replace()s the old file: a kill at any moment leaves either the old or the new file,
never a torn one. A write that fails (a full disk) removes its temporary file and raises
WriteFailed, one line naming the file and the free space (writes.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .writes import write_failed

FORMAT = "fmnist-accel/1"
METADATA_KEY = "fmnist_accel"
CHECKPOINT_NAMES = ("best", "last")
_UMASK = os.umask(0)
os.umask(_UMASK)


def first_sentence(exc: Exception) -> str:
    """A library error's reason, short enough for a one-line message: torch's run on with
    advice for several sentences and lines."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(". ")[0]


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


def checkpoint_epoch(path: Path) -> int | None:
    """The epoch in a checkpoint's metadata, or None if there is no readable checkpoint."""
    try:
        return load_model_checkpoint(path, metadata_only=True)[1].get("epoch")
    except UserError:
        return None


def save_model_checkpoint(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    # safetensors.save() gives the file's bytes, written here into our own temporary file:
    # save_file() would write through a temporary file of its own (.tmpXXXXXX), which a kill
    # would leave behind under a name no cleanup knows.
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    header = {METADATA_KEY: json.dumps({"format": FORMAT, **metadata})}
    data = save(tensors, metadata=header)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_model_checkpoint(
    path: Path, metadata_only: bool = False
) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, metadata) of a checkpoint written by save_model_checkpoint; with
    metadata_only, an empty state_dict (only the header is read).

    Raises UserError with one line for anything else: a missing file, a file that is not
    safetensors, a truncated one, or a safetensors file without our metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state_dict = {} if metadata_only else load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path} is not a readable checkpoint ({first_sentence(exc)})") from None
    try:
        metadata = json.loads(header[METADATA_KEY])
    except (KeyError, json.JSONDecodeError):
        metadata = None
    if not isinstance(metadata, dict):
        raise UserError(f"{path} is a safetensors file but not an fmnist-accel checkpoint")
    if metadata.get("format") != FORMAT:
        raise UserError(
            f"{path} has checkpoint format {metadata.get('format')!r}, expected {FORMAT}"
        )
    return state_dict, metadata


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    # Serialised in memory, then written as bytes: torch.save() to a path reports a full
    # disk as a RuntimeError from its C++ stream ("unexpected pos"), not as an OSError.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    data = buffer.getbuffer()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_resume_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no resume state at {path}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        reason = first_sentence(exc)
        raise UserError(f"{path} is not a readable resume state ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an fmnist-accel resume state")
    return state
