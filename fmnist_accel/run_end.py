"""The figures a training run ends with, for TensorBoard's Images tab: its best checkpoint
(the last one when the run had no validation) evaluated on the test split, or on the
validation split when the test files cannot be had.

    figures = end_figures(accelerator, run_dir, status, say)   # every rank, after summary.json
    outputs.log_figures(s, figures)                             # the main process draws, writes
    outputs.write_hparams(s, figures.test_accuracy if figures else None)

The figures come from the exact multi-process evaluation (every rank evaluates its shard of
the split; the confusion counts are summed and the most confident mistakes gathered); only
the main process draws them (tensorboard_images), inside outputs.log_figures. Both are
extras of a run that has already ended: a problem here (no test files and no network, a
full disk) is said in one note and never changes how the run ended or its exit code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import Split, load_split
from .errors import UserError

FIGURE_STATUSES = ("completed", "early-stopped")  # a preempted run draws when it ends later
FIGURE_TAG = "Figures/{split}/{name}"


@dataclass
class EndFigures:
    """What the figures show, the same on every rank; only the main process draws them."""

    checkpoint: Path
    meta: dict  # the checkpoint's metadata
    split_name: str  # "test" or "valid"
    split: Split
    result: Any  # engine.EvalResult over the whole split
    mistakes: list  # mistakes.Mistake, the most confident of all ranks
    processes: int

    @property
    def test_accuracy(self) -> float | None:
        """The checkpoint's test accuracy when the figures measured it (for HParams)."""
        return self.result.accuracy if self.split_name == "test" else None


def end_figures(
    accelerator, run_dir: Path, status: str, say: Callable[[str], None]
) -> EndFigures | None:
    """Collective: every rank calls it once the run has ended and summary.json is written.
    None (after a note when something is missing) when there is nothing to draw."""
    if status not in FIGURE_STATUSES:
        return None
    return evaluate_for_figures(accelerator, Path(run_dir), say)


def evaluate_for_figures(accelerator, run_dir: Path, say) -> EndFigures | None:
    """Collective. The evaluation of the run's best (else last) checkpoint for its figures."""
    import torch
    from accelerate.utils import gather_object

    from .device_data import EvalSet
    from .engine import evaluate
    from .figures import MISTAKES_SHOWN
    from .mistakes import most_confident_mistakes

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

    config = meta.get("config", {})
    channels_last = bool(config.get("channels_last", True))
    batch_size = int(config.get("eval_batch_size", 1024))
    model = model.to(accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    world, rank = accelerator.num_processes, accelerator.process_index
    eval_set = EvalSet(split, accelerator.device, world, rank, channels_last)
    result = evaluate(model, eval_set, accelerator, batch_size)
    mistakes = most_confident_mistakes(model, eval_set, accelerator, batch_size, MISTAKES_SHOWN)
    return EndFigures(checkpoint, meta, split_name, split, result, mistakes, world)


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
            data_dir = meta.get("config", {}).get("data_dir", "data")
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
    data_dir = config.get("data_dir", "data")
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
