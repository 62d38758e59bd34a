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


def table_rows(runs: list[RunInfo]) -> list[list[str]]:
    rows = []
    for r in runs:
        epochs = "-" if r.epochs is None else str(r.epochs)
        if r.max_epochs is not None and r.epochs is not None:
            epochs += f"/{r.max_epochs}"
        best = figure(r.best_valid_accuracy)
        if r.best_epoch is not None:
            best += f" ({r.best_epoch})"
        status = r.status + (f" (pid {r.pid})" if r.pid else "")
        rows.append(
            [
                r.name,
                r.model or "-",
                r.recipe or "-",
                status,
                epochs,
                best,
                figure(r.test_accuracy),
                duration(r.train_time),
                "-" if r.processes is None else str(r.processes),
                r.precision or "-",
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
    "problems",
)


def print_table(runs: list[RunInfo]) -> None:
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
    for row in table_rows(runs):
        table.add_row(*map(Text, row))  # Text: a run name may hold [brackets], not markup
    console.print(table)


def run_runs(output_dir: str, sort: str, as_json: bool) -> int:
    folder = Path(output_dir)
    if not folder.is_dir():
        raise UserError(
            f"no folder {output_dir}: train a run first (fmnist-accel train) or pass --output-dir"
        )
    try:
        runs = sort_runs(list_runs(folder), sort)
    except OSError as exc:
        raise UserError(f"cannot list {output_dir}: {exc.strerror or exc}") from None
    if as_json:
        print(json.dumps([r.public() for r in runs]))
    elif not runs:
        print(f"no runs in {output_dir}")
    else:
        print_table(runs)
    return 0
