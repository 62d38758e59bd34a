"""What a new user meets first: a resumed run keeps its own precision and records the options
it changed; the README's main command uses the machine's cores; a launch leaves nothing
behind in the temp folder; the figures the README repeats agree with its tables."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from support.fakedata import TINY_RUN_ARGS
from support.processes import BIN, CLI, HARNESS, process_env, run_command

from fmnist_accel.cluster import restarts

REPO = Path(__file__).resolve().parents[1]
ONE_PROCESS = REPO / "launch_configs" / "one_process.yaml"


def test_a_resumed_run_keeps_its_own_precision_and_says_so(readonly_data, tmp_path):
    """A bf16 run stopped mid-epoch, resumed without --mixed-precision (and no launcher):
    it goes on in bf16 with one note, instead of refusing."""
    out = tmp_path / "runs"
    args = [*TINY_RUN_ARGS, "--data-dir", str(readonly_data.path), "--output-dir", str(out),
            "--run-name", "bf16", "--mixed-precision", "bf16"]  # fmt: skip
    stopped = run_command([sys.executable, str(HARNESS), *args], tmp_path,
                          env=process_env(FAULT_TERM_STEP="3"))  # fmt: skip
    assert stopped.rc == 75, str(stopped)
    resumed = run_command([CLI, "train", "--resume", out / "bf16"], tmp_path)
    assert resumed.rc == 0, str(resumed)
    assert "note: the run keeps its own mixed precision, bf16" in resumed.stdout
    assert json.loads((out / "bf16" / "summary.json").read_text())["mixed_precision"] == "bf16"
    # An explicit other choice is still refused... unless given as the option itself.
    again = run_command([CLI, "train", "--resume", out / "bf16", "--epochs", "3",
                         "--mixed-precision", "no"], tmp_path)  # fmt: skip
    assert again.rc == 0, str(again)
    assert json.loads((out / "bf16" / "summary.json").read_text())["mixed_precision"] == "no"


def test_a_resume_with_more_epochs_records_them(tiny_run, tmp_path):
    """config.json, `runs` and provenance.json say the run now trains for 3 epochs."""
    import shutil

    run = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_run.run_dir, run)
    more = run_command([CLI, "train", "--resume", run, "--epochs", "3",
                        "--data-dir", tiny_run.data_dir], tmp_path)  # fmt: skip
    assert more.rc == 0, str(more)
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
    listed = run_command([CLI, "runs", "--output-dir", run.parent, "--json"], tmp_path).json()
    assert (listed[0]["epochs"], listed[0]["max_epochs"]) == (3, 3)
    starts = json.loads((run / "provenance.json").read_text())["starts"]
    assert starts[-1]["changed"]["epochs"] == [2, 3], starts[-1]


@pytest.mark.slow
def test_the_main_command_uses_the_cores_not_the_launchers_one_thread(readonly_data, tmp_path):
    """`accelerate launch -q --config_file launch_configs/one_process.yaml` with no
    OMP_NUM_THREADS set: the launcher gives its process 1 thread; the run takes the cores
    available to it, says so, and prints nothing of the launcher's own."""
    env = process_env()
    env.pop("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file",
              str(REPO / "launch_configs" / "one_process.yaml"), "-m", "fmnist_accel.train",
              *TINY_RUN_ARGS, "--epochs", "1", "--data-dir", str(readonly_data.path),
              "--output-dir", str(tmp_path / "runs")]  # fmt: skip
    result = run_command(launch, tmp_path, env=env)
    assert result.rc == 0, str(result)
    threads = re.search(r"hardware: 1 process, CPU, (\d+) thread", result.stdout)
    assert threads and int(threads[1]) == cores, result.stdout
    if cores > 1:
        assert f"note: {cores} CPU threads per process" in result.stdout
    assert "were not passed" not in result.stdout + result.stderr
    # The user's own choice wins.
    env["OMP_NUM_THREADS"] = "1"
    chosen = run_command(launch, tmp_path, env=env)
    assert chosen.rc == 0 and "1 thread;" in chosen.stdout, str(chosen)


