"""Bad input: each case one clear line and a non-zero exit, nothing already written damaged.

Every case runs the real `fmnist-accel` in a subprocess inside a workspace that holds a copy
of a finished run (runs/existing) and a writable fake data folder, and checks:
- the exit code (errors.EXIT_USER_ERROR, or EXIT_DIVERGED for a non-finite loss);
- stderr is exactly one line, `fmnist-accel: error: ...`, naming the problem; no traceback;
- every file that was in the workspace before is byte-identical afterwards.
docs/bad-input.md lists the cases; each row names its test here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from support.errors import assert_one_line_error
from support.fakedata import N_TEST, N_TRAIN, idx_bytes, write_fashion_dir
from support.files import file_digests
from support.processes import CLI, HARNESS, process_env, run_command
from test_picture import png_bytes

from fmnist_accel.engine.data import ALL_FILES, raw_dir
from fmnist_accel.engine.trained_model import model_from_checkpoint
from fmnist_accel.errors import (
    EXIT_DIVERGED,
    EXIT_PEER_FAILED,
    EXIT_USER_ERROR,
    EXIT_WRITE_FAILED,
)
from fmnist_accel.store.checkpoint import METADATA_KEY, load_model_checkpoint, load_resume_state

TRAIN_FAST = ("--model", "mlp", "--epochs", "1", "--batch-size", "64")


@dataclass
class Workspace:
    root: Path
    runs: Path  # --output-dir, holding one finished run
    existing: Path  # runs/existing: a copy of the session's tiny run
    data: Path  # a writable fake data folder (plain IDX files)

    def snapshot(self) -> dict[str, str]:
        return file_digests(self.root)


@pytest.fixture
def ws(tmp_path, tiny_run) -> Workspace:
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, runs / "existing")
    data = write_fashion_dir(tmp_path / "data", N_TRAIN, N_TEST, gz=False)
    return Workspace(tmp_path, runs, runs / "existing", data)


def check_nothing_damaged(ws: Workspace, before: dict[str, str]) -> None:
    """Every file that was there is still there, byte for byte; no new files either."""
    assert ws.snapshot() == before


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
def test_missing_data_without_network(ws, cli):
    """No files and no network (the proxies point at a closed port: it fails at once)."""
    empty = ws.root / "empty"
    empty.mkdir()
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", empty, "--output-dir", ws.runs)
    assert_one_line_error(
        res,
        f"Fashion-MNIST files missing from {raw_dir(empty)}/ (all four) and the download failed",
        *(f"{name}.gz" for name in ALL_FILES),
        "--data-dir",
    )
    check_nothing_damaged(ws, before)


def test_missing_test_files_stop_training_before_it_starts(ws, cli):
    """The run's final test needs the t10k files: without them training does not start
    (after training would be too late to say so), unless the final test is turned off."""
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw_dir(ws.data) / name).unlink()
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs)
    line = assert_one_line_error(
        res,
        f"missing from {raw_dir(ws.data)}/ (t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)",
        "--data-dir",
    )
    assert not re.search(r"^epoch 1/1", res.stdout, re.M), line  # not one epoch trained
    check_nothing_damaged(ws, before)
    res = cli(
        "train", *TRAIN_FAST, "--no-final-test", "--data-dir", ws.data, "--output-dir", ws.runs
    )
    assert res.rc == 0 and "\ntest: " not in res.stdout, str(res)


# (A header-only file, wrong image/label counts and labels above 9: tests/test_data.py.)
@pytest.mark.parametrize("damage", ["truncated", "wrong-magic", "corrupt-gzip"])
def test_corrupt_idx_file(ws, cli, damage):
    images = raw_dir(ws.data) / "train-images-idx3-ubyte"
    raw = images.read_bytes()
    if damage == "truncated":
        images.write_bytes(raw[: len(raw) - 1000])
        expected = (str(images), "truncated or corrupt")
    elif damage == "wrong-magic":
        images.write_bytes(b"\x00\x00\x08\x01" + raw[4:])
        expected = (str(images), "magic number 0x00000801, expected 0x00000803")
    else:  # a gzip header, then a deflate stream that zlib rejects
        images.unlink()
        gz = images.with_name(images.name + ".gz")
        gz.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + bytes(range(256)) * 4)
        expected = (f"cannot read {gz}", "Error -3 while decompressing data")
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs)
    assert_one_line_error(res, *expected)
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("where", ["config", "data"])
def test_too_few_training_images_per_process(ws, cli, where):
    """A split that leaves at most one training image per process: nothing to train on (it
    used to end in a ZeroDivisionError). With the real 60k images --valid-size says it all;
    with a smaller data file (here 200 images, whose split shrinks in proportion) the
    images themselves are counted."""
    valid_size, expected = {
        "config": ("59999", "--valid-size 59999 leaves 1 training image(s) for 1 process(es)"),
        "data": ("59800", "1 training image(s) for 1 process(es): each process needs at least 2"),
    }[where]
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--valid-size", valid_size, "--data-dir", ws.data,
              "--output-dir", ws.runs)  # fmt: skip
    assert_one_line_error(res, expected)
    check_nothing_damaged(ws, before)


def test_idx_file_with_no_items(ws, cli):
    """A header that claims 0 images (and a labels file that agrees): no data to train on."""
    raw = raw_dir(ws.data)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(torch.zeros(0, 28, 28).byte()))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(torch.zeros(0).byte()))
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs)
    assert_one_line_error(res, f"{raw / 'train-images-idx3-ubyte'} holds no items")
    check_nothing_damaged(ws, before)


def test_idx_file_far_larger_than_its_header_says(ws, cli, tmp_path_factory):
    """A 1 TB (sparse) file whose header promises 200 images: its size is compared with the
    header before anything is read (reading it all was a MemoryError). Outside the workspace:
    the workspace's snapshot reads every file."""
    data = write_fashion_dir(tmp_path_factory.mktemp("huge") / "data", N_TRAIN, N_TEST, gz=False)
    images = raw_dir(data) / "train-images-idx3-ubyte"
    with open(images, "r+b") as f:
        f.truncate(1 << 40)
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", data, "--output-dir", ws.runs)
    assert_one_line_error(
        res, f"{images} is truncated or corrupt: {1 << 40} bytes, its header promises 156816"
    )
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_data_path_that_is_not_a_file(ws, cli, kind):
    """A folder or a named pipe where a data file belongs: said as such (a FIFO would block
    the read), not taken for a missing file to download."""
    images = raw_dir(ws.data) / "train-images-idx3-ubyte"
    images.unlink()
    if kind == "folder":
        images.mkdir()
    else:
        os.mkfifo(images)
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs)
    what = "a folder" if kind == "folder" else "a named pipe (FIFO)"
    assert_one_line_error(res, f"{images} is {what}, not a data file")
    check_nothing_damaged(ws, before)


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------
def make_bad_checkpoint(ws: Workspace, kind: str) -> tuple[Path, tuple[str, ...]]:
    path = ws.root / f"{kind}.safetensors"
    good = ws.existing / "best.safetensors"
    if kind == "not-a-checkpoint":
        path.write_text("model weights, honest\n")
        return path, (f"{path} is not a readable checkpoint",)
    if kind == "truncated":
        raw = good.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        return path, (f"{path} is not a readable checkpoint",)
    if kind == "plain-safetensors":
        save_file({"weight": torch.zeros(3, 3)}, path)
        return path, (f"{path} is a safetensors file but not an fmnist-accel checkpoint",)
    weights, meta = load_file(good), load_model_checkpoint(good)[1]
    if kind == "non-finite":
        weights["net.5.bias"][3] = float("nan")
        expected = (f"{path} holds non-finite weights (net.5.bias has nan or inf values)",)
    elif kind == "integer-weights":
        weights = {k: v.round().to(torch.int64) for k, v in weights.items()}
        expected = (f"{path} does not fit the mlp architecture", "int64 instead of float32")
    elif kind == "config-not-object":
        meta["config"] = ["mlp", 2]
        expected = (f"{path} has damaged metadata: its config is a list, not an object",)
    elif kind == "config-out-of-range":  # a negative split size: a wrong --split valid
        meta["config"]["valid_size"] = -5
        expected = (f"{path} has damaged metadata: its config has valid_size = -5, outside",)
    elif kind == "epoch-not-a-number":
        meta["epoch"] = "two"
        expected = (f"{path} has damaged metadata: epoch is 'two', not a number of epochs",)
    else:
        assert kind == "other-architecture"  # mlp weights, metadata that says cnn throughout
        meta["model"] = meta["config"]["model"] = "cnn"
        expected = (f"{path} does not fit the cnn architecture its metadata names", "missing")
    save_file(weights, path, metadata={METADATA_KEY: json.dumps(meta)})
    return path, expected


