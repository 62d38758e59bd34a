"""The figure a training run ends with: its best checkpoint's test accuracy and loss.

It is measured after the run's last decision, on the checkpoint file the run wrote, with the
same exact multi-process evaluation as `fmnist-accel eval` (each rank its own shard of the
test set, one all-reduce), so `eval best` of the run prints the same figures. Nothing chooses
or stops by it. Every rank evaluates; outputs.add_final_test writes it into summary.json.
The evaluation is kept for the run's figures (run_end.end_figures), which then need no
second one.
"""

from __future__ import annotations

from pathlib import Path

from . import rundir
from .data import load_split
from .engine import evaluate
from .errors import UserError
from .evaluate import EvaluatedCheckpoint, on_device
from .trained_model import model_from_checkpoint


def checkpoint_to_test(run_dir: Path) -> Path | None:
    """best.safetensors; last.safetensors for a run without a validation split (no best)."""
    for name in ("best", "last"):
        path = rundir.checkpoint_path(run_dir, name)
        if path.is_file():
            return path
    return None


def run_final_test(
    accelerator, run_dir: Path, data_dir: str, batch_size: int
) -> EvaluatedCheckpoint | None:
    """Collective: every rank must call it. The checkpoint evaluated on the test split, or
    None when the run wrote no checkpoint."""
    from accelerate.utils import gather_object

    accelerator.wait_for_everyone()  # the main process has written the checkpoints
    path = checkpoint_to_test(Path(run_dir))
    if path is None:
        return None
    model, meta = model_from_checkpoint(path)
    try:  # the test files were checked before training; an error becomes the same on all ranks
        images, error = load_split(data_dir, "test"), None
    except UserError as exc:
        images, error = None, str(exc)
    errors = [e for e in gather_object([error]) if e]
    if errors:
        raise UserError(errors[0])
    channels_last = True  # as `eval` evaluates: the same figures to the last bit
    model, eval_set = on_device(accelerator, model, images, channels_last)
    result = evaluate(model, eval_set, accelerator, batch_size)
    return EvaluatedCheckpoint(
        path, meta, "test", images, data_dir, batch_size, channels_last, model, eval_set, result
    )


def final_test_record(tested: EvaluatedCheckpoint | None) -> dict | None:
    """summary.json's `final_test` (None: no checkpoint was tested)."""
    if tested is None:
        return None
    return {
        "checkpoint": tested.path.name,
        "epoch": tested.meta.get("epoch"),
        "accuracy": tested.result.accuracy,
        "loss": tested.result.loss,
        "num_samples": tested.result.num_samples,
    }


def final_test_line(record: dict | None) -> str:
    """What the user is shown of final_test_record."""
    if record is None:
        return "test: no checkpoint was written, nothing to test"
    return (
        f"test: accuracy {record['accuracy']:.4f}, loss {record['loss']:.4f} "
        f"({record['checkpoint']}, epoch {record['epoch']}, {record['num_samples']:,} images)"
    )
