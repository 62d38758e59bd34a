"""The run's entry in TensorBoard's HParams dashboard: one per run folder, not one per start.

TensorBoard makes a run of every folder that holds event files. torch's
SummaryWriter.add_hparams (and accelerate's init_trackers(config=...), which calls it)
writes into a new timestamped sub-folder each time: a second run per start or resume. Here
the entry goes into the run's own tensorboard/ folder instead, in one event file of its own
(events.out.tfevents.<time>.<host>.<pid>.hparams) that is replaced whenever the run ends:

- the options (hparams) are a SessionStartInfo summary. TensorBoard keeps the first one it
  reads for a run and ignores later ones, so an entry is updated by replacing the file, not
  by appending to it;
- the final metrics are scalars under final/ in the same file, at the step of the last
  finished epoch (which a resume's purge of later epochs never removes).

No Experiment summary is written: TensorBoard then builds the table's columns from the union
of every run's options (those that differ between runs first) instead of from whichever
run's Experiment it finds first.

This module builds the entry (run_entry, entry_events); outputs.py writes its file, as it
writes every file of a run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, NamedTuple

from ..store.layout import COMPLETED, DIVERGED, EARLY_STOPPED
from ..store.run_info import RunInfo, number, read_run

SUFFIX = ".hparams"
PARTIAL_PREFIX = ".hparams-"  # an entry being written: no "tfevents" in it, TensorBoard skips it
# Options that say where a run lives, not what it is.
NOT_HPARAMS = ("data_dir", "output_dir", "run_name", "resume")
METRIC_PREFIX = "final/"
STATUS_CODES = {  # tensorboard.plugins.hparams.api_pb2.Status; preempted: STATUS_UNKNOWN
    COMPLETED: "STATUS_SUCCESS",
    EARLY_STOPPED: "STATUS_SUCCESS",
    DIVERGED: "STATUS_FAILURE",
}


def hparams_of(info: RunInfo) -> dict[str, bool | int | float | str]:
    """Every training option of the run (where it lives aside), its process count and
    how it ended. TensorBoard's table lists first the ones that differ between runs."""
    values: dict[str, Any] = {
        k: v for k, v in info.config.items() if k not in NOT_HPARAMS and v is not None
    }
    values["processes"] = info.processes
    values["status"] = info.status
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float, str)) and v == v}


def metrics_of(info: RunInfo, test_accuracy: float | None = None) -> dict[str, float]:
    """The final figures: best validation accuracy and its epoch, the test accuracy when it
    is known, the epochs finished. test_accuracy: a figure measured at the end of this very
    run, for when the run folder does not hold one."""
    values = {
        "best_valid_accuracy": info.best_valid_accuracy,
        "best_epoch": info.best_epoch,
        "test_accuracy": info.test_accuracy if info.test_accuracy is not None else test_accuracy,
        "epochs": info.epochs,
    }
    return {METRIC_PREFIX + k: float(v) for k, v in values.items() if number(v) is not None}


def entry_file_name(now: float) -> str:
    """The entry's event file: a name TensorBoard reads (it has "tfevents" in it), made
    unique by the time, host and process, and ending in SUFFIX so that it can be found."""
    return f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}{SUFFIX}"


def entry_events(
    hparams: dict[str, Any], metrics: dict[str, float], status: str, step: int, now: float
) -> list:
    """The entry's events, in the order its event file holds them (outputs.py writes it)."""
    from tensorboard.compat.proto.event_pb2 import Event

    return [
        Event(wall_time=now, file_version="brain.Event:2"),
        Event(wall_time=now, step=step, summary=session_start(hparams, now)),
        *(Event(wall_time=now, step=step, summary=scalar(k, v)) for k, v in metrics.items()),
        Event(wall_time=now, step=step, summary=session_end(status, now)),
    ]


def plugin_summary(tag: str, data):
    """A Summary holding one HParamsPluginData message, as TensorBoard's own writer makes it."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(
        value=[
            Summary.Value(
                tag=tag,
                metadata=metadata.create_summary_metadata(data),
                tensor=metadata.NULL_TENSOR,
            )
        ]
    )


def session_start(hparams: dict[str, Any], start_time: float):
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=start_time)
    for key, value in hparams.items():
        # bool first: a bool is an int in Python
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, (int, float)):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = str(value)
    data = plugin_data_pb2.HParamsPluginData(session_start_info=info)
    return plugin_summary(metadata.SESSION_START_INFO_TAG, data)


def session_end(status: str, end_time: float):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    code = api_pb2.Status.Value(STATUS_CODES.get(status, "STATUS_UNKNOWN"))
    info = plugin_data_pb2.SessionEndInfo(status=code, end_time_secs=end_time)
    data = plugin_data_pb2.HParamsPluginData(session_end_info=info)
    return plugin_summary(metadata.SESSION_END_INFO_TAG, data)


def scalar(tag: str, value: float):
    from tensorboard.compat.proto.summary_pb2 import Summary

    return Summary(value=[Summary.Value(tag=tag, simple_value=value)])


class Entry(NamedTuple):
    """What a run's HParams entry holds (the arguments of outputs.write_hparams_entry)."""

    hparams: dict[str, Any]
    metrics: dict[str, float]
    status: str
    step: int


def run_entry(run_dir: Path, test_accuracy: float | None = None) -> Entry:
    """The entry of the run in run_dir, from what its folder holds once summary.json says
    how it ended; test_accuracy as in metrics_of."""
    info = read_run(run_dir, live_check=False)
    return Entry(hparams_of(info), metrics_of(info, test_accuracy), info.status, info.epochs or 0)