@pytest.mark.parametrize(
    "kind, command",
    [
        ("not-a-checkpoint", "eval"),
        ("plain-safetensors", "predict"),
        ("other-architecture", "eval"),
        ("truncated", "predict"),
        ("non-finite", "eval"),
        ("integer-weights", "predict"),
        ("config-not-object", "eval"),
        ("config-out-of-range", "eval"),
        ("epoch-not-a-number", "predict"),
    ],
)
def test_bad_checkpoint(ws, cli, kind, command):
    path, expected = make_bad_checkpoint(ws, kind)
    extra = ("--index", "0") if command == "predict" else ()
    before = ws.snapshot()
    assert_one_line_error(cli(command, path, *extra, "--data-dir", ws.data), *expected)
    check_nothing_damaged(ws, before)


def copy_with_a_truncated_file(ws, name: str, keep: int) -> tuple[Path, Path]:
    """A copy of the finished run whose file `name` is cut to `keep` bytes."""
    broken = ws.runs / "broken"
    shutil.copytree(ws.existing, broken)
    path = broken / name
    path.write_bytes(path.read_bytes()[:keep])
    return broken, path


def test_truncated_checkpoint_in_a_run(ws, cli):
    """`eval last` of a run whose last.safetensors was cut short (a copied run)."""
    broken, last = copy_with_a_truncated_file(ws, "last.safetensors", 1000)
    before = ws.snapshot()
    res = cli("eval", "last", "--run-dir", broken)
    assert_one_line_error(res, f"{last} is not a readable checkpoint")
    check_nothing_damaged(ws, before)


