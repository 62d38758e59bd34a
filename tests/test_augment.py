"""On-device augmentation (random crop with padding, horizontal flip), the epoch's data
order, and test-time augmentation: shapes, determinism under a seed, labels untouched."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from support.fakedata import fake_split
from torch import nn

from fmnist_accel.engine.data import MEAN, STD, Split
from fmnist_accel.engine.device_data import (
    CROP_PADDING,
    EvalSet,
    TrainStream,
    augment,
    epoch_indices,
    erase,
    normalise,
    seeded_generator,
)
from fmnist_accel.engine.evaluation import evaluate, predict_logits, tta_views


def images(n: int = 64) -> torch.Tensor:
    return fake_split(n, seed=3)[0]


def crops_and_flips(image: torch.Tensor, p: int = CROP_PADDING) -> list[torch.Tensor]:
    """Every image augment() may make of `image` with crop padding p."""
    padded = F.pad(image, (p, p, p, p))
    out = []
    for dy in range(2 * p + 1):
        for dx in range(2 * p + 1):
            crop = padded[dy : dy + 28, dx : dx + 28]
            out += [crop, crop.flip(-1)]
    return out


def test_augment_keeps_shape_and_dtype():
    x = images()
    y = augment(x, seeded_generator(0, 1))
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_augment_is_a_function_of_its_seed():
    x = images()
    a, b = augment(x, seeded_generator(0, 1)), augment(x, seeded_generator(0, 1))
    assert a.equal(b)
    assert not a.equal(augment(x, seeded_generator(0, 2)))


def test_each_augmented_image_is_a_crop_or_mirror_of_its_own_source():
    x = images(32)
    y = augment(x, seeded_generator(5))
    for source, result in zip(x, y, strict=True):
        assert any(result.equal(c) for c in crops_and_flips(source))
    # and it does change images: not all are the identity
    assert sum(not r.equal(s) for s, r in zip(x, y, strict=True)) > len(x) // 2


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_crop_padding_bounds_the_shifts(padding):
    """--crop-padding P: every image is a shift of at most P pixels (0: only flips), and
    with P > 0 some images are shifted by exactly P."""
    x = images(64)
    y = augment(x, seeded_generator(7), padding)
    for source, result in zip(x, y, strict=True):
        assert any(result.equal(c) for c in crops_and_flips(source, padding))
    if padding == 0:
        flipped = [r.equal(s.flip(-1)) and not r.equal(s) for s, r in zip(x, y, strict=True)]
        assert 0 < sum(flipped) < len(x)  # about half the images are mirrored
    else:
        assert any(not any(r.equal(c) for c in crops_and_flips(s, padding - 1))
                   for s, r in zip(x, y, strict=True)), "no image was shifted by P"  # fmt: skip


def test_augmented_epoch_keeps_every_label_with_its_image():
    raw_images, labels = fake_split(200, seed=4)
    split = Split(raw_images, labels.long())
    plain = TrainStream(
        split, torch.device("cpu"), 16, 1, 0, seed=7, augment=False, channels_last=False
    )
    augmented = TrainStream(
        split, torch.device("cpu"), 16, 1, 0, seed=7, augment=True, channels_last=False
    )
    x_plain, y_plain = plain.epoch(3)
    x_aug, y_aug = augmented.epoch(3)
    assert x_aug.shape == x_plain.shape == (200, 1, 28, 28)
    assert y_aug.equal(y_plain)  # the same order, the same labels
    order = epoch_indices(200, 1, 0, seed=7, epoch=3)
    assert y_aug.equal(split.labels[order])
    # the same epoch again is the same data (a resumed epoch is rebuilt exactly)
    again = augmented.epoch(3)
    assert again[0].equal(x_aug) and again[1].equal(y_aug)
    assert not augmented.epoch(4)[0].equal(x_aug)


def test_an_epoch_with_crop_padding_0_holds_each_image_or_its_mirror():
    """The `accurate` recipe's flips-only augmentation, through the training stream."""
    raw_images, labels = fake_split(200, seed=4)
    split = Split(raw_images, labels.long())
    kwargs = dict(seed=7, channels_last=False)
    plain = TrainStream(split, torch.device("cpu"), 16, 1, 0, augment=False, **kwargs)
    flipped = TrainStream(split, torch.device("cpu"), 16, 1, 0, augment=True, crop_padding=0,
                          **kwargs)  # fmt: skip
    x_plain, x_flip = plain.epoch(2)[0], flipped.epoch(2)[0]
    pairs = list(zip(x_plain, x_flip, strict=True))
    mirrored = [b.equal(a.flip(-1)) and not b.equal(a) for a, b in pairs]
    same = [b.equal(a) for a, b in pairs]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert 60 < sum(mirrored) < 140  # about half of the 200


