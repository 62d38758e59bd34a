"""Rebuild a trained model from a checkpoint file alone."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from ..store.checkpoint import load_model_checkpoint
from .models import MODELS, build_model


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata); the architecture comes from the checkpoint itself."""
    state_dict, meta = load_model_checkpoint(path)
    name = meta.get("model")
    if not isinstance(name, str) or name not in MODELS:
        raise UserError(f"{path} is for model {name!r}, which this version does not know")
    config_model = meta.get("config", {}).get("model", name)
    if config_model != name:
        raise UserError(
            f"{path} has damaged metadata: it names model {name} but its config says "
            f"{config_model!r}; use the run's own checkpoint"
        )
    model = build_model(name)
    mismatch = state_dict_mismatch(model.state_dict(), state_dict)
    if mismatch:
        raise UserError(
            f"{path} does not fit the {name} architecture its metadata names ({mismatch})"
        )
    model.load_state_dict(state_dict, strict=True)  # names and shapes are checked above
    return model.eval(), meta


def state_dict_mismatch(expected: dict, found: dict) -> str:
    """'' when `found` has exactly the tensor names and shapes of `expected`, else a short
    account of the differences, with the first example of each kind."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} instead of {tuple(expected[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    # load_state_dict would cast silently (int weights into float parameters)
    dtypes = [
        f"{k} {str(found[k].dtype).removeprefix('torch.')} instead of "
        f"{str(expected[k].dtype).removeprefix('torch.')}"
        for k in expected
        if k in found and found[k].dtype != expected[k].dtype
    ]
    parts = [
        f"{len(names)} {what}, e.g. {names[0]}"
        for what, names in (
            ("tensors missing", missing),
            ("unexpected tensors", unexpected),
            ("tensors of another shape", shapes),
            ("tensors of another type", dtypes),
        )
        if names
    ]
    return "; ".join(parts)


def data_dir_for(meta: dict, data_dir: str | None) -> str:
    """--data-dir if given, else the folder the run was trained on. That folder, read from
    the checkpoint's metadata, is a place to read from, never to write: callers download
    missing files only into a --data-dir the user gave (may_download)."""
    return data_dir if data_dir is not None else meta.get("config", {}).get("data_dir", "data")


def may_download(data_dir: str | None) -> bool:
    return data_dir is not None