def test_corrupt_resume_state(ws, cli):
    broken, resume = copy_with_a_truncated_file(ws, "resume.pt", 2000)
    before = ws.snapshot()
    res = cli("train", "--resume", broken, "--data-dir", ws.data)
    assert_one_line_error(res, f"{resume} is not a readable resume state")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize(
    "edit", ["config-not-object", "key-missing", "wrong-shape", "optimizer-wrong-shape"]
)
def test_edited_resume_state(ws, cli, edit):
    """A resume.pt edited by hand (still a valid torch file, so it loads): said in one line
    before anything is trained or written."""
    broken = ws.runs / "edited"
    shutil.copytree(ws.existing, broken)
    resume = broken / "resume.pt"
    state = torch.load(resume, weights_only=True)
    if edit == "config-not-object":
        state["config"] = "mlp"
        expected = f"{resume} is damaged: config is a string, not an object"
    elif edit == "key-missing":
        del state["rank_states"]
        expected = f"{resume} is damaged: rank_states is missing"
    elif edit == "wrong-shape":
        state["model"]["net.5.weight"] = torch.zeros(5, 64)
        expected = f"{resume} does not fit the run it belongs to (size mismatch for net.5.weight"
    else:
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
        expected = f"{resume} does not fit the run it belongs to (optimizer exp_avg of shape (3,)"
    torch.save(state, resume)
    before = ws.snapshot()
    res = cli("train", "--resume", broken, "--epochs", "3", "--data-dir", ws.data)
    assert_one_line_error(res, expected)
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("entry", ["tensorboard-file", "metrics-folder", "summary-folder"])
def test_run_folder_entry_of_the_wrong_kind(ws, cli, entry):
    """A name the run writes, taken by the wrong kind of entry: found when the run folder is
    taken, before training (a file called tensorboard gave a traceback at start, a folder
    called summary.json a failed write after the whole run)."""
    broken = ws.runs / "odd"
    shutil.copytree(ws.existing, broken)
    name, kind = {
        "tensorboard-file": ("tensorboard", "a file: the run writes its TensorBoard folder"),
        "metrics-folder": ("metrics.jsonl", "a folder: the run writes a file there"),
        "summary-folder": ("summary.json", "a folder: the run writes a file there"),
    }[entry]
    path = broken / name
    if path.is_dir():
        shutil.rmtree(path)
        path.write_text("not a folder\n")
    else:
        path.unlink()
        path.mkdir()
    before = ws.snapshot()
    res = cli("train", "--resume", broken, "--epochs", "3", "--data-dir", ws.data)
    assert_one_line_error(res, f"{path} is {kind}")
    check_nothing_damaged(ws, before)


def test_run_killed_in_its_first_epoch_started_again_by_name(ws, cli):
    """Killed in epoch 1, before any state was saved: a plain rerun with the same --run-name
    refuses to overwrite the folder, and says how to continue it; --resume RUN (which used
    to fail: no resume.pt) trains it again in its own folder."""
    proc = run_command([sys.executable, HARNESS, *TRAIN_FAST, "--batch-size", "32", "--data-dir",
                        ws.data, "--output-dir", ws.runs, "--run-name", "killed"],
                       cwd=ws.root, env=process_env(FAULT_KILL_STEP="2"))  # fmt: skip
    killed = ws.runs / "killed"
    assert proc.rc == -signal.SIGKILL and not (killed / "resume.pt").exists(), str(proc)
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs,
              "--run-name", "killed")  # fmt: skip
    assert_one_line_error(res, f"{killed} already exists: pass --resume auto to continue it")
    check_nothing_damaged(ws, before)
    res = cli("train", "--resume", killed)
    assert res.rc == 0, str(res)
    assert "stopped before it saved any state: it trains again from epoch 1" in res.stdout
    assert [r["epoch"] for r in map(json.loads, (killed / "metrics.jsonl").open())] == [1]