def flipped_in_epoch(stream: TrainStream, split: Split, epoch: int) -> dict[int, bool]:
    """{training image index: whether the stream's epoch showed it mirrored} (flips only)."""
    x, _ = stream.epoch(epoch)
    order = epoch_indices(len(split), stream.world_size, stream.rank, stream.seed, epoch)
    seen = {}
    for i, shown in zip(order.tolist(), x[:, 0], strict=True):
        source = normalise(split.images[i : i + 1])[0, 0]
        assert shown.equal(source) or shown.equal(source.flip(-1))
        seen[i] = shown.equal(source.flip(-1))
    return seen


def test_alternating_flips_show_each_image_both_ways_in_any_two_epochs_on_every_rank():
    """A random half of the images is mirrored in even epochs and the other half in odd ones,
    the same half on every rank (it is drawn by image index); coin tosses do not do that."""
    raw_images, labels = fake_split(200, seed=6)
    split = Split(raw_images, labels.long())
    kwargs = dict(seed=3, augment=True, channels_last=False, crop_padding=0)
    ranks = [
        TrainStream(split, torch.device("cpu"), 16, 2, rank, alternating_flips=True, **kwargs)
        for rank in (0, 1)
    ]
    by_epoch = [{} for _ in range(4)]
    for epoch, seen in enumerate(by_epoch):
        for stream in ranks:
            seen.update(flipped_in_epoch(stream, split, epoch))
    assert len(by_epoch[0]) == 200  # the two ranks together saw every image
    for image in range(200):
        assert by_epoch[0][image] != by_epoch[1][image]
        assert by_epoch[0][image] == by_epoch[2][image] != by_epoch[3][image]
    assert 60 < sum(by_epoch[0].values()) < 140  # a random half
    other_seed = TrainStream(
        split, torch.device("cpu"), 16, 1, 0, alternating_flips=True, **{**kwargs, "seed": 4}
    )
    assert flipped_in_epoch(other_seed, split, 0) != by_epoch[0]
    tossed = TrainStream(split, torch.device("cpu"), 16, 1, 0, **kwargs)
    first, second = (flipped_in_epoch(tossed, split, epoch) for epoch in (0, 1))
    assert any(first[i] == second[i] for i in range(200))


def test_alternating_flips_leave_the_shifts_as_they_were():
    """Only the flips change: each image is the same crop as without them, mirrored or not."""
    raw_images, labels = fake_split(100, seed=8)
    split = Split(raw_images, labels.long())
    kwargs = dict(seed=5, augment=True, channels_last=False, crop_padding=2)
    tossed = TrainStream(split, torch.device("cpu"), 16, 1, 0, **kwargs).epoch(1)[0]
    alternated = TrainStream(split, torch.device("cpu"), 16, 1, 0, alternating_flips=True, **kwargs)
    for a, b in zip(tossed[:, 0], alternated.epoch(1)[0][:, 0], strict=True):
        assert b.equal(a) or b.equal(a.flip(-1))
    assert not alternated.epoch(1)[0].equal(tossed)


