"""Shared fixtures: fake data folders, the real CLI in a subprocess, one tiny trained run.

Every command runs the installed `fmnist-accel` (or `python -m ...`) of the interpreter that
runs pytest, in a temporary folder, through tests/support/processes.py: no test can reach or
wait for the network, and none writes into the repository.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.fakedata import N_TEST, N_TRAIN, TINY_RUN_ARGS, write_fashion_dir
from support.files import file_digests, listing, make_read_only, make_writable
from support.processes import CLI, Result, run_command


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


@pytest.fixture(scope="session")
def weak_run(readonly_data, tmp_path_factory) -> Path:
    """One epoch at a learning rate too small to learn: a checkpoint that makes mistakes."""
    base = tmp_path_factory.mktemp("weak")
    args = [*TINY_RUN_ARGS, "--epochs", "1", "--lr", "1e-6", "--run-name", "weak"]
    result = run_command(
        [CLI, "train", *args, "--data-dir", readonly_data.path, "--output-dir", base / "runs"],
        cwd=base,
    )
    if result.rc != 0:
        pytest.fail(f"the weak training run failed\n{result}")
    return base / "runs" / "weak"
