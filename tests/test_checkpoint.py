"""Checkpoint files and the resume state: round trips, and one-line errors for anything else
(their atomic writes: test_atomic_writes.py)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.errors import one_line

from fmnist_accel.config import TrainConfig
from fmnist_accel.engine.models import build_model
from fmnist_accel.engine.trained_model import model_from_checkpoint
from fmnist_accel.errors import UserError
from fmnist_accel.store.checkpoint import (
    FORMAT,
    METADATA_KEY,
    load_model_checkpoint,
    load_resume_state,
    save_model_checkpoint,
    save_resume_state,
)


def tmp_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def resume_state(model: torch.nn.Module, optimizer) -> dict:
    """A complete resume state of one process, as run/outputs.save_resume writes it."""
    return {
        "config": TrainConfig(model="mlp").to_dict(),
        "epoch": 1,
        "step": 0,
        "elapsed": 1.5,
        "world_size": 1,
        "model": model.state_dict(),
        "ema": None,
        "optimizer": optimizer.state_dict(),
        "plateau": None,
        "step_scheduler": None,
        "grad_scaler": None,
        "early_stopping": {"best": 0.5, "bad_epochs": 0},
        "best": {"metric": "valid_accuracy", "value": 0.5, "epoch": 3},
        "rank_states": [
            {"cpu_rng": torch.get_rng_state(), "cuda_rng": None, "loss_sum": 0.0, "count": 0}
        ],
    }


def mlp_checkpoint(path: Path, seed: int = 0, **meta) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp")
    save_model_checkpoint(path, model.state_dict(), {"model": "mlp", "epoch": 3, **meta})
    return model


# ------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------
def test_checkpoint_round_trips_weights_and_metadata(tmp_path):
    path = tmp_path / "best.safetensors"
    metadata = {"model": "mlp", "epoch": 7, "metrics": {"valid_loss": 0.25}, "config": {"lr": 1}}
    torch.manual_seed(0)
    model = build_model("mlp")
    save_model_checkpoint(path, model.state_dict(), metadata)
    state, meta = load_model_checkpoint(path)
    assert meta == {"format": FORMAT, **metadata}
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)


def test_model_is_rebuilt_from_the_checkpoint_alone(tmp_path):
    path = tmp_path / "best.safetensors"
    torch.manual_seed(0)
    original = build_model("cnn-bn")
    original.train()(torch.randn(16, 1, 28, 28))  # move the BatchNorm running statistics
    save_model_checkpoint(path, original.state_dict(), {"model": "cnn-bn", "epoch": 1})
    rebuilt, meta = model_from_checkpoint(path)
    assert meta["model"] == "cnn-bn" and not rebuilt.training
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original.eval()(x))


def test_resume_state_round_trips_with_weights_only(tmp_path):
    path = tmp_path / "resume.pt"
    model = build_model("mlp")
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()
    state = resume_state(model, optimizer)
    state.update(epoch=4, rng=torch.get_rng_state())
    save_resume_state(path, state)
    assert tmp_leftovers(tmp_path) == []
    direct = torch.load(path, weights_only=True)  # no arbitrary pickles inside
    assert direct["format"] == FORMAT and direct["epoch"] == 4
    back = load_resume_state(path)
    assert torch.equal(back["rng"], state["rng"])
    assert back["optimizer"]["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]
    for k, v in model.state_dict().items():
        assert torch.equal(back["model"][k], v)


def test_the_tiny_runs_resume_state_loads_with_weights_only(tiny_run):
    path = tiny_run.run_dir / "resume.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["format"] == FORMAT and state["epoch"] == 2
    assert state["config"]["model"] == "mlp"
    assert load_resume_state(path)["epoch"] == 2
    # the resume weights are the last checkpoint's weights
    last, meta = load_model_checkpoint(tiny_run.run_dir / "last.safetensors")
    assert meta["epoch"] == 2
    for k, v in last.items():
        assert torch.equal(state["model"][k], v)


# ------------------------------------------------------------------------------------------
# Files that are not our checkpoints: one-line UserError
# ------------------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError) as exc:
        load_model_checkpoint(tmp_path / "nope.safetensors")
    assert one_line(exc) == f"no checkpoint at {tmp_path / 'nope.safetensors'}"


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, I am text\n", b"\xff" * 8 + b"{}", os.urandom(4096)],
    ids=["empty", "text", "bad-header-length", "random"],
)
def test_non_checkpoint_file(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError) as exc:
        load_model_checkpoint(path)
    assert one_line(exc).startswith(f"{path} is not a readable checkpoint")


@pytest.mark.parametrize("keep", [0.99, 0.5, 0.01])
def test_truncated_checkpoint(tmp_path, keep):
    path = tmp_path / "best.safetensors"
    mlp_checkpoint(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(UserError) as exc:
        load_model_checkpoint(path)
    assert one_line(exc).startswith(f"{path} is not a readable checkpoint")


@pytest.mark.parametrize(
    "metadata",
    [None, {"other": "x"}, {METADATA_KEY: "not json {"}, {METADATA_KEY: "[1, 2]"}],
    ids=["no-metadata", "foreign-metadata", "bad-json", "json-not-object"],
)
def test_plain_safetensors_without_our_metadata(tmp_path, metadata):
    path = tmp_path / "plain.safetensors"
    save_file(build_model("mlp").state_dict(), path, metadata=metadata)
    with pytest.raises(UserError) as exc:
        load_model_checkpoint(path)
    assert one_line(exc) == f"{path} is a safetensors file but not an fmnist-accel checkpoint"


def test_other_format_version(tmp_path):
    path = tmp_path / "future.safetensors"
    save_file(
        {"w": torch.zeros(2)},
        path,
        metadata={METADATA_KEY: json.dumps({"format": "fmnist-accel/99", "model": "mlp"})},
    )
    with pytest.raises(UserError, match="checkpoint format 'fmnist-accel/99', expected"):
        load_model_checkpoint(path)


def test_weights_that_do_not_fit_the_named_architecture(tmp_path):
    path = tmp_path / "liar.safetensors"
    weights = build_model("mlp").state_dict()
    save_model_checkpoint(path, weights, {"model": "cnn", "epoch": 1})
    with pytest.raises(UserError) as exc:
        model_from_checkpoint(path)
    message = one_line(exc)
    assert message.startswith(f"{path} does not fit the cnn architecture its metadata names")
    assert "tensors missing, e.g. conv1.0.weight" in message
    assert "unexpected tensors" in message


def test_weights_of_the_wrong_shape(tmp_path):
    path = tmp_path / "reshaped.safetensors"
    weights = build_model("mlp").state_dict()
    weights["net.5.weight"] = torch.zeros(5, 64)
    save_model_checkpoint(path, weights, {"model": "mlp", "epoch": 1})
    with pytest.raises(UserError) as exc:
        model_from_checkpoint(path)
    assert "net.5.weight (5, 64) instead of (10, 64)" in one_line(exc)


@pytest.mark.parametrize("name", ["vgg", None, ["mlp"]], ids=["unknown", "missing", "list"])
def test_unknown_model_in_metadata(tmp_path, name):
    path = tmp_path / "odd.safetensors"
    meta = {"epoch": 1} if name is None else {"model": name, "epoch": 1}
    save_model_checkpoint(path, build_model("mlp").state_dict(), meta)
    with pytest.raises(UserError) as exc:
        model_from_checkpoint(path)
    assert "which this version does not know" in one_line(exc)


def test_resume_state_refuses_pickled_objects(tmp_path):
    path = tmp_path / "resume.pt"

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should never run",))

    torch.save({"format": FORMAT, "payload": Payload()}, path, pickle_module=pickle)
    with pytest.raises(UserError) as exc:
        load_resume_state(path)
    assert one_line(exc).startswith(f"{path} is not a readable resume state")


@pytest.mark.parametrize("kind", ["truncated", "foreign-dict", "text", "missing"])
def test_bad_resume_state(tmp_path, kind):
    path = tmp_path / "resume.pt"
    if kind == "truncated":
        save_resume_state(path, {"epoch": 1, "w": torch.zeros(1000)})
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "foreign-dict":
        torch.save({"epoch": 1}, path)
    elif kind == "text":
        path.write_text("epoch=1\n")
    with pytest.raises(UserError) as exc:
        load_resume_state(path)
    assert str(path) in one_line(exc)
