"""The command line end to end, on fake data, in real subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
from support.fakedata import N_TEST, N_TRAIN, fake_split
from support.files import file_digests

from fmnist_accel.config import TrainConfig
from fmnist_accel.engine.data import CLASS_NAMES
from fmnist_accel.engine.device_data import normalise
from fmnist_accel.engine.trained_model import model_from_checkpoint
from fmnist_accel.store.checkpoint import load_model_checkpoint

EPOCH_KEYS = ("train_loss", "valid_loss", "valid_accuracy", "lr", "epoch_time", "images_per_sec")


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# train
# ------------------------------------------------------------------------------------------
def test_train_writes_the_run_folder(tiny_run):
    run = tiny_run.run_dir
    assert tiny_run.result.rc == 0 and "Traceback" not in tiny_run.result.stderr
    for name in (
        "config.json",
        "metrics.jsonl",
        "best.safetensors",
        "last.safetensors",
        "resume.pt",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "mlp" and config["epochs"] == 2 and config["batch_size"] == 32
    assert config["data_dir"] == str(tiny_run.data_dir)
    assert config["run_name"] == "tiny" and config["output_dir"] == str(tiny_run.output_dir)

    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        for key in EPOCH_KEYS:
            assert isinstance(r[key], float | int) and r[key] == r[key], key  # a number, not nan
        assert 0 <= r["valid_accuracy"] <= 1 and r["train_loss"] > 0 and r["lr"] == TrainConfig().lr
    # the fake classes are easy: two epochs of the MLP learn them
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["valid_accuracy"] > 0.5

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2
    assert summary["world_size"] == 1

    best_state, best_meta = load_model_checkpoint(run / "best.safetensors")
    _, last_meta = load_model_checkpoint(run / "last.safetensors")
    assert last_meta["epoch"] == 2 and last_meta["model"] == "mlp"
    assert best_meta["epoch"] == summary["best"]["epoch"]
    assert best_meta["metrics"]["valid_accuracy"] == max(r["valid_accuracy"] for r in records)
    assert best_meta["config"] == config
    assert all(torch.isfinite(t).all() for t in best_state.values())


def test_train_writes_tensorboard_scalars(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = read_metrics(tiny_run.run_dir)
    events = list((tiny_run.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    scalars: dict[str, list] = {}
    for folder in {e.parent for e in events}:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    expected = {
        "Loss/train": "train_loss",
        "Loss/valid": "valid_loss",
        "Accuracy/valid": "valid_accuracy",
        "LearningRate": "lr",
    }
    assert set(expected) <= set(scalars)
    for tag, key in expected.items():
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
        assert [v for _, v in scalars[tag]] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_train_reports_progress_on_stdout(tiny_run):
    out = tiny_run.result.stdout
    assert f"run folder: {tiny_run.run_dir}" in out
    assert re.search(r"^hardware: 1 process, CPU, \d+ threads?; fp32$", out, re.M), out
    n_valid = N_TRAIN * 10000 // 60000  # the 50k/10k split, scaled to the fake data
    assert f"data: {N_TRAIN - n_valid:,} train, {n_valid:,} validation images" in out
    assert re.search(r"^epoch 1/2 \| train loss [0-9.]+", out, re.M)
    assert re.search(r"^epoch 2/2 \| ", out, re.M)


def test_train_help_is_the_same_for_both_entry_points(cli):
    a = cli("train", "--help")
    b = cli("-h", module="fmnist_accel.train")
    assert a.rc == b.rc == 0, f"{a}\n{b}"
    assert a.stdout.splitlines()[0] == "Usage: fmnist-accel train [OPTIONS]"
    assert b.stdout.splitlines()[0] == "Usage: python -m fmnist_accel.train [OPTIONS]"
    assert a.stdout.splitlines()[1:] == b.stdout.splitlines()[1:]
    options = set(re.findall(r"--[a-z][a-z-]+", a.stdout))
    assert {"--model", "--epochs", "--data-dir", "--output-dir", "--run-name", "--lr"} <= options
    assert "--early-stopping / --no-early-stopping" in a.stdout


# ------------------------------------------------------------------------------------------
# eval
# ------------------------------------------------------------------------------------------
def test_eval_json_is_one_object_with_the_test_metrics(tiny_run, cli):
    res = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--json")
    assert res.rc == 0, str(res)
    report = res.json()
    for key in (
        "accuracy",
        "loss",
        "num_samples",
        "per_class_accuracy",
        "confusion_matrix",
        "checkpoint",
    ):
        assert key in report
    assert report["num_samples"] == N_TEST
    assert report["checkpoint"] == str(tiny_run.run_dir / "best.safetensors")
    matrix = report["confusion_matrix"]
    assert len(matrix) == 10 and all(len(row) == 10 for row in matrix)
    assert sum(map(sum, matrix)) == N_TEST
    images, labels = fake_split(N_TEST, 2)
    assert [sum(row) for row in matrix] == torch.bincount(labels.long(), minlength=10).tolist()
    assert report["accuracy"] == pytest.approx(sum(matrix[i][i] for i in range(10)) / N_TEST)
    assert list(report["per_class_accuracy"]) == list(CLASS_NAMES)
    for i, name in enumerate(CLASS_NAMES):
        assert report["per_class_accuracy"][name] == pytest.approx(matrix[i][i] / sum(matrix[i]))

    # The figures are those of the checkpoint's model on the test files, computed here.
    model, meta = model_from_checkpoint(tiny_run.run_dir / "best.safetensors")
    with torch.no_grad():
        logits = model(normalise(images))
    predicted = logits.argmax(1)
    assert report["epoch"] == meta["epoch"]
    assert report["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels.long()).item(), rel=1e-4
    )
    assert report["accuracy"] == pytest.approx((predicted == labels.long()).float().mean().item())
    expected = torch.zeros(10, 10, dtype=torch.long)
    expected.index_put_((labels.long(), predicted), torch.ones(N_TEST, dtype=torch.long), True)
    assert matrix == expected.tolist()


def test_eval_of_the_validation_split_gives_the_figures_the_run_logged(tiny_run, cli):
    """--split valid rebuilds the run's seeded split: a checkpoint's validation accuracy is the
    one its epoch wrote to metrics.jsonl, its loss too up to summation order (fp32, CPU)."""
    res = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--split", "valid", "--json")
    assert res.rc == 0, str(res)
    report = res.json()
    logged = {
        r["epoch"]: r
        for r in map(json.loads, (tiny_run.run_dir / "metrics.jsonl").read_text().splitlines())
    }[report["epoch"]]
    assert report["split"] == "valid"
    assert report["accuracy"] == logged["valid_accuracy"]
    assert report["loss"] == pytest.approx(logged["valid_loss"], rel=1e-6)
    # The held-out images: the seed's 1/6 of the training file (scaled down for fake data).
    assert report["num_samples"] == N_TRAIN * 10_000 // 60_000
    test = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--json").json()
    assert test["split"] == "test" and test["num_samples"] == N_TEST
    tables = cli("eval", "best", "--run-dir", tiny_run.run_dir, "--split", "valid")
    assert f"valid loss {logged['valid_loss']:.4f}  accuracy {logged['valid_accuracy']:.4f}" in (
        tables.stdout
    )


def test_eval_without_run_dir_picks_the_newest_run(tiny_run, cli, tmp_path):
    """Newest by the run's config.json time, not by name: 'a-newer' sorts first by name."""
    out = tmp_path / "runs"
    older, newer = out / "z-older", out / "a-newer"
    shutil.copytree(tiny_run.run_dir, older)
    shutil.copytree(tiny_run.run_dir, newer)
    (out / "not-a-run").mkdir()  # a folder without config.json is ignored
    os.utime(older / "config.json", (1_000_000_000, 1_000_000_000))
    os.utime(newer / "config.json", (1_500_000_000, 1_500_000_000))
    res = cli("eval", "best", "--output-dir", out, "--json")
    assert res.rc == 0, str(res)
    assert res.json()["checkpoint"] == str(newer / "best.safetensors")
    # and the default --output-dir is ./runs
    os.utime(older / "config.json", (1_600_000_000, 1_600_000_000))
    res = cli("eval", "last", "--json", cwd=tmp_path)
    assert res.rc == 0, str(res)
    assert res.json()["checkpoint"] == os.path.join("runs", "z-older", "last.safetensors")


