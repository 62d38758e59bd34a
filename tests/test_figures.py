"""Pictures of a checkpoint's evaluation: drawn from the same counts as `eval --json`, written
as PNG files by `eval --save-figures` (on one and on two processes). The pictures a training
run ends with, in its TensorBoard: test_ending.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from support.errors import assert_one_line_error
from support.pictures import FIGURE_NAMES, assert_picture, png_description
from support.processes import CLI, evaluate_json, run_command

from fmnist_accel import figures
from fmnist_accel.engine.data import CLASS_NAMES, load_split


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


def test_titles_keep_the_accuracy_and_fit_with_a_long_run_name(weak_run, tmp_path):
    """The title's second line holds the figures (never cut off), the third the model and
    checkpoint, a long run name shortened in its middle to fit the figure's width; the
    table output names the files it wrote."""
    long_run = tmp_path / ("a-long-run-name-" * 12).rstrip("-")
    shutil.copytree(weak_run, long_run)
    folder = tmp_path / "figs"
    table = run_command([CLI, "eval", "best", "--run-dir", long_run, "--save-figures", folder],
                        cwd=tmp_path)  # fmt: skip
    assert table.rc == 0, str(table)
    written = ", ".join(str(folder / f"{name}.png") for name in FIGURE_NAMES)
    assert f"figures written: {written}" in table.stdout
    report = run_command([CLI, "eval", "best", "--run-dir", long_run, "--json"], tmp_path).json()
    for name in FIGURE_NAMES:
        lines = figures.title("Title", report, name).splitlines()
        assert len(lines) == 3 and f"accuracy {report['accuracy']:.4f}" in lines[1], lines
        assert "…" in lines[2] and len(lines[2]) <= figures.SIZES[name][0] * figures.CHARS_PER_INCH
        # Drawn: the title's box lies within the figure.
        figure = figures.eval_figures(report, [])[name]
        figure.canvas.draw()
        box = figure._suptitle.get_window_extent()
        assert box.x0 >= 0 and box.x1 <= figure.bbox.width, (name, box, figure.bbox)
