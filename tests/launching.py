"""Start real training/eval processes for tests: one process, or N gloo ranks through
`accelerate launch` with the repository's own CPU launch config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CPU_MULTI_CONFIG = REPO / "launch_configs" / "cpu_2proc.yaml"
FAULTS = REPO / "tests" / "faults.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until something listens on 127.0.0.1:port (a launcher's rendezvous), while proc runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def launch_command(
    nproc: int, target: list[str], port: int | None = None, max_restarts: int | None = None
) -> list[str]:
    """`accelerate launch` of `target` (['-m', module, ...] or [script, ...]) on nproc CPU ranks
    (with max_restarts: torchrun restarts the group that many times when a process fails)."""
    if nproc == 1:
        return [sys.executable, *target]
    restarts = [] if max_restarts is None else ["--max_restarts", str(max_restarts)]
    return [
        str(BIN / "accelerate"), "launch",
        "--config_file", str(CPU_MULTI_CONFIG),
        "--num_processes", str(nproc),
        "--main_process_port", str(port or free_port()),
        *restarts,
        *target,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 300, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=cwd
    )


def train(nproc: int, args: list[str], *, faults: dict | None = None, timeout: float = 300):
    target = [str(FAULTS), *args] if faults is not None else ["-m", "fmnist_accel.train", *args]
    return run(launch_command(nproc, target), timeout=timeout, env=child_env(**(faults or {})))


def evaluate_json(nproc: int, args: list[str], timeout: float = 300) -> dict:
    proc = run(launch_command(nproc, ["-m", "fmnist_accel", "eval", "--json", *args]), timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # printed once, by the main process only
    return json.loads(lines[0])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# metrics.jsonl fields that differ between two runs of the same training: wall-clock times
TIMING = {"train_time", "images_per_sec", "epoch_time", "elapsed"}


def assert_same_training(run: Path, reference: Path, epochs: int) -> None:
    """Two runs trained alike: metrics.jsonl (all but the timings) and the tensors of every
    checkpoint the reference has (best and last, or last alone), bit for bit."""
    from safetensors.torch import load_file

    got, want = metrics(run), metrics(reference)
    assert [r["epoch"] for r in got] == list(range(1, epochs + 1))
    for a, b in zip(got, want, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING
        }
    names = [n for n in ("best", "last") if (reference / f"{n}.safetensors").exists()]
    assert "last" in names
    for name in names:
        a, b = load_file(run / f"{name}.safetensors"), load_file(reference / f"{name}.safetensors")
        assert a.keys() == b.keys(), name
        for key in a:
            assert a[key].equal(b[key]), f"{name}: {key} differs"


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def why(proc) -> str:
    """The informative part of a failed launch's output (the ranks' own messages, not the
    launcher's traceback that follows them)."""
    text = proc.stdout[-2000:] + "\n" + proc.stderr
    cut = text.find('Traceback (most recent call last):\n  File "' + str(BIN))
    return text[: cut if cut > 0 else None][-4000:]
