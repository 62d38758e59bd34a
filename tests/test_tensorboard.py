"""The HParams entry of a run: one event file in the run's tensorboard/ folder, replaced
when the run ends again. Read back with TensorBoard's own event reader."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fmnist_accel import tb_hparams


def hparams_entry(tb_dir: Path) -> tuple[dict, dict]:
    """(options, final metrics with their steps) of the run's HParams entry, as TensorBoard
    reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    options = {}
    for key, value in start.hparams.items():
        options[key] = getattr(value, value.WhichOneof("kind"))
    metrics = {
        tag: [(e.step, e.value) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(tb_hparams.METRIC_PREFIX)
    }
    return options, metrics


def test_the_entry_is_replaced_not_added(tmp_path):
    tb_dir = tmp_path / "tensorboard"
    tb_hparams.write_hparams_entry(tb_dir, {"lr": 0.1}, {"final/epochs": 1.0}, "preempted", 1)
    (tb_dir / ".hparams-left-by-a-kill.partial").write_bytes(b"torn")
    time.sleep(1.1)  # the next file's name has a later second in it
    tb_hparams.write_hparams_entry(tb_dir, {"lr": 0.2}, {"final/epochs": 3.0}, "completed", 3)
    assert [p.name.endswith(tb_hparams.SUFFIX) for p in tb_dir.iterdir()] == [True]
    options, metrics = hparams_entry(tb_dir)
    assert options == {"lr": 0.2}
    assert metrics == {"final/epochs": [(3, 3.0)]}


@pytest.mark.parametrize("status", ["completed", "early-stopped", "preempted", "diverged", "?"])
def test_every_status_makes_an_entry(tmp_path, status):
    tb_hparams.write_hparams_entry(tmp_path, {"status": status}, {}, status, 0)
    assert hparams_entry(tmp_path)[0] == {"status": status}
