"""The most confidently misclassified images of a split, found on every rank's shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .device_data import EvalSet, shard_bounds
from .engine import predict_logits


@dataclass
class Mistake:
    index: int  # position in the whole split (test image N is `predict --index N`)
    true: int
    predicted: int
    confidence: float  # the probability the model gave its (wrong) prediction
    image: Any = None  # uint8 (28, 28), filled in by the process that draws


@torch.no_grad()
def most_confident_mistakes(
    model, eval_set: EvalSet, accelerator, batch_size: int, count: int, tta: bool = False
) -> list[Mistake]:
    """Collective: every rank must call it. Each rank keeps the `count` most confident
    mistakes of its own shard; the lists are gathered and every rank returns the `count`
    most confident of all (ties: the lower index first), with indices into the whole split.

    Predictions are made as engine.evaluate makes them (the same autocast, the same flip
    TTA, argmax of the logits), so a mistake shown here is one the confusion matrix counts.
    """
    from accelerate.utils import gather_object

    was_training = model.training
    model.eval()
    first, _ = shard_bounds(eval_set.total, accelerator.num_processes, accelerator.process_index)
    found = []  # (confidence, global index, true, predicted) tensors per batch
    position = first
    with accelerator.autocast():
        for x, y in eval_set.batches(batch_size):
            logits = predict_logits(model, x, tta)
            predicted = logits.argmax(1)
            confidence = logits.softmax(1).gather(1, predicted[:, None])[:, 0]
            wrong = predicted != y
            index = torch.arange(position, position + len(y), device=y.device)
            found.append((confidence[wrong], index[wrong], y[wrong], predicted[wrong]))
            position += len(y)
    model.train(was_training)
    local = []
    if found:
        confidence, index, true, predicted = (torch.cat(t).cpu() for t in zip(*found, strict=True))
        top = confidence.argsort(descending=True, stable=True)[:count]
        local = [
            Mistake(int(index[i]), int(true[i]), int(predicted[i]), float(confidence[i]))
            for i in top
        ]
    everyone = gather_object(local) if accelerator.num_processes > 1 else local
    return sorted(everyone, key=lambda m: (-m.confidence, m.index))[:count]


def attach_images(mistakes: list[Mistake], images: torch.Tensor) -> list[Mistake]:
    """Give each mistake its picture from the split's uint8 images (N, 28, 28)."""
    for m in mistakes:
        m.image = images[m.index].numpy()
    return mistakes
