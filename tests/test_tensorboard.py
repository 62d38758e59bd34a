"""TensorBoard sees one run per run folder, resumes included, with one HParams entry that
is rewritten when the run ends again. Read back with TensorBoard's own event reader, and
through a real TensorBoard server's HParams plugin."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from support.fakedata import TINY_RUN_ARGS
from support.processes import CLI, free_port, run_command, train, why

from fmnist_accel.run import hparams as tb_hparams
from fmnist_accel.run import outputs
from fmnist_accel.run.ending import Ending
from fmnist_accel.store import layout
from fmnist_accel.store.run_info import read_run

# The tiny run has 6 steps per epoch: step 8 is in epoch 2.
STOP_IN_EPOCH_2 = {"FAULT_TERM_STEP": "8"}


def tensorboard_runs(output_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(output_dir))
    return sorted(multiplexer.Runs())


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


@pytest.fixture(scope="module")
def stopped_then_resumed(readonly_data, tmp_path_factory):
    """A run stopped by SIGTERM in epoch 2 (its HParams entry noted then), then resumed."""
    out = tmp_path_factory.mktemp("resumed")
    args = [*TINY_RUN_ARGS, "--data-dir", str(readonly_data.path), "--output-dir", str(out)]
    first = train(1, [*args, "--run-name", "r"], faults=STOP_IN_EPOCH_2)
    assert first.returncode == 75, why(first)
    run_dir = out / "r"
    after_stop = hparams_entry(run_dir / "tensorboard")
    second = run_command([CLI, "train", "--resume", run_dir], cwd=out)
    assert second.rc == 0, str(second)
    return run_dir, after_stop


def test_a_resumed_run_is_one_tensorboard_run_with_one_hparams_entry(stopped_then_resumed):
    run_dir, (options_then, metrics_then) = stopped_then_resumed
    assert options_then["status"] == "preempted"
    assert metrics_then[tb_hparams.METRIC_PREFIX + "epochs"] == [(1, 1.0)]

    assert tensorboard_runs(run_dir.parent) == ["r/tensorboard"]
    entries = list((run_dir / "tensorboard").glob(f"*{tb_hparams.SUFFIX}"))
    assert len(entries) == 1
    options, metrics = hparams_entry(run_dir / "tensorboard")
    config = json.loads((run_dir / "config.json").read_text())
    assert options["status"] == "completed"
    assert options["model"] == "mlp" and options["lr"] == pytest.approx(config["lr"])
    assert options["batch_size"] == 32 and options["augment"] is False
    assert options["processes"] == 1
    assert not set(options) & {"data_dir", "output_dir", "run_name", "resume"}
    info = read_run(run_dir)
    final = {k.removeprefix(tb_hparams.METRIC_PREFIX): v for k, v in metrics.items()}
    assert final["epochs"] == [(2, 2.0)]
    assert final["best_valid_accuracy"] == [(2, pytest.approx(info.best_valid_accuracy))]
    assert final["best_epoch"] == [(2, float(info.best_epoch))]
    assert [step for step, _ in final["test_accuracy"]] == [2]


def test_the_entry_is_replaced_not_added(tmp_path):
    tb_dir = tmp_path / "tensorboard"
    outputs.write_hparams_entry(tb_dir, {"lr": 0.1}, {"final/epochs": 1.0}, "preempted", 1)
    (tb_dir / ".hparams-left-by-a-kill.partial").write_bytes(b"torn")
    time.sleep(1.1)  # the next file's name has a later second in it
    outputs.write_hparams_entry(tb_dir, {"lr": 0.2}, {"final/epochs": 3.0}, "completed", 3)
    assert [p.name.endswith(tb_hparams.SUFFIX) for p in tb_dir.iterdir()] == [True]
    options, metrics = hparams_entry(tb_dir)
    assert options == {"lr": 0.2}
    assert metrics == {"final/epochs": [(3, 3.0)]}


@pytest.mark.parametrize("status", [*layout.STATUSES, "?"])
def test_every_status_makes_an_entry(tmp_path, status):
    outputs.write_hparams_entry(tmp_path, {"status": status}, {}, status, 0)
    assert hparams_entry(tmp_path)[0] == {"status": status}


def test_an_entry_that_cannot_be_written_is_one_note_of_the_main_process(tiny_run, tmp_path):
    """An extra of a run that has ended: a failed write is said, it raises nothing."""
    run = tmp_path / "r"
    shutil.copytree(tiny_run.run_dir, run)
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").write_text("a file where the folder should be")
    said = []
    for main in (False, True):
        accelerator = SimpleNamespace(is_main_process=main, num_processes=1)
        outputs.write_ending(accelerator, run, Ending(), said.append)
    assert said == ["note: the HParams entry was not written: File exists"]


# The local server directly, whatever proxies the environment names.
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(base: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with LOCAL.open(request, timeout=20) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_tensorboard_server_shows_one_run_and_one_hparams_row_per_run_folder(
    stopped_then_resumed, tiny_run, tmp_path
):
    run_dir, _ = stopped_then_resumed
    logdir = tmp_path / "runs"
    shutil.copytree(run_dir, logdir / "resumed")
    shutil.copytree(tiny_run.run_dir, logdir / "tiny")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        # TensorBoard takes long to start on a busy 2-core machine: wait for it, up to 5 min.
        runs, deadline = [], time.monotonic() + 300
        while len(runs) < 2 and time.monotonic() < deadline:
            assert server.poll() is None, f"tensorboard exited with {server.returncode}"
            try:
                with LOCAL.open(base + "/data/runs", timeout=5) as response:
                    runs = json.loads(response.read())
            except OSError:
                pass
            time.sleep(0.5)
        time.sleep(2)  # a second reload pass: every file of both runs read
        with LOCAL.open(base + "/data/runs", timeout=5) as response:
            runs = json.loads(response.read())
        assert sorted(runs) == ["resumed/tensorboard", "tiny/tensorboard"]
        experiment = post(base, "/data/plugin/hparams/experiment", {"experimentName": ""})
        names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"model", "lr", "epochs", "status", "processes"} <= names
        groups = post(
            base,
            "/data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE"],
                "colParams": [],
                "startIndex": 0,
                "sliceSize": 10,
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(rows) == ["resumed/tensorboard", "tiny/tensorboard"]
    for name, folder in (("resumed/tensorboard", run_dir), ("tiny/tensorboard", tiny_run.run_dir)):
        values = {m["name"]["tag"]: m["value"] for m in rows[name]["metricValues"]}
        info = read_run(folder)
        assert values["final/best_valid_accuracy"] == pytest.approx(info.best_valid_accuracy)
        assert values["final/epochs"] == info.epochs
        assert rows[name]["hparams"]["status"] == "completed"
