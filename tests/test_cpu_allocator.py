"""The glibc setting that keeps large CPU tensors' memory in the heap between steps."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from fmnist_accel.cluster.accelerator import USER_MALLOC_SETTINGS

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

# Allocates and frees a 64 MiB tensor (above glibc's largest default mmap threshold) ten
# times, touching every page, and prints the minor page faults that cost. Warm-up first: the
# heap grows for the first few tensors (a 64-byte aligned request does not fit the chunk the
# previous one freed) until freed chunks have coalesced; a training step repeats its
# allocations thousands of times.
FAULTS = """
import resource, sys, torch
from fmnist_accel.cluster.accelerator import keep_large_allocations_in_heap
print("TUNED", keep_large_allocations_in_heap() if sys.argv[1] == "tune" else "no")
for _ in range(20):
    torch.ones(1 << 24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(1 << 24)
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    if env is None:  # the test process may have any of these: the child must not
        env = {k: v for k, v in os.environ.items() if k not in USER_MALLOC_SETTINGS}
    proc = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, check=True
    )
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    return lines["TUNED"], int(lines["FAULTS"])


def test_large_tensors_reuse_heap_memory_instead_of_faulting_in_fresh_pages():
    threshold, faults_tuned = page_faults("tune")
    untuned, faults_plain = page_faults("plain")
    assert untuned == "no" and int(threshold) > 0
    if int(threshold) < 64 << 20:
        pytest.skip(f"this glibc took a {threshold}-byte threshold only: 64 MiB stays mmapped")
    # Plain glibc maps 64 MiB afresh each time: 16k faults of 4 KiB pages per tensor.
    assert faults_plain > 10 * 10_000
    assert faults_tuned < faults_plain / 20


def test_a_user_malloc_setting_is_left_alone():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    threshold, _ = page_faults("tune", env)
    assert threshold == "0"
