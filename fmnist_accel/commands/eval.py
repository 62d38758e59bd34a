"""`fmnist-accel eval`: test-set (or validation-set) metrics of one checkpoint, on one or
several processes (the evaluation itself: engine/evaluation.py)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..cluster.accelerator import (
    DEFAULT_COLLECTIVE_TIMEOUT_S,
    collectives_fail_in_one_line,
    end_accelerator,
    make_accelerator,
)
from ..cluster.shared_errors import agree, say_it_and_leave_together
from ..engine.evaluation import (
    CheckpointEvaluation,
    attach_images,
    eval_report,
    evaluate_loaded,
    load_checkpoint_and_split,
)
from ..errors import UserError
from ..figures import MISTAKES_SHOWN, save_eval_figures
from ..store.run_folder import check_writable, resolve_checkpoint


def run_eval(
    checkpoint: str,
    run_dir: str | None,
    output_dir: str,
    data_dir: str | None,
    batch_size: int,
    tta: bool,
    split: str,
    as_json: bool,
    save_figures: str | None = None,
    program: str = "fmnist-accel",
) -> int:
    # The group first, then every check inside agree(): an error on any rank becomes the
    # same error on every rank, printed by the main process before any of them exits.
    with collectives_fail_in_one_line(DEFAULT_COLLECTIVE_TIMEOUT_S):
        accelerator = make_accelerator()
        try:
            path, loaded = agree(
                accelerator,
                lambda: eval_inputs(checkpoint, run_dir, output_dir, data_dir, split, save_figures),
            )
            warning = tta_warning(path, loaded[1].get("config", {})) if tta else None
            if warning and accelerator.is_main_process:
                print(f"{program}: warning: {warning}", file=sys.stderr)
            mistakes = MISTAKES_SHOWN if save_figures is not None else 0
            evaluation = evaluate_loaded(
                accelerator, path, split, loaded, batch_size, tta, mistakes
            )
            if accelerator.is_main_process:
                report_evaluation(evaluation, accelerator.num_processes, as_json, save_figures)
            return 0
        except UserError as exc:
            say_it_and_leave_together(accelerator, exc, program)
            raise
        finally:
            # Tear the process group down before exit: gloo's threads otherwise abort at exit.
            end_accelerator(accelerator)


def eval_inputs(checkpoint: str, run_dir, output_dir: str, data_dir, split: str, save_figures):
    """(checkpoint path, (model, metadata, images to evaluate)), or a UserError."""
    path = resolve_checkpoint(checkpoint, run_dir, output_dir)
    if save_figures is not None:
        if Path(save_figures).is_file():
            raise UserError(f"--save-figures {save_figures} is a file: name a folder")
        check_writable(Path(save_figures))  # every rank, before the work: same answer
    return path, load_checkpoint_and_split(path, split, data_dir)


def tta_warning(path, config: dict) -> str | None:
    """Flip TTA helps a model that trained on mirrored images; one that never saw any scores
    its mirror images worse, and the average with them lowers its accuracy."""
    if config.get("augment") is not False:
        return None  # trained with flips, or a checkpoint that does not say
    return (
        f"{path} was trained without flipped images (augment off), so --tta averages in "
        "mirror images it has never seen: that usually lowers accuracy (measured on the test "
        f"set: {TTA_COST}); leave out --tta, or use it with runs trained with --augment"
    )


# Test accuracy without and with --tta of default-recipe runs (no --augment), 2-core CPU.
TTA_COST = "mlp 0.9016 -> 0.8571, cnn-bn 0.9020 -> 0.8185"


def report_evaluation(
    evaluation: CheckpointEvaluation, processes: int, as_json: bool, figures_dir: str | None
) -> None:
    """Main process: the tables or the JSON object, and the figures when asked for."""
    report = eval_report(evaluation, processes)
    if figures_dir is not None:
        mistakes = attach_images(evaluation.result.mistakes, evaluation.split.images)
        report["figures"] = save_eval_figures(report, mistakes, Path(figures_dir))
    if as_json:
        print(json.dumps(finite_or_null(report), allow_nan=False))
    else:
        print_tables(report)
        if figures_dir is not None:
            print(f"figures written: {', '.join(report['figures'].values())}")


def finite_or_null(value):
    """`value` with every nan or inf replaced by None: json.dumps would write NaN, which is
    not JSON (a model whose logits overflow has a non-finite loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(v) for v in value]
    return value


def print_tables(report: dict) -> None:
    console = Console(highlight=False)
    # soft_wrap: a long checkpoint path stays on one line (rich wraps at 80 columns when the
    # output is not a terminal); markup=False: a path may contain [brackets].
    console.print(
        f"{report['checkpoint']} ({report['model']}, epoch {report['epoch']})"
        + (f", {report['tta_views']} TTA" if report["tta"] else ""),
        soft_wrap=True,
        markup=False,
    )
    console.print(
        f"{report['split']} loss {report['loss']:.4f}  accuracy {report['accuracy']:.4f}  "
        f"({report['num_samples']:,} images)",
        soft_wrap=True,
    )
    per_class = Table(title="per-class accuracy")
    per_class.add_column("class")
    per_class.add_column("accuracy", justify="right")
    per_class.add_column("images", justify="right")
    for name, row in zip(report["classes"], report["confusion_matrix"], strict=True):
        per_class.add_row(name, f"{report['per_class_accuracy'][name]:.4f}", f"{sum(row):,}")
    console.print(per_class)
    confusion = Table(title="confusion matrix (rows: true class, columns: predicted)")
    confusion.add_column("")
    for i in range(len(report["classes"])):
        confusion.add_column(str(i), justify="right")
    for i, (name, row) in enumerate(
        zip(report["classes"], report["confusion_matrix"], strict=True)
    ):
        confusion.add_row(
            f"{i} {name}", *(f"[bold]{n}[/]" if j == i else str(n) for j, n in enumerate(row))
        )
    console.print(confusion)
