"""The file formats of a run's weights and state: written atomically, read safely.

- best.safetensors / last.safetensors: model weights in safetensors, with the JSON metadata
  that rebuilds the model (model name, config, epoch, metrics) stored in the same file's
  header, so weights and metadata can never disagree.
- resume.pt: the whole training state (run/outputs.py writes it), a plain dict of tensors and
  numbers read back with torch.load(weights_only=True), which refuses arbitrary pickled
  objects.

Both are written atomically (store/atomic.py): a kill leaves the old file or the new one.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..config import config_dict_problem
from ..errors import UserError
from .atomic import atomic_write_bytes

FORMAT = "fmnist-accel/1"
METADATA_KEY = "fmnist_accel"


def first_sentence(exc: Exception) -> str:
    """A library error's reason, short enough for a one-line message: torch's run on with
    advice for several sentences and lines."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.split(". ")[0]


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
    atomic_write_bytes(path, save(tensors, metadata=header))


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
    problem = metadata_problem(metadata)
    if problem:
        raise UserError(f"{path} has damaged metadata: {problem}")
    bad = next((k for k, v in state_dict.items() if not_all_finite(v)), None)
    if bad is not None:
        raise UserError(
            f"{path} holds non-finite weights ({bad} has nan or inf values): training never "
            "saves such weights; use another checkpoint"
        )
    return state_dict, metadata


def metadata_problem(metadata: dict) -> str | None:
    """What makes a checkpoint's metadata unusable (edited by hand), or None. The model name
    is checked where the model is built (engine/trained_model.py)."""
    epoch = metadata.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        return f"epoch is {epoch!r}, not a number of epochs"
    if not isinstance(metadata.get("metrics", {}), dict):
        return "its metrics are not an object"
    if "config" in metadata:
        return config_dict_problem(metadata["config"])
    return None


def not_all_finite(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    # Serialised in memory, then written as bytes: torch.save() to a path reports a full
    # disk as a RuntimeError from its C++ stream ("unexpected pos"), not as an OSError.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def load_resume_state(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch adds a 2-line warning to a refused pickle
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no resume state at {path}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
        reason = first_sentence(exc)
        raise UserError(f"{path} is not a readable resume state ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not an fmnist-accel resume state")
    problem = resume_state_problem(state)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; resume from another copy or start anew")
    return state


# What resume.pt holds (run/outputs.save_resume writes it) and the types a resume relies on;
# None: may be null.
_RESUME_FIELDS = {
    "config": dict,
    "epoch": int,
    "step": int,
    "elapsed": (int, float),
    "world_size": int,
    "model": dict,
    "ema": (dict, None),
    "optimizer": dict,
    "plateau": (dict, None),
    "step_scheduler": (dict, None),
    "grad_scaler": (dict, None),
    "early_stopping": dict,
    "best": dict,
    "rank_states": list,
}
_RANK_FIELDS = {
    "cpu_rng": torch.Tensor,
    "cuda_rng": (torch.Tensor, None),
    "loss_sum": (int, float),
    "count": int,
}
# Written by newer versions only: checked when present.
_OPTIONAL_RANK_FIELDS = {"seconds": (int, float)}


def resume_state_problem(state: dict) -> str | None:
    """What makes a resume state unusable (edited by hand, written by something else), or
    None. Tensors that do not fit the model are found when they are loaded (run/session.py)."""
    for key, kinds in _RESUME_FIELDS.items():
        problem = _field_problem(state, key, kinds)
        if problem:
            return problem
    if state["epoch"] < 0 or state["step"] < 0 or state["world_size"] < 1:
        return "epoch, step or world_size is negative"
    data = state.get("data")  # newer versions: what identifies the training data
    if data is not None and not (
        isinstance(data, dict)
        and isinstance(data.get("images"), int)
        and isinstance(data.get("fingerprint"), str)
    ):
        return "data is not an object with images and fingerprint"
    if not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        return "its model weights are not all tensors"
    ranks = state["rank_states"]
    if len(ranks) != state["world_size"] or not all(isinstance(r, dict) for r in ranks):
        return f"it holds {len(ranks)} rank states for world_size {state['world_size']}"
    rng_size = torch.get_rng_state().numel()
    for rank_state in ranks:
        optional = {k: v for k, v in _OPTIONAL_RANK_FIELDS.items() if k in rank_state}
        for key, kinds in {**_RANK_FIELDS, **optional}.items():
            problem = _field_problem(rank_state, key, kinds)
            if problem:
                return f"a rank state: {problem}"
        rng = rank_state["cpu_rng"]
        if rng.dtype != torch.uint8 or rng.numel() != rng_size:
            return "a rank state's cpu_rng is not a CPU random generator state"
    problem = config_dict_problem(state["config"])
    if problem is None and not {"epochs", "scheduler"} <= set(state["config"]):
        problem = "its config lacks epochs or scheduler"
    return problem


_KIND_NAMES = {
    dict: "an object",
    list: "a list",
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true/false",
    type(None): "null",
    torch.Tensor: "a tensor",
}


def _field_problem(mapping: dict, key: str, kinds) -> str | None:
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if key not in mapping:
        return f"{key} is missing"
    value = mapping[key]
    types = tuple(type(None) if k is None else k for k in kinds)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        found = next((n for t, n in _KIND_NAMES.items() if type(value) is t), "something else")
        wanted = " or ".join(_KIND_NAMES.get(t, t.__name__) for t in types)
        return f"{key} is {found}, not {wanted}"
    return None


@contextmanager
def resume_state_must_fit(path: Path) -> Iterator[None]:
    """Loading a resume state into the run's model and optimizer: what does not fit (a
    tensor of another shape, a missing key: an edited or foreign file) becomes one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # load_state_dict: "Error(s) in loading state_dict for MLP:", then one line per problem
        reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else None
        reason = reason or (f"no {exc}" if isinstance(exc, KeyError) else first_sentence(exc))
        raise UserError(f"{path} does not fit the run it belongs to ({reason})") from None


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Raise ValueError when a loaded optimizer state holds tensors of another shape than
    their parameters (torch only finds out at the next step, in the middle of training)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise ValueError(
                        f"optimizer {name} of shape {tuple(value.shape)} for a parameter of "
                        f"shape {tuple(param.shape)}"
                    )