def test_no_runs(ws, cli):
    """`eval best` with no run in ./runs (absent), `predict best` with an empty --output-dir."""
    empty = ws.root / "empty-runs"
    empty.mkdir()
    (empty / "not-a-run").mkdir()  # e.g. left by a run that failed before writing anything
    elsewhere = ws.root / "elsewhere"
    elsewhere.mkdir()
    before = ws.snapshot()
    res = cli("eval", "best", cwd=elsewhere)
    assert_one_line_error(res, "no runs in runs/", "train one first (fmnist-accel train)")
    res = cli("predict", "best", "--index", "0", "--output-dir", empty)
    assert_one_line_error(res, f"no runs in {empty}/")
    check_nothing_damaged(ws, before)


# ------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------
def test_unknown_model(ws, cli):
    before = ws.snapshot()
    res = cli("train", "--model", "vgg16", "--data-dir", ws.data, "--output-dir", ws.runs)
    line = assert_one_line_error(res, "Invalid value for '--model': 'vgg16' is not one of 'mlp'")
    check_nothing_damaged(ws, before)
    from fmnist_accel.engine.models import MODELS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "bad-input.md").read_text()
    listed = ", ".join(repr(name) for name in MODELS)
    assert listed in line and listed in doc, "docs/bad-input.md must list every model"


@pytest.mark.parametrize(
    "args",
    [
        ("train", "--epochs", "0"),
        ("train", "--epochs", "-3"),
        ("train", "--batch-size", "0"),
        ("train", "--eval-batch-size", "-1"),
        ("train", "--lr", "0"),
        ("train", "--lr", "-0.1"),
        ("train", "--lr", "nan"),
        ("train", "--momentum", "-0.5"),
        ("train", "--weight-decay", "-1e-4"),
        ("train", "--valid-size", "-1"),
        ("train", "--plateau-factor", "0"),
        ("train", "--early-stopping-patience", "-1"),
        ("eval", "best", "--batch-size", "0"),
        ("predict", "best", "--index", "-1"),
        ("predict", "best", "--index", "0", "--top", "0"),
        ("train", "--seed", "-1"),
        ("train", "--seed", "4294967296"),
        ("train", "--collective-timeout", "0"),
        ("train", "--collective-timeout", "1e308"),
    ],
    ids=" ".join,
)
def test_zero_or_negative_numeric_option(ws, cli, args):
    option = args[-2]  # the bad option is always the last one given
    before = ws.snapshot()
    res = cli(*args, "--data-dir", ws.data, "--output-dir", ws.runs)
    line = assert_one_line_error(res, f"Invalid value for '{option}'")
    assert "not in the range" in line or "is not a finite number" in line
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize(
    "args",
    [
        ("--lr", "1e308"),
        ("--optimizer", "sgd", "--momentum", "1e308"),
        ("--weight-decay", "1e308"),
    ],
    ids=" ".join,
)
def test_option_too_large_for_float_arithmetic(ws, cli, args):
    """Finite, but beyond what the optimizer's float32 arithmetic holds: an overflow
    traceback at the first step ('--lr 1e30' still trains, and stops with exit 3)."""
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, *args, "--data-dir", ws.data, "--output-dir", ws.runs)
    assert_one_line_error(res, f"{args[-2]} {float(args[-1]):g} is beyond float32 arithmetic")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("name", ["../escaped", "ABSOLUTE", "a/b", ".", ""])
def test_run_name_that_is_not_a_folder_name(ws, cli, name):
    """--run-name names one folder in --output-dir: '..' or an absolute path wrote the run
    outside it, 'a/b' where `eval best` never looks."""
    if name == "ABSOLUTE":
        name = str(ws.root / "elsewhere")
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs,
              "--run-name", name)  # fmt: skip
    expected = "--run-name is empty" if name == "" else f"--run-name {name!r} is not a plain"
    assert_one_line_error(res, expected)
    check_nothing_damaged(ws, before)
    assert not (ws.root / "escaped").exists() and not (ws.root / "elsewhere").exists()


def test_output_folder_that_cannot_be_written(ws, cli):
    """Root ignores permissions, so the folder is made impossible: under a regular file."""
    blocker = ws.root / "a-file"
    blocker.write_text("I am a file, not a folder\n")
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", blocker / "runs")
    assert_one_line_error(res, f"cannot write to {blocker / 'runs'}", "Not a directory")
    check_nothing_damaged(ws, before)


