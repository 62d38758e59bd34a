"""Named recipes: sets of training options chosen together (`--recipe NAME`).

Each is a dict of TrainConfig fields (config.py) that overrides their defaults; the options a
user types override the recipe. Every value has its reason beside it, as in good speed-run
code. This module imports nothing, so that `fmnist-accel --help` stays fast.
"""

from __future__ import annotations

from typing import Any

# What the time-to-accuracy recipes share: a fixed schedule on all 60k images, shaped after
# the CIFAR-10 speed runs.
SPEED_RUN: dict[str, Any] = {
    # 256 rather than 512: twice the steps per epoch, at the same images/s on a CPU
    "batch_size": 256,
    "optimizer": "sgd",  # Nesterov; with OneCycle it converges in a few epochs
    "lr": 0.2,  # 0.4 at 512 in the high-accuracy recipe, scaled with the batch
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.2,  # as airbench: calibrated logits help the short schedule
    "scheduler": "onecycle",  # warms up over a quarter of the steps, then falls to ~0
    "early_stopping": False,  # a fixed schedule takes no decision from validation...
    "valid_size": 0,  # ...so the 10k held-out images are trained on instead
}

RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    # The DAWNBench-shaped ResNet-9 (README, "Recipes and results"), made a recipe: fixed
    # OneCycle schedule, so early stopping and the plateau scheduler are off.
    "high-accuracy": {
        "model": "resnet9",
        "epochs": 40,
        "optimizer": "sgd",
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "label_smoothing": 0.1,
        "scheduler": "onecycle",
        "early_stopping": False,
        "augment": True,
    },
    # Time-to-accuracy recipes for a small CPU (benchmarks/RESULTS.md, "Time to accuracy"),
    # aimed at 0.93 test accuracy within 90 s, 0.95 within 5 minutes and 0.955 within 15
    # minutes of training on 2 cores in bf16. Measured, mean of seeds 0 and 1: 0.9366 in 77 to
    # 80 s; 0.9505 with flip TTA in 4.1 minutes; 0.9558 with flip TTA in 12.6 minutes.
    "fast": {
        **SPEED_RUN,
        # ResNet-9 pooled after its stem, narrower: a third of its compute per image (models.py)
        "model": "resnet-s",
        # 69 to 80 s on 2 cores in bf16 (86 to 95 s when the shared machine was busier); in
        # this 3-epoch schedule epoch 2 is at 0.925, so fewer epochs would miss 0.93.
        "epochs": 3,
        "augment": False,  # 3 epochs: augmentation slows learning more than it regularises
    },
    "accurate": {
        **SPEED_RUN,
        # airbench's shape (models.py): a whitening first layer fitted to the data, no
        # residuals, BatchNorm after pooling. Per epoch it learns much faster than resnet-m,
        # which the previous accurate recipe used (0.9482 in 5 minutes).
        "model": "airbench-s",
        # About 25 s each on 2 cores in bf16: 243 to 249 s measured, some room for a slower
        # host. The last epochs pay most: 8 instead of 9 epochs cost airbench-m 0.4 points.
        "epochs": 10,
        # Flips only: 10 epochs are too few for random shifts to pay; the flips also let
        # `eval --tta` average each image with its mirror (+0.2 to +0.3 points).
        "augment": True,
        "crop_padding": 0,
    },
    # The 15-minute recipe: wider, more than twice the epochs, and gentle shifts as well as
    # flips. Shifts of up to 2 pixels held airbench-m near 0.93 until the learning rate fell,
    # and it ended at 0.9533 with flip TTA (benchmarks/RESULTS.md).
    "accurate-long": {
        **SPEED_RUN,
        "model": "airbench-m",  # wider than airbench-s: 0.50M parameters
        "epochs": 24,  # about 31 s each on 2 cores in bf16: 745 to 759 s measured
        "augment": True,
        "crop_padding": 1,  # shifts of up to 1 pixel, and flips
    },
}

# Recipes that pick their precision on a CPU (run/training.py, cluster/accelerator.
# cpu_precision): bf16
# where the CPU has bf16 instructions (AVX512-BF16 or AMX), 1.2 to 1.5 times fp32's images/s
# there (benchmarks/RESULTS.md); fp32 elsewhere, where bf16 is emulated and slower. A
# --mixed-precision of the user's or the launcher's wins.
CPU_PRECISION_RECIPES = ("fast", "accurate", "accurate-long")
