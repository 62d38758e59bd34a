"""What a training run leaves in its TensorBoard when it ends: the figures of its best
checkpoint (Images tab). Its entry in the HParams dashboard is built by tb_hparams.py and
written by outputs.write_hparams, with the test accuracy measured here.

    test_accuracy = record_run_end(accelerator, run_dir, status, say)   # every rank

The figures come from the exact multi-process evaluation (every rank evaluates its shard of
the split; the confusion counts are summed and the most confident mistakes gathered) and
only the main process draws and writes. Both are extras of a run that has already ended:
a problem here (no test files and no network, a full disk) is said in one note and never
changes how the run ended or its exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .data import Split, load_split
from .errors import UserError
from .runinfo import read_metrics

FIGURE_STATUSES = ("completed", "early-stopped")  # a preempted run draws when it ends later
FIGURE_TAG = "Figures/{split}/{name}"


def record_run_end(
    accelerator, run_dir: Path, status: str, say: Callable[[str], None]
) -> float | None:
    """Collective: every rank calls it once the run has ended and summary.json is written
    (and with it any final test result). Writes the TensorBoard images of the best
    checkpoint (the last one when the run had no validation) on the test split, or on the
    validation split when the test files cannot be had; returns the test accuracy measured
    for them, for the HParams entry."""
    run_dir = Path(run_dir)
    if status in FIGURE_STATUSES:
        return log_checkpoint_figures(accelerator, run_dir, say)
    return None


def log_checkpoint_figures(accelerator, run_dir: Path, say) -> float | None:
    """Collective. The figures of the run's best (else last) checkpoint, into the run's
    TensorBoard; returns the checkpoint's test accuracy when it was measured here."""
    import torch
    from accelerate.utils import gather_object

    from .device_data import EvalSet
    from .engine import evaluate
    from .evaluate import eval_report
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
    if accelerator.is_main_process:
        try:
            report = eval_report(result, str(checkpoint), meta, False, world, split_name)
            draw_into_tensorboard(accelerator, run_dir, report, mistakes, split)
            say(f"figures of {checkpoint.name} on the {split_name} split: TensorBoard, Images")
        except Exception as exc:  # noqa: BLE001 - an extra must not fail an ended run
            say(f"note: no figures in TensorBoard: {type(exc).__name__}: {exc}")
    return result.accuracy if split_name == "test" else None


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


def draw_into_tensorboard(accelerator, run_dir, report: dict, mistakes, split: Split) -> None:
    """Main process: draw the eval figures and add them as images of the run's writer."""
    from .figures import eval_figures, rgb_pixels
    from .mistakes import attach_images

    attach_images(mistakes, split.images)
    records, _ = read_metrics(run_dir)
    step = max((r["epoch"] for r in records), default=0)  # a resume never purges it
    writer = accelerator.get_tracker("tensorboard", unwrap=True)
    for name, figure in eval_figures(report, mistakes).items():
        tag = FIGURE_TAG.format(split=report["split"], name=name)
        writer.add_image(tag, rgb_pixels(figure), step, dataformats="HWC")
    writer.flush()
