"""Rebuild a trained model from a checkpoint file alone."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .checkpoint import load_model_checkpoint
from .errors import UserError
from .models import MODELS, build_model


def model_from_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata); the architecture comes from the checkpoint itself."""
    state_dict, meta = load_model_checkpoint(path)
    name = meta.get("model")
    if name not in MODELS:
        raise UserError(f"{path} is for model {name!r}, which this version does not know")
    model = build_model(name)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"{path} does not fit the {name} architecture its metadata names ({first})"
        ) from None
    return model.eval(), meta


def data_dir_for(meta: dict, data_dir: str | None) -> str:
    """--data-dir if given, else the folder the run was trained on."""
    return data_dir if data_dir is not None else meta.get("config", {}).get("data_dir", "data")
