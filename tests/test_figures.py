"""Pictures of a checkpoint's mistakes: drawn from the same counts as `eval --json`, written
as PNG files by `eval --save-figures` (on one and on two processes), and logged into the
run's TensorBoard when training ends."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import CLI, TINY_RUN_ARGS, assert_one_line_error, run_command
from launching import evaluate_json, train, why
from PIL import Image

from fmnist_accel import figures
from fmnist_accel.data import CLASS_NAMES, load_split

FIGURE_NAMES = ("confusion_matrix", "per_class_accuracy", "mistakes")


def expected_size(name: str) -> tuple[int, int]:
    width, height = figures.SIZES[name]
    return round(width * figures.DPI), round(height * figures.DPI)


def assert_picture(image: Image.Image, name: str) -> np.ndarray:
    """A PNG of the figure's size with real content (many colours, not a blank canvas)."""
    assert image.format == "PNG"
    assert image.size == expected_size(name)
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{name} is (nearly) uniform"
    return pixels


def png_description(path: Path) -> dict:
    return json.loads(Image.open(path).text["Description"])


@pytest.fixture(scope="module")
def weak_run(readonly_data, tmp_path_factory):
    """One epoch at a learning rate too small to learn: a checkpoint that makes mistakes."""
    base = tmp_path_factory.mktemp("weak")
    args = [*TINY_RUN_ARGS, "--epochs", "1", "--lr", "1e-6", "--run-name", "weak"]
    result = run_command(
        [CLI, "train", *args, "--data-dir", readonly_data.path, "--output-dir", base / "runs"],
        cwd=base,
    )
    assert result.rc == 0, str(result)
    return base / "runs" / "weak"


def synthetic_report(counts: list[list[int]]) -> dict:
    n = sum(map(sum, counts))
    return {
        "checkpoint": "runs/x/best.safetensors",
        "model": "mlp",
        "epoch": 3,
        "split": "test",
        "accuracy": sum(counts[i][i] for i in range(10)) / n,
        "num_samples": n,
        "classes": list(CLASS_NAMES),
        "confusion_matrix": counts,
        "per_class_accuracy": {
            name: counts[i][i] / max(1, sum(counts[i])) for i, name in enumerate(CLASS_NAMES)
        },
        "tta": False,
    }


def test_the_confusion_matrix_drawn_is_the_counts_given():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 60, (10, 10)) + np.diag(rng.integers(100, 900, 10))
    counts[3] = 0  # a class without images: a row of zeros, not a division by zero
    report = synthetic_report(counts.tolist())
    figure = figures.confusion_matrix_figure(report)
    ax = figure.axes[0]
    drawn = np.full((10, 10), -1)
    for text in ax.texts:  # each count where it is drawn: x the predicted, y the true class
        x, y = text.get_position()
        drawn[int(y), int(x)] = int(text.get_text())
    assert (drawn == counts).all()
    rows = counts.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ax.images[0].get_array(), counts / np.maximum(rows, 1))
    assert [t.get_text() for t in ax.get_xticklabels()] == list(CLASS_NAMES)
    assert [t.get_text() for t in ax.get_yticklabels()] == list(CLASS_NAMES)

    bars = figures.per_class_accuracy_figure(report).axes[0].patches
    widths = [bar.get_width() for bar in bars]
    assert widths == pytest.approx([report["per_class_accuracy"][c] for c in CLASS_NAMES])


def test_eval_save_figures_draws_the_counts_eval_json_reports(weak_run, readonly_data, tmp_path):
    folder = tmp_path / "figs"
    args = ["best", "--run-dir", weak_run, "--json"]
    plain = run_command([CLI, "eval", *args], cwd=tmp_path)
    drawn = run_command([CLI, "eval", *args, "--save-figures", folder], cwd=tmp_path)
    assert plain.rc == 0 and drawn.rc == 0, str(drawn)
    report = drawn.json()
    assert report["confusion_matrix"] == plain.json()["confusion_matrix"]
    assert report["figures"] == {name: str(folder / f"{name}.png") for name in FIGURE_NAMES}
    for name in FIGURE_NAMES:
        path = folder / f"{name}.png"
        assert_picture(Image.open(path), name)
        assert png_description(path)["confusion_matrix"] == report["confusion_matrix"]

    # The mistakes shown are real mistakes of this checkpoint, most confident first.
    mistakes = png_description(folder / "mistakes.png")["mistakes"]
    counts = np.array(report["confusion_matrix"])
    wrong = int(counts.sum() - counts.trace())
    assert wrong > 0 and len(mistakes) == min(figures.MISTAKES_SHOWN, wrong)
    labels = load_split(readonly_data.path, "test").labels
    shown = np.zeros_like(counts)
    for m in mistakes:
        assert m["true"] == int(labels[m["index"]]) and m["predicted"] != m["true"]
        shown[m["true"], m["predicted"]] += 1
    assert (shown <= counts).all()
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True)


