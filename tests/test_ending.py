"""What a training run ends with (run/ending.py, written by run/outputs.write_ending): its
checkpoint evaluated once on the test split, the final test printed and in summary.json with
the same figures `fmnist-accel eval` gives, and the pictures of that evaluation in the run's
TensorBoard."""

from __future__ import annotations

import io
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from support.fakedata import N_TEST, N_TRAIN, TINY_RUN_ARGS, write_fashion_dir
from support.pictures import FIGURE_NAMES, assert_picture, expected_size
from support.processes import CLI, HARNESS, process_env, run_command, train, why

from fmnist_accel.engine.data import Split
from fmnist_accel.engine.evaluation import CheckpointEvaluation, EvalResult, Mistake
from fmnist_accel.errors import EXIT_WRITE_FAILED, WriteFailed
from fmnist_accel.run import outputs
from fmnist_accel.run.ending import Ending
from fmnist_accel.store.checkpoint import load_model_checkpoint


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


def main_process(main: bool = True, writer=None) -> SimpleNamespace:
    """The parts of an Accelerator that outputs.write_ending uses, on one process."""
    return SimpleNamespace(
        is_main_process=main, num_processes=1, get_tracker=lambda name, unwrap: writer
    )


def test_the_record_is_added_to_summary_json_and_a_failed_write_is_write_failed(tmp_path):
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed"}))
    said = []
    outputs.write_ending(main_process(), tmp_path, Ending(), said.append)  # nothing measured
    assert summary(tmp_path) == {"status": "completed"}
    record = {"accuracy": 0.5}
    outputs.write_ending(main_process(), tmp_path, Ending(due=True, final_test=record), said.append)
    assert summary(tmp_path) == {
        "status": "completed",
        "final_test": {"accuracy": 0.5},
        "ending": "done",
    }

    gone = tmp_path / "a-file"  # where the run folder should be: nothing can be written there
    gone.write_text("")
    with pytest.raises(WriteFailed, match=f"^cannot write {re.escape(str(gone))}/summary.json: "):
        outputs.write_ending(main_process(), gone, Ending(due=True, final_test=record), said.append)
    assert WriteFailed.exit_code == EXIT_WRITE_FAILED


