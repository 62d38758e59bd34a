"""`fmnist-accel plot`: learning curves of one or more runs in one picture, from their
metrics.jsonl, without a TensorBoard server (a login node often has no port forwarding).

Four panels against the epoch: training and validation loss; validation accuracy (and test
accuracy where --test-every-epoch logged it) with the best epoch starred and the final test
marked; the learning rate
on a log scale with its drops marked; a key. One colour per run.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..store.layout import METRICS
from ..store.run_info import RunInfo, read_run

SIZE = (13.0, 9.0)  # inches, at figures.DPI
FORMATS = (".png", ".pdf", ".svg")
# A learning rate that falls to less than this share of the previous epoch's is a drop
# (the plateau scheduler's x0.1); the small steps of a per-step schedule are not.
DROP_RATIO = 0.75


def find_run(spec: str, output_dir: str) -> Path:
    """RUN as a folder path, else as a run name in output_dir."""
    if not spec.strip():
        raise UserError("a RUN given to plot is empty (an unset shell variable?): name a run")
    for candidate in (Path(spec), Path(output_dir) / spec):
        if candidate.is_dir():
            return candidate
    raise UserError(f"no run folder {spec!r} (looked for {spec} and {Path(output_dir) / spec})")


def load_runs(specs: list[str], output_dir: str) -> list[RunInfo]:
    runs = []
    for spec in specs:
        info = read_run(find_run(spec, output_dir))
        if not info.records:
            raise UserError(f"{info.path} has no finished epoch to plot (no records in {METRICS})")
        runs.append(info)
    return runs


def check_target(save: str) -> Path:
    path = Path(save)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--save {save}: name a {', '.join(FORMATS)} file")
    if path.is_dir():
        raise UserError(f"--save {save} is a folder: name a file")
    if not path.parent.is_dir():
        raise UserError(f"--save {save}: the folder {path.parent} does not exist")
    return path


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [e for e, _ in points], [v for _, v in points]


def lr_drops(info: RunInfo) -> list[tuple[int, float]]:
    """(epoch, lr) of each epoch whose learning rate fell below DROP_RATIO of the last, in a
    run with the plateau scheduler (a per-step schedule's curve is its own picture)."""
    if info.config.get("scheduler", "plateau") != "plateau":
        return []
    epochs, lrs = series(info.records, "lr")
    return [
        (epochs[i], lrs[i])
        for i in range(1, len(lrs))
        if lrs[i - 1] > 0 and lrs[i] < DROP_RATIO * lrs[i - 1]
    ]


def best_point(info: RunInfo) -> tuple[int, float] | None:
    """The best epoch as training chose it (the last record marked is_best), with its
    validation accuracy."""
    best = [r for r in info.records if r.get("is_best") and "valid_accuracy" in r]
    return (best[-1]["epoch"], best[-1]["valid_accuracy"]) if best else None


def curves_figure(runs: list[RunInfo]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    from ..figures import DPI

    figure = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    (loss_ax, acc_ax), (lr_ax, key_ax) = figure.subplots(2, 2)
    colours = [f"C{i % 10}" for i in range(len(runs))]  # matplotlib's 10 distinct colours
    smoothed = False
    for info, colour in zip(runs, colours, strict=True):
        records = info.records
        # With label smoothing the training loss is not plain cross-entropy (it cannot reach
        # 0): drawn dash-dotted, and said so in the title.
        smoothing = bool(info.config.get("label_smoothing"))
        smoothed |= smoothing
        loss_ax.plot(
            *series(records, "train_loss"), color=colour, linestyle="-." if smoothing else "-"
        )
        loss_ax.plot(*series(records, "valid_loss"), color=colour, linestyle="--")
        acc_ax.plot(*series(records, "valid_accuracy"), color=colour, marker=".")
        acc_ax.plot(*series(records, "test_accuracy"), color=colour, linestyle=":")
        best = best_point(info)
        if best:
            acc_ax.plot(*best, marker="*", markersize=16, color=colour, markeredgecolor="black")
        # The final test (summary.json) of the best checkpoint, at its epoch, or of the last
        # one without validation: the one accuracy the time-to-accuracy recipes have to show.
        if records and info.test_accuracy_from == "final_test":
            epoch = info.best_epoch or records[-1]["epoch"]
            acc_ax.plot(epoch, info.test_accuracy, marker="D", markersize=8, color=colour,
                        markeredgecolor="black")  # fmt: skip
        # A plateau schedule holds one rate per epoch (steps); a per-step schedule changes it
        # every step and is sampled at each epoch's end (a line through the samples).
        per_epoch = info.config.get("scheduler", "plateau") in ("plateau", "none")
        lr_ax.plot(
            *series(records, "lr"),
            color=colour,
            drawstyle="steps-mid" if per_epoch else "default",
            marker=".",
        )
        for epoch, lr in lr_drops(info):
            lr_ax.plot(epoch, lr, marker="v", markersize=10, color=colour, markeredgecolor="k")
            for ax in (loss_ax, acc_ax):
                ax.axvline(epoch - 0.5, color=colour, linestyle=":", linewidth=1, alpha=0.7)
    loss_ax.set_title(
        "loss: training (solid; dash-dot: with label smoothing,\nnot plain cross-entropy), "
        "validation (dashed)"
        if smoothed
        else "loss: training (solid), validation (dashed)",
        fontsize=10,
    )
    loss_ax.set_ylabel("cross-entropy")
    acc_ax.set_title(
        "accuracy: validation (dots), test (dotted line);\n\u2605 best epoch, \u25c6 final test",
        fontsize=10,
    )
    acc_ax.set_ylabel("accuracy")
    if not any(len(line.get_xdata()) for line in acc_ax.lines):  # say why, not empty axes
        acc_ax.text(0.5, 0.5, "no accuracy recorded: trained without validation\n"
                    "(--test-every-epoch adds a test curve)", ha="center", va="center",
                    transform=acc_ax.transAxes, fontsize=9, color="0.4")  # fmt: skip
        acc_ax.set_yticks([])
    acc_ax.set_xlim(loss_ax.get_xlim())  # the same epochs as the loss, also for a lone point
    lr_ax.set_title(
        "learning rate (log scale; per-step schedules at each epoch's end);\n"
        "\u25bc a drop, also dotted in the panels above",
        fontsize=10,
    )
    lr_ax.set_yscale("log")
    lr_ax.set_ylabel("learning rate")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    key_ax.set_axis_off()
    handles = [Line2D([], [], color=c, linewidth=3) for c in colours]
    key_ax.legend(
        handles,
        [run_label(info) for info in runs],
        loc="upper left",
        title="runs",
        fontsize=9,
        title_fontsize=10,
        frameon=False,
    )
    return figure


def run_label(info: RunInfo) -> str:
    """'NAME\\n  mlp, default recipe, completed after 23 epochs; best valid 0.9016 (epoch
    12), test 0.8991'."""
    facts = f"{info.model}, {info.recipe} recipe, {info.status} after {info.epochs} epochs"
    if info.best_valid_accuracy is not None:
        facts += f"; best valid {info.best_valid_accuracy:.4f} (epoch {info.best_epoch})"
    if info.test_accuracy is not None:
        facts += f", test {info.test_accuracy:.4f}"
    name = info.name
    if len(name) > LABEL_CHARS:  # a long name would push the panels off the figure
        keep = (LABEL_CHARS - 1) // 2
        name = name[:keep] + "…" + name[-keep:]
    return f"{name}\n  {facts}"


LABEL_CHARS = 60  # of a run's name in the key: what fits its panel at 9 points


def run_plot(specs: list[str], output_dir: str, save: str) -> int:
    target = check_target(save)
    runs = load_runs(specs, output_dir)
    from ..figures import save_figure

    try:
        save_figure(curves_figure(runs), target)
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    print(f"wrote {target}: learning curves of {len(runs)} run(s)")
    return 0