@pytest.mark.slow
def test_two_processes_draw_the_same_figures(weak_run, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    args = ["best", "--run-dir", str(weak_run), "--save-figures"]
    single = evaluate_json(1, [*args, str(one)])
    double = evaluate_json(2, [*args, str(two)])
    assert double["num_processes"] == 2
    assert double["confusion_matrix"] == single["confusion_matrix"]
    by_one = png_description(one / "mistakes.png")["mistakes"]
    by_two = png_description(two / "mistakes.png")["mistakes"]
    assert [m["index"] for m in by_two] == [m["index"] for m in by_one]
    assert [m["confidence"] for m in by_two] == pytest.approx(
        [m["confidence"] for m in by_one], abs=1e-5
    )
    for name in FIGURE_NAMES:
        assert_picture(Image.open(two / f"{name}.png"), name)


def test_save_figures_into_a_file_is_refused(weak_run, tmp_path):
    target = tmp_path / "figs"
    target.write_text("keep me")
    result = run_command(
        [CLI, "eval", "best", "--run-dir", weak_run, "--save-figures", target], cwd=tmp_path
    )
    assert_one_line_error(result, f"--save-figures {target} is a file")
    assert target.read_text() == "keep me"


class FakeWriter:
    """The TensorBoard writer's two calls that log_figures makes; `fail`: a full disk."""

    def __init__(self, fail: bool = False):
        self.images, self.fail = [], fail

    def add_image(self, tag, pixels, step, dataformats):
        if self.fail:
            raise OSError(28, "No space left on device")
        self.images.append((tag, pixels.shape, step, dataformats))

    def flush(self):
        pass


def test_end_figures_are_drawn_and_written_by_the_main_process_alone(tmp_path):
    """outputs.log_figures: the three figures at the last epoch's step and one line; nothing
    on another rank; a writer that fails is one note, never an error of the ended run."""
    import torch

    from fmnist_accel import outputs
    from fmnist_accel.data import Split
    from fmnist_accel.engine import EvalResult
    from fmnist_accel.mistakes import Mistake
    from fmnist_accel.run_end import EndFigures

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    counts = [[20 if i == j else 1 for j in range(10)] for i in range(10)]
    n = sum(map(sum, counts))
    result = EvalResult(loss=0.5, accuracy=200 / n, num_samples=n, confusion=counts)
    split = Split(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))
    mistakes = [Mistake(index=3, true=0, predicted=1, confidence=0.9)]
    meta = {"model": "mlp", "epoch": 2}
    figures = EndFigures(tmp_path / "best.safetensors", meta, "test", split, result, mistakes, 1)
    said = []

    def session(writer, main=True):
        accelerator = SimpleNamespace(is_main_process=main, get_tracker=lambda name, unwrap: writer)
        reporter = SimpleNamespace(print=said.append)
        return SimpleNamespace(accelerator=accelerator, run_dir=tmp_path, reporter=reporter)

    writer = FakeWriter()
    outputs.log_figures(session(writer, main=False), figures)
    outputs.log_figures(session(writer), None)  # nothing to draw: the note was said before
    assert writer.images == [] and said == []
    outputs.log_figures(session(writer), figures)
    assert writer.images == [
        (f"Figures/test/{name}", (*reversed(expected_size(name)), 3), 2, "HWC")
        for name in FIGURE_NAMES
    ]
    assert said == ["figures of best.safetensors on the test split: TensorBoard, Images"]
    said.clear()
    outputs.log_figures(session(FakeWriter(fail=True)), figures)
    assert said == ["note: no figures in TensorBoard: OSError: [Errno 28] No space left on device"]


