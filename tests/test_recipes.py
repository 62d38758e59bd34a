"""The named recipes: what each sets, that the options a user gives win, and that the
time-to-accuracy recipes (fast, accurate, accurate-long) keep the engine's promises on real
processes: ranks agree on 2 processes, a run stopped mid-epoch resumes to identical results,
and the augmentation each recipe names is what its run trains with.

Their accuracy and speed are measured in benchmarks/recipes.py, not here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from support.fakedata import write_fashion_dir
from support.processes import assert_same_training, metrics, summary, train, why

from fmnist_accel.config import MODEL_NAMES, TrainConfig, resolve_config
from fmnist_accel.engine.models import build_model, count_parameters
from fmnist_accel.recipes import RECIPES

FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_recipe_sets_only_real_options_and_resolves_to_them(name):
    recipe = RECIPES[name]
    assert set(recipe) <= FIELDS - {"recipe"}, set(recipe) - FIELDS
    cfg = resolve_config({"recipe": name})
    assert cfg.recipe == name
    for key, value in recipe.items():
        assert getattr(cfg, key) == value, key
    if "model" in recipe:
        assert recipe["model"] in MODEL_NAMES
        assert count_parameters(build_model(recipe["model"])) < 2_000_000


def test_the_recipe_choices_are_the_recipes():
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "recipe")
    assert set(field.metadata["choices"]) == set(RECIPES)


def test_options_given_override_the_recipe():
    cfg = resolve_config({"recipe": "accurate", "epochs": 2, "valid_size": 5000, "model": None})
    assert (cfg.epochs, cfg.valid_size, cfg.model) == (2, 5000, RECIPES["accurate"]["model"])


def test_the_time_to_accuracy_recipes_are_fixed_schedules_on_all_images():
    for name in ("fast", "accurate", "accurate-long"):
        cfg = resolve_config({"recipe": name})
        assert cfg.scheduler == "onecycle" and not cfg.early_stopping and cfg.valid_size == 0
    assert not resolve_config({"recipe": "fast"}).augment
    accurate = resolve_config({"recipe": "accurate"})
    assert accurate.augment and accurate.crop_padding == 0  # flips only


# ------------------------------------------------------------------------------------------
# Real runs on fake data, shortened (2 epochs, small batches)
# ------------------------------------------------------------------------------------------
EPOCHS = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=100)


def short(recipe: str, data_dir: Path, out: Path, name: str, batch: int = 50) -> list[str]:
    return ["--recipe", recipe, "--epochs", str(EPOCHS), "--batch-size", str(batch),
            "--data-dir", str(data_dir), "--output-dir", str(out), "--run-name", name]  # fmt: skip


def saved_config(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["fmnist_accel"])["config"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fast", "accurate", "accurate-long"])
def test_two_processes_agree_and_end_with_the_test_accuracy(recipe, data_dir, tmp_path):
    proc = train(2, short(recipe, data_dir, tmp_path, "r", batch=25))
    assert proc.returncode == 0, why(proc)
    run = tmp_path / "r"
    s = summary(run)
    assert s["status"] == "completed"
    assert [r["epoch"] for r in s["ranks"]] == [EPOCHS, EPOCHS]  # every rank ran every epoch
    assert 0 <= s["final_test"]["accuracy"] <= 1
    assert [m["epoch"] for m in metrics(run)] == [1, 2]
    assert "valid_loss" not in metrics(run)[0]  # all images trained on, no validation
    config = saved_config(run / "last.safetensors")
    assert config["recipe"] == recipe and config["model"] == RECIPES[recipe]["model"]
    assert config["crop_padding"] == RECIPES[recipe].get("crop_padding", 2)


@pytest.mark.slow
def test_accurate_stopped_mid_epoch_resumes_to_identical_results(data_dir, tmp_path):
    """SIGTERM in step 4 of epoch 2 (one process saves the last finished step, 3, at once), then
    --resume: the same metrics and last checkpoint, bit for bit, as a run never stopped.
    The flip-only augmentation of epoch 2 is rebuilt from (seed, epoch, rank)."""
    steps = 600 // 50
    ref = short("accurate", data_dir, tmp_path, "ref") + ["--deterministic"]
    assert (proc := train(1, ref)).returncode == 0, why(proc)

    args = short("accurate", data_dir, tmp_path, "cut") + ["--deterministic", "--resume", "auto"]
    proc = train(1, args, faults={"FAULT_TERM_STEP": str(steps + 4)})
    assert proc.returncode == 75, why(proc)
    proc = train(1, args)
    assert proc.returncode == 0, why(proc)
    assert "resuming after epoch 1" in proc.stdout and ", at step 3 of epoch 2)" in proc.stdout

    assert_same_training(tmp_path / "cut", tmp_path / "ref", EPOCHS)
