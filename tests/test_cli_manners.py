"""How the command line behaves at its edges: a bare command, a closed pipe."""

from __future__ import annotations

import signal
import subprocess

import pytest
from support.processes import BIN, CLI, REPO, process_env, run_command


def test_bare_command_shows_its_help(cli):
    """`fmnist-accel` alone prints the same help as --help: exit 0, nothing on stderr."""
    bare = cli()
    assert bare.rc == 0 and bare.stderr == "", str(bare)
    assert bare.stdout.startswith("Usage: fmnist-accel [OPTIONS] COMMAND [ARGS]...")
    assert "error" not in bare.stdout.lower()
    assert bare.stdout == cli("--help").stdout


def run_into_closed_pipe(args: list, cwd) -> tuple[int, str]:
    """Run the CLI with its stdout a pipe whose reader has gone, as `... | head -1` leaves it
    once head has its line. Returns (exit status, stderr)."""
    proc = subprocess.Popen(
        [str(CLI), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        env=process_env(),
        text=True,
    )
    proc.stdout.close()  # long before the interpreter has started and written anything
    stderr = proc.stderr.read()
    return proc.wait(timeout=180), stderr


@pytest.mark.parametrize(
    "args",
    [["--help"], ["train", "--help"], ["eval", "best"], ["predict", "best", "--index", "1"]],
    ids=["help", "train-help", "eval", "predict"],
)
def test_closed_pipe_ends_quietly_like_other_tools(args, tiny_run, tmp_path):
    """No traceback, no message, and the status of a process ended by SIGPIPE (the shell's
    141), as `seq 1000000 | head -1` ends seq."""
    if args[0] in ("eval", "predict"):
        args = [*args, "--run-dir", tiny_run.run_dir]
    status, stderr = run_into_closed_pipe(args, tmp_path)
    assert stderr == ""
    assert status == -signal.SIGPIPE


def test_the_one_process_launch_config_needs_no_accelerate_config_and_is_quiet(tmp_path):
    """`accelerate launch -q --config_file launch_configs/one_process.yaml`, with no
    accelerate config of the user's: the run's one error line is all there is on stderr (no
    "values were not passed" warning, no threads note, no launcher traceback)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = process_env(HF_HOME=str(tmp_path / "no-accelerate-config"))
    env.pop("OMP_NUM_THREADS")  # as a user's shell has it: a CPU config would make a note
    res = run_command(
        [
            BIN / "accelerate", "launch", "-q",
            "--config_file", REPO / "launch_configs" / "one_process.yaml",
            "-m", "fmnist_accel.train", "--data-dir", empty,
        ],
        cwd=tmp_path,
        env=env,
    )  # fmt: skip
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(res)
    assert lines[0].startswith("python -m fmnist_accel.train: error: Fashion-MNIST files missing")
    assert res.rc == 1  # the launcher's status for any failed run (the run itself exits 2)
