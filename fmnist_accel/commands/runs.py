"""`fmnist-accel runs`: one line per run folder, for people (a table) or scripts (--json)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..store.run_info import RunInfo, list_runs

# --sort keys: (what they sort by, best first?). Runs that lack the value come last.
SORT_KEYS: dict[str, tuple[Callable[[RunInfo], Any], bool]] = {
    "name": (lambda r: r.name, False),
    "started": (lambda r: r.started, False),
    "model": (lambda r: r.model, False),
    "status": (lambda r: r.status, False),
    "epochs": (lambda r: r.epochs, True),
    "valid": (lambda r: r.best_valid_accuracy, True),
    "test": (lambda r: r.test_accuracy, True),
    "time": (lambda r: r.train_time, False),
}


def sort_runs(runs: list[RunInfo], key: str) -> list[RunInfo]:
    value, descending = SORT_KEYS[key]
    known = [r for r in runs if value(r) is not None]
    unknown = [r for r in runs if value(r) is None]
    known.sort(key=lambda r: r.name)
    known.sort(key=value, reverse=descending)  # stable: equal values stay in name order
    return known + sorted(unknown, key=lambda r: r.name)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def figure(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def best_run(runs: list[RunInfo]) -> RunInfo | None:
    """The run with the highest best validation accuracy (the first in name order on a tie):
    chosen on validation, never on test accuracy."""
    scored = [r for r in runs if r.best_valid_accuracy is not None]
    return max(
        sorted(scored, key=lambda r: r.name), key=lambda r: r.best_valid_accuracy, default=None
    )


def table_rows(runs: list[RunInfo], best: RunInfo | None = None) -> list[list[str]]:
    rows = []
    for r in runs:
        epochs = "-" if r.epochs is None else str(r.epochs)
        if r.max_epochs is not None and r.epochs is not None:
            epochs += f"/{r.max_epochs}"
        valid = figure(r.best_valid_accuracy)
        if r.best_epoch is not None:
            valid += f" ({r.best_epoch})"
        status = r.status + (f" (pid {r.pid})" if r.pid else "")
        rows.append(
            [
                ("* " if r is best else "") + r.name,
                r.model or "-",
                r.recipe or "-",
                status,
                epochs,
                valid,
                figure(r.test_accuracy),
                duration(r.train_time),
                "-" if r.processes is None else str(r.processes),
                r.precision or "-",
                r.slurm_job or "-",
                "; ".join(r.problems),
            ]
        )
    return rows


COLUMNS = (
    "run",
    "model",
    "recipe",
    "status",
    "epochs",
    "best valid acc (epoch)",
    "test acc",
    "time",
    "procs",
    "precision",
    "slurm job",
    "problems",
)


def print_table(runs: list[RunInfo], best: RunInfo | None) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 250  # a pipe or a file: one line per run, not wrapped at 80 columns
    table = Table()
    for name in COLUMNS:
        numeric = name in ("epochs", "test acc", "time", "procs")
        table.add_column(name, justify="right" if numeric else "left", overflow="fold")
    for row in table_rows(runs, best):
        table.add_row(*map(Text, row))  # Text: a run name may hold [brackets], not markup
    console.print(table)


def run_runs(output_dir: str, sort: str, as_json: bool, sweep: str | None = None) -> int:
    folder = Path(output_dir)
    if not folder.is_dir():
        raise UserError(
            f"no folder {output_dir}: train a run first (fmnist-accel train) or pass --output-dir"
        )
    try:
        runs = sort_runs(list_runs(folder), sort)
    except OSError as exc:
        raise UserError(f"cannot list {output_dir}: {exc.strerror or exc}") from None
    best = None
    if sweep is not None:
        runs = [r for r in runs if r.sweep == sweep]
        if not runs:
            sweeps = sorted({r.sweep for r in list_runs(folder) if r.sweep})
            known = f"sweeps there: {', '.join(sweeps)}" if sweeps else "no run there is in a sweep"
            raise UserError(f"no runs of sweep {sweep!r} in {output_dir} ({known})")
        best = best_run(runs)
    if as_json:
        print(
            json.dumps([r.public() | ({"best_in_sweep": r is best} if sweep else {}) for r in runs])
        )
    elif not runs:
        print(f"no runs in {output_dir}")
    else:
        print_table(runs, best)
        if best is not None:
            print(f"* best validation accuracy of sweep {sweep}: {best.name}")
    return 0
