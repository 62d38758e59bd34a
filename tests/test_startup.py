"""`fmnist-accel --help` must stay fast: the command-line layer imports no torch (the time
itself is measured by benchmarks/benchmark.py, not asserted here)."""

import subprocess
import sys


def test_cli_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from fmnist_accel.cli import cli\n"
        "try:\n"
        "    cli.main(['--help'], standalone_mode=False)\n"
        "    cli.main(['train', '--help'], standalone_mode=False)\n"
        "finally:\n"
        "    heavy = ('torch', 'accelerate', 'torchvision')\n"
        "    heavy = sorted(m for m in heavy if m in sys.modules)\n"
        "    print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