def test_eval_tables_of_a_checkpoint_path(tiny_run, cli, tmp_path):
    """A checkpoint copied anywhere carries its own architecture: no --model needed."""
    copy = tmp_path / "elsewhere" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy(tiny_run.run_dir / "best.safetensors", copy)
    res = cli("eval", copy, "--tta")
    assert res.rc == 0, str(res)
    out = res.stdout
    assert out.startswith(f"{copy} (mlp, epoch ") and ", flip TTA" in out.splitlines()[0]
    assert "per-class accuracy" in out and "confusion matrix" in out
    assert re.search(rf"accuracy [01]\.\d{{4}}\s+\({N_TEST:,} images\)", out)
    for name in CLASS_NAMES:
        assert name in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


# ------------------------------------------------------------------------------------------
# predict
# ------------------------------------------------------------------------------------------
def test_predict_index_prints_the_class_and_top_probabilities(tiny_run, cli, tmp_path):
    picture = tmp_path / "x.png"
    res = cli("predict", "best", "--run-dir", tiny_run.run_dir, "--index", "7", "--save", picture)
    assert res.rc == 0, str(res)
    lines = res.stdout.splitlines()
    _, labels = fake_split(N_TEST, 2)
    true_name = CLASS_NAMES[int(labels[7])]
    head = re.fullmatch(r"test image 7: (.+) \(([\d.]+)%\), true class (.+)", lines[0])
    assert head, lines[0]
    assert head.group(1) in CLASS_NAMES and head.group(3) == true_name
    ranked = [re.fullmatch(r"  (.+?)\s+([\d.]+)%", line) for line in lines[1:4]]
    assert all(ranked), lines
    probs = [float(m.group(2)) for m in ranked]
    assert ranked[0].group(1) == head.group(1) and probs == sorted(probs, reverse=True)
    assert sum(probs) <= 100.01
    assert lines[4] == f"picture saved to {picture}"

    from PIL import Image

    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(picture) as img:
        assert img.format == "PNG" and img.size == (28 * 8, 28 * 8 + 40)