def test_random_erasing_blanks_one_rectangle_in_about_that_share_of_images():
    """Each erased image differs from its source in one axis-aligned rectangle set to 0 (the
    mean pixel), of 2 to 40% of its area; the others are untouched; the draws follow the
    seed, and the flips and shifts stay those of the same epoch without erasing."""
    raw_images, labels = fake_split(400, seed=4)
    split = Split(raw_images, labels.long())
    kwargs = dict(seed=7, augment=True, channels_last=False)
    plain = TrainStream(split, torch.device("cpu"), 16, 1, 0, **kwargs)
    erased = TrainStream(split, torch.device("cpu"), 16, 1, 0, random_erasing=0.5, **kwargs)
    x_plain, y_plain = plain.epoch(2)
    x_erased, y_erased = erased.epoch(2)
    assert y_erased.equal(y_plain)
    changed = 0
    for a, b in zip(x_plain[:, 0], x_erased[:, 0], strict=True):
        differs = a != b
        if not differs.any():
            continue
        changed += 1
        rows = differs.any(1).nonzero().flatten()
        cols = differs.any(0).nonzero().flatten()
        box = b[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        # within the rectangle every pixel is 0 (some were 0 already: fake images have them)
        assert (box == 0).all()
        assert (b != a).sum() <= box.numel() <= 0.4 * 28 * 28 + 28
    assert 150 < changed < 250  # about half of the 400
    assert erased.epoch(2)[0].equal(x_erased)  # a function of (seed, epoch, rank)
    assert not erased.epoch(3)[0].equal(x_erased)


def test_random_erasing_areas_and_shapes_follow_the_paper():
    x = torch.ones(4000, 1, 28, 28)
    blanks = erase(x, seeded_generator(1, 2, 3), 1.0)[:, 0] == 0
    share = blanks.flatten(1).float().mean(1)
    assert (share > 0).all()  # probability 1: every image
    assert share.min() > 0.015 and share.max() < 0.45
    assert 0.18 < share.mean() < 0.24  # about (0.02 + 0.4) / 2, less where clipped
    heights = blanks.any(2).sum(1).float()
    widths = blanks.any(1).sum(1).float()
    assert (heights > widths).any() and (widths > heights).any()
    assert erase(x, seeded_generator(1, 2, 3), 0.0).equal(x)


def test_a_last_batch_of_one_image_is_left_out():
    """BatchNorm cannot train on a batch of one: such a remainder sits the epoch out."""
    raw_images, labels = fake_split(100, seed=4)

    def steps(n: int, batch: int) -> int:
        split = Split(raw_images[:n], labels[:n].long())
        return TrainStream(split, torch.device("cpu"), batch, 1, 0, 0, False, False).steps_per_epoch

    assert (steps(32, 16), steps(33, 16), steps(34, 16)) == (2, 2, 3)


def test_epoch_shards_are_disjoint_and_interleaved():
    """W ranks at batch B see exactly the images of one rank at batch W*B."""
    n, world = 103, 3
    shards = [epoch_indices(n, world, r, seed=1, epoch=2) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    together = torch.stack(shards, 1).reshape(-1)
    assert together.equal(epoch_indices(n, 1, 0, seed=1, epoch=2)[: len(together)])
    assert len(set(together.tolist())) == len(together)


class MirrorSensitive(nn.Module):
    """Logits from the left half of the image only: a mirror changes them."""

    def forward(self, x):
        left = x[..., :14].mean(dim=(1, 2, 3))
        return torch.stack([left, -left, 0.5 * left] + [torch.zeros_like(left)] * 7, 1)


class MirrorAveraged(MirrorSensitive):
    """What flip TTA of MirrorSensitive should compute."""

    def forward(self, x):
        return (super().forward(x) + super().forward(x.flip(-1))) / 2


def eval_set(n: int = 50) -> EvalSet:
    raw_images, labels = fake_split(n, seed=6)
    split = Split(raw_images, labels.long())
    return EvalSet(split, torch.device("cpu"), 1, 0, channels_last=False)


def test_tta_averages_the_logits_of_an_image_and_its_mirror():
    accelerator = Accelerator(cpu=True)
    data = eval_set()
    tta = evaluate(MirrorSensitive(), data, accelerator, 16, tta=True)
    expected = evaluate(MirrorAveraged(), data, accelerator, 16)
    without = evaluate(MirrorSensitive(), data, accelerator, 16)
    assert tta.num_samples == expected.num_samples == 50
    assert tta.confusion == expected.confusion
    assert abs(tta.loss - expected.loss) < 1e-6
    assert abs(tta.loss - without.loss) > 1e-4  # the mirror did matter
    # TTA of a model that is already mirror-invariant changes nothing.
    invariant = evaluate(MirrorAveraged(), data, accelerator, 16, tta=True)
    assert invariant.confusion == expected.confusion
    assert abs(invariant.loss - expected.loss) < 1e-6
    # Deterministic, and independent of the batch size.
    assert evaluate(MirrorSensitive(), data, accelerator, 16, tta=True) == tta
    other_batch = evaluate(MirrorSensitive(), data, accelerator, 7, tta=True)
    assert other_batch.confusion == tta.confusion and abs(other_batch.loss - tta.loss) < 1e-6


def test_flip_shift_tta_adds_one_pixel_shifts_of_the_mirror_pair():
    """ "flip+shift": 1/2 of the flip average, 1/4 each of the flip averages of the images
    moved one pixel up-left and down-right, with black (normalised) coming in at the edge."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    raw = images(8).float()[:, None]

    def norm(pixels):
        return (pixels - 255 * MEAN) / (255 * STD)

    black = norm(torch.zeros(()))

    def pair(x):
        return (model(x) + model(x.flip(-1))) / 2

    x = norm(raw)
    down_right = torch.full_like(x, black)
    down_right[..., 1:, 1:] = x[..., :-1, :-1]
    up_left = torch.full_like(x, black)
    up_left[..., :-1, :-1] = x[..., 1:, 1:]
    expected = pair(x) / 2 + (pair(down_right) + pair(up_left)) / 4
    with torch.no_grad():
        got = predict_logits(model, x, "flip+shift")
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.allclose(predict_logits(model, x, True), pair(x), atol=1e-6)
        assert torch.allclose(predict_logits(model, x, "flip"), pair(x), atol=1e-6)
        assert not torch.allclose(got, pair(x), atol=1e-3)


@pytest.mark.parametrize(
    ("config", "views"),
    [
        ({"augment": True, "crop_padding": 1}, "flip+shift"),
        ({"augment": True}, "flip+shift"),  # --crop-padding's default, 2
        ({"augment": True, "crop_padding": 0}, "flip"),  # the accurate recipe: flips only
        ({"augment": False, "crop_padding": 2}, "flip"),
        ({}, "flip"),  # a checkpoint that does not say
    ],
)
def test_tta_views_follow_what_the_model_trained_on(config, views):
    assert tta_views(config) == views
