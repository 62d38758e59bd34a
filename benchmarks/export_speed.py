"""Inference speed of an exported model: onnxruntime against PyTorch eager on the CPU, side by
side in one run.

    python benchmarks/export_speed.py                       # cnn-bn and airbench-s, batch 1 and 256
    python benchmarks/export_speed.py --models mlp --seconds 5 --threads 1

For each model, the graph `fmnist-accel export` writes (commands/export.py: uint8 images in,
the normalisation and the model in eval mode, logits out; randomly initialised weights, which
cost what trained ones cost) is run by onnxruntime (CPU, its default graph optimisations) and
by PyTorch eager (under torch.inference_mode; contiguous tensors as `predict` feeds them, and
channels-last as `eval` feeds them), with the same number of threads. The three take turns,
ROUNDS times, for SECONDS each turn, so a neighbour's load falls on all of them alike; the
figure is the median of the rounds, in images per second. The load average before and after,
and the CPU time the other processes of the machine used during the run (from /proc/stat), are
printed, to show whether the machine was quiet.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from fmnist_accel.commands.export import DeployedModel, build_onnx
from fmnist_accel.commands.onnx_model import open_onnx_model
from fmnist_accel.engine.models import build_model

ROUNDS = 5


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes have been busy, CPU seconds of this process) from /proc
    (Linux), or None: their difference over the run is what the rest of the machine used."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    ours = os.times()
    return (user + nice + system + irq + softirq + steal) / ticks, ours.user + ours.system


def images_per_second(run, batch: int, seconds: float) -> float:
    """Calls of run() for about `seconds` (after one warm-up call) -> images per second."""
    run()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch / elapsed


def measure(name: str, batches: list[int], seconds: float, threads: int) -> list[dict]:
    torch.manual_seed(0)
    deployed = DeployedModel(build_model(name), tta=False)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{name}.onnx"
        path.write_bytes(build_onnx(deployed, None).SerializeToString())
        classifier = open_onnx_model(str(path), threads=threads, check_ours=False)
        size = path.stat().st_size
    channels_last = DeployedModel(build_model(name), tta=False)
    channels_last.load_state_dict(deployed.state_dict())
    channels_last = channels_last.to(memory_format=torch.channels_last)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(batch)
        images = torch.randint(0, 256, (batch, 1, 28, 28), generator=g, dtype=torch.uint8)
        array = images.numpy()
        session = classifier.session

        def ort_run(array=array, session=session):
            session.run(["logits"], {"images": array})

        def eager(images=images):
            with torch.inference_mode():
                deployed(images)

        def eager_cl(images=images):
            with torch.inference_mode():
                channels_last(images.contiguous(memory_format=torch.channels_last))

        with torch.inference_mode():
            reference = deployed(images).numpy()
        difference = float(np.abs(classifier.logits(array) - reference).max())
        figures = {"onnxruntime": [], "eager": [], "eager channels-last": []}
        for _ in range(ROUNDS):
            figures["onnxruntime"].append(images_per_second(ort_run, batch, seconds))
            figures["eager"].append(images_per_second(eager, batch, seconds))
            figures["eager channels-last"].append(images_per_second(eager_cl, batch, seconds))
        row = {k: statistics.median(v) for k, v in figures.items()}
        row.update(model=name, batch=batch, size=size, difference=difference)
        rows.append(row)
        print(
            f"  {name} batch {batch}: onnxruntime {row['onnxruntime']:,.0f} img/s, eager "
            f"{row['eager']:,.0f}, eager channels-last {row['eager channels-last']:,.0f} "
            f"(largest logit difference {difference:.1e})",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn-bn,airbench-s")
    parser.add_argument("--batches", default="1,256")
    parser.add_argument("--seconds", type=float, default=2.0, help="per turn [2]")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of both [torch's default]"
    )
    args = parser.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cpu = platform.processor() or platform.machine()
    print(
        f"CPU {cpu}, {os.cpu_count()} cores, {threads} threads for each; torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}; {ROUNDS} rounds of "
        f"{args.seconds:g} s per figure, median"
    )
    load_before = os.getloadavg()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)}", flush=True)
    busy_before, started = busy_seconds(), time.perf_counter()
    rows = []
    for name in args.models.split(","):
        rows += measure(name, [int(b) for b in args.batches.split(",")], args.seconds, threads)
    load_after = os.getloadavg()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")
    busy_after, wall = busy_seconds(), time.perf_counter() - started
    if busy_before and busy_after:
        others = (busy_after[0] - busy_before[0]) - (busy_after[1] - busy_before[1])
        print(
            f"other processes used {max(0.0, others):.1f} CPU seconds in the {wall:.0f} s of "
            f"the run ({max(0.0, others) / wall:.0%} of one core on average)"
        )
    print()
    print("| model | batch | onnxruntime img/s | PyTorch eager img/s | ratio | eager channels-last "
          "img/s | ratio |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['model']} | {r['batch']} | {r['onnxruntime']:,.0f} | {r['eager']:,.0f} | "
            f"{r['onnxruntime'] / r['eager']:.2f}x | {r['eager channels-last']:,.0f} | "
            f"{r['onnxruntime'] / r['eager channels-last']:.2f}x |"
        )


if __name__ == "__main__":
    main()