def test_existing_run_name_is_not_overwritten(ws, cli):
    before = ws.snapshot()
    res = cli(
        "train",
        *TRAIN_FAST,
        "--data-dir",
        ws.data,
        "--output-dir",
        ws.runs,
        "--run-name",
        "existing",
    )
    assert_one_line_error(res, f"{ws.existing} already exists", "--resume auto")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize(
    "how", ["resume-path", "resume-auto", "first-epoch-resume-path", "first-epoch-resume-auto"]
)
def test_run_in_use_by_another_process(ws, cli, how):
    """A second process must not train into a run folder that a live one is using; the lock
    is this test's (another process than the CLI's), taken the way training takes it
    (tests/test_run_lock.py shows that a real training process holds it)."""
    import fcntl

    folder = ws.existing
    if how.startswith("first-epoch"):  # a live run still in its first epoch: only .lock yet
        folder = ws.runs / "starting"
        folder.mkdir()
    with open(folder / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = ws.snapshot()
        where = ["--resume", folder]
        if how.endswith("resume-auto"):
            where = ["--resume", "auto", "--output-dir", ws.runs, "--run-name", folder.name]
        res = cli("train", "--epochs", "3", "--data-dir", ws.data, *where)
        assert_one_line_error(res, f"{folder} is in use by another training process")
        check_nothing_damaged(ws, before)


def test_validation_split_of_a_run_without_one(ws, cli):
    """A run trained with --valid-size 0 has no validation images to evaluate."""
    res = cli("train", *TRAIN_FAST, "--valid-size", "0", "--scheduler", "none",
              "--no-early-stopping", "--data-dir", ws.data, "--output-dir", ws.runs,
              "--run-name", "all-images")  # fmt: skip
    assert res.rc == 0, str(res)
    before = ws.snapshot()
    res = cli("eval", "last", "--run-dir", ws.runs / "all-images", "--split", "valid")
    assert_one_line_error(
        res, f"{ws.runs / 'all-images' / 'last.safetensors'} was trained with --valid-size 0"
    )
    check_nothing_damaged(ws, before)


def test_unreadable_picture(ws, cli):
    picture = ws.root / "photo.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)  # a PNG signature, then nothing
    before = ws.snapshot()
    res = cli("predict", "best", "--run-dir", ws.existing, "--image", picture)
    assert_one_line_error(res, f"cannot read {picture} as a picture")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("kind", ["truncated", "too-large"])
def test_unusable_picture(ws, cli, kind):
    """A PNG cut short, and one whose header promises more pixels than Pillow opens safely
    (its guard against decompression bombs)."""
    picture = ws.root / f"{kind}.png"
    if kind == "truncated":
        Image.fromarray(torch.full((50, 40), 200, dtype=torch.uint8).numpy()).save(picture)
        picture.write_bytes(picture.read_bytes()[:-30])
        expected = f"cannot read {picture} as a picture (OSError: image file is truncated"
    else:
        picture.write_bytes(png_bytes(20000, 20000))
        expected = f"{picture} is too large to open safely: more than 89,478,485 pixels"
    before = ws.snapshot()
    res = cli("predict", "best", "--run-dir", ws.existing, "--image", picture)
    assert_one_line_error(res, expected)
    check_nothing_damaged(ws, before)


# ------------------------------------------------------------------------------------------
# A non-finite training loss
# ------------------------------------------------------------------------------------------
# Plain SGD (no momentum) at lr 1e5 on the MLP, two steps per epoch, no validation: the loss
# of epoch 1 is finite (the first weights, then weights after one step, ~1e12), the weights
# after two steps overflow float32, so the first step of epoch 2 has a non-finite loss.
# Any lr from 1e3 to 1e8 does the same on the fake data.
DIVERGE = (
    "--model",
    "mlp",
    "--epochs",
    "2",
    "--optimizer",
    "sgd",
    "--momentum",
    "0",
    "--lr",
    "1e5",
    "--batch-size",
    str(N_TRAIN // 2),
    "--valid-size",
    "0",
    "--scheduler",
    "none",
    "--no-early-stopping",
)


@dataclass
class Diverged:
    ws: Workspace
    before: dict
    run_dir: Path
    result: object


@pytest.fixture(scope="module")
def diverged(tiny_run, tmp_path_factory) -> Diverged:
    root = tmp_path_factory.mktemp("diverge")
    runs = root / "runs"
    shutil.copytree(tiny_run.run_dir, runs / "existing")
    data = write_fashion_dir(root / "data", N_TRAIN, N_TEST, gz=True)
    ws = Workspace(root, runs, runs / "existing", data)
    before = ws.snapshot()
    result = run_command(
        [CLI, "train", *DIVERGE, "--data-dir", data, "--output-dir", runs, "--run-name", "boom"],
        cwd=root,
    )
    return Diverged(ws, before, runs / "boom", result)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(diverged):
    res, run = diverged.result, diverged.run_dir
    last = run / "last.safetensors"
    assert res.rc == EXIT_DIVERGED == 3, str(res)
    assert "Traceback" not in res.stdout + res.stderr
    said = [line for line in (res.stdout + res.stderr).splitlines() if "non-finite" in line]
    assert len(said) == 1, str(res)
    assert "training loss became non-finite" in said[0] and "in epoch 2" in said[0]
    assert f"last good checkpoint: {last} (epoch 1)" in said[0]

    # The named checkpoint is the epoch-1 one, loadable, finite: not overwritten by epoch 2.
    model, meta = model_from_checkpoint(last)
    assert meta["epoch"] == 1
    assert all(torch.isfinite(p).all() for p in model.state_dict().values())
    # ... and it holds the same weights as the resume state saved after epoch 1.
    state = load_resume_state(run / "resume.pt")
    assert state["epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v), k
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epochs_completed"] == 1
    assert "non-finite" in summary["detail"]

    # Nothing that was there before the run changed.
    after = diverged.ws.snapshot()
    assert {k: after[k] for k in diverged.before} == diverged.before


def test_nonfinite_loss_message_is_one_line_on_stderr(diverged):
    assert_one_line_error(
        diverged.result, "non-finite", str(diverged.run_dir / "last.safetensors"), rc=3
    )


def test_exit_codes_are_the_documented_ones():
    assert (EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PEER_FAILED, EXIT_WRITE_FAILED) == (2, 3, 4, 74)


def test_every_case_in_the_docs_has_a_test_and_every_test_a_row():
    """docs/bad-input.md: one row per case, naming its tests, which must exist here (or, for
    export and predict --onnx, as test_bad_input_* in tests/test_export.py)."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
    rows = [
        line
        for line in doc.read_text().splitlines()
        if line.startswith("| ")
        and line.count(" | ") >= 5
        and not line.startswith(("| Case", "| ---"))
    ]
    assert len(rows) >= 14
    here = {name for name in globals() if name.startswith("test_")}
    export_tests = (Path(__file__).parent / "test_export.py").read_text()
    here |= set(re.findall(r"^def (test_bad_input_[a-z_]+)\(", export_tests, re.M))
    named: set[str] = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[3] in {"2", "3", "74"}, row  # the exit code column
        tests = re.findall(r"`(test_[a-z_]+)(?:\[[^\]`]+\])?`", cells[-1])
        assert tests, f"row without a test: {row}"
        assert set(tests) <= here, set(tests) - here
        named |= set(tests)
    helpers = {
        "test_exit_codes_are_the_documented_ones",
        "test_every_case_in_the_docs_has_a_test_and_every_test_a_row",
    }
    assert here - helpers == named, (here - helpers) ^ named


# ------------------------------------------------------------------------------------------
# A run's files are never overwritten or trained on with what is not theirs
# ------------------------------------------------------------------------------------------
def stopped_run(ws: Workspace, name: str = "stopped", step: int = 5, *extra: str) -> Path:
    """A run stopped by SIGTERM mid-epoch (resume.pt at that step), in ws.runs."""
    args = [*TRAIN_FAST, "--epochs", "2", "--batch-size", "32", *extra]
    res = run_command(
        [sys.executable, str(HARNESS), *args, "--data-dir", str(ws.data),
         "--output-dir", str(ws.runs), "--run-name", name],
        ws.root, env=process_env(FAULT_TERM_STEP=str(step)),
    )  # fmt: skip
    assert res.rc == 75, str(res)
    return ws.runs / name


@pytest.mark.parametrize("how", ["auto", "path"])
def test_a_finished_run_without_resume_state_is_never_started_again(ws, cli, how):
    """resume.pt deleted from a completed run: neither `--resume auto --run-name` nor
    `--resume RUN` starts a fresh training over its checkpoints and metrics."""
    (ws.existing / "resume.pt").unlink()
    before = ws.snapshot()
    resume = ["--resume", "auto", "--run-name", "existing"] if how == "auto" else [
        "--resume", str(ws.existing)]  # fmt: skip
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs, *resume)
    assert_one_line_error(res, f"{ws.existing} holds a run (2 finished epoch(s), best.safetensors")
    assert "no resume.pt to continue it from" in res.stderr
    check_nothing_damaged(ws, before)


def test_a_resume_on_other_data_is_refused(ws, cli):
    """A run stopped mid-epoch, resumed with a --data-dir that holds other images (13 of
    them): refused, since it would finish on data it did not start with."""
    run = stopped_run(ws)
    other = write_fashion_dir(ws.root / "other", 13, N_TEST, gz=False)
    before = ws.snapshot()
    res = cli("train", "--resume", run, "--data-dir", other)
    assert_one_line_error(res, f"--data-dir {other} holds other training data than {run}")
    check_nothing_damaged(ws, before)


def test_a_resume_state_of_another_run_is_refused(ws, cli):
    """An mlp run's resume.pt in a folder whose config.json says cnn."""
    run = stopped_run(ws)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": "cnn"}))
    before = ws.snapshot()
    res = cli("train", "--resume", run, "--data-dir", ws.data)
    assert_one_line_error(res, f"{run / 'resume.pt'} is not this run's state: it says model 'mlp'")
    check_nothing_damaged(ws, before)


def test_a_checkpoint_whose_metadata_contradicts_itself_is_refused(ws, cli):
    path = ws.root / "lying.safetensors"
    tensors = load_file(ws.existing / "best.safetensors")
    _, meta = load_model_checkpoint(ws.existing / "best.safetensors")
    meta["config"]["model"] = "cnn"
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})
    before = ws.snapshot()
    res = cli("eval", path, "--data-dir", ws.data)
    assert_one_line_error(res, f"{path} has damaged metadata: it names model mlp but its config")
    check_nothing_damaged(ws, before)


def test_a_resume_step_past_the_end_of_its_epoch_is_refused(ws, cli):
    run = stopped_run(ws)
    state = torch.load(run / "resume.pt", weights_only=True)
    torch.save({**state, "step": 10_000}, run / "resume.pt")
    before = ws.snapshot()
    res = cli("train", "--resume", run, "--data-dir", ws.data)
    assert_one_line_error(res, f"{run / 'resume.pt'} is damaged: it stopped at step 10000")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize(
    "line",
    [b"\xff\xfe\x00binary", b"[1, 2, 3]", b'{"train_loss": 0.5}'],
    ids=["binary", "list", "no-epoch"],
)
def test_damaged_metrics_lines_on_resume_are_named(ws, cli, line):
    run = stopped_run(ws, "stopped", 8)  # into epoch 2 (6 steps each): epoch 1 recorded
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(line + b"\n" + metrics.read_bytes())
    before = ws.snapshot()
    res = cli("train", "--resume", run, "--data-dir", ws.data)
    assert_one_line_error(res, f"{metrics} line 1 is not an epoch record")
    check_nothing_damaged(ws, before)


def test_a_refused_pickle_says_one_line_without_torchs_warning(ws, cli):
    run = stopped_run(ws)

    # A pathlib.PosixPath: a global that weights_only loading refuses
    torch.save({"format": 1, "payload": Path("/x")}, run / "resume.pt")
    before = ws.snapshot()
    res = cli("train", "--resume", run, "--data-dir", ws.data)
    assert_one_line_error(res, f"{run / 'resume.pt'} is not a readable resume state")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("kind", ["folder", "lock"])
def test_a_run_folder_or_lock_that_is_a_link_is_refused(ws, cli, kind):
    """Followed, the link would have the run write (and clean up) outside --output-dir."""
    outside = ws.root / "outside"
    outside.mkdir()
    if kind == "folder":
        (ws.runs / "linked").symlink_to(outside)
        path, name = ws.runs / "linked", "linked"
    else:
        (ws.runs / "linked").mkdir()
        (outside / "target").write_text("keep")
        (ws.runs / "linked" / ".lock").symlink_to(outside / "target")
        path, name = ws.runs / "linked" / ".lock", "linked"
    before = ws.snapshot()
    res = cli("train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs,
              "--run-name", name, "--resume", "auto")  # fmt: skip
    assert_one_line_error(res, f"{path} is a symbolic link (to {outside}")
    check_nothing_damaged(ws, before)
    assert sorted(p.name for p in outside.iterdir()) == ([] if kind == "folder" else ["target"])


def test_eval_never_creates_the_data_folder_its_metadata_names(ws, cli):
    """The checkpoint's metadata data_dir is a hint to read from: eval without --data-dir
    neither creates that folder nor downloads into it."""
    nowhere = ws.root / "nowhere" / "deep"
    path = ws.root / "elsewhere.safetensors"
    tensors = load_file(ws.existing / "best.safetensors")
    _, meta = load_model_checkpoint(ws.existing / "best.safetensors")
    meta["config"]["data_dir"] = str(nowhere)
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(meta)})
    before = ws.snapshot()
    res = cli("eval", path)
    assert_one_line_error(res, f"Fashion-MNIST files missing from {raw_dir(nowhere)}/")
    assert not (ws.root / "nowhere").exists()
    check_nothing_damaged(ws, before)


