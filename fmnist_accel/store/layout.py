"""The run folder's vocabulary, written once: the names of its files, the ways a run can end,
and the shape of what it records. Every module that reads or writes a run folder takes its
words from here (training, `eval`, `runs`, `plot`, the HParams entry). No imports beyond
typing: `runs` and `plot` read run folders on a login node without torch.

    runs/NAME/
      config.json          the run's options as its latest start runs them (config.TrainConfig)
      metrics.jsonl        one EpochRecord per finished epoch
      best.safetensors     weights with the best validation metric (+ metadata)
      last.safetensors     weights of the latest finished epoch (+ metadata)
      resume.pt            everything needed to continue the run (--resume)
      summary.json         how the run ended (a Summary), written when it ends, also when stopped
      provenance.json      one Start per start of the run: code version, SLURM job, sweep
      tensorboard/         TensorBoard events
      .lock                held (flock) by the training process that uses the folder

Only the main process of a training run writes here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESUME = "resume.pt"
SUMMARY = "summary.json"
PROVENANCE = "provenance.json"
LOCK = ".lock"
TENSORBOARD = "tensorboard"

# The checkpoints, by the names `eval` and `predict` take (best|last).
CHECKPOINT_NAMES = ("best", "last")
CHECKPOINT_SUFFIX = ".safetensors"


def checkpoint_file(name: str) -> str:
    """'best' -> 'best.safetensors'."""
    return f"{name}{CHECKPOINT_SUFFIX}"


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / checkpoint_file(name)


CHECKPOINT_FILES = tuple(checkpoint_file(name) for name in CHECKPOINT_NAMES)
# The files a run writes, each replaced whole (a folder of that name is in the way).
RUN_FILES = (CONFIG, METRICS, RESUME, SUMMARY, PROVENANCE, *CHECKPOINT_FILES)

# How a run ended: summary.json's "status".
COMPLETED = "completed"
EARLY_STOPPED = "early-stopped"
DIVERGED = "diverged"  # a non-finite loss stopped it
PREEMPTED = "preempted"  # a stop signal: its state is saved, --resume continues it
WRITE_FAILED = "write-failed"  # a full disk or failing write stopped it; --resume continues it
STATUSES = (COMPLETED, EARLY_STOPPED, PREEMPTED, WRITE_FAILED, DIVERGED)
# Ended for good: a resume has nothing to continue (a completed run may be given more epochs).
FINISHED_STATUSES = (COMPLETED, EARLY_STOPPED, DIVERGED)
# Ended as planned: exit code 0, and the end of the run (final test, figures) follows.
SUCCESSFUL_STATUSES = (COMPLETED, EARLY_STOPPED)
# summary.json's "ending" for those: pending until the end is written, then done. A start that
# finds it pending (a stop or a kill during the end) completes the end and nothing else.
ENDING_PENDING = "pending"
ENDING_DONE = "done"


class EpochRecord(TypedDict, total=False):
    """One line of metrics.jsonl: a finished epoch."""

    epoch: int  # 1-based
    train_loss: float  # mean over every training image of every rank
    lr: float  # the learning rate the epoch trained with (a per-step schedule: where it ended)
    valid_loss: float  # without a validation split: absent
    valid_accuracy: float
    is_best: bool  # this epoch's weights are best.safetensors now
    test_loss: float  # --test-every-epoch only
    test_accuracy: float
    train_time: float  # seconds of training (a resumed epoch: this start's part)
    images_per_sec: float
    epoch_time: float  # seconds of training, validation and logging
    elapsed: float  # seconds of training and validation of the whole run so far


# Fields of an EpochRecord that differ between two runs of the same training: wall-clock times.
TIMING_FIELDS = ("train_time", "images_per_sec", "epoch_time", "elapsed")


class FinalTest(TypedDict):
    """summary.json's final_test: the test figures of the checkpoint the run ended with."""

    checkpoint: str  # best.safetensors, or last.safetensors without validation
    epoch: int
    accuracy: float
    loss: float
    num_samples: int


class Summary(TypedDict, total=False):
    """summary.json: how the run ended, written by the main process at every end."""

    status: str  # one of STATUSES
    detail: str  # what the user was told ("" when nothing)
    epochs_completed: int
    best: dict  # {"metric", "value", "epoch"}
    world_size: int
    distributed_type: str
    mixed_precision: str
    elapsed: float  # as EpochRecord.elapsed, at the end
    ranks: list  # where each rank ended: {"rank", "epoch", "lr", "early_stopping_bad_epochs"}
    ending: str  # SUCCESSFUL_STATUSES only: ENDING_PENDING, then ENDING_DONE
    stopped_by: str  # PREEMPTED by a signal: its name (SIGTERM, SIGUSR1...) as the main got it
    final_test: FinalTest  # once the run has ended successfully and --final-test


class Start(TypedDict, total=False):
    """One entry of provenance.json's "starts": where a start of the run came from."""

    time: float  # seconds since the epoch
    host: str
    code: dict  # {"version", "commit", "dirty", "changes"} (store/provenance.code_version)
    slurm_job: str | None  # 1234, or 1230_4 for an array task
    sweep: str | None  # the sweep's name (slurm/sweep.sbatch), else None
    changed: dict  # a resume only, when it changed options: {name: [before, now]}
