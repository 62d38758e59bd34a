"""The test accuracy a training run ends with: printed, in summary.json, and the same figures
that `fmnist-accel eval` gives for that checkpoint."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from conftest import N_TEST, TINY_RUN_ARGS

from fmnist_accel import outputs
from fmnist_accel.checkpoint import load_model_checkpoint
from fmnist_accel.errors import EXIT_WRITE_FAILED, WriteFailed


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def eval_json(cli, checkpoint: str, run_dir) -> dict:
    res = cli("eval", checkpoint, "--run-dir", run_dir, "--json")
    assert res.rc == 0, str(res)
    return res.json()


def test_a_run_ends_with_its_best_checkpoints_test_figures(tiny_run, cli):
    final = summary(tiny_run.run_dir)["final_test"]
    evaluated = eval_json(cli, "best", tiny_run.run_dir)
    assert final["checkpoint"] == "best.safetensors"
    assert final["epoch"] == evaluated["epoch"] == summary(tiny_run.run_dir)["best"]["epoch"]
    # The same evaluation as `eval`: the same figures, to the last bit on one process.
    assert final["accuracy"] == evaluated["accuracy"]
    assert final["loss"] == evaluated["loss"]
    assert final["num_samples"] == evaluated["num_samples"] == N_TEST
    line = f"test: accuracy {final['accuracy']:.4f}, loss {final['loss']:.4f} (best.safetensors"
    lines = tiny_run.result.stdout.splitlines()
    # One line, after the last epoch and before the closing line.
    assert [n for n, text in enumerate(lines) if text.startswith(line)] == [len(lines) - 2]
    assert lines[-1].startswith("done: completed")


def test_a_run_without_validation_tests_its_last_checkpoint(readonly_data, cli, tmp_path):
    res = cli(
        "train", *TINY_RUN_ARGS, "--valid-size", "0", "--scheduler", "none",
        "--no-early-stopping", "--data-dir", readonly_data.path, "--output-dir", tmp_path,
        "--run-name", "all",
    )  # fmt: skip
    assert res.rc == 0, str(res)
    run = tmp_path / "all"
    final = summary(run)["final_test"]
    assert final["checkpoint"] == "last.safetensors" and not (run / "best.safetensors").exists()
    evaluated = eval_json(cli, "last", run)
    assert (final["accuracy"], final["loss"]) == (evaluated["accuracy"], evaluated["loss"])
    assert re.search(
        r"^test: accuracy [01]\.\d{4}, .*\(last\.safetensors, epoch 2, ", res.stdout, re.M
    )


def test_the_final_test_changes_nothing_else_and_can_be_turned_off(
    tiny_run, readonly_data, cli, tmp_path
):
    """--no-final-test: no line, no summary entry; and the run otherwise the same, weights
    and metrics alike: the test set is only looked at after the run's last decision."""
    res = cli(
        "train", *TINY_RUN_ARGS, "--no-final-test", "--data-dir", readonly_data.path,
        "--output-dir", tmp_path, "--run-name", "tiny",
    )  # fmt: skip
    assert res.rc == 0, str(res)
    run = tmp_path / "tiny"
    assert "final_test" not in summary(run)
    assert not re.search(r"^test: ", res.stdout, re.M)
    for name in ("best", "last"):
        ours, _ = load_model_checkpoint(run / f"{name}.safetensors")
        theirs, _ = load_model_checkpoint(tiny_run.run_dir / f"{name}.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(ours[k].equal(theirs[k]) for k in ours), name

    def epochs(folder):
        drop = ("train_time", "epoch_time", "images_per_sec", "elapsed")
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in drop} for r in rows]

    assert epochs(run) == epochs(tiny_run.run_dir)


def one_process_session(run_dir) -> SimpleNamespace:
    accelerator = SimpleNamespace(is_main_process=True, num_processes=1)
    return SimpleNamespace(accelerator=accelerator, run_dir=run_dir)


def test_the_record_is_added_to_summary_json_and_a_failed_write_is_write_failed(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    outputs.add_final_test(one_process_session(tmp_path), None)  # no checkpoint: no entry
    assert summary(tmp_path) == {"status": "completed"}
    outputs.add_final_test(one_process_session(tmp_path), {"accuracy": 0.5})
    assert summary(tmp_path) == {"status": "completed", "final_test": {"accuracy": 0.5}}

    gone = tmp_path / "gone"
    with pytest.raises(WriteFailed, match=f"^cannot write {re.escape(str(gone))}/summary.json: "):
        outputs.add_final_test(one_process_session(gone), {"accuracy": 0.5})
    assert WriteFailed.exit_code == EXIT_WRITE_FAILED
