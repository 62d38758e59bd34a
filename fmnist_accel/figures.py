"""Pictures of a checkpoint's evaluation: the confusion matrix, per-class accuracy and its
most confident mistakes. Drawn from an `eval` report (engine/evaluation.eval_report), so the
picture and `eval --json` come from the same counts.

matplotlib is imported inside the functions (`fmnist-accel --help` must not pay for it) and
used through its Agg canvas, never pyplot: no display, no global figure state, the same
pixels on a laptop and on a headless cluster node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .store.atomic import atomic_write

DPI = 100
# Figure sizes in inches; at DPI these are the PNG sizes in pixels (tests check them).
SIZES = {
    "confusion_matrix": (9.0, 8.0),
    "per_class_accuracy": (8.0, 5.5),
    "mistakes": (12.0, 10.0),
}
MISTAKE_ROWS, MISTAKE_COLUMNS = 4, 6
MISTAKES_SHOWN = MISTAKE_ROWS * MISTAKE_COLUMNS


def new_figure(name: str, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZES[name], dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)  # attaches itself: the figure renders with Agg
    return figure


def title(kind: str, report: dict, figure_name: str) -> str:
    """Three lines that fit the figure's width at TITLE_SIZE, whatever the run's name:

        Per-class accuracy
        test split, 10,000 images: accuracy 0.9016 (flip TTA)
        mlp, RUN/best.safetensors (epoch 12)

    The figures come first; a run name too long for the line is shortened in its middle."""
    width = int(SIZES[figure_name][0] * CHARS_PER_INCH)
    checkpoint = "/".join(Path(str(report.get("checkpoint", "?"))).parts[-2:])
    tta = f" ({report.get('tta_views') or 'flip'} TTA)" if report.get("tta") else ""
    figures = (
        f"{report['split']} split, {report['num_samples']:,} images: "
        f"accuracy {report['accuracy']:.4f}{tta}"
    )
    source = f"{report.get('model')}, {checkpoint} (epoch {report.get('epoch')})"
    if len(source) > width:
        keep = (width - 1) // 2
        source = source[:keep] + "…" + source[-keep:]
    return f"{kind}\n{figures}\n{source}"


# Characters of a title line per inch of figure at TITLE_SIZE points, with a margin: an
# average DejaVu Sans character is about 0.6 of the font size wide (11 pt: 6.6 pt; 72 pt
# an inch).
TITLE_SIZE = 11
CHARS_PER_INCH = 9.5


def confusion_matrix_figure(report: dict):
    """Rows: true class, columns: predicted. Colour: the share of the true class (rows sum
    to 1); text: the count of images."""
    import numpy as np

    counts = np.array(report["confusion_matrix"], dtype=np.int64)
    names = report["classes"]
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = new_figure("confusion_matrix")
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (i, j), n in np.ndenumerate(counts):
        # white on dark cells, black on light ones
        colour = "white" if shares[i, j] > 0.55 else "black"
        ax.text(j, i, str(n), ha="center", va="center", fontsize=9, color=colour)
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    figure.suptitle(title("Confusion matrix", report, "confusion_matrix"), fontsize=TITLE_SIZE)
    bar = figure.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("share of the true class")
    return figure


def per_class_accuracy_figure(report: dict):
    """One horizontal bar per class (the recall of that class), the overall accuracy as a
    line; classes in the confusion matrix's order, top to bottom."""
    names = report["classes"]
    accuracy = [report["per_class_accuracy"][name] for name in names]
    images = [sum(row) for row in report["confusion_matrix"]]
    figure = new_figure("per_class_accuracy")
    ax = figure.add_subplot()
    positions = range(len(names))
    ax.barh(positions, accuracy, color="tab:blue")
    for y, (acc, n) in enumerate(zip(accuracy, images, strict=True)):
        # on a white box above the overall-accuracy line, which may cross it
        label_box = {"facecolor": "white", "edgecolor": "none", "pad": 1}
        ax.text(acc + 0.01, y, f"{acc:.3f}  ({n:,})", va="center", fontsize=9, bbox=label_box,
                zorder=4)  # fmt: skip
    ax.axvline(
        report["accuracy"],
        color="tab:red",
        linestyle="--",
        linewidth=1,
        zorder=3,
        label=f"overall accuracy {report['accuracy']:.4f}",
    )
    figure.legend(loc="outside lower center", frameon=False, fontsize=9)
    ax.set_yticks(positions, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.18)  # room for the labels right of a bar at 1.0
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("accuracy on the images of the class (their count in brackets)")
    figure.suptitle(title("Per-class accuracy", report, "per_class_accuracy"), fontsize=TITLE_SIZE)
    ax.grid(axis="x", alpha=0.3)
    return figure