def test_predict_on_weights_whose_outputs_overflow_says_so(ws, cli):
    """Finite but huge weights: the logits overflow; one line and exit code 3, not a JSON
    with a null probability."""
    path = ws.root / "huge.safetensors"
    tensors = load_file(ws.existing / "best.safetensors")
    _, meta = load_model_checkpoint(ws.existing / "best.safetensors")
    save_file({k: v * 1e30 if v.is_floating_point() else v for k, v in tensors.items()}, path,
              metadata={METADATA_KEY: json.dumps(meta)})  # fmt: skip
    before = ws.snapshot()
    for command in (["predict", path, "--index", "0", "--json"], ["eval", path]):
        res = cli(*command, "--data-dir", ws.data)
        assert_one_line_error(res, f"{path}: the model's outputs overflow", rc=EXIT_DIVERGED)
    check_nothing_damaged(ws, before)


def test_batch_size_one_with_a_batchnorm_layer_is_refused(ws, cli):
    before = ws.snapshot()
    res = cli("train", "--model", "cnn-bn", "--batch-size", "1", "--data-dir", ws.data,
              "--output-dir", ws.runs)  # fmt: skip
    assert_one_line_error(res, "--batch-size 1 with --model cnn-bn: its BatchNorm1d layer")
    check_nothing_damaged(ws, before)


