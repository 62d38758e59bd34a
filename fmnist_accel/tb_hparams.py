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
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from .runinfo import TENSORBOARD, RunInfo, number, read_run

SUFFIX = ".hparams"
PARTIAL_PREFIX = ".hparams-"  # an entry being written: no "tfevents" in it, TensorBoard skips it
# Options that say where a run lives, not what it is.
NOT_HPARAMS = ("data_dir", "output_dir", "run_name", "resume")
METRIC_PREFIX = "final/"
STATUS_CODES = {  # tensorboard.plugins.hparams.api_pb2.Status; preempted: STATUS_UNKNOWN
    "completed": "STATUS_SUCCESS",
    "early-stopped": "STATUS_SUCCESS",
    "diverged": "STATUS_FAILURE",
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


def write_hparams_entry(
    tb_dir: Path, hparams: dict[str, Any], metrics: dict[str, float], status: str, step: int
) -> Path:
    """Write the run's entry as a new event file in tb_dir and remove the older ones.

    The file is written under a name TensorBoard ignores and renamed into place: a kill
    leaves the old entry or the new one, never a torn one (at worst both, and TensorBoard
    shows the older until the next write removes it)."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    tb_dir = Path(tb_dir)
    tb_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}{SUFFIX}"
    events = [
        Event(wall_time=now, file_version="brain.Event:2"),
        Event(wall_time=now, step=step, summary=session_start(hparams, now)),
        *(Event(wall_time=now, step=step, summary=scalar(k, v)) for k, v in metrics.items()),
        Event(wall_time=now, step=step, summary=session_end(status, now)),
    ]
    fd, tmp = tempfile.mkstemp(dir=tb_dir, prefix=PARTIAL_PREFIX, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = RecordWriter(f)
            for event in events:
                writer.write(event.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, tb_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in tb_dir.iterdir():
        is_old_entry = old.name.endswith(SUFFIX) and old.name != name
        if is_old_entry or old.name.startswith(PARTIAL_PREFIX):
            old.unlink(missing_ok=True)
    return tb_dir / name


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


def write_run_hparams(run_dir: Path, test_accuracy: float | None = None) -> Path:
    """The entry of the run in run_dir, from what its folder holds; called by the run's own
    process once summary.json says how it ended."""
    info = read_run(run_dir, live_check=False)
    return write_hparams_entry(
        Path(run_dir) / TENSORBOARD,
        hparams_of(info),
        metrics_of(info, test_accuracy),
        info.status,
        step=info.epochs or 0,
    )