def mistakes_figure(report: dict, mistakes: list):
    """The most confidently misclassified images, most confident first: each with its
    index in the split, its true class and the predicted class with its probability."""
    names = report["classes"]
    # A fixed grid: constrained layout would spend seconds placing 24 axes, at the end of
    # every training run.
    figure = new_figure("mistakes", layout=None)
    figure.suptitle(
        title(f"Most confident mistakes ({len(mistakes)} shown)", report, "mistakes"),
        fontsize=TITLE_SIZE,
    )
    axes = figure.subplots(
        MISTAKE_ROWS,
        MISTAKE_COLUMNS,
        gridspec_kw={"left": 0.01, "right": 0.99, "bottom": 0.01, "top": 0.87, "hspace": 0.3},
    )
    for ax in axes.flat:
        ax.set_axis_off()
    if not mistakes:
        axes.flat[0].text(0, 0.5, "no misclassified images", fontsize=12)
    for ax, m in zip(axes.flat, mistakes[:MISTAKES_SHOWN], strict=False):
        ax.imshow(m.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_title(
            f"#{m.index}  true: {names[m.true]}\npred: {names[m.predicted]} ({m.confidence:.0%})",
            fontsize=9,
        )
    return figure


def eval_figures(report: dict, mistakes: list) -> dict[str, Any]:
    """name -> matplotlib Figure, for an `eval` report and its mistakes (with images)."""
    return {
        "confusion_matrix": confusion_matrix_figure(report),
        "per_class_accuracy": per_class_accuracy_figure(report),
        "mistakes": mistakes_figure(report, mistakes),
    }


def description(report: dict, mistakes: list) -> str:
    """What the pictures were drawn from, stored in each PNG (a text chunk): the counts
    of the confusion matrix and the mistakes shown."""
    return json.dumps(
        {
            "checkpoint": report.get("checkpoint"),
            "split": report.get("split"),
            "classes": report["classes"],
            "confusion_matrix": report["confusion_matrix"],
            "mistakes": [
                {
                    "index": m.index,
                    "true": m.true,
                    "predicted": m.predicted,
                    "confidence": m.confidence,
                }
                for m in mistakes
            ],
        }
    )


def save_figure(figure, path: Path, text: str = "") -> None:
    """Write figure in the format its suffix names (png, pdf, svg), atomically: a kill leaves
    either the old picture or the new one; a failed write is WriteFailed, one line. text:
    stored in a PNG as its Description."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    metadata = {"Description": text} if fmt == "png" else None
    atomic_write(path, lambda tmp: figure.savefig(tmp, format=fmt, dpi=DPI, metadata=metadata))


def save_eval_figures(report: dict, mistakes: list, folder: Path) -> dict[str, str]:
    """Draw and write the eval figures as folder/<name>.png; returns name -> path."""
    text = description(report, mistakes)
    paths = {}
    for name, figure in eval_figures(report, mistakes).items():
        path = Path(folder) / f"{name}.png"
        save_figure(figure, path, text)
        paths[name] = str(path)
    return paths


def rgb_pixels(figure):
    """The figure rendered by Agg as an (H, W, 3) uint8 array (for TensorBoard)."""
    import numpy as np

    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
