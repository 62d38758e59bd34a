"""The figures a training run ends with, for TensorBoard's Images tab: its best checkpoint
(the last one when the run had no validation) evaluated on the test split, or on the
validation split when the test files cannot be had.

    figures = end_figures(accelerator, run_dir, status, say, tested)  # every rank
    outputs.log_figures(s, figures)                  # the main process draws and writes them
    outputs.write_hparams(s, figures.test_accuracy if figures else None)

The figures come from the exact multi-process evaluation (every rank evaluates its shard of
the split; the confusion counts are summed and the most confident mistakes gathered): the
final test's (`tested`) when it is the same evaluation, so that the checkpoint is loaded and
evaluated once. Only the main process draws them (tensorboard_images), inside
outputs.log_figures. Both are
extras of a run that has already ended: a problem here (no test files and no network, a
full disk) is said in one note and never changes how the run ended or its exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import Split, load_split
from .errors import UserError

if TYPE_CHECKING:
    from .engine import EvalResult
    from .evaluate import EvaluatedCheckpoint
    from .mistakes import Mistake

FIGURE_STATUSES = ("completed", "early-stopped")  # a preempted run draws when it ends later
FIGURE_TAG = "Figures/{split}/{name}"


@dataclass
class EndFigures:
    """What the figures show, the same on every rank; only the main process draws them."""

    checkpoint: Path
    meta: dict  # the checkpoint's metadata
    split_name: str  # "test" or "valid"
    split: Split
    result: EvalResult  # over the whole split
    mistakes: list[Mistake]  # the most confident of all ranks
    processes: int

    @property
    def test_accuracy(self) -> float | None:
        """The checkpoint's test accuracy when the figures measured it (for HParams)."""
        return self.result.accuracy if self.split_name == "test" else None


def end_figures(
    accelerator,
    run_dir: Path,
    status: str,
    say: Callable[[str], None],
    tested: EvaluatedCheckpoint | None = None,
) -> EndFigures | None:
    """Collective: every rank calls it once the run has ended and summary.json is written.
    tested: the final test's evaluation, used again when it is the one the figures would
    make. None (after a note when something is missing) when there is nothing to draw."""
    from .figures import MISTAKES_SHOWN
    from .mistakes import most_confident_mistakes

    if status not in FIGURE_STATUSES:
        return None
    evaluated = tested if tested is not None and evaluates_as_figures(tested) else None
    if evaluated is None:
        evaluated = evaluate_for_figures(accelerator, Path(run_dir), say)
        if evaluated is None:
            return None
    # One more pass over this rank's shard: the evaluation keeps counts, not the mistakes.
    mistakes = most_confident_mistakes(
        evaluated.model, evaluated.eval_set, accelerator, evaluated.batch_size, MISTAKES_SHOWN
    )
    return EndFigures(
        evaluated.path,
        evaluated.meta,
        evaluated.split_name,
        evaluated.split,
        evaluated.result,
        mistakes,
        accelerator.num_processes,
    )


def figure_settings(meta: dict) -> tuple[str, int, bool]:
    """(data folder, batch size, channels_last) the figures evaluate a checkpoint with: those
    of the run that wrote it, from its metadata."""
    config = meta.get("config", {})
    return (
        config.get("data_dir", "data"),
        int(config.get("eval_batch_size", 1024)),
        bool(config.get("channels_last", True)),
    )


def evaluates_as_figures(evaluated: EvaluatedCheckpoint) -> bool:
    """Whether an evaluation of the run's best (else last) checkpoint, the final test's, is
    the one the figures would make: the test split, read from the same folder, in the same
    batch size and memory layout, so the same figures to the last bit. Not when the
    checkpoint was written with another --data-dir or --eval-batch-size (a resume may change
    them) or without channels_last: the figures then evaluate on their own, as before."""
    used = (evaluated.data_dir, evaluated.batch_size, evaluated.channels_last)
    return evaluated.split_name == "test" and used == figure_settings(evaluated.meta)


def evaluate_for_figures(accelerator, run_dir: Path, say) -> EvaluatedCheckpoint | None:
    """Collective. The run's best (else last) checkpoint evaluated for its figures, on the
    test split or else the validation split; None after a note when neither can be had."""
    from accelerate.utils import gather_object

    from .engine import evaluate
    from .evaluate import EvaluatedCheckpoint, on_device

    checkpoint = next(
        (p for p in (run_dir / "best.safetensors", run_dir / "last.safetensors") if p.is_file()),
        None,
    )
    model = meta = split = None
    split_name, problem = figure_split(accelerator, checkpoint, say)
    if problem is None:
        try:
            model, meta, split = load_for_figures(checkpoint, split_name)
        except UserError as exc:
            problem = str(exc)
    problems = [p for p in gather_object([problem]) if p]
    if problems:
        say(f"note: no figures in TensorBoard: {problems[0]}")
        return None

    data_dir, batch_size, channels_last = figure_settings(meta)
    model, eval_set = on_device(accelerator, model, split, channels_last)
    result = evaluate(model, eval_set, accelerator, batch_size)
    return EvaluatedCheckpoint(
        checkpoint,
        meta,
        split_name,
        split,
        data_dir,
        batch_size,
        channels_last,
        model,
        eval_set,
        result,
    )


def figure_split(accelerator, checkpoint: Path | None, say) -> tuple[str, str | None]:
    """('test' or 'valid', problem or None), the same on every rank: the main process tries
    the test files first (downloading them if needed, as `eval` would) and tells the others."""
    from accelerate.utils import broadcast_object_list

    from .checkpoint import load_model_checkpoint

    if checkpoint is None:
        return "", "the run has no checkpoint"
    choice = ["test", None]
    if accelerator.is_main_process:
        try:
            _, meta = load_model_checkpoint(checkpoint, metadata_only=True)
            data_dir = figure_settings(meta)[0]
        except UserError as exc:
            choice = ["", str(exc)]
        else:
            try:
                load_split(data_dir, "test")
            except UserError as exc:
                say(f"note: figures on the validation split: no test split ({exc})")
                choice = ["valid", None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    return choice[0], choice[1]


def load_for_figures(checkpoint: Path, split_name: str):
    """(model, metadata, split) on this rank; UserError if any is missing or broken."""
    from .evaluate import eval_split
    from .trained_model import model_from_checkpoint

    model, meta = model_from_checkpoint(checkpoint)
    config = meta.get("config", {})
    data_dir = figure_settings(meta)[0]
    if split_name == "valid" and not config.get("valid_size"):
        raise UserError("no test files and no validation split to draw from")
    return model, meta, eval_split(data_dir, split_name, config, allow_download=False)


def tensorboard_images(figures: EndFigures) -> Iterator[tuple[str, Any]]:
    """Main process: (TensorBoard tag, RGB pixels) of each eval figure, drawn one at a time
    as the writer takes it."""
    from .evaluate import eval_report
    from .figures import eval_figures, rgb_pixels
    from .mistakes import attach_images

    checkpoint = str(figures.checkpoint)
    report = eval_report(
        figures.result, checkpoint, figures.meta, False, figures.processes, figures.split_name
    )
    attach_images(figures.mistakes, figures.split.images)
    for name, figure in eval_figures(report, figures.mistakes).items():
        yield FIGURE_TAG.format(split=report["split"], name=name), rgb_pixels(figure)
