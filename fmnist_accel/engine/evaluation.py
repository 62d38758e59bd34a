"""Exact evaluation over every rank, and a checkpoint evaluated on a whole split.

Each rank evaluates its own shard of the split (the shards never overlap, nothing is padded
or duplicated) and one all-reduce adds up the per-sample loss sums and the confusion counts:
the figures are the same on 1 or N processes, for any batch size. Validation during training,
the end of a training run and `fmnist-accel eval` all evaluate here, the last two through
evaluate_checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cluster.shared_errors import agree
from ..errors import OutputsOverflowed, UserError
from .data import CLASS_NAMES, MEAN, NUM_CLASSES, STD, Split, load_split, train_valid_split
from .device_data import CROP_PADDING, EvalSet
from .trained_model import data_dir_for, may_download, model_from_checkpoint


@dataclass
class Mistake:
    """A misclassified image of the split."""

    index: int  # position in the whole split (test image N is `predict --index N`)
    true: int
    predicted: int
    confidence: float  # the probability the model gave its (wrong) prediction
    image: Any = None  # uint8 (28, 28), filled in by the process that draws (attach_images)


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    num_samples: int
    confusion: list[list[int]]  # confusion[true][predicted]
    # The most confidently misclassified images of every rank, most confident first (ties:
    # the lower index first); empty unless evaluate was asked for them.
    mistakes: list[Mistake] = field(default_factory=list)

    @property
    def per_class_accuracy(self) -> list[float]:
        return [row[i] / max(1, sum(row)) for i, row in enumerate(self.confusion)]


# The views test-time augmentation averages. "flip": each image and its mirror. "flip+shift"
# (airbench's level 2): that pair weighted 1/2, and the pair shifted one pixel up-left and
# the pair shifted one pixel down-right, 1/4 each. `--tta` picks the views a model trained
# on (tta_views): on the validation split the shifts added 0.05 to 0.37 points to five
# shift-trained runs and cost two flip-only ones 0.03 and 0.09 (benchmarks/RESULTS.md).
TTA_FLIP = "flip"
TTA_FLIP_SHIFT = "flip+shift"
BLACK = -MEAN / STD  # a black pixel once normalised: what a shift brings in at the edge


def tta_views(config: dict) -> str:
    """The TTA views for a model trained with `config` (its config.json): flip+shift where
    it trained on random shifts (--augment with --crop-padding above 0), else flip."""
    shifts = config.get("augment") and int(config.get("crop_padding", CROP_PADDING)) > 0
    return TTA_FLIP_SHIFT if shifts else TTA_FLIP


def shifted(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """x (N, C, H, W) moved by (dy, dx) pixels, one at most, with black coming in."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), value=BLACK)
    return padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]


def predict_logits(model, x: torch.Tensor, tta: bool | str) -> torch.Tensor:
    """fp32 logits of a batch. tta: False, "flip" (True means it too) or "flip+shift"."""
    if not tta:
        return model(x).float()

    def with_mirror(images):
        return (model(images).float() + model(images.flip(-1)).float()) / 2

    logits = with_mirror(x)
    if tta == TTA_FLIP_SHIFT:
        logits = logits / 2 + (with_mirror(shifted(x, -1, -1)) + with_mirror(shifted(x, 1, 1))) / 4
    return logits


@torch.no_grad()
def evaluate(
    model: nn.Module,
    eval_set: EvalSet,
    accelerator,
    batch_size: int,
    tta: bool | str = False,
    mistakes: int = 0,
) -> EvalResult:
    """Collective: exact loss and accuracy over all samples of every rank's shard.

    Each rank sums per-sample losses and fills a confusion matrix for its own shard; one
    all-reduce adds them up. `model` must be the plain module (not DDP): shards differ in
    size, so no collective may run per batch. tta: average the logits of each image and its
    horizontal mirror ("flip" or True), and of its one-pixel shifts ("flip+shift").
    mistakes: also find the `mistakes` most confident wrong predictions of all ranks, from
    the same logits as the confusion matrix (one gather more).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, device=device, dtype=torch.float64)
    wrong_found = []  # (confidence, index in the split, true, predicted) tensors per batch
    position = eval_set.first
    with accelerator.autocast():
        for x, y in eval_set.batches(batch_size):
            logits = predict_logits(model, x, tta)
            predicted = logits.argmax(1)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            confusion += torch.bincount(
                y * NUM_CLASSES + predicted, minlength=NUM_CLASSES**2
            ).double()
            if mistakes:
                wrong_found.append(wrong_predictions(logits, predicted, y, position))
            position += len(y)
    totals = accelerator.reduce(torch.cat([loss_sum[None], confusion]), "sum").cpu()
    model.train(was_training)
    matrix = totals[1:].round().long().view(NUM_CLASSES, NUM_CLASSES)
    n = int(matrix.sum())
    return EvalResult(
        loss=float(totals[0]) / n,
        accuracy=int(matrix.trace()) / n,
        num_samples=n,
        confusion=matrix.tolist(),
        mistakes=most_confident(wrong_found, mistakes, accelerator) if mistakes else [],
    )


def wrong_predictions(logits, predicted, labels, first: int):
    """(confidence, index in the split, true, predicted) of a batch's wrong predictions."""
    confidence = logits.softmax(1).gather(1, predicted[:, None])[:, 0]
    wrong = predicted != labels
    index = torch.arange(first, first + len(labels), device=labels.device)
    return confidence[wrong], index[wrong], labels[wrong], predicted[wrong]


