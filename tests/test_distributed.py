"""Distributed behaviour with real processes: N gloo ranks on the CPU through
`accelerate launch` and the repository's launch config, and two "machines" on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.fakedata import write_fashion_dir
from support.processes import (
    BIN,
    HARNESS,
    evaluate_json,
    free_port,
    launch_command,
    metrics,
    process_env,
    run_command,
    summary,
    train,
    wait_for_port,
    why,
)

pytestmark = pytest.mark.slow

N_TEST = 203  # divisible by neither 2 nor 3, nor by the batch sizes below


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_fashion_dir(tmp_path_factory.mktemp("data"), n_train=600, n_test=N_TEST)


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    args = ["--model", "cnn-bn", "--epochs", "1", "--batch-size", "64"]
    proc = train(1, [*args, *common(data_dir, out, "r")])
    assert proc.returncode == 0, why(proc)
    return out / "r"


def common(data_dir: Path, out: Path, name: str) -> list[str]:
    return ["--data-dir", str(data_dir), "--output-dir", str(out), "--run-name", name]


def test_cpu_launch_config_gives_real_ranks(data_dir, tmp_path):
    proc = train(2, ["--model", "mlp", "--epochs", "1", *common(data_dir, tmp_path, "r")])
    assert proc.returncode == 0, why(proc)
    assert "hardware: 2 processes, CPU (gloo), " in proc.stdout
    s = summary(tmp_path / "r")
    assert s["world_size"] == 2 and s["distributed_type"] == "MULTI_CPU"
    assert [r["rank"] for r in s["ranks"]] == [0, 1]
    # Only the main process printed and wrote: one line per epoch, one metrics record.
    assert proc.stdout.count("epoch 1/1") == 1
    assert len(metrics(tmp_path / "r")) == 1
    # The final test ran on both ranks, each on its shard of the odd-sized test set, and
    # gives exactly what a one-process `eval` of the checkpoint gives; said once.
    evaluated = evaluate_json(1, ["best", "--run-dir", str(tmp_path / "r")])
    final = s["final_test"]
    assert final["num_samples"] == evaluated["num_samples"] == N_TEST
    assert final["accuracy"] == evaluated["accuracy"]
    assert final["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    assert proc.stdout.count("\ntest: accuracy ") == 1
    events = list((tmp_path / "r" / "tensorboard").rglob("events.out.tfevents.*"))
    # events.out.tfevents.<time>.<host>.<pid>.<n> (the scalars and images) and
    # .<pid>.hparams (the HParams entry): all written by one process
    assert events and len({e.name.split(".")[-2] for e in events}) == 1


def test_unconnected_processes_are_refused(tmp_path):
    """A pitfall of docs/architecture.md: a plain Accelerator() (no cpu=True) under a
    2-process CPU launch gives two unconnected single-process runs. The toolkit must refuse,
    not train twice."""
    script = tmp_path / "plain.py"
    script.write_text(
        "import sys\n"
        "import fmnist_accel.cluster.accelerator as hardware\n"
        "from fmnist_accel.errors import UserError\n"
        "hardware.wants_cpu = lambda: False  # what a plain Accelerator() does\n"
        "try:\n"
        "    hardware.make_accelerator()\n"
        "    line = 'JOINED'\n"
        "except UserError as exc:\n"
        "    line = f'REFUSED: {exc}'\n"
        "sys.stdout.write(line + '\\n')  # one write: the two ranks share the pipe\n"
        "sys.stdout.flush()\n"
    )
    proc = run_command(launch_command(2, [str(script)]))
    assert proc.returncode == 0, why(proc)
    assert proc.stdout.count("REFUSED: the launcher started 2 processes") == 2, proc.stdout
    assert "JOINED" not in proc.stdout


@pytest.mark.parametrize("batch_size", [7, 64, 1024])
def test_eval_identical_on_1_2_3_processes(trained_run, batch_size):
    args = ["last", "--run-dir", str(trained_run), "--batch-size", str(batch_size)]
    results = [evaluate_json(n, args) for n in (1, 2, 3)]
    for r, n in zip(results, (1, 2, 3), strict=True):
        assert r["num_samples"] == N_TEST
        assert r["num_processes"] == n
    assert results[0]["accuracy"] == results[1]["accuracy"] == results[2]["accuracy"]
    assert (
        results[0]["confusion_matrix"]
        == results[1]["confusion_matrix"]
        == results[2]["confusion_matrix"]
    )
    for r in results[1:]:
        assert abs(r["loss"] - results[0]["loss"]) < 1e-6


def test_eval_of_the_validation_split_identical_on_1_and_3_processes(trained_run):
    """--split valid: every rank rebuilds the same seeded split and takes its own shard."""
    args = ["last", "--run-dir", str(trained_run), "--split", "valid", "--batch-size", "64"]
    one, three = (evaluate_json(n, args) for n in (1, 3))
    assert one["split"] == three["split"] == "valid"
    assert one["num_samples"] == three["num_samples"] > 0
    assert one["confusion_matrix"] == three["confusion_matrix"]
    assert abs(one["loss"] - three["loss"]) < 1e-6


def plateau_args(data_dir, out, name, *extra: str) -> list[str]:
    """A validation loss that plateaus from epoch 1 on: plain SGD with an lr so small (1e-6)
    that no later epoch improves it by ReduceLROnPlateau's relative threshold of 1e-4 (yet
    large enough that halving it is above the scheduler's eps of 1e-8)."""
    return ["--model", "mlp", "--optimizer", "sgd", "--momentum", "0", "--lr", "1e-6",
            "--batch-size", "50", "--plateau-patience", "1", "--plateau-factor", "0.5",
            *common(data_dir, out, name), *extra]  # fmt: skip


