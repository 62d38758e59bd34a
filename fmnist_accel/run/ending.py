"""What a training run ends with: its checkpoint picked once, evaluated once, and the numbers
and pictures handed to the one writer (outputs.write_ending).

Once a run has ended as planned (completed or early-stopped), every rank:

1. waits for the main process to have written the checkpoints;
2. picks the checkpoint to report: best.safetensors, else last.safetensors (a run without a
   validation split has no best);
3. picks the split: the test split; the validation split only when the test files cannot be
   had (a run with --no-final-test need not have them);
4. evaluates the checkpoint on it once, with the run's own settings (its data folder and
   --eval-batch-size, channels-last), by the same exact evaluation as `fmnist-accel eval`, the
   most confident mistakes found in the same pass;
5. hands on what it measured: the final test (summary.json's final_test, the run's last
   line), and, drawn by the main process, the pictures for TensorBoard's Images tab and the
   test accuracy for the HParams entry.

The final test is measured after the run's last decision: nothing chooses or stops by it. The
pictures and the HParams entry are extras of a run that has ended: a problem with them is one
note, and changes neither how the run ended nor its exit code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..engine.evaluation import CheckpointEvaluation, evaluate_checkpoint
from ..errors import UserError
from ..store.layout import CHECKPOINT_NAMES, SUCCESSFUL_STATUSES, FinalTest, checkpoint_path

PICTURE_TAG = "Figures/{split}/{name}"


@dataclass
class Ending:
    """What the end of a run measured; empty when there was nothing to measure."""

    due: bool = False  # the run ended as planned: summary.json's ending is to be done
    evaluation: CheckpointEvaluation | None = None
    final_test: FinalTest | None = None  # when --final-test asked for it
    # Main process: (TensorBoard tag, RGB pixels) of each picture, drawn from the evaluation.
    pictures: list[tuple[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user: what is missing and why

    @property
    def test_accuracy(self) -> float | None:
        """The checkpoint's test accuracy when it was measured (for the HParams entry)."""
        e = self.evaluation
        return e.result.accuracy if e is not None and e.split_name == "test" else None


def final_checkpoint(run_dir: Path) -> Path | None:
    """best.safetensors; last.safetensors for a run without a validation split (no best)."""
    for name in CHECKPOINT_NAMES:
        path = checkpoint_path(run_dir, name)
        if path.is_file():
            return path
    return None


def end_of_run(
    accelerator, run_dir: Path, cfg: TrainConfig, status: str, say: Callable[[str], None]
) -> Ending:
    """Collective: every rank calls it once summary.json says how the run ended. An error of
    the final test (its data gone since training started) is raised on every rank; a problem
    of the pictures alone is a note."""
    from ..figures import MISTAKES_SHOWN

    if status not in SUCCESSFUL_STATUSES:
        return Ending()  # a stopped run ends later; a diverged one has nothing to show
    accelerator.wait_for_everyone()  # the main process has written the checkpoints
    checkpoint = final_checkpoint(Path(run_dir))
    if checkpoint is None:
        missing = ["test: no checkpoint was written, nothing to test"] * cfg.final_test
        return Ending(due=True, notes=missing)
    split, note = choose_split(accelerator, cfg)
    ending = Ending(due=True, notes=[note] if note else [])
    if split is None:
        return ending
    try:
        ending.evaluation = evaluate_checkpoint(
            accelerator,
            checkpoint,
            split,
            cfg.data_dir,
            cfg.eval_batch_size,
            mistakes=MISTAKES_SHOWN,
            allow_download=False,  # choose_split has fetched what it could
        )
    except UserError as exc:
        if cfg.final_test:
            raise
        ending.notes.append(f"note: no figures in TensorBoard: {exc}")
        return ending
    if cfg.final_test:
        ending.final_test = final_test_record(ending.evaluation)
    if accelerator.is_main_process:
        ending.pictures = draw_pictures(ending.evaluation, accelerator.num_processes, ending)
    return ending


def choose_split(accelerator, cfg: TrainConfig) -> tuple[str | None, str | None]:
    """(split to evaluate or None, a note), the same on every rank. With --final-test the
    test files were checked before training began. Without it the main process tries the
    test files (downloading them, as `eval` would) and tells the others."""
    if cfg.final_test:
        return "test", None
    from ..engine.data import ensure_files

    choice: list = ["test", None]
    if accelerator.is_main_process:
        try:
            ensure_files(cfg.data_dir, ("test",))
        except UserError as exc:
            if cfg.valid_size:
                choice = ["valid", f"note: figures on the validation split: no test split ({exc})"]
            else:
                choice = [None, f"note: no figures in TensorBoard: no test split ({exc}) and no "
                          "validation split to draw from"]  # fmt: skip
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(choice, from_process=0)
    return choice[0], choice[1]


def final_test_record(evaluation: CheckpointEvaluation) -> FinalTest:
    """summary.json's final_test."""
    return {
        "checkpoint": evaluation.path.name,
        "epoch": evaluation.meta.get("epoch"),
        "accuracy": evaluation.result.accuracy,
        "loss": evaluation.result.loss,
        "num_samples": evaluation.result.num_samples,
    }


def final_test_line(record: FinalTest) -> str:
    """What the user is shown of the final test."""
    return (
        f"test: accuracy {record['accuracy']:.4f}, loss {record['loss']:.4f} "
        f"({record['checkpoint']}, epoch {record['epoch']}, {record['num_samples']:,} images)"
    )


def draw_pictures(
    evaluation: CheckpointEvaluation, processes: int, ending: Ending
) -> list[tuple[str, Any]]:
    """Main process: (TensorBoard tag, RGB pixels) of each eval picture; [] after a note
    when they cannot be drawn."""
    from ..engine.evaluation import attach_images, eval_report
    from ..figures import eval_figures, rgb_pixels

    try:
        report = eval_report(evaluation, processes)
        mistakes = attach_images(evaluation.result.mistakes, evaluation.split.images)
        return [
            (PICTURE_TAG.format(split=evaluation.split_name, name=name), rgb_pixels(figure))
            for name, figure in eval_figures(report, mistakes).items()
        ]
    except Exception as exc:  # noqa: BLE001 - an extra must not fail an ended run
        ending.notes.append(f"note: no figures in TensorBoard: {type(exc).__name__}: {exc}")
        return []
