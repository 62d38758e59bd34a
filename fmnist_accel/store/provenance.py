"""Where each start of a run came from: the code it ran (git commit, dirty or not, the
package version), the SLURM job and sweep it belonged to, the machine. provenance.json keeps
one entry per start, so a run requeued five times shows its five jobs, and a start that runs
other code than the run's first start says so.

No torch: `runs` reads it on a login node.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
from pathlib import Path

from .layout import Start

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding fmnist_accel/


def code_version(root: Path = PACKAGE_ROOT) -> dict:
    """{"version", "commit", "dirty", "changes"}: commit and dirty are None when the code is
    not a git checkout (an installed wheel) or git is missing; dirty means tracked files
    differ from the commit (untracked files, such as run folders, do not count), and changes
    is a hash of that difference, so that two dirty starts with other edits differ."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        package_version = version("fmnist-accel")
    except PackageNotFoundError:
        package_version = None
    code = {"version": package_version, "commit": None, "dirty": None, "changes": None}
    if not (root / ".git").exists():
        return code
    git = ["git", "-C", str(root), "-c", "safe.directory=*"]
    try:
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return code
        diff = subprocess.run([*git, "diff", "HEAD"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return code
    code["commit"] = commit.stdout.strip()
    if diff.returncode == 0:
        code["dirty"] = bool(diff.stdout)
        code["changes"] = hashlib.sha256(diff.stdout).hexdigest()[:16] if diff.stdout else None
    return code


def slurm_job(environ=os.environ) -> str | None:
    """The SLURM job as `squeue` and `sacct` name it: 1234, or 1230_4 for an array task."""
    array, task = environ.get("SLURM_ARRAY_JOB_ID"), environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return environ.get("SLURM_JOB_ID") or None


def this_start(environ=os.environ) -> Start:
    return {
        "time": time.time(),
        "host": socket.gethostname(),
        "code": code_version(),
        "slurm_job": slurm_job(environ),
        "sweep": environ.get("FMNIST_SWEEP") or None,
    }


def describe_code(code: dict) -> str:
    if not code.get("commit"):
        return f"version {code.get('version')} (not a git checkout)"
    if not code.get("dirty"):
        return code["commit"][:12]
    return f"{code['commit'][:12]} with uncommitted changes ({code.get('changes')})"


def code_change_note(first: Start | None, now: Start) -> str | None:
    """One line when this start runs other code than the run's first start, else None."""
    if not isinstance(first, dict) or not isinstance(first.get("code"), dict):
        return None
    before, after = first["code"], now["code"]
    keys = ("commit", "changes") if before.get("commit") or after.get("commit") else ("version",)
    if all(before.get(k) == after.get(k) for k in keys):
        return None
    return (
        f"note: this run started with code {describe_code(before)}; this start runs "
        f"{describe_code(after)}"
    )
