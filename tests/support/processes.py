"""One way to start a process in the tests, with one environment.

Every process a test starts (`fmnist-accel`, `python -m ...`, N gloo ranks through `accelerate
launch` with the repository's own CPU launch config, the fault harness) gets process_env(): the
launcher variables of whatever runs pytest removed, proxies pointing at a closed local port
(no test can reach or wait for the network), one CPU thread per process, unbuffered output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CLI = BIN / "fmnist-accel"
CPU_MULTI_CONFIG = REPO / "launch_configs" / "cpu_2proc.yaml"
HARNESS = REPO / "tests" / "support" / "harness.py"  # faults put in from outside

# A closed port: any HTTP(S) request fails at once with "connection refused".
DEAD_PROXY = "http://127.0.0.1:9"
# Variables a multi-process launcher sets; a test run started under one must not leak them.
LAUNCHER_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "ACCELERATE_USE_CPU",
    "ACCELERATE_MIXED_PRECISION",
)


def process_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts; `extra` added last."""
    values = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        values[name] = values[name.upper()] = DEAD_PROXY
    values["no_proxy"] = values["NO_PROXY"] = ""
    # One thread: the machine is small and shared; two spinning threads per process are
    # many times slower than one when another job holds a core.
    values.setdefault("OMP_NUM_THREADS", "1")
    values["PYTHONUNBUFFERED"] = "1"
    values.update(extra)
    return values


@dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str

    @property
    def returncode(self) -> int:
        return self.rc

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nrc={self.rc}\n--- stdout\n{self.stdout}"
            f"\n--- stderr\n{self.stderr}"
        )

    def json(self) -> dict:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one JSON line on stdout\n{self}"
        return json.loads(lines[0])


def run_command(
    args: list, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
) -> Result:
    """Run a command to its end (stdin closed, output captured) with process_env()."""
    args = [str(a) for a in args]
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=env if env is not None else process_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result(args, proc.returncode, proc.stdout, proc.stderr)


def start(args: list, env: dict | None = None, **popen) -> subprocess.Popen:
    """Start a command and return at once (for signals and kills), with process_env()."""
    popen.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(
        [str(a) for a in args], env=env if env is not None else process_env(), **popen
    )


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


def train(nproc: int, args: list[str], *, faults: dict | None = None, timeout: float = 300):
    """A training run on nproc processes; with faults, through the fault harness."""
    target = [str(HARNESS), *args] if faults is not None else ["-m", "fmnist_accel.train", *args]
    return run_command(
        launch_command(nproc, target), timeout=timeout, env=process_env(**(faults or {}))
    )


def evaluate_json(nproc: int, args: list[str], timeout: float = 300) -> dict:
    proc = run_command(launch_command(nproc, ["-m", "fmnist_accel", "eval", "--json", *args]),
                       timeout=timeout)  # fmt: skip
    assert proc.rc == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # printed once, by the main process only
    return json.loads(lines[0])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_training(run: Path, reference: Path, epochs: int) -> None:
    """Two runs trained alike: metrics.jsonl (all but the timings) and the tensors of every
    checkpoint the reference has (best and last, or last alone), bit for bit."""
    from safetensors.torch import load_file

    from fmnist_accel.store.layout import TIMING_FIELDS

    got, want = metrics(run), metrics(reference)
    assert [r["epoch"] for r in got] == list(range(1, epochs + 1))
    for a, b in zip(got, want, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING_FIELDS} == {
            k: v for k, v in b.items() if k not in TIMING_FIELDS
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
