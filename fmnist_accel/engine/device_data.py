"""The fast data path: every split held as tensors on the training device.

Fashion-MNIST is 47 MB as uint8, so it fits on any device. Each epoch every rank takes its
shard of one seeded permutation, augments and normalises it in a few whole-tensor
operations, and then serves batches as slices: no DataLoader, no per-sample Python, no
host-device copies inside the epoch.

Sharding is interleaved: rank r takes positions r, r+W, r+2W, ... of the permutation, so
with W processes at batch B the images of global step k are exactly those of step k of one
process at batch W*B. Every rank gets the same number of images (the permutation's last
n mod W images are left out of that epoch), hence the same number of steps, which DDP needs.

Everything random here comes from CPU generators seeded by (seed, epoch, rank), so an epoch's
data is a pure function of those numbers: the same on CPU and GPU, and rebuilt exactly when
a run resumes mid-epoch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from .data import MEAN, STD, Split

CROP_PADDING = 2  # the default of --crop-padding


def normalise(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float32 (N, 1, 28, 28), zero mean, unit std."""
    x = images.reshape(-1, 1, *images.shape[-2:]).float()
    x = (x - 255.0 * MEAN) / (255.0 * STD)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def seeded_generator(*numbers: int) -> torch.Generator:
    """A CPU generator seeded from several integers (seed, epoch, rank, ...)."""
    seed = 0
    for n in numbers:
        seed = (seed * 1_000_003 + int(n)) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def epoch_indices(n: int, world_size: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's training indices for `epoch` (see the module docstring)."""
    order = torch.randperm(n, generator=seeded_generator(seed, epoch))
    per_rank = n // world_size
    return order[: per_rank * world_size].view(per_rank, world_size)[:, rank]


def augment(
    images: torch.Tensor,
    generator: torch.Generator,
    padding: int = CROP_PADDING,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Random crop with zero padding `padding` (0: none) and random horizontal flip, per image.

    images: uint8 (N, 28, 28) on any device; the random draws come from `generator` (CPU)
    so they do not depend on the device. flips: which images to flip (bool, N), instead of a
    coin toss each. Labels are untouched by construction.
    """
    n, h, w = images.shape
    p = padding
    shifts = torch.randint(0, 2 * p + 1, (2, n), generator=generator) if p else None
    if flips is None:
        flips = torch.rand(n, generator=generator) < 0.5
    flips = flips.to(images.device)
    if shifts is None:
        return torch.where(flips[:, None, None], images.flip(-1), images)
    shifts = shifts.to(images.device)
    padded = F.pad(images, (p, p, p, p))
    rows = shifts[0][:, None] + torch.arange(h, device=images.device)  # (N, h)
    cols = shifts[1][:, None] + torch.arange(w, device=images.device)  # (N, w)
    cropped = padded[
        torch.arange(n, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]
    ]
    return torch.where(flips[:, None, None], cropped.flip(-1), cropped)


def alternating_flip_mask(n: int, seed: int, epoch: int) -> torch.Tensor:
    """Which of the n training images (by their index in the split) to flip in `epoch`: a
    random half in even epochs, the other half in odd ones (airbench's alternating flip). The
    half depends on the seed alone, so every rank draws the same."""
    first = torch.rand(n, generator=seeded_generator(seed, 3)) < 0.5
    return first ^ bool(epoch % 2)


# Random erasing's rectangles, as Zhong et al. (2017) draw them: an area of 2 to 40% of the
# image, an aspect ratio from 0.3 to 1/0.3 (uniform in its logarithm).
ERASE_AREA = (0.02, 0.4)
ERASE_ASPECT = 0.3


def erase(x: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """Random erasing: each image, with `probability`, gets one random rectangle set to 0, the
    mean pixel once normalised. x: normalised (N, 1, H, W); the draws come from `generator`
    (CPU), all of them whatever `probability` is, so they do not depend on the device."""
    n, _, h, w = x.shape
    chosen = torch.rand(n, generator=generator) < probability
    area = torch.empty(n).uniform_(*ERASE_AREA, generator=generator) * (h * w)
    log_aspect = math.log(ERASE_ASPECT)
    aspect = torch.empty(n).uniform_(log_aspect, -log_aspect, generator=generator).exp()
    heights = (area * aspect).sqrt().round().clamp(1, h).long()
    widths = (area / aspect).sqrt().round().clamp(1, w).long()
    tops = (torch.rand(n, generator=generator) * (h - heights + 1)).long()
    lefts = (torch.rand(n, generator=generator) * (w - widths + 1)).long()
    rows = torch.arange(h)[None, :]
    cols = torch.arange(w)[None, :]
    in_rows = (rows >= tops[:, None]) & (rows < (tops + heights)[:, None])  # (N, H)
    in_cols = (cols >= lefts[:, None]) & (cols < (lefts + widths)[:, None])  # (N, W)
    mask = chosen[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    return x.masked_fill(mask[:, None].to(x.device), 0.0)


class TrainStream:
    """The training split on the device, served one epoch at a time."""

    def __init__(
        self,
        split: Split,
        device: torch.device,
        batch_size: int,
        world_size: int,
        rank: int,
        seed: int,
        augment: bool,
        channels_last: bool,
        crop_padding: int = CROP_PADDING,
        random_erasing: float = 0.0,
        alternating_flips: bool = False,
    ):
        if len(split) < 2 * world_size:
            # Fewer than 2 images per rank: no step (a batch of one sits out, see
            # steps_per_epoch) and an epoch with nothing to average.
            raise UserError(
                f"{len(split)} training image(s) for {world_size} process(es): each process "
                "needs at least 2; hold out fewer for validation (--valid-size) or use fewer "
                "processes"
            )
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.random_erasing = random_erasing
        self.alternating_flips = alternating_flips
        self.channels_last = channels_last

    @property
    def images_per_rank(self) -> int:
        return len(self.labels) // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full batches, and a last partial one unless it would hold a single image: BatchNorm
        cannot normalise a batch of one in training mode, so that image sits this epoch out."""
        full, rest = divmod(self.images_per_rank, self.batch_size)
        return full + (rest > 1)

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of this rank for `epoch`, already augmented and normalised."""
        order = epoch_indices(len(self.labels), self.world_size, self.rank, self.seed, epoch)
        idx = order.to(self.images.device)
        images = self.images[idx]
        if self.augment:
            flips = (
                alternating_flip_mask(len(self.labels), self.seed, epoch)[order]
                if self.alternating_flips
                else None
            )
            images = augment(
                images, seeded_generator(self.seed, epoch, self.rank, 1), self.crop_padding, flips
            )
        x = normalise(images, self.channels_last)
        if self.random_erasing > 0:
            x = erase(x, seeded_generator(self.seed, epoch, self.rank, 2), self.random_erasing)
        return x, self.labels[idx]

    def batch(self, epoch_data: tuple[torch.Tensor, torch.Tensor], step: int):
        x, y = epoch_data
        sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
        return x[sl], y[sl]


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Contiguous, non-overlapping evaluation shards that together cover all n samples."""
    return rank * n // world_size, (rank + 1) * n // world_size


class EvalSet:
    """A validation or test split on the device: this rank's shard, normalised once."""

    def __init__(
        self, split: Split, device: torch.device, world_size: int, rank: int, channels_last: bool
    ):
        start, stop = shard_bounds(len(split), world_size, rank)
        self.total = len(split)
        self.first = start  # the index in the whole split of this shard's first image
        self.inputs = normalise(split.images[start:stop].to(device), channels_last)
        self.labels = split.labels[start:stop].to(device)

    def batches(self, batch_size: int):
        for i in range(0, len(self.labels), batch_size):
            yield self.inputs[i : i + batch_size], self.labels[i : i + batch_size]
