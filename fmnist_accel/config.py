"""Every training option, defined once.

`fmnist-accel train`, `python -m fmnist_accel.train` and `accelerate launch -m
fmnist_accel.train` all build their options from TrainConfig's fields (see cli.py), and the
resolved config is written into every run folder and checkpoint. The layers, lowest first:
the field defaults below (the seed's recipe, made fast), then a named --recipe, then the
options the user typed.

This module imports no torch, so that `fmnist-accel --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from .recipes import RECIPES

MODEL_NAMES = (
    "mlp",
    "cnn",
    "cnn-bn",
    "resnet9",
    "resnet-s",
    "resnet-m",
    "airbench-s",
    "airbench-m",
)
MIXED_PRECISION = ("no", "fp16", "bf16")


def option(default: Any, help: str, **click_settings: Any) -> Any:
    """A dataclass field that also carries its command-line help and constraints.

    click_settings: choices=(...), min=number, min_open=True (strictly greater), max=number.
    """
    return field(default=default, metadata={"help": help, **click_settings})


@dataclass
class TrainConfig:
    # --- what to train -----------------------------------------------------------------
    recipe: str = option(
        "default",
        "Named set of defaults: 'default' is the seed's recipe (Adam, ReduceLROnPlateau, early "
        "stopping) in large batches; 'high-accuracy' is a ResNet-9 with on-device crop/flip, "
        "label smoothing, SGD+OneCycle; 'fast', 'accurate' and 'accurate-long' are fixed "
        "schedules aimed at 0.935 in 60 s, 0.95 in 3 minutes and 0.96 in 15 minutes of "
        "training on a 2-core CPU (airbench-s, airbench-s, airbench-m; all 60k images trained "
        "on, no validation; benchmarks/RESULTS.md has what each reaches). Options you give "
        "override the recipe.",
        choices=tuple(RECIPES),
    )
    model: str = option(
        "cnn-bn",
        "mlp, cnn (the seed's basic CNN), cnn-bn (the seed's improved CNN), resnet9, the "
        "faster resnet-s and resnet-m (ResNet-9's shape at half resolution), or airbench-s "
        "and airbench-m (airbench's shape: a whitening first layer fitted to the data).",
        choices=MODEL_NAMES,
    )
    epochs: int = option(50, "Maximum number of epochs (the seed trained 50).", min=1)
    batch_size: int = option(
        512,
        "Training images per process per step. The global batch is this times the number of "
        "processes (see --scale-lr).",
        min=1,
    )
    eval_batch_size: int = option(
        1024, "Images per process per forward pass in validation and evaluation.", min=1
    )

    # --- optimisation ------------------------------------------------------------------
    optimizer: str = option(
        "adam", "adam (the seed's) or sgd (Nesterov momentum).", choices=("adam", "sgd")
    )
    # 512 at 3e-3 rather than the seed's 16 at 1e-3: a step costs about the same at any batch
    # size up to ~1k on a GPU, and this pair reached 0.925 test accuracy within 15 epochs and
    # the seed's 0.93 in under 40 (benchmarks/RESULTS.md).
    lr: float = option(
        3e-3, "Learning rate (peak learning rate for onecycle).", min=0, min_open=True
    )
    scale_lr: bool = option(
        False,
        "Multiply --lr by the number of processes, so that the step size follows the global "
        "batch (linear scaling rule).",
    )
    momentum: float = option(0.9, "SGD momentum (only with --optimizer sgd).", min=0)
    weight_decay: float = option(0.0, "L2 weight decay.", min=0)
    label_smoothing: float = option(0.0, "Label smoothing of the training loss.", min=0)
    grad_clip_norm: float = option(
        0.0,
        "Scale the gradients down before each optimizer step when their global L2 norm "
        "exceeds this value (after fp16 unscaling); 0 turns clipping off.",
        min=0,
    )
    scheduler: str = option(
        "plateau",
        "plateau: ReduceLROnPlateau on the global validation loss, stepped once per epoch; "
        "onecycle or cosine: a fixed schedule stepped every optimizer step; none.",
        choices=("plateau", "onecycle", "cosine", "none"),
    )
    plateau_patience: int = option(
        5,
        "ReduceLROnPlateau patience: the LR is multiplied by --plateau-factor at the first "
        "epoch whose validation loss has failed to improve (by a relative 1e-4) for more "
        "than this many epochs in a row.",
        min=0,
    )
    plateau_factor: float = option(0.1, "ReduceLROnPlateau factor.", min=0, min_open=True)
    early_stopping: bool = option(True, "Stop when the validation loss stops improving.")
    early_stopping_patience: int = option(
        10,
        "Early stopping, as in the seed: an epoch 'improves' when its global validation loss "
        "is lower than the best so far by more than --early-stopping-min-delta; training "
        "stops at the end of the epoch that makes the count of consecutive non-improving "
        "epochs exceed this number (patience 10: the 11th bad epoch in a row stops).",
        min=0,
    )
    early_stopping_min_delta: float = option(
        0.0, "Smallest decrease of the validation loss that counts as an improvement.", min=0
    )
    best_metric: str = option(
        "valid_accuracy",
        "Metric that selects the best checkpoint (the seed's option 2: validation accuracy).",
        choices=("valid_accuracy", "valid_loss"),
    )

    # --- data and regularisation ---------------------------------------------------------
    data_dir: str = option(
        "data",
        "Folder holding FashionMNIST/raw/*-ubyte[.gz] (torchvision's layout); missing files "
        "are downloaded. May be read-only when the files are there.",
    )
    valid_size: int = option(
        10000,
        "Training images held out for validation (the seed's 50k/10k split). 0 trains on all "
        "60k: then there is no validation, so no plateau scheduler, early stopping or best "
        "checkpoint.",
        min=0,
    )
    augment: bool = option(
        False,
        "On-device augmentation of training batches: random crop (shifts of up to "
        "--crop-padding pixels) and flip.",
    )
    crop_padding: int = option(
        2,
        "With --augment: random shifts of up to this many pixels (a random crop of the image "
        "padded with zeros); 0 keeps the flips only, which suits short runs.",
        min=0,
        max=14,
    )
    alternating_flips: bool = option(
        False,
        "With --augment: flip each training image in every other epoch, starting from a random "
        "half, instead of by a coin toss each epoch, so that each image is seen both ways in "
        "any two epochs in a row (airbench's alternating flip).",
    )
    random_erasing: float = option(
        0.0,
        "The chance that a training image gets a random rectangle (2 to 40% of its area, "
        "from 1:3 to 3:1) set to the mean pixel (random erasing, Zhong et al. 2017): a "
        "regulariser for long runs; 0 turns it off.",
        min=0,
        max=1,
    )
    ema_decay: float = option(
        0.0,
        "Keep an exponential moving average of the weights with this decay (e.g. 0.999) and "
        "validate and save it instead of the raw weights; 0 turns it off.",
        min=0,
    )
    seed: int = option(
        0,
        "Seed of the train/validation split, data order, init and dropout.",
        min=0,
        max=2**32 - 1,  # numpy's limit (accelerate's set_seed seeds numpy too)
    )

    # --- hardware and speed -----------------------------------------------------------------
    mixed_precision: str | None = option(
        None,
        "no, fp16 or bf16; when not given, the launcher's setting (accelerate config or "
        "--mixed_precision) decides.",
        choices=MIXED_PRECISION,
    )
    channels_last: bool = option(
        True,
        "Channels-last memory format for convolutions: faster on GPUs (tensor cores) and, "
        "with oneDNN, on CPUs too.",
    )
    compile: bool = option(False, "torch.compile the model (slower start, faster steps).")
    deterministic: bool = option(
        False, "torch.use_deterministic_algorithms(True): bitwise repeatable runs, slower."
    )

    # The longest wait between two collectives in a healthy run, with room: the local main
    # process downloading the data (30 MB) while the others wait at their first barrier (10
    # minutes allow 50 kB/s); the main process writing checkpoints while the others wait; a
    # first torch.compile of resnet9 on a slow CPU; one rank ending its validation shard later
    # than another. A validation or test pass is no wait however long it is: each rank
    # evaluates its own shard and they meet once, at the end.
    collective_timeout: float = option(
        600.0,
        "Seconds a process of a multi-process run waits for the others at a collective "
        "operation before it stops with an error naming this timeout (a hung or dead process); "
        "the launcher then restarts the group if --max_restarts allows. Raise it if the first "
        "start downloads the data over a slow network.",
        min=1,
        max=1e6,  # 11.6 days, in milliseconds still within a 32-bit int (torch's limit)
    )

    test_every_epoch: bool = option(
        False,
        "Also evaluate the test set after every epoch (test_loss, test_accuracy in the metrics "
        "and TensorBoard): for learning curves and benchmarks. Never used to pick checkpoints "
        "or to stop.",
    )
    final_test: bool = option(
        True,
        "At the end of training, evaluate the best checkpoint (the last one for a run without "
        "a validation split) on the test set: one line, and final_test in summary.json. "
        "Measured after every decision of the run: never used to choose or stop.",
    )

    # --- outputs --------------------------------------------------------------------------------
    output_dir: str = option("runs", "Folder that holds one sub-folder per run.")
    run_name: str | None = option(
        None, "Name of this run's folder (default: a timestamp and the model name)."
    )
    resume: str | None = option(
        None,
        "Continue an interrupted run: 'auto' resumes --run-name (or the newest unfinished "
        "run) if it has saved state and starts fresh otherwise; a path names a run folder.",
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options that may differ from the saved config when a run is resumed: where things are and
# how long to go on. Anything else would silently make a different run.
RESUMABLE_OVERRIDES = frozenset(
    {
        "epochs",
        "data_dir",
        "output_dir",
        "run_name",
        "resume",
        "compile",
        "eval_batch_size",
        "final_test",  # what is reported at the end, not how the run trains
        "mixed_precision",  # e.g. resuming on other hardware; never changed silently
        "collective_timeout",
    }
)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def resolve_config(explicit: dict[str, Any]) -> TrainConfig:
    """Field defaults, then the recipe, then the options the user gave (None = not given)."""
    given = {k: v for k, v in explicit.items() if v is not None}
    recipe = given.get("recipe", TrainConfig.recipe)
    values = {**RECIPES[recipe], **given}
    return TrainConfig(**values)


def config_dict_problem(values: Any) -> str | None:
    """Why `values` cannot be the saved config of a run (not an object, unknown keys, a value
    of another type than its option's), or None. Keys it lacks take their defaults: a run
    saved by an older version lacks the options added since."""
    if not isinstance(values, dict):
        kinds = {list: "a list", str: "a string", int: "a number", float: "a number"}
        return f"its config is {kinds.get(type(values), repr(values))}, not an object"
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        return f"its config has unknown keys {unknown}"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    limits = {f.name: f.metadata for f in config_fields()}
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)  # e.g. (str, NoneType)
        # An integer is a fine number; True is an int to Python but not to a numeric option.
        fits = isinstance(value, (*allowed, int) if float in allowed else allowed)
        if not fits or (isinstance(value, bool) and bool not in allowed):
            wanted = " or ".join(names.get(t, "null") for t in allowed)
            return f"its config has {key} = {value!r}, not {wanted}"
        if value is not None and not within_limits(value, limits[key]):
            return f"its config has {key} = {value!r}, outside what the option allows"
    return None


def within_limits(value: Any, meta: dict) -> bool:
    """Whether a saved option value obeys its field's choices, min (open or not) and max."""
    if "choices" in meta:
        return value in meta["choices"]
    if "min" in meta and (value <= meta["min"] if meta.get("min_open") else value < meta["min"]):
        return False
    if meta.get("max") is not None and value > meta["max"]:
        return False
    return not isinstance(value, float) or math.isfinite(value)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config saved by an earlier run; unknown keys mean another version wrote it."""
    names = {f.name for f in config_fields()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config keys {unknown}")
    return TrainConfig(**values)


def unused_options(explicit: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Options the user gave that this configuration does not use: worth a note."""
    unused = {
        "momentum": cfg.optimizer != "sgd",
        "plateau_patience": cfg.scheduler != "plateau",
        "plateau_factor": cfg.scheduler != "plateau",
        "early_stopping_patience": not cfg.early_stopping,
        "early_stopping_min_delta": not cfg.early_stopping,
        "best_metric": cfg.valid_size == 0,
        "crop_padding": not cfg.augment,
        "alternating_flips": not cfg.augment,
    }
    return [name for name, idle in unused.items() if idle and explicit.get(name) is not None]


# The largest float32: a learning rate, momentum or weight decay above it overflows the
# optimizer's float32 arithmetic (torch raises "value cannot be converted to type float").
FLOAT32_MAX = 3.4028234663852886e38


def check_config(cfg: TrainConfig) -> None:
    """Rules that involve more than one option; raises ValueError with a one-line reason."""
    check_paths(cfg)
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; --scale-lr uses it
    lr = cfg.lr * (processes if cfg.scale_lr else 1)
    if lr > FLOAT32_MAX:
        times = f" x {processes} processes (--scale-lr)" if lr != cfg.lr else ""
        raise ValueError(
            f"--lr {cfg.lr:g}{times} is beyond float32 arithmetic (at most {FLOAT32_MAX:.3g})"
        )
    for name in ("momentum", "weight_decay"):
        if getattr(cfg, name) > FLOAT32_MAX:
            raise ValueError(
                f"--{name.replace('_', '-')} {getattr(cfg, name):g} is beyond float32 "
                f"arithmetic (at most {FLOAT32_MAX:.3g})"
            )
    train_images = 60000 - cfg.valid_size
    if train_images < 1:
        raise ValueError(f"--valid-size {cfg.valid_size} leaves no training images (60000 in all)")
    if train_images < 2 * processes:  # a rank with fewer than 2 images has no step to take
        raise ValueError(
            f"--valid-size {cfg.valid_size} leaves {train_images} training image(s) for "
            f"{processes} process(es): each process needs at least 2; lower --valid-size"
        )
    if cfg.valid_size == 0:
        if cfg.scheduler == "plateau":
            raise ValueError(
                "--valid-size 0 leaves no validation loss for the plateau scheduler; "
                "use --scheduler onecycle, cosine or none"
            )
        if cfg.early_stopping:
            raise ValueError("--valid-size 0 leaves no validation loss; add --no-early-stopping")
    if cfg.batch_size < 2 and cfg.model in BATCHNORM_1D_MODELS:
        raise ValueError(
            f"--batch-size {cfg.batch_size} with --model {cfg.model}: its BatchNorm1d layer "
            "cannot normalise a batch of one image in training; use --batch-size 2 or more"
        )
    if cfg.ema_decay >= 1:
        raise ValueError(f"--ema-decay must be below 1, got {cfg.ema_decay}")
    if cfg.label_smoothing >= 1:
        raise ValueError(f"--label-smoothing must be below 1, got {cfg.label_smoothing}")
    if cfg.plateau_factor >= 1:
        raise ValueError(f"--plateau-factor must be below 1, got {cfg.plateau_factor}")


# A run name is a folder name, a log-line word and a TensorBoard run: a safe set of
# characters (a newline would break log lines; bytes that are not UTF-8, TensorBoard), and
# short enough that ".<name>.<random>.tmp" files next to it stay within 255 bytes.
RUN_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._\-+=@,]")
MAX_RUN_NAME = 200


