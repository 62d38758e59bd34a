"""Speed of the toolkit against the seed's own loop, on the same device in the same run.

    python benchmarks/benchmark.py --data-dir ../shared/data                # CPU or one GPU
    python benchmarks/benchmark.py --data-dir ../shared/data --accuracy     # + time to 0.92/0.93

Prints images/s of the seed's loop (benchmarks/seed_loop.py: batch 16, a DataLoader over PIL
transforms, `.item()` every step) and of the toolkit's loop (`python -m fmnist_accel.train`,
read back from its metrics.jsonl), and their ratio, for each model. With --accuracy it also
trains cnn-bn to the end with the toolkit's defaults and with the seed's loop (within a time
budget), evaluating the test set after every epoch (not timed), and reports the training time
to reach 0.92 and 0.93 test accuracy. Results go to OUT/benchmark.json and OUT/benchmark.md.

Figures are ratios measured side by side in one run: the machine may be shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fmnist_accel.store.run_folder import MetricsLog

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_loop import SeedRun  # noqa: E402

TARGETS = (0.92, 0.93)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def toolkit_configs(device: torch.device) -> list[tuple[str, list[str]]]:
    """The toolkit settings measured on this device: its defaults, and its fastest."""
    if device.type == "cuda":
        return [
            ("defaults, bf16", ["--mixed-precision", "bf16"]),
            (
                "batch 2048, bf16, compile",
                ["--batch-size", "2048", "--mixed-precision", "bf16", "--compile"],
            ),
        ]
    # On a CPU, smaller batches run faster per image (they stay in cache): 128 is the
    # fastest fp32 setting measured on the 2-core machine; the defaults suit GPUs.
    return [
        ("defaults (batch 512, fp32)", []),
        ("batch 128, fp32", ["--batch-size", "128"]),
        ("bf16", ["--mixed-precision", "bf16"]),
        ("batch 1024, bf16", ["--batch-size", "1024", "--mixed-precision", "bf16"]),
    ]


def run_toolkit(args: list[str], data_dir: str, workdir: Path, name: str) -> dict:
    """One `python -m fmnist_accel.train` process; its metrics, wall time and start-up."""
    cmd = [sys.executable, "-m", "fmnist_accel.train", "--data-dir", data_dir,
           "--output-dir", str(workdir), "--run-name", name, *args]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    startup = re.search(r"first training step done ([\d.]+) s", proc.stdout)
    return {
        "command": "python -m fmnist_accel.train " + " ".join(args),
        "run_dir": workdir / name,
        "stdout": proc.stdout,
        "records": MetricsLog(workdir / name).read(),
        "wall_seconds": wall,
        "startup_seconds": float(startup.group(1)) if startup else None,
    }


def toolkit_throughput(
    model: str, extra: list[str], data_dir: str, workdir: Path, epochs: int
) -> dict:
    run = run_toolkit(
        ["--model", model, "--epochs", str(epochs), "--no-early-stopping", *extra],
        data_dir, workdir, f"speed-{model}-{abs(hash(tuple(extra)))}",
    )  # fmt: skip
    # The first epoch pays for warm-up (and compilation): measure the others.
    rates = [r["images_per_sec"] for r in run["records"][1:]] or [
        run["records"][0]["images_per_sec"]
    ]
    return {"images_per_sec": statistics.median(rates), "epochs_measured": len(rates), **run}


def seed_throughput(model: str, data_dir: str, device: torch.device, seconds: float) -> float:
    seed = SeedRun(model, data_dir, device)
    seed.train_steps(min(3.0, seconds / 5))  # warm-up: allocator, cuDNN autotuning
    images, elapsed = seed.train_steps(seconds)
    return images / elapsed


def help_seconds(repeats: int = 5) -> float:
    """Median wall time of `fmnist-accel --help` (target: under half a second)."""
    script = Path(sys.executable).parent / "fmnist-accel"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "fmnist_accel"]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([*cmd, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def first_reaching(points: list[tuple[float, float]], target: float) -> float | None:
    """The training time of the first (time, test accuracy) point at or above target."""
    return next((t for t, acc in points if acc >= target), None)


def toolkit_time_to_accuracy(data_dir: str, workdir: Path, extra: list[str]) -> dict:
    run = run_toolkit(["--test-every-epoch", *extra], data_dir, workdir, "accuracy-toolkit")
    points = [(r["elapsed"], r["test_accuracy"]) for r in run["records"]]
    best = max(run["records"], key=lambda r: r["valid_accuracy"])
    return {
        "command": run["command"],
        "epochs": len(run["records"]),
        "curve": points,
        **{f"seconds_to_{t}": first_reaching(points, t) for t in TARGETS},
        "best_checkpoint_test_accuracy": best["test_accuracy"],
        "wall_seconds": run["wall_seconds"],
        "startup_seconds": run["startup_seconds"],
        "training_seconds": run["records"][-1]["elapsed"],
    }


def seed_time_to_accuracy(data_dir: str, device: torch.device, budget: float) -> dict:
    seed = SeedRun("cnn-bn", data_dir, device)
    points, spent = [], 0.0
    for epoch, seconds in seed.epochs():
        spent += seconds
        points.append((spent, seed.test_accuracy()))
        print(
            f"  seed loop epoch {epoch}: {spent:.0f} s, test accuracy {points[-1][1]:.4f}",
            flush=True,
        )
        if spent > budget or all(first_reaching(points, t) for t in TARGETS):
            break
    return {
        "epochs": len(points),
        "curve": points,
        "budget_seconds": budget,
        **{f"seconds_to_{t}": first_reaching(points, t) for t in TARGETS},
    }


def fmt_seconds(value: float | None, budget: float | None = None) -> str:
    if value is None:
        return f"not in {budget:.0f} s" if budget else "not reached"
    return f"{value:.1f} s"


def markdown(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; torch {results['torch']}; {results['date']}",
        "",
        f"`fmnist-accel --help`: {results['help_seconds']:.2f} s (median of 5).",
        "",
        "| model | seed loop (batch 16) img/s | toolkit setting | toolkit img/s | ratio |",
        "| --- | ---: | --- | ---: | ---: |",
    ]
    for row in results["throughput"]:
        lines.append(
            f"| {row['model']} | {row['seed_images_per_sec']:,.0f} | {row['setting']} | "
            f"{row['toolkit_images_per_sec']:,.0f} | {row['ratio']:.1f}x |"
        )
    acc = results.get("accuracy")
    if acc:
        t, s = acc["toolkit"], acc["seed"]
        lines += [
            "",
            "Time to test accuracy, cnn-bn (training and validation time; the test evaluation "
            "is not timed):",
            "",
            "| loop | to 0.92 | to 0.93 | epochs run | best-checkpoint test acc |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| toolkit: `{t['command']}` | {fmt_seconds(t['seconds_to_0.92'])} | "
            f"{fmt_seconds(t['seconds_to_0.93'])} | {t['epochs']} | "
            f"{t['best_checkpoint_test_accuracy']:.4f} |",
            f"| seed loop | {fmt_seconds(s['seconds_to_0.92'], s['budget_seconds'])} | "
            f"{fmt_seconds(s['seconds_to_0.93'], s['budget_seconds'])} | {s['epochs']} | - |",
            "",
            f"The toolkit run: {t['wall_seconds']:.1f} s wall time in all, start-up (launch to "
            f"first step) {t['startup_seconds']:.1f} s, training and validation "
            f"{t['training_seconds']:.1f} s.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--models", default="cnn-bn,mlp")
    parser.add_argument("--seed-seconds", type=float, default=30, help="seed-loop time per model")
    parser.add_argument("--epochs", type=int, default=3, help="toolkit epochs per throughput run")
    parser.add_argument("--accuracy", action="store_true", help="also time to 0.92/0.93 test acc")
    parser.add_argument("--accuracy-args", default="", help="extra toolkit options for that run")
    parser.add_argument("--seed-budget", type=float, default=900, help="seed loop's time budget")
    parser.add_argument("--out", default="benchmarks/out")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {
        "device": device_name(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "throughput": [],
        "help_seconds": help_seconds(),
    }
    print(f"device: {results['device']}", flush=True)
    print(f"fmnist-accel --help: {results['help_seconds']:.2f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for model in args.models.split(","):
            seed_rate = seed_throughput(model, args.data_dir, device, args.seed_seconds)
            print(f"{model}: seed loop {seed_rate:,.0f} img/s", flush=True)
            for setting, extra in toolkit_configs(device):
                run = toolkit_throughput(model, extra, args.data_dir, workdir, args.epochs)
                rate = run["images_per_sec"]
                results["throughput"].append({
                    "model": model, "setting": setting, "command": run["command"],
                    "seed_images_per_sec": seed_rate, "toolkit_images_per_sec": rate,
                    "ratio": rate / seed_rate, "startup_seconds": run["startup_seconds"],
                })  # fmt: skip
                print(
                    f"{model}: toolkit [{setting}] {rate:,.0f} img/s = {rate / seed_rate:.1f}x",
                    flush=True,
                )
        if args.accuracy:
            extra = args.accuracy_args.split()
            if device.type == "cuda" and "--mixed-precision" not in extra:
                extra += ["--mixed-precision", "bf16"]
            toolkit = toolkit_time_to_accuracy(args.data_dir, workdir, extra)
            reached = [toolkit[f"seconds_to_{t}"] for t in TARGETS]
            print(f"toolkit to {TARGETS}: {reached} s", flush=True)
            seed = seed_time_to_accuracy(args.data_dir, device, args.seed_budget)
            results["accuracy"] = {"toolkit": toolkit, "seed": seed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "benchmark.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