def test_plateau_lowers_lr_at_the_same_epoch_on_1_and_2_processes(data_dir, tmp_path):
    # patience 1: epochs 2 and 3 are bad, so the lr used from epoch 4 on is halved. A
    # scheduler stepped once per process (a prepared ReduceLROnPlateau) would halve it at
    # epoch 3 on 2 processes.
    expected = [1e-6, 1e-6, 1e-6, 5e-7, 5e-7]
    lrs = {}
    for n in (1, 2):
        proc = train(
            n, plateau_args(data_dir, tmp_path, f"p{n}", "--epochs", "5", "--no-early-stopping")
        )
        assert proc.returncode == 0, why(proc)
        lrs[n] = [m["lr"] for m in metrics(tmp_path / f"p{n}")]
        # The lr every rank holds at the end: epochs 4 and 5 were bad again, so halved twice.
        assert [r["lr"] for r in summary(tmp_path / f"p{n}")["ranks"]] == pytest.approx(
            [2.5e-7] * n
        )
    assert lrs[1] == pytest.approx(expected, rel=1e-9)
    assert lrs[2] == pytest.approx(expected, rel=1e-9)


def test_early_stopping_stops_every_rank_at_the_same_epoch(data_dir, tmp_path):
    # patience 2, min delta 1e-3: epochs 2, 3, 4 do not improve by that much; the 3rd bad
    # epoch in a row (epoch 4) stops.
    proc = train(
        2,
        plateau_args(
            data_dir,
            tmp_path,
            "es",
            "--epochs",
            "20",
            "--early-stopping-patience",
            "2",
            "--early-stopping-min-delta",
            "1e-3",
        ),
    )
    assert proc.returncode == 0, why(proc)
    s = summary(tmp_path / "es")
    assert s["status"] == "early-stopped"
    assert [r["epoch"] for r in s["ranks"]] == [4, 4]
    assert [r["early_stopping_bad_epochs"] for r in s["ranks"]] == [3, 3]
    assert [m["epoch"] for m in metrics(tmp_path / "es")] == [1, 2, 3, 4]