def test_training_logs_the_figures_of_its_best_checkpoint_to_tensorboard(weak_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(weak_run / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    tags = {f"Figures/test/{name}": name for name in FIGURE_NAMES}
    assert set(tags) <= set(events.Tags()["images"])
    for tag, name in tags.items():
        (image,) = events.Images(tag)
        assert image.step == 1  # the last finished epoch
        assert (image.width, image.height) == expected_size(name)
        assert_picture(Image.open(io.BytesIO(image.encoded_image_string)), name)

    # They show the best checkpoint on the test split: the same pixels as eval draws.
    result = run_command(
        [CLI, "eval", "best", "--run-dir", weak_run, "--save-figures", tmp_path], cwd=tmp_path
    )
    assert result.rc == 0, str(result)
    (logged,) = events.Images("Figures/test/confusion_matrix")
    from_tensorboard = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)))
    from_eval = np.asarray(Image.open(tmp_path / "confusion_matrix.png").convert("RGB"))
    assert (from_tensorboard[..., :3] == from_eval).all()


def test_the_final_tests_evaluation_serves_the_figures_only_when_they_would_make_it():
    from fmnist_accel.run_end import evaluates_as_figures

    def final_test(split_name="test", data_dir="/d", batch_size=512, **config):
        """An evaluation made with these settings, of a checkpoint whose config says config."""
        config = {"data_dir": "/d", "eval_batch_size": 512, "channels_last": True, **config}
        return SimpleNamespace(
            meta={"config": config}, split_name=split_name, data_dir=data_dir,
            batch_size=batch_size, channels_last=True,
        )  # fmt: skip

    assert evaluates_as_figures(final_test())
    assert not evaluates_as_figures(final_test(split_name="valid"))
    # A resumed run may read another folder or use another batch size than its checkpoint's.
    assert not evaluates_as_figures(final_test(data_dir="/moved"))
    assert not evaluates_as_figures(final_test(eval_batch_size=1024))
    # The final test evaluates channels_last, as eval does; the figures as the run trained.
    assert not evaluates_as_figures(final_test(channels_last=False))


def test_figures_without_a_final_test_to_reuse_are_the_same(weak_run, readonly_data, tmp_path):
    """weak_run's figures reuse its final test's evaluation; with --no-final-test the same
    run evaluates for its figures alone: the same images."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    args = [*TINY_RUN_ARGS, "--epochs", "1", "--lr", "1e-6", "--run-name", "weak"]
    result = run_command(
        [CLI, "train", *args, "--no-final-test", "--data-dir", readonly_data.path,
         "--output-dir", tmp_path],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.rc == 0, str(result)
    assert "figures of best.safetensors on the test split: TensorBoard, Images" in result.stdout
    logged = []
    for run in (weak_run, tmp_path / "weak"):
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={IMAGES: 0})
        events.Reload()
        logged.append(
            {
                name: np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
                for name in FIGURE_NAMES
                for image in events.Images(f"Figures/test/{name}")
            }
        )
    assert logged[0].keys() == logged[1].keys() == set(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        assert (logged[0][name] == logged[1][name]).all(), name


@pytest.mark.slow
def test_two_process_training_logs_the_figures_of_the_exact_evaluation(readonly_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    args = [*TINY_RUN_ARGS, "--epochs", "1", "--lr", "1e-6", "--data-dir", str(readonly_data.path),
            "--output-dir", str(tmp_path), "--run-name", "two"]  # fmt: skip
    proc = train(2, args)
    assert proc.returncode == 0, why(proc)
    assert proc.stdout.count("figures of best.safetensors on the test split") == 1
    events = EventAccumulator(str(tmp_path / "two" / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    drawn = run_command(
        [CLI, "eval", "best", "--run-dir", tmp_path / "two", "--json", "--save-figures",
         tmp_path / "figs"],
        cwd=tmp_path,
    )  # fmt: skip
    assert drawn.rc == 0, str(drawn)
    assert drawn.json()["accuracy"] < 1  # there are mistakes to show
    for name in FIGURE_NAMES:
        (logged,) = events.Images(f"Figures/test/{name}")
        by_ranks = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)))
        by_eval = np.asarray(Image.open(tmp_path / "figs" / f"{name}.png").convert("RGB"))
        assert (by_ranks[..., :3] == by_eval).all(), name
