"""Shared fixtures: fake data folders, the real CLI in a subprocess, one tiny trained run.

Every command runs the installed `fmnist-accel` (or `python -m ...`) of the interpreter that
runs pytest, in a temporary folder, with proxies pointing at a closed local port: no test can
reach or wait for the network, and none writes into the repository.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from fakedata import write_fashion_dir

BIN = Path(sys.executable).parent
CLI = BIN / "fmnist-accel"

# Sizes of the fake data: tiny, so a training epoch of the MLP takes a fraction of a second.
N_TRAIN = 200
N_TEST = 100
# What the tiny run trains: 2 epochs of the MLP.
TINY_RUN_ARGS = ("--model", "mlp", "--epochs", "2", "--batch-size", "32", "--seed", "0")

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


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = DEAD_PROXY
    env["no_proxy"] = env["NO_PROXY"] = ""
    # One thread: the machine is small and shared; two spinning threads per process are
    # many times slower than one when another job holds a core.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str

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
    args: list[str], cwd: Path, timeout: float = 180, env: dict | None = None
) -> Result:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return Result([str(a) for a in args], proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def cli(tmp_path):
    """cli(*args, cwd=None, module=None, env=None) -> Result.

    Runs `fmnist-accel ARGS` (or `python -m MODULE ARGS`) in a subprocess, by default in the
    test's tmp_path.
    """

    def call(*args, cwd: Path | None = None, module: str | None = None, env=None, timeout=180):
        head = [sys.executable, "-m", module] if module else [str(CLI)]
        return run_command([*head, *args], cwd or tmp_path, timeout=timeout, env=env)

    return call


def one_line(exc_info) -> str:
    """The message of a raised UserError (pytest.raises' exc_info), checked to be one line."""
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


def assert_one_line_error(result: Result, *fragments: str, rc: int = 2) -> str:
    """A non-zero exit `rc`, exactly one non-empty line on stderr, no traceback anywhere,
    and that line contains every fragment. Returns the line."""
    assert result.rc == rc, str(result)
    assert "Traceback" not in result.stderr + result.stdout, str(result)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected exactly one line on stderr\n{result}"
    line = lines[0]
    assert line.startswith("fmnist-accel: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def file_digests(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every regular file under root."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def listing(root: Path) -> dict[str, tuple]:
    """Relative path -> (kind, size, mtime_ns, mode) of everything under root, root included."""
    root = Path(root)
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (
            "dir" if p.is_dir() else "file",
            st.st_size if p.is_file() else 0,
            st.st_mtime_ns,
            stat.S_IMODE(st.st_mode),
        )
    return out


def make_read_only(root: Path) -> None:
    for p in sorted(Path(root).rglob("*"), reverse=True):
        p.chmod(0o555 if p.is_dir() else 0o444)
    Path(root).chmod(0o555)


def make_writable(root: Path) -> None:
    Path(root).chmod(0o755)
    for p in sorted(Path(root).rglob("*")):
        p.chmod(0o755 if p.is_dir() else 0o644)


@pytest.fixture
def fresh_data_dir(tmp_path) -> Path:
    """A writable fake Fashion-MNIST folder (gzipped files) of this test's own."""
    return write_fashion_dir(tmp_path / "data", N_TRAIN, N_TEST, gz=True)


@dataclass
class ReadOnlyData:
    path: Path
    listing_before: dict


@pytest.fixture(scope="session")
def readonly_data(tmp_path_factory):
    """A fake data folder made read-only (folders 0555, files 0444) before any use, and its
    listing at that moment: tests compare it after the tools have read the folder."""
    root = write_fashion_dir(tmp_path_factory.mktemp("ro") / "data", N_TRAIN, N_TEST, gz=True)
    make_read_only(root)
    data = ReadOnlyData(root, listing(root))
    yield data
    make_writable(root)


@dataclass
class TinyRun:
    run_dir: Path
    output_dir: Path
    data_dir: Path
    result: Result
    digests: dict  # file digests of the run folder right after training


@pytest.fixture(scope="session")
def tiny_run(readonly_data, tmp_path_factory) -> TinyRun:
    """`fmnist-accel train` of a 2-epoch MLP on the read-only fake data, once per session.

    Tests that use it must only read it; to damage or extend a run, copy it first.
    """
    base = tmp_path_factory.mktemp("tiny")
    output_dir = base / "runs"
    result = run_command(
        [
            CLI,
            "train",
            *TINY_RUN_ARGS,
            "--data-dir",
            readonly_data.path,
            "--output-dir",
            output_dir,
            "--run-name",
            "tiny",
        ],
        cwd=base,
    )
    if result.rc != 0:
        pytest.fail(f"the tiny training run failed\n{result}")
    run_dir = output_dir / "tiny"
    return TinyRun(run_dir, output_dir, readonly_data.path, result, file_digests(run_dir))