def test_the_end_evaluates_its_checkpoint_once(tmp_path):
    """Watched from outside (tests/support/harness.py records every cross-entropy call): after
    the last training step, the test split is evaluated once, in ceil(N_TEST / batch) calls,
    and that one evaluation gives both the final test and the pictures, with --final-test
    and without (where it stands alone)."""
    data = write_fashion_dir(tmp_path / "data", N_TRAIN, N_TEST)
    batch = 32
    for name, final_test in (("with", "--final-test"), ("without", "--no-final-test")):
        spy = tmp_path / f"spy-{name}"
        spy.mkdir()
        args = [*TINY_RUN_ARGS, "--epochs", "1", "--eval-batch-size", batch, final_test,
                "--data-dir", data, "--output-dir", tmp_path / "runs",
                "--run-name", name]  # fmt: skip
        harness = [sys.executable, HARNESS, *args]
        res = run_command(harness, tmp_path, env=process_env(SPY_LOSS_DIR=str(spy)))
        assert res.rc == 0, str(res)
        calls = [json.loads(line) for line in (spy / "rank0.jsonl").read_text().splitlines()]
        last_step = max(n for n, call in enumerate(calls) if call["train"])
        after = calls[last_step + 1 :]
        valid_calls = -(-(N_TRAIN // 6) // batch)  # the validation of epoch 1: 33 images
        assert not any(c["train"] for c in after)
        assert len(after) == valid_calls + -(-N_TEST // batch), final_test
        assert "of best.safetensors on the test split: in TensorBoard" in res.stdout
        assert ("final_test" in summary(tmp_path / "runs" / name)) == (name == "with")


class FakeWriter:
    """The TensorBoard writer's two calls that log_figures makes; `fail`: a full disk."""

    def __init__(self, fail: bool = False):
        self.images, self.fail = [], fail

    def add_image(self, tag, pixels, step, dataformats):
        if self.fail:
            raise OSError(28, "No space left on device")
        self.images.append((tag, pixels.shape, step, dataformats))

    def flush(self):
        pass


def test_end_pictures_are_drawn_and_written_by_the_main_process_alone(tmp_path):
    """The end's pictures: drawn by the main process from the one evaluation, written at the
    last epoch's step with one line; nothing on another rank; a writer that fails is one
    note, never an error of the ended run."""
    import torch

    from fmnist_accel.run.ending import draw_pictures

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (tmp_path / "tensorboard").mkdir()
    counts = [[20 if i == j else 1 for j in range(10)] for i in range(10)]
    n = sum(map(sum, counts))
    mistakes = [Mistake(index=3, true=0, predicted=1, confidence=0.9)]
    result = EvalResult(loss=0.5, accuracy=200 / n, num_samples=n, confusion=counts,
                        mistakes=mistakes)  # fmt: skip
    split = Split(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64))
    meta = {"model": "mlp", "epoch": 2}
    evaluation = CheckpointEvaluation(
        tmp_path / "best.safetensors", meta, "test", split, result, False
    )
    ending = Ending(evaluation=evaluation)
    ending.pictures = draw_pictures(evaluation, 1, ending)
    assert ending.notes == []
    said = []
    writer = FakeWriter()
    outputs.write_ending(main_process(False, writer), tmp_path, ending, said.append)
    assert writer.images == [] and said == []
    outputs.write_ending(main_process(True, writer), tmp_path, Ending(), said.append)
    assert writer.images == []  # nothing to draw
    outputs.write_ending(main_process(True, writer), tmp_path, ending, said.append)
    assert writer.images == [
        (f"Figures/test/{name}", (*reversed(expected_size(name)), 3), 2, "HWC")
        for name in FIGURE_NAMES
    ]
    assert len(said) == 1 and said[0].startswith(
        "figures (per-class accuracy, confusion matrix, mistakes) of best.safetensors on the "
        "test split: in TensorBoard's Images tab"
    ), said
    said.clear()
    outputs.write_ending(main_process(True, FakeWriter(fail=True)), tmp_path, ending, said.append)
    assert said == ["note: no figures in TensorBoard: OSError: [Errno 28] No space left on device"]


def test_training_logs_the_figures_of_its_best_checkpoint_to_tensorboard(weak_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    events = EventAccumulator(str(weak_run / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    tags = {f"Figures/test/{name}": name for name in FIGURE_NAMES}
    assert set(tags) <= set(events.Tags()["images"])
    for tag, name in tags.items():
        (image,) = events.Images(tag)
        assert image.step == 1  # the last finished epoch
        assert (image.width, image.height) == expected_size(name)
        assert_picture(Image.open(io.BytesIO(image.encoded_image_string)), name)

    # They show the best checkpoint on the test split: the same pixels as eval draws.
    result = run_command(
        [CLI, "eval", "best", "--run-dir", weak_run, "--save-figures", tmp_path], cwd=tmp_path
    )
    assert result.rc == 0, str(result)
    (logged,) = events.Images("Figures/test/confusion_matrix")
    from_tensorboard = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)))
    from_eval = np.asarray(Image.open(tmp_path / "confusion_matrix.png").convert("RGB"))
    assert (from_tensorboard[..., :3] == from_eval).all()


def test_pictures_without_a_final_test_are_the_same(weak_run, readonly_data, tmp_path):
    """weak_run's pictures come from its final test's evaluation; with --no-final-test the
    same run evaluates for its pictures alone: the same images."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    args = [*TINY_RUN_ARGS, "--epochs", "1", "--lr", "1e-6", "--run-name", "weak"]
    result = run_command(
        [CLI, "train", *args, "--no-final-test", "--data-dir", readonly_data.path,
         "--output-dir", tmp_path],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.rc == 0, str(result)
    assert "of best.safetensors on the test split: in TensorBoard's Images tab" in result.stdout
    logged = []
    for run in (weak_run, tmp_path / "weak"):
        events = EventAccumulator(str(run / "tensorboard"), size_guidance={IMAGES: 0})
        events.Reload()
        logged.append(
            {
                name: np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
                for name in FIGURE_NAMES
                for image in events.Images(f"Figures/test/{name}")
            }
        )
    assert logged[0].keys() == logged[1].keys() == set(FIGURE_NAMES)
    for name in FIGURE_NAMES:
        assert (logged[0][name] == logged[1][name]).all(), name


@pytest.mark.slow
def test_two_process_training_logs_the_figures_of_the_exact_evaluation(readonly_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    args = [*TINY_RUN_ARGS, "--epochs", "1", "--lr", "1e-6", "--data-dir", str(readonly_data.path),
            "--output-dir", str(tmp_path), "--run-name", "two"]  # fmt: skip
    proc = train(2, args)
    assert proc.returncode == 0, why(proc)
    assert proc.stdout.count("of best.safetensors on the test split: in TensorBoard") == 1
    events = EventAccumulator(str(tmp_path / "two" / "tensorboard"), size_guidance={IMAGES: 0})
    events.Reload()
    drawn = run_command(
        [CLI, "eval", "best", "--run-dir", tmp_path / "two", "--json", "--save-figures",
         tmp_path / "figs"],
        cwd=tmp_path,
    )  # fmt: skip
    assert drawn.rc == 0, str(drawn)
    assert drawn.json()["accuracy"] < 1  # there are mistakes to show
    for name in FIGURE_NAMES:
        (logged,) = events.Images(f"Figures/test/{name}")
        by_ranks = np.asarray(Image.open(io.BytesIO(logged.encoded_image_string)))
        by_eval = np.asarray(Image.open(tmp_path / "figs" / f"{name}.png").convert("RGB"))
        assert (by_ranks[..., :3] == by_eval).all(), name
