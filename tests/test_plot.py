"""`fmnist-accel plot`: the learning curves of several runs in one picture; bad input is one
line and exit 2, and nothing already there is overwritten by a failed plot."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from support.errors import assert_one_line_error
from support.fakedata import TINY_RUN_ARGS
from support.processes import CLI, run_command

from fmnist_accel import figures
from fmnist_accel.commands import plot as curves
from fmnist_accel.store.run_info import RunInfo, read_run

# matplotlib's first two colours, C0 and C1: one per run
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)


@pytest.fixture(scope="module")
def second_run(readonly_data, tmp_path_factory):
    """A 3-epoch run, other seed and lr than the tiny run, that also logged test accuracy
    every epoch."""
    base = tmp_path_factory.mktemp("second")
    args = [*TINY_RUN_ARGS, "--epochs", "3", "--seed", "1", "--lr", "1e-3", "--test-every-epoch",
            "--run-name", "second"]  # fmt: skip
    result = run_command(
        [CLI, "train", *args, "--data-dir", readonly_data.path, "--output-dir", base / "runs"],
        cwd=base,
    )
    assert result.rc == 0, str(result)
    return base / "runs" / "second"


def pixels_of(pixels: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((np.abs(pixels.astype(int) - colour).sum(axis=-1) < 30).sum())


def test_plot_of_two_runs(tiny_run, second_run, tmp_path):
    target = tmp_path / "curves.png"
    result = run_command(
        [CLI, "plot", tiny_run.run_dir, "second", "--output-dir", second_run.parent,
         "--save", target],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.rc == 0, str(result)
    assert f"wrote {target}" in result.stdout
    image = Image.open(target)
    assert image.format == "PNG"
    assert image.size == tuple(round(inches * figures.DPI) for inches in curves.SIZE)
    pixels = np.asarray(image.convert("RGB"))
    assert pixels_of(pixels, BLUE) > 300 and pixels_of(pixels, ORANGE) > 300  # both runs

    # What was drawn: each run's curves from its metrics.jsonl, the best epoch starred.
    runs = [read_run(tiny_run.run_dir), read_run(second_run)]
    loss_ax, acc_ax, lr_ax, key_ax = curves.curves_figure(runs).axes
    for colour, info in zip(("C0", "C1"), runs, strict=True):
        mine = [line for line in acc_ax.lines if line.get_color() == colour]
        valid = [r["valid_accuracy"] for r in info.records]
        assert any(list(line.get_ydata()) == valid for line in mine)
        star = [line for line in mine if line.get_marker() == "*"]
        assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in star] == [
            curves.best_point(info)
        ]
    test_lines = [line for line in acc_ax.lines if line.get_linestyle() == ":"]
    assert [list(line.get_ydata()) for line in test_lines if len(line.get_ydata())] == [
        [r["test_accuracy"] for r in runs[1].records]
    ]
    assert lr_ax.get_yscale() == "log"
    labels = [t.get_text() for t in key_ax.get_legend().get_texts()]
    assert labels[0].startswith("tiny\n") and labels[1].startswith("second\n")


def test_learning_rate_drops_are_marked():
    records = [
        {"epoch": e, "train_loss": 1 / e, "valid_loss": 1 / e, "valid_accuracy": 0.5, "lr": lr}
        for e, lr in enumerate([3e-3] * 6 + [3e-4] * 6 + [3e-5] * 2, start=1)
    ]
    info = RunInfo(name="r", path="r", status="completed", records=records)
    assert curves.lr_drops(info) == [(7, 3e-4), (13, 3e-5)]
    _, _, lr_ax, _ = curves.curves_figure([info]).axes
    marked = [(line.get_xdata()[0], line.get_ydata()[0]) for line in lr_ax.lines
              if line.get_marker() == "v"]  # fmt: skip
    assert marked == [(7, 3e-4), (13, 3e-5)]
    info.config = {"scheduler": "cosine"}  # a per-step schedule falls every epoch: no marks
    assert curves.lr_drops(info) == []


def test_a_per_step_schedule_is_a_line_and_label_smoothing_is_marked():
    """A plateau schedule holds a rate for the epoch: steps. OneCycle changes it every step
    and is sampled at epoch ends: a line through the samples, not steps with vertical drops.
    Label-smoothed training losses are drawn dash-dotted, and the title says so."""
    records = [{"epoch": e, "train_loss": 1 / e, "lr": 0.1 / e} for e in range(1, 6)]
    plateau = RunInfo(name="p", path="p", status="completed", records=records)
    onecycle = RunInfo(name="o", path="o", status="completed", records=records,
                       config={"scheduler": "onecycle", "label_smoothing": 0.2})  # fmt: skip
    loss_ax, _, lr_ax, _ = curves.curves_figure([plateau, onecycle]).axes
    styles = [line.get_drawstyle() for line in lr_ax.lines if line.get_marker() == "."]
    assert styles == ["steps-mid", "default"], styles
    styles = [line.get_linestyle() for line in loss_ax.lines]  # (":" marks an lr drop)
    assert [s for s in styles if s in ("-", "-.")] == ["-", "-."], styles
    assert "label smoothing" in loss_ax.get_title()


def test_plot_bad_input_is_one_line_and_keeps_the_old_picture(tiny_run, tmp_path):
    target = tmp_path / "curves.png"
    target.write_bytes(b"an older picture")
    (tmp_path / "runs" / "fresh").mkdir(parents=True)
    (tmp_path / "runs" / "fresh" / "config.json").write_text("{}")
    cases = [
        (["nope"], "--save", target, "no run folder 'nope'"),
        (["fresh"], "--save", target, "has no finished epoch to plot"),
        ([str(tiny_run.run_dir)], "--save", tmp_path / "curves.txt", "name a .png, .pdf, .svg"),
        ([str(tiny_run.run_dir)], "--save", tmp_path / "no" / "c.png", "does not exist"),
    ]
    for runs, flag, path, message in cases:
        result = run_command([CLI, "plot", *runs, flag, path], cwd=tmp_path)
        assert_one_line_error(result, message)
    missing_save = run_command([CLI, "plot", str(tiny_run.run_dir)], cwd=tmp_path)
    assert_one_line_error(missing_save, "--save")
    assert target.read_bytes() == b"an older picture"


def test_a_run_without_validation_shows_its_final_test_or_says_why_not():
    """The time-to-accuracy recipes train without validation: their accuracy panel shows the
    final test at the last epoch (a diamond), or a line saying why it is empty."""
    records = [{"epoch": e, "train_loss": 1 / e, "lr": 0.1} for e in (1, 2, 3, 4)]
    tested = RunInfo(name="fast", path="fast", status="completed", records=records,
                     test_accuracy=0.9413, test_accuracy_from="final_test")  # fmt: skip
    _, acc_ax, _, _ = curves.curves_figure([tested]).axes
    marks = [(line.get_xdata()[0], line.get_ydata()[0]) for line in acc_ax.lines
             if line.get_marker() == "D"]  # fmt: skip
    assert marks == [(4, 0.9413)] and not acc_ax.texts
    assert acc_ax.get_xlim()[0] < 1 and acc_ax.get_xlim()[1] > 4  # every epoch, not one point
    untested = RunInfo(name="stopped", path="stopped", status="preempted", records=records)
    _, acc_ax, _, _ = curves.curves_figure([untested]).axes
    assert not any(len(line.get_xdata()) for line in acc_ax.lines)
    assert [t.get_text().split(":")[0] for t in acc_ax.texts] == ["no accuracy recorded"]