def test_the_models_config_names_are_the_ones_with_batchnorm_of_one_dimension():
    from fmnist_accel.config import BATCHNORM_1D_MODELS
    from fmnist_accel.engine.models import MODELS, build_model

    found = {n for n in MODELS if any(isinstance(m, torch.nn.BatchNorm1d)
                                      for m in build_model(n).modules())}  # fmt: skip
    assert found == set(BATCHNORM_1D_MODELS)


@pytest.mark.parametrize(
    "name, shown",
    [("x" * 300, "at most 200"), ("two\nlines", "'\\n'"), ("bad\udcffbytes", "'\\udcff'"),
     ("-dash", "a leading '-'"), ("a b", "' '")],
    ids=["too-long", "newline", "not-utf8", "leading-dash", "space"],
)  # fmt: skip
def test_unsafe_run_names_are_refused(ws, name, shown):
    before = ws.snapshot()
    args = [CLI, "train", *TRAIN_FAST, "--data-dir", ws.data, "--output-dir", ws.runs]
    res = run_command([*args, "--run-name", name], ws.root)  # str with surrogates: raw bytes
    assert_one_line_error(res, "--run-name")
    assert shown in res.stderr, res.stderr
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
def test_predict_image_that_is_not_a_regular_file_is_refused(ws, cli, kind, tmp_path):
    import socket

    path = ws.root / f"picture-{kind}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    else:
        path = Path("/dev/zero")
    before = ws.snapshot()
    res = cli("predict", "best", "--run-dir", ws.existing, "--image", path, timeout=60)
    assert_one_line_error(res, f"--image {path} is a")
    check_nothing_damaged(ws, before)


