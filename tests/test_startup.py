"""`fmnist-accel --help` must stay fast: the command-line layer imports no torch, matplotlib
or tensorboard (the time itself is measured by benchmarks/benchmark.py, not asserted here).
`runs` reads run folders without them too: it is for a login node."""

import subprocess
import sys

HEAVY = ("torch", "accelerate", "torchvision", "matplotlib", "tensorboard")


def heavy_modules_after(calls: str) -> str:
    code = (
        "import sys\n"
        "from fmnist_accel.cli import cli\n"
        "try:\n"
        f"{calls}"
        "finally:\n"
        f"    heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "    print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cli_and_help_do_not_import_heavy_modules():
    helps = "".join(
        f"    cli.main({[*command, '--help']!r}, standalone_mode=False)\n"
        for command in ([], ["train"], ["eval"], ["predict"], ["export"], ["plot"], ["runs"])
    )
    assert "HEAVY []" in heavy_modules_after(helps)


def test_runs_imports_no_heavy_module(tiny_run):
    args = ["runs", "--output-dir", str(tiny_run.output_dir)]
    out = heavy_modules_after(f"    cli.main({args!r}, standalone_mode=False)\n")
    assert "tiny" in out and "completed" in out
    assert "HEAVY []" in out
