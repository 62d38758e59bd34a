"""`fmnist-accel eval`: test-set (or validation-set) metrics of one checkpoint, on one or
several processes."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .agreement import agree, say_it_and_leave_together
from .data import CLASS_NAMES, Split, load_split, train_valid_split
from .device_data import EvalSet
from .engine import EvalResult, evaluate
from .errors import UserError
from .figures import MISTAKES_SHOWN, save_eval_figures
from .hardware import end_accelerator, make_accelerator
from .mistakes import attach_images, most_confident_mistakes
from .rundir import check_writable, resolve_checkpoint
from .trained_model import data_dir_for, model_from_checkpoint


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
) -> int:
    # The group first, then every check inside agree(): an error on any rank becomes the
    # same error on every rank, printed by the main process before any of them exits.
    accelerator = make_accelerator()
    try:
        path, model, meta, images = agree(
            accelerator,
            lambda: eval_inputs(checkpoint, run_dir, output_dir, data_dir, split, save_figures),
        )
        warning = tta_warning(path, meta.get("config", {})) if tta else None
        if warning and accelerator.is_main_process:
            print(f"fmnist-accel: warning: {warning}", file=sys.stderr)
        return evaluate_and_report(
            accelerator, path, model, meta, images, split, batch_size, tta, as_json, save_figures
        )
    except UserError as exc:
        say_it_and_leave_together(accelerator, exc)
        raise
    finally:
        # Tear the process group down before exit: gloo's threads otherwise abort at exit.
        end_accelerator(accelerator)


def eval_inputs(checkpoint: str, run_dir, output_dir: str, data_dir, split: str, save_figures):
    """(checkpoint path, model, metadata, images to evaluate), or a UserError."""
    path = resolve_checkpoint(checkpoint, run_dir, output_dir)
    if save_figures is not None:
        if Path(save_figures).is_file():
            raise UserError(f"--save-figures {save_figures} is a file: name a folder")
        check_writable(Path(save_figures))  # every rank, before the work: same answer
    model, meta = model_from_checkpoint(path)
    config = meta.get("config", {})
    if split == "valid" and not {"valid_size", "seed"} <= set(config):
        raise UserError(
            f"{path} has no valid_size and seed in its metadata: its validation split cannot "
            "be rebuilt; evaluate the test split"
        )
    if split == "valid" and not config["valid_size"]:
        raise UserError(
            f"{path} was trained with --valid-size 0 (on all training images): it has no "
            "validation split; evaluate the test split"
        )
    return path, model, meta, eval_split(data_dir_for(meta, data_dir), split, config)


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


def eval_split(data_dir: str, split: str, config: dict, allow_download: bool = True) -> Split:
    """The test split, or the validation images of the run that `config` describes: the
    same seeded permutation of the training file that the run drew them from."""
    if split == "test":
        return load_split(data_dir, "test", allow_download=allow_download)
    _, valid = train_valid_split(
        load_split(data_dir, "train", allow_download=allow_download),
        config["valid_size"],
        config["seed"],
    )
    return valid


def on_device(accelerator, model, images: Split, channels_last: bool = True):
    """(model, EvalSet): the model moved to this rank's device, and this rank's shard of the
    images there. channels_last, as `eval` always has it: faster convolutions on GPUs and on
    oneDNN CPUs alike."""
    eval_set = EvalSet(
        images,
        accelerator.device,
        accelerator.num_processes,
        accelerator.process_index,
        channels_last,
    )
    model = model.to(accelerator.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, eval_set


@dataclass
class EvaluatedCheckpoint:
    """A checkpoint's exact loss, accuracy and confusion matrix on a whole split (each rank
    evaluates its own shard, one all-reduce adds them up: the same figures on 1 or N
    processes), with what evaluated it on this rank. The end of a training run evaluates its
    checkpoint once for the final test and the figures alike (run_end.end_figures)."""

    path: Path
    meta: dict  # the checkpoint's metadata
    split_name: str  # "test" or "valid"
    split: Split
    data_dir: str  # where the split was read
    batch_size: int
    channels_last: bool
    model: torch.nn.Module  # on this rank's device, in eval mode
    eval_set: EvalSet  # this rank's shard
    result: EvalResult  # over the whole split


def evaluate_and_report(
    accelerator, path, model, meta, images: Split, split, batch_size, tta, as_json, figures_dir
) -> int:
    model, eval_set = on_device(accelerator, model, images)
    result = evaluate(model, eval_set, accelerator, batch_size, tta=tta)
    if figures_dir is not None:
        mistakes = most_confident_mistakes(
            model, eval_set, accelerator, batch_size, MISTAKES_SHOWN, tta=tta
        )
    if accelerator.is_main_process:
        report = eval_report(result, str(path), meta, tta, accelerator.num_processes, split)
        if figures_dir is not None:
            attach_images(mistakes, images.images)
            report["figures"] = save_eval_figures(report, mistakes, Path(figures_dir))
        if as_json:
            print(json.dumps(finite_or_null(report), allow_nan=False))
        else:
            print_tables(report)
    return 0


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


def eval_report(
    result: EvalResult, path: str, meta: dict, tta: bool, processes: int, split: str
) -> dict:
    return {
        "checkpoint": path,
        "model": meta.get("model"),
        "epoch": meta.get("epoch"),
        "split": split,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "num_samples": result.num_samples,
        "per_class_accuracy": dict(zip(CLASS_NAMES, result.per_class_accuracy, strict=True)),
        "confusion_matrix": result.confusion,
        "classes": list(CLASS_NAMES),
        "tta": tta,
        "num_processes": processes,
    }


def print_tables(report: dict) -> None:
    console = Console(highlight=False)
    # soft_wrap: a long checkpoint path stays on one line (rich wraps at 80 columns when the
    # output is not a terminal); markup=False: a path may contain [brackets].
    console.print(
        f"{report['checkpoint']} ({report['model']}, epoch {report['epoch']})"
        + (", flip TTA" if report["tta"] else ""),
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
