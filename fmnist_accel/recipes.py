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
    # 256 rather than 512: twice the steps per epoch, at the same images/s on a CPU. On a GPU,
    # where a step costs about the same at any batch up to 1024, `--batch-size 1024 --lr 0.8`
    # with twice the epochs matches it on validation in half the steps (0.952 in 7.9 s on one
    # H200: benchmarks/RESULTS.md)
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
    # aimed at 0.935 test accuracy within 60 s, 0.95 within 3 minutes and 0.96 within 15
    # minutes of training on 2 cores, for every seed. Models and epochs were chosen on the
    # validation split (50k/10k, seed 0); the figures of seeds 0, 1 and 2 are in RESULTS.md.
    "fast": {
        **SPEED_RUN,
        # airbench's shape learns faster per second than resnet-s, the previous choice: on the
        # validation split 4 epochs reached 0.9321 in 38 s, resnet-s's 3 epochs 0.9295 in 46 s
        "model": "airbench-s",
        # about 11 s each on 2 cores with AMX in bf16 (an EPYC without AMX: about 25 s); 5
        # epochs gained 0.0007 on validation for 25% more time, too close to 60 s
        "epochs": 4,
        "augment": False,  # 4 epochs: augmentation slows learning more than it regularises
    },
    "accurate": {
        **SPEED_RUN,
        # airbench's shape (models.py): a whitening first layer fitted to the data, no
        # residuals, BatchNorm after pooling. Per epoch it learns much faster than resnet-m,
        # which an earlier accurate recipe used (0.9482 in 5 minutes). With flip TTA, as it is
        # judged, it beat airbench-m for 10 epochs on validation (0.9469 against 0.9449)
        "model": "airbench-s",
        # about 11 s each on 2 cores with AMX in bf16 (an EPYC without AMX: about 25 s), so 14
        # fill most of the 3 minutes: on validation, seeds 0, 1 and 2, 14 epochs gave 0.9454
        # on average with flip TTA against 10 epochs' 0.9445 (a gain within a seed's spread)
        "epochs": 14,
        # Flips only: at 10 epochs random shifts did not pay (on validation, shifts with
        # flip+shift TTA: 0.9435 against 0.9469); the flips also let `eval --tta`
        # average each image with its mirror (+0.2 to +0.3 points).
        "augment": True,
        "crop_padding": 0,
    },
    # The 15-minute recipe: wider, more than twice the epochs, and gentle shifts as well as
    # flips. Shifts of up to 2 pixels held airbench-m near 0.93 until the learning rate fell,
    # and it ended at 0.9533 with flip TTA (benchmarks/RESULTS.md). Trained with shifts, it is
    # judged with `eval --tta`'s shifted views too: +0.18 to +0.37 on validation. On
    # validation, 50 epochs, random erasing, alternating flips and a wider airbench gave no
    # more than this.
    "accurate-long": {
        **SPEED_RUN,
        "model": "airbench-m",  # wider than airbench-s: 0.50M parameters
        # about 14 s each on 2 cores with AMX in bf16 (335 to 368 s measured); an EPYC without
        # AMX: about 31 s (745 to 759 s)
        "epochs": 24,
        "augment": True,
        "crop_padding": 1,  # shifts of up to 1 pixel, and flips
    },
}

# Recipes that pick their precision on a CPU (run/training.py, cluster/accelerator.
# cpu_precision): bf16 where the CPU has bf16 instructions (AVX512-BF16 or AMX), 1.2 to 2
# times fp32's images/s there (benchmarks/RESULTS.md); fp32 elsewhere, where bf16 is emulated
# and slower. The user's --mixed-precision wins, and a launcher's fp16 or bf16; a launcher's
# "no" does not, since `accelerate launch` passes it whenever nobody chose.
CPU_PRECISION_RECIPES = ("fast", "accurate", "accurate-long")