def test_plot_of_an_empty_run_name_is_refused(ws, cli):
    before = ws.snapshot()
    res = cli("plot", "", "--output-dir", ws.runs, "--save", ws.root / "c.png")
    assert_one_line_error(res, "a RUN given to plot is empty")
    check_nothing_damaged(ws, before)


@pytest.mark.parametrize(
    "name", ["config.json", "metrics.jsonl", "summary.json", "provenance.json", "resume.pt"]
)
def test_a_run_file_that_is_a_fifo_is_refused_without_waiting(ws, cli, name):
    """A FIFO (or a device) where a run file belongs: read, it would block for ever. A resume
    names it in one line; `runs` lists the run with the problem instead of hanging."""
    run = stopped_run(ws)
    target = run / name
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    before = ws.snapshot()
    res = cli("train", "--resume", run, "--data-dir", ws.data, timeout=60)
    assert_one_line_error(res, f"{target} is not a regular file: the run writes a file there")
    listed = cli("runs", "--output-dir", ws.runs, "--json", timeout=60)
    assert listed.rc == 0, str(listed)
    check_nothing_damaged(ws, before)


def test_a_checkpoint_path_that_is_a_fifo_is_refused(ws, cli):
    fifo = ws.root / "model.safetensors"
    os.mkfifo(fifo)
    before = ws.snapshot()
    res = cli("eval", fifo, "--data-dir", ws.data, timeout=60)
    assert_one_line_error(res, f"{fifo} is not a regular file: name a checkpoint file")
    check_nothing_damaged(ws, before)