# Models with a BatchNorm1d layer (engine/models.py; a test keeps this list true): in
# training it needs 2 images per batch (BatchNorm2d has every pixel of a channel).
BATCHNORM_1D_MODELS = ("cnn-bn",)


def check_paths(cfg: TrainConfig) -> None:
    """--run-name names one folder inside --output-dir: a path there ('../x', '/abs', 'a/b')
    would write the run elsewhere, where `eval best` and --resume auto never look."""
    for name in ("data_dir", "output_dir", "run_name", "resume"):
        if getattr(cfg, name) == "":
            raise ValueError(f"--{name.replace('_', '-')} is empty")
    name = cfg.run_name
    if name is None:
        return
    separators = [s for s in (os.sep, os.altsep) if s]
    if name in (".", "..") or any(s in name for s in separators):
        raise ValueError(
            f"--run-name {name!r} is not a plain folder name: it names the run's folder inside "
            "--output-dir (give the parent folder as --output-dir)"
        )
    bad = sorted(set(RUN_NAME_UNSAFE.findall(name)))
    if bad or name.startswith(("-", ".")):
        shown = ", ".join(repr(c) for c in bad) if bad else f"a leading {name[0]!r}"
        raise ValueError(
            f"--run-name {name.encode('utf-8', 'backslashreplace').decode()!r} has {shown}: "
            "use letters, digits and . _ - + = @ , (not first: . or -)"
        )
    if len(name.encode("utf-8", "surrogateescape")) > MAX_RUN_NAME:
        raise ValueError(
            f"--run-name is {len(name)} characters long: at most {MAX_RUN_NAME} (it names a "
            "folder, and file systems allow 255 bytes with room for the run's temporary files)"
        )