def test_predict_json_agrees_with_the_model(tiny_run, cli):
    res = cli(
        "predict", "last", "--run-dir", tiny_run.run_dir, "--index", "3", "--json", "--top", "10"
    )
    assert res.rc == 0, str(res)
    result = res.json()
    model, _ = model_from_checkpoint(tiny_run.run_dir / "last.safetensors")
    images, labels = fake_split(N_TEST, 2)
    with torch.no_grad():
        probs = model(normalise(images[3:4])).softmax(1)[0]
    assert result["predicted_index"] == int(probs.argmax())
    assert result["predicted_class"] == CLASS_NAMES[int(probs.argmax())]
    assert result["true_class"] == CLASS_NAMES[int(labels[3])]
    assert len(result["top"]) == 10
    assert sum(t["probability"] for t in result["top"]) == pytest.approx(1, abs=1e-5)
    assert result["probability"] == pytest.approx(float(probs.max()), rel=1e-5)


def test_predict_image_file(tiny_run, cli, tmp_path):
    """A PNG of test image 5 is classified like the tensor itself."""
    from PIL import Image

    images, _ = fake_split(N_TEST, 2)
    png = tmp_path / "shirt.png"
    Image.frombytes("L", (28, 28), images[5].numpy().tobytes()).save(png)
    res = cli("predict", "best", "--run-dir", tiny_run.run_dir, "--image", png, "--top", "10")
    assert res.rc == 0, str(res)
    lines = res.stdout.splitlines()
    model, _ = model_from_checkpoint(tiny_run.run_dir / "best.safetensors")
    with torch.no_grad():
        probs = model(normalise(images[5:6])).softmax(1)[0]
    best = int(probs.argmax())
    # A 28x28 picture on a dark border is used pixel for pixel, and the choice is said.
    assert lines[0].startswith(f"{png}: dark background (border grey level "), lines[0]
    assert lines[0].endswith(": used as it is; --invert inverts it"), lines[0]
    assert lines[1] == f"{png}: {CLASS_NAMES[best]} ({float(probs[best]):.1%})"
    shown = dict(re.fullmatch(r"  (.+?)\s+([\d.]+)%", line).groups() for line in lines[2:12])
    assert {name: float(p) / 100 for name, p in shown.items()} == pytest.approx(
        dict(zip(CLASS_NAMES, probs.tolist(), strict=True)), abs=1e-4
    )


def test_commands_do_not_change_the_run(tiny_run):
    """eval and predict only read the run folder (most useful after the tests above ran)."""
    assert file_digests(tiny_run.run_dir) == tiny_run.digests


def test_version_and_group_help(cli):
    res = cli("--version")
    assert res.rc == 0 and "0.1.0" in res.stdout
    res = cli("--help")
    assert res.rc == 0
    for command in ("train", "eval", "predict"):
        assert command in res.stdout