def most_confident(found: list, count: int, accelerator) -> list[Mistake]:
    """Collective: the `count` most confident of every rank's wrong predictions (ties: the
    lower index first). Each rank keeps its own `count` best, then they are gathered."""
    local = []
    if found:
        confidence, index, true, predicted = (torch.cat(t).cpu() for t in zip(*found, strict=True))
        top = confidence.argsort(descending=True, stable=True)[:count]
        local = [
            Mistake(int(index[i]), int(true[i]), int(predicted[i]), float(confidence[i]))
            for i in top
        ]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    return sorted(local, key=lambda m: (-m.confidence, m.index))[:count]


def attach_images(mistakes: list[Mistake], images: torch.Tensor) -> list[Mistake]:
    """Give each mistake its picture from the split's uint8 images (N, 28, 28)."""
    for m in mistakes:
        m.image = images[m.index].numpy()
    return mistakes


# --------------------------------------------------------------------------------------------
# A checkpoint on a whole split
# --------------------------------------------------------------------------------------------
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


def check_split(path: Path, split: str, config: dict) -> None:
    """UserError when the checkpoint's run has no such split to rebuild."""
    if split != "valid":
        return
    if not {"valid_size", "seed"} <= set(config):
        raise UserError(
            f"{path} has no valid_size and seed in its metadata: its validation split cannot "
            "be rebuilt; evaluate the test split"
        )
    if not config["valid_size"]:
        raise UserError(
            f"{path} was trained with --valid-size 0 (on all training images): it has no "
            "validation split; evaluate the test split"
        )


def on_device(accelerator, model, images: Split, channels_last: bool = True):
    """(model, EvalSet): the model moved to this rank's device, and this rank's shard of the
    images there. channels_last, as training has it by default: faster convolutions on GPUs
    and on oneDNN CPUs alike."""
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
class CheckpointEvaluation:
    """A checkpoint's exact figures on a whole split, the same on every rank."""

    path: Path
    meta: dict  # the checkpoint's metadata
    split_name: str  # "test" or "valid"
    split: Split  # the whole split, on the CPU (its images are drawn for the mistakes)
    result: EvalResult
    tta: str | bool  # the views averaged (tta_views), or False


def load_checkpoint_and_split(
    path: Path, split: str, data_dir: str | None = None, allow_download: bool = True
) -> tuple[nn.Module, dict, Split]:
    """(model, metadata, split) on this rank, or a UserError naming what is missing.
    data_dir None: the folder the checkpoint's run trained on."""
    model, meta = model_from_checkpoint(path)
    config = meta.get("config", {})
    check_split(path, split, config)
    allow_download = allow_download and may_download(data_dir)
    images = eval_split(data_dir_for(meta, data_dir), split, config, allow_download)
    return model, meta, images


def evaluate_checkpoint(
    accelerator,
    path: Path,
    split: str,
    data_dir: str | None,
    batch_size: int,
    *,
    tta: bool = False,
    mistakes: int = 0,
    allow_download: bool = True,
) -> CheckpointEvaluation:
    """Collective: the checkpoint at `path` evaluated on `split` ("test" or "valid") read
    from data_dir, by every rank on its shard. A UserError on any rank (a broken checkpoint,
    missing data) is raised on every rank."""
    loaded = agree(
        accelerator, lambda: load_checkpoint_and_split(path, split, data_dir, allow_download)
    )
    return evaluate_loaded(accelerator, path, split, loaded, batch_size, tta, mistakes)


def evaluate_loaded(
    accelerator, path: Path, split: str, loaded, batch_size: int, tta: bool, mistakes: int
) -> CheckpointEvaluation:
    """Collective: evaluate_checkpoint for a (model, metadata, split) that every rank has
    loaded already (load_checkpoint_and_split)."""
    model, meta, images = loaded
    model, eval_set = on_device(accelerator, model, images)
    views = tta_views(meta.get("config", {})) if tta else False
    result = evaluate(model, eval_set, accelerator, batch_size, tta=views, mistakes=mistakes)
    if not math.isfinite(result.loss):  # the same reduced loss on every rank: all raise
        raise OutputsOverflowed(
            f"{path}: the model's outputs overflow on the {split} split (non-finite logits; "
            "its weights are finite but too large): use another checkpoint"
        )
    return CheckpointEvaluation(Path(path), meta, split, images, result, views)


def eval_report(evaluation: CheckpointEvaluation, processes: int) -> dict[str, Any]:
    """What `eval --json` prints, and what the figures are drawn from."""
    result, meta = evaluation.result, evaluation.meta
    return {
        "checkpoint": str(evaluation.path),
        "model": meta.get("model"),
        "epoch": meta.get("epoch"),
        "split": evaluation.split_name,
        "accuracy": result.accuracy,
        "loss": result.loss,
        "num_samples": result.num_samples,
        "per_class_accuracy": dict(zip(CLASS_NAMES, result.per_class_accuracy, strict=True)),
        "confusion_matrix": result.confusion,
        "classes": list(CLASS_NAMES),
        "tta": bool(evaluation.tta),
        "tta_views": evaluation.tta or None,  # "flip" or "flip+shift" (tta_views)
        "num_processes": processes,
    }