def test_one_and_two_processes_agree_at_the_same_global_batch(data_dir, tmp_path):
    """mlp (no dropout, no BatchNorm) at global batch 50: 1x50 vs 2x25. The same images
    make up every global step, so the runs differ only by floating-point summation order."""
    runs = {}
    for n, batch in ((1, 50), (2, 25)):
        args = ["--model", "mlp", "--epochs", "3", "--batch-size", str(batch),
                *common(data_dir, tmp_path, f"g{n}")]  # fmt: skip
        proc = train(n, args)
        assert proc.returncode == 0, why(proc)
        runs[n] = tmp_path / f"g{n}"
    m1, m2 = metrics(runs[1]), metrics(runs[2])
    assert [m["epoch"] for m in m1] == [m["epoch"] for m in m2] == [1, 2, 3]
    for a, b in zip(m1, m2, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
        assert a["valid_accuracy"] == pytest.approx(b["valid_accuracy"], abs=0.011)
    w1, w2 = load_file(runs[1] / "last.safetensors"), load_file(runs[2] / "last.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-3, atol=1e-4)


def test_two_machines_on_localhost_train_together(data_dir, tmp_path):
    port = free_port()
    env = process_env(ACCELERATE_USE_CPU="1")
    procs = []
    for machine_rank in (0, 1):
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_machines", "2",
               "--machine_rank", str(machine_rank), "--num_processes", "2",
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--rdzv_backend", "c10d", "-m", "fmnist_accel.train", "--model", "mlp",
               "--epochs", "2", *common(data_dir, tmp_path, "mm")]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
        if machine_rank == 0:
            # The head machine first, as on a cluster: on 127.0.0.1 either launcher could
            # host the rendezvous, and machine 0's launcher refuses a port already taken.
            wait_for_port(port, procs[0])
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "hardware: 2 processes on 2 machines, CPU (gloo)" in outs[0][0]
    s = summary(tmp_path / "mm")
    assert s["world_size"] == 2 and [r["epoch"] for r in s["ranks"]] == [2, 2]


def test_bad_data_stops_every_rank_with_one_error_line(tmp_path):
    data = write_fashion_dir(tmp_path / "data", n_train=100, n_test=20, gz=False)
    images = data / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    proc = train(2, ["--model", "mlp", *common(data, tmp_path / "out", "r")], timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "is truncated or corrupt" in errors[0], proc.stderr[-3000:]


def test_nonfinite_loss_on_one_rank_stops_all_ranks(data_dir, tmp_path):
    args = [
        "--model",
        "mlp",
        "--epochs",
        "3",
        "--batch-size",
        "10",
        *common(data_dir, tmp_path, "nan"),
    ]
    # 250 images per rank at batch 10: 25 steps per epoch; rank 1 turns NaN in epoch 2.
    proc = train(2, args, faults={"FAULT_NAN_RANK": "1", "FAULT_NAN_STEP": "30"}, timeout=180)
    assert proc.returncode != 0
    # Rank 1's NaN reaches rank 0 through the gradient all-reduce, so both may be named.
    assert re.search(r"non-finite on rank (0, )?1 in epoch 2", proc.stderr), proc.stderr
    s = summary(tmp_path / "nan")
    assert s["status"] == "diverged"
    assert [r["epoch"] for r in s["ranks"]] == [2, 2]
    assert [m["epoch"] for m in metrics(tmp_path / "nan")] == [1]


def test_stop_signal_to_one_rank_stops_all_and_resumes(data_dir, tmp_path):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    # batch 1: 250 steps of a few ms per epoch, time enough to signal in mid-run.
    args = [
        "--model",
        "mlp",
        "--epochs",
        "6",
        "--batch-size",
        "1",
        *common(data_dir, tmp_path, "sig"),
    ]
    env = process_env(FAULT_PID_DIR=str(pid_dir))
    proc = subprocess.Popen(launch_command(2, [str(HARNESS), *args]), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (tmp_path / "sig" / "metrics.jsonl").exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    os.kill(int((pid_dir / "rank1.pid").read_text()), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "rank 1: received SIGTERM" in err
    s = summary(tmp_path / "sig")
    assert s["status"] == "preempted"
    stopped_at = [m["epoch"] for m in metrics(tmp_path / "sig")]
    assert len(stopped_at) < 6

    resumed = train(2, [*args, "--resume", "auto"])
    assert resumed.returncode == 0, why(resumed)
    assert "resuming after epoch" in resumed.stdout
    assert [m["epoch"] for m in metrics(tmp_path / "sig")] == [1, 2, 3, 4, 5, 6]
    assert summary(tmp_path / "sig")["status"] == "completed"