def test_launch_records_are_not_written_by_an_orphan_and_go_when_the_run_ends(
    tmp_path, monkeypatch
):
    """Keyed on the launcher's pid: an orphaned worker (its parent now pid 1) writes none, and
    a run that ended as planned removes its launch's records."""
    monkeypatch.setattr(restarts.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    restarts.remember_run_dir("runs/x")
    restarts.remember_deliberate_exit(2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert [n.rsplit(".", 1)[1] for n in names] == ["exit", "run"], names
    restarts.forget_launch()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(restarts.os, "getppid", lambda: 1)
    restarts.remember_deliberate_exit(2)
    assert list(tmp_path.iterdir()) == []
    # An old record under pid 1 (from a version before this one) is cleaned up too.
    stale = tmp_path / f"{restarts.RECORD_PREFIX}1-26.exit"
    stale.write_text("2")
    restarts._remove_records_of_ended_launches()
    assert not stale.exists()


def table_accuracies(readme: str, recipe: str) -> list[str]:
    """The test accuracies the README's results table gives the recipe's 2-core CPU row."""
    for line in readme.splitlines():
        if line.startswith("|") and f"--recipe {recipe} " in line and "2-core CPU" in line:
            test_cell = line.strip("|").split(" | ")[-2]
            return re.findall(r"0\.\d{4}", test_cell)
    raise AssertionError(f"no 2-core CPU row for --recipe {recipe} in the results table")


def test_every_figure_the_readme_repeats_agrees_with_its_table():
    """The "Fast." summary repeats the table's per-seed accuracies: they must be the same."""
    readme = (REPO / "README.md").read_text()
    summary = readme[readme.index("- **Fast.**") :].split("\n## ")[0]
    claims = re.findall(r"`--recipe ([a-z-]+)` reaches ((?:0\.\d{4}(?:,\s+|\s+and\s+)?)+)", summary)
    assert {recipe for recipe, _ in claims} == {"fast", "accurate", "accurate-long"}, claims
    for recipe, accuracies in claims:
        said = re.findall(r"0\.\d{4}", accuracies)
        assert len(said) == 3 and said == table_accuracies(readme, recipe), recipe


@pytest.mark.parametrize(
    "flags, recipe, given, launcher, expected",
    [
        ("fpu avx2 amx_bf16 amx_tile", "fast", None, None, "bf16"),
        ("fpu avx512f avx512_bf16", "accurate-long", None, None, "bf16"),
        ("fpu avx2", "accurate", None, None, "no"),
        ("fpu avx2 amx_bf16", "fast", "no", None, None),  # the user's choice wins
        ("fpu avx2 amx_bf16", "fast", None, "fp16", None),  # so does the launcher's
        # ... but not its "no", which accelerate launch passes when nobody chose
        ("fpu avx2 amx_bf16", "fast", None, "no", "bf16"),
        ("fpu avx2 amx_bf16", "default", None, None, None),  # only the CPU speed recipes
    ],
)
def test_a_cpu_recipe_picks_bf16_only_where_the_cpu_has_bf16_instructions(
    monkeypatch, flags, recipe, given, launcher, expected
):
    from fmnist_accel.cluster import accelerator

    monkeypatch.setenv(accelerator.CPU_FLAGS_VARIABLE, flags)
    monkeypatch.setattr(accelerator, "wants_cpu", lambda: True)
    if launcher:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    from fmnist_accel.recipes import CPU_PRECISION_RECIPES

    chosen = accelerator.cpu_precision(given) if recipe in CPU_PRECISION_RECIPES else None
    assert (chosen[0] if chosen else None) == expected, chosen
    if expected == "bf16":
        assert "this CPU has a" in chosen[1], chosen  # names amx_bf16 / avx512_bf16


def test_the_hardware_lines_say_which_precision_and_why(readonly_data, tmp_path):
    """On a CPU faked without bf16 instructions: --recipe fast trains in fp32 and says why;
    --mixed-precision bf16 there is one note that it is slower than fp32."""
    data, out = str(readonly_data.path), str(tmp_path / "runs")
    base = ["--recipe", "fast", "--model", "mlp", "--epochs", "1", "--batch-size", "64",
            "--data-dir", data, "--output-dir", out]  # fmt: skip
    env = process_env(FMNIST_ACCEL_CPU_FLAGS="fpu sse2 avx2")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    plain = run_command([CLI, "train", *base], tmp_path, env=env)
    assert plain.rc == 0, str(plain)
    assert "hardware: 1 process, CPU, 1 thread; fp32" in plain.stdout, plain.stdout
    assert "precision: fp32 chosen by --recipe fast: this CPU has no bf16 instructions" in (
        plain.stdout
    )
    # The README's main command: accelerate launch passes its config's "no", nobody's choice
    amx = process_env(FMNIST_ACCEL_CPU_FLAGS="fpu avx2 amx_bf16")
    launched = run_command(
        [BIN / "accelerate", "launch", "-q", "--config_file", ONE_PROCESS,
         "-m", "fmnist_accel.train", *base],
        tmp_path, env=amx,
    )  # fmt: skip
    assert launched.rc == 0, str(launched)
    assert "precision: bf16 chosen by --recipe fast: this CPU has amx_bf16" in launched.stdout
    assert "; bf16 mixed precision" in launched.stdout, launched.stdout
    forced = run_command([CLI, "train", *base, "--mixed-precision", "bf16"], tmp_path, env=env)
    assert forced.rc == 0, str(forced)
    notes = [line for line in forced.stdout.splitlines() if "bf16 is emulated" in line]
    assert len(notes) == 1 and "slower than fp32" in notes[0], forced.stdout


def test_a_run_without_validation_ends_with_its_training_time(readonly_data, tmp_path):
    """--valid-size 0 (no best checkpoint): the last line still gives the training time (a
    format of the missing best metric once raised a TypeError there). A damaged
    provenance.json does not stop a resume: it says so and starts a new record."""
    args = ["--recipe", "fast", "--model", "mlp", "--epochs", "2", "--batch-size", "64",
            "--data-dir", str(readonly_data.path), "--output-dir", str(tmp_path / "runs"),
            "--run-name", "all60k", "--mixed-precision", "no"]  # fmt: skip
    stopped = run_command([sys.executable, str(HARNESS), *args], tmp_path,
                          env=process_env(FAULT_TERM_STEP="2"))  # fmt: skip
    assert stopped.rc == 75, str(stopped)
    run = tmp_path / "runs" / "all60k"
    (run / "provenance.json").write_text("{not json")
    result = run_command([CLI, "train", "--resume", run], tmp_path)
    assert result.rc == 0, str(result)
    last = result.stdout.strip().splitlines()[-1]
    done = r"done: completed after [\d.]+ s of training; checkpoints in \S+"
    assert re.fullmatch(done, last), last
    assert "provenance.json was unreadable: its record starts again here" in result.stdout
    assert len(json.loads((run / "provenance.json").read_text())["starts"]) == 1


def test_a_run_name_taken_by_a_file_is_refused(readonly_data, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "taken").write_text("a file of the user's")
    result = run_command([CLI, "train", *TINY_RUN_ARGS, "--data-dir", readonly_data.path,
                          "--output-dir", out, "--run-name", "taken"], tmp_path)  # fmt: skip
    assert result.rc == 2 and "taken is a file, not a folder" in result.stderr, str(result)
    assert (out / "taken").read_text() == "a file of the user's"
