"""Measurements of benchmarks/gpu.sh: time to a test accuracy, fixed schedules fitted to a time
budget, and throughput, each from `python -m fmnist_accel.train` processes.

One measurement per call; each appends its rows to OUT/results.jsonl as soon as a run ends,
rewrites OUT/results.md, and prints one line per row with "met" or "not met" beside the target:

    time_to_accuracy.py reach NAME --target 0.93 --budget 10 -- TRAIN_OPTIONS
        a run with --test-every-epoch: the first epoch whose test accuracy reaches the target,
        its training time ("elapsed" in metrics.jsonl: training and validation, without start-up,
        checkpoint writing or the per-epoch test evaluation), and the best checkpoint's test
        accuracy (the run's final test, summary.json)
    time_to_accuracy.py fitted NAME --budgets 15,45 --targets 0.955,0.96 -- TRAIN_OPTIONS
        a fixed schedule fitted to each budget: a probe run (--probe-epochs) measures the first
        epoch's and a later epoch's seconds; each budget then gets the most epochs that fit it,
        and `fmnist-accel eval last --tta --json` (its TTA) gives its test accuracy
    time_to_accuracy.py once NAME [--tta] [--target 0.95 --budget 10] -- TRAIN_OPTIONS
        one run: its training time and the final test accuracy of its checkpoint (with --tta,
        of the last checkpoint through `eval last --tta`), against the target if one is given
    time_to_accuracy.py throughput NAME --target 700000 -- TRAIN_OPTIONS
        images/s of the epochs after the first (which pays for warm-up and compilation)
    time_to_accuracy.py table              print OUT/results.md
    time_to_accuracy.py check NAME...      exit 1 unless each named row has its figures

Common options (before the subcommand): --data-dir, --out, --runs-dir.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A fitted run aims at this share of its budget: epoch times vary by a percent or two.
BUDGET_MARGIN = 0.98


class Bench:
    def __init__(self, data_dir: str, out: Path, runs_dir: Path) -> None:
        self.data_dir, self.out, self.runs_dir = data_dir, out, runs_dir
        out.mkdir(parents=True, exist_ok=True)

    # -- processes ---------------------------------------------------------------------------
    def log(self, command: list[str], text: str) -> None:
        tail = "\n".join(text.rstrip().splitlines()[-12:])
        with open(self.out / "runs.log", "a") as f:
            f.write(f"$ {' '.join(command)}\n{tail}\n\n")

    def train(self, name: str, options: list[str]) -> dict:
        """One training process; its records, summary, start-up and wall time."""
        run_dir = self.runs_dir / name
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "fmnist_accel.train",
            "--data-dir",
            self.data_dir,
            "--output-dir",
            str(self.runs_dir),
            "--run-name",
            name,
            *options,
        ]
        started = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - started
        self.log(cmd, proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise RuntimeError(f"training exited {proc.returncode}: {proc.stderr[-1500:]}")
        startup = re.search(r"first training step done ([\d.]+) s", proc.stdout)
        records = [
            json.loads(line)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()
        ]
        return {
            "options": options,
            "run_dir": run_dir,
            "records": records,
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "wall_seconds": wall,
            "startup_seconds": float(startup.group(1)) if startup else None,
        }

    def eval_tta(self, run_dir: Path) -> float:
        cmd = [
            sys.executable,
            "-m",
            "fmnist_accel",
            "eval",
            "last",
            "--run-dir",
            str(run_dir),
            "--data-dir",
            self.data_dir,
            "--tta",
            "--json",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            self.log(cmd, proc.stdout + proc.stderr)
            raise RuntimeError(f"eval exited {proc.returncode}: {proc.stderr[-1500:]}")
        accuracy = json.loads(proc.stdout)["accuracy"]
        self.log(cmd, f"accuracy {accuracy}")
        return accuracy

    # -- rows --------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        path = self.out / "results.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def add(self, row: dict) -> None:
        row = {"time": time.strftime("%H:%M:%S"), **row}
        with open(self.out / "results.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        (self.out / "results.md").write_text(self.markdown())
        print(
            f"{row['name']}: {row['figures']}  [{row['target']}: {met_word(row['met'])}]",
            flush=True,
        )

    def failed(self, name: str, command: str, error: Exception) -> None:
        self.add(
            {
                "name": name,
                "command": command,
                "error": str(error)[-800:],
                "figures": f"FAILED: {str(error)[-300:]}",
                "target": "-",
                "met": None,
            }
        )

    def markdown(self) -> str:
        machine = self.out / "machine.txt"
        lines = ["```", machine.read_text().strip(), "```", ""] if machine.exists() else []
        lines += [
            "Training time is the run's `elapsed` (metrics.jsonl): training and validation, "
            "without start-up, checkpoint writing or the per-epoch test evaluation. "
            "With `--compile` it includes the compilation of the first steps.",
            "",
            "| run | command | figures | target | met |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in self.rows():
            cells = [r["name"], f"`{r['command']}`", r["figures"], r["target"], met_word(r["met"])]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines) + "\n"


def met_word(met: bool | None) -> str:
    return "-" if met is None else "met" if met else "not met"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def command_of(options: list[str]) -> str:
    return "python -m fmnist_accel.train " + " ".join(options)


def final_test(run: dict) -> float | None:
    test = run["summary"].get("final_test") or {}
    return test.get("accuracy")


def warmup_seconds(records: list[dict]) -> float:
    """How much longer the first epoch took than the median of the others (warm-up, cuDNN
    autotuning, torch.compile): 0 for a one-epoch run."""
    if len(records) < 2:
        return 0.0
    later = statistics.median(r["epoch_time"] for r in records[1:])
    return max(0.0, records[0]["epoch_time"] - later)


def fmt(value: float | None, spec: str = ".4f", unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def tta_figures(tta: float, run: dict) -> str:
    return (
        f"test accuracy of last + TTA (eval --tta) {fmt(tta)}, without TTA {fmt(final_test(run))}"
    )


# -- measurements ------------------------------------------------------------------------------
def reach(bench: Bench, name: str, target: float, budget: float, options: list[str]) -> bool:
    options = ["--test-every-epoch", *options]
    try:
        run = bench.train(name, options)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        bench.failed(name, command_of(options), error)
        return False
    records = run["records"]
    hit = next((r for r in records if r.get("test_accuracy", 0) >= target), None)
    warm = warmup_seconds(records)
    seconds = hit["elapsed"] if hit else None
    to_target = (
        f"{target} at epoch {hit['epoch']}, {seconds:.1f} s of training "
        f"({seconds - warm:.1f} s without epoch 1's {warm:.1f} s of warm-up)"
        if hit
        else f"{target} not reached (best per-epoch test accuracy "
        f"{max(r.get('test_accuracy', 0) for r in records):.4f})"
    )
    figures = (
        f"{to_target}; {len(records)} epochs ({run['summary']['status']}), "
        f"{records[-1]['elapsed']:.1f} s of training; best-checkpoint test accuracy "
        f"{fmt(final_test(run))}; start-up {fmt(run['startup_seconds'], '.1f', ' s')}, "
        f"wall {run['wall_seconds']:.1f} s"
    )
    bench.add(
        {
            "name": name,
            "command": command_of(options),
            "figures": figures,
            "target": f">= {target} within {budget:g} s",
            "met": seconds is not None and seconds <= budget,
            "seconds_to_target": seconds,
            "epoch_to_target": hit["epoch"] if hit else None,
            "warmup_seconds": warm,
            "epochs": len(records),
            "status": run["summary"]["status"],
            "training_seconds": records[-1]["elapsed"],
            "best_checkpoint_test_accuracy": final_test(run),
            "startup_seconds": run["startup_seconds"],
            "wall_seconds": run["wall_seconds"],
            "curve": [
                [r["epoch"], round(r["elapsed"], 3), r.get("test_accuracy")] for r in records
            ],
        }
    )
    return True


def fitted(
    bench: Bench,
    name: str,
    budgets: list[float],
    targets: list[float],
    options: list[str],
    probe_epochs: int,
    max_epochs: int | None,
) -> bool:
    probe_options = [*options, "--epochs", str(probe_epochs)]
    try:
        probe = bench.train(f"{name}-probe", probe_options)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        bench.failed(f"{name}-probe", command_of(probe_options), error)
        return False
    records = probe["records"]
    first = records[0]["epoch_time"]
    later = statistics.median(r["epoch_time"] for r in records[1:]) if len(records) > 1 else first
    bench.add(
        {
            "name": f"{name}-probe",
            "command": command_of(probe_options),
            "figures": f"epoch 1 {first:.2f} s, later epochs {later:.2f} s; start-up "
            f"{fmt(probe['startup_seconds'], '.1f', ' s')}, wall {probe['wall_seconds']:.1f} s",
            "target": "-",
            "met": None,
            "first_epoch_seconds": first,
            "epoch_seconds": later,
            "images_per_sec": records[-1]["images_per_sec"],
        }
    )
    ok = True
    for budget, target in zip(budgets, targets, strict=True):
        # The first epoch (warm-up) once, then as many steady epochs as fit the budget.
        epochs = max(1, 1 + math.floor((BUDGET_MARGIN * budget - first) / later))
        if max_epochs:
            epochs = min(epochs, max_epochs)
        run_name = f"{name}-{budget:g}s"
        run_options = [*options, "--epochs", str(epochs)]
        try:
            run = bench.train(run_name, run_options)
            tta = bench.eval_tta(run["run_dir"])
        except (RuntimeError, OSError, ValueError, KeyError) as error:
            bench.failed(run_name, command_of(run_options), error)
            ok = False
            continue
        elapsed = run["records"][-1]["elapsed"]
        bench.add(
            {
                "name": run_name,
                "command": command_of(run_options),
                "figures": f"{plural(epochs, 'epoch')} fitted to {budget:g} s: {elapsed:.1f} s of "
                f"training; {tta_figures(tta, run)}; start-up "
                f"{fmt(run['startup_seconds'], '.1f', ' s')}, wall {run['wall_seconds']:.1f} s",
                "target": f">= {target} within {budget:g} s (eval --tta)",
                "met": tta >= target and elapsed <= budget,
                "budget_seconds": budget,
                "epochs": epochs,
                "training_seconds": elapsed,
                "tta_test_accuracy": tta,
                "last_test_accuracy": final_test(run),
                "startup_seconds": run["startup_seconds"],
                "wall_seconds": run["wall_seconds"],
            }
        )
    return ok


def once(
    bench: Bench,
    name: str,
    options: list[str],
    tta: bool = False,
    target: float | None = None,
    budget: float | None = None,
) -> bool:
    try:
        run = bench.train(name, options)
        accuracy = bench.eval_tta(run["run_dir"]) if tta else final_test(run)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        bench.failed(name, command_of(options), error)
        return False
    records = run["records"]
    elapsed = records[-1]["elapsed"]
    checkpoint = (run["summary"].get("final_test") or {}).get("checkpoint", "-")
    judged = (
        tta_figures(accuracy, run)
        if tta
        else f"test accuracy {fmt(accuracy)} ({checkpoint}, no TTA)"
    )
    judge = target is not None and budget is not None
    warm = warmup_seconds(records)
    startup = fmt(run["startup_seconds"], ".1f", " s")
    bench.add(
        {
            "name": name,
            "command": command_of(options),
            "figures": f"{plural(len(records), 'epoch')}, {elapsed:.1f} s of training "
            f"({elapsed - warm:.1f} s without epoch 1's warm-up); {judged}; "
            f"start-up {startup}, wall {run['wall_seconds']:.1f} s",
            "target": (
                f">= {target} within {budget:g} s" + (" (eval --tta)" if tta else "")
                if judge
                else "-"
            ),
            "met": (
                accuracy is not None and accuracy >= target and elapsed <= budget if judge else None
            ),
            "epochs": len(records),
            "training_seconds": elapsed,
            "warmup_seconds": warm,
            "test_accuracy": accuracy,
            "last_test_accuracy": final_test(run),
            "tta": tta,
            "startup_seconds": run["startup_seconds"],
            "wall_seconds": run["wall_seconds"],
        }
    )
    return True


def throughput(bench: Bench, name: str, target: float, options: list[str]) -> bool:
    try:
        run = bench.train(name, options)
    except (RuntimeError, OSError, ValueError, KeyError) as error:
        bench.failed(name, command_of(options), error)
        return False
    rates = [r["images_per_sec"] for r in run["records"]]
    measured = rates[1:] or rates  # the first epoch pays for warm-up and compilation
    rate = statistics.median(measured)
    bench.add(
        {
            "name": name,
            "command": command_of(options),
            "figures": f"{rate:,.0f} img/s (median of epochs {len(rates) - len(measured) + 1}-"
            f"{len(rates)}; per epoch: {', '.join(f'{r:,.0f}' for r in rates)}); start-up "
            f"{fmt(run['startup_seconds'], '.1f', ' s')}, wall {run['wall_seconds']:.1f} s",
            "target": f">= {target:,.0f} img/s",
            "met": rate >= target,
            "images_per_sec": rate,
            "per_epoch": rates,
            "startup_seconds": run["startup_seconds"],
            "wall_seconds": run["wall_seconds"],
        }
    )
    return True


def check(bench: Bench, names: list[str]) -> bool:
    """Every named row is there, without error, with its figures."""
    rows = bench.rows()
    bad = [f"{r['name']} (failed)" for r in rows if "error" in r or not r.get("figures")]
    for name in names:  # a fitted measurement NAME writes NAME-probe, NAME-15s, ...
        if not any(r["name"] == name or r["name"].startswith(name + "-") for r in rows):
            bad.append(f"{name} (missing)")
    if bad:
        print(f"check: {', '.join(bad)}")
        return False
    print(f"check: {len(rows)} rows, every one with its figures ({len(names)} measurements)")
    return True


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/out")
    # Not under --out: only the small result files come back from a lent machine.
    parser.add_argument("--runs-dir", default=str(Path(tempfile.gettempdir()) / "fmnist-bench"))
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("reach")
    p.add_argument("name")
    p.add_argument("--target", type=float, default=0.93)
    p.add_argument("--budget", type=float, default=10)
    p = sub.add_parser("fitted")
    p.add_argument("name")
    p.add_argument("--budgets", type=floats, default=[15.0, 45.0])
    p.add_argument("--targets", type=floats, default=[0.955, 0.96])
    p.add_argument("--probe-epochs", type=int, default=2)
    p.add_argument("--max-epochs", type=int, default=None, help="cap (for a quick check)")
    p = sub.add_parser("once")
    p.add_argument("name")
    p.add_argument("--tta", action="store_true", help="judge the last checkpoint with eval --tta")
    p.add_argument("--target", type=float, default=None)
    p.add_argument("--budget", type=float, default=None)
    p = sub.add_parser("throughput")
    p.add_argument("name")
    p.add_argument("--target", type=float, default=700_000)
    sub.add_parser("table")
    p = sub.add_parser("check")
    p.add_argument("names", nargs="+")
    argv = sys.argv[1:]
    options = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    bench = Bench(args.data_dir, Path(args.out), Path(args.runs_dir))
    if args.what == "reach":
        ok = reach(bench, args.name, args.target, args.budget, options)
    elif args.what == "fitted":
        if len(args.budgets) != len(args.targets):
            parser.error("--budgets and --targets need as many values")
        ok = fitted(
            bench,
            args.name,
            args.budgets,
            args.targets,
            options,
            args.probe_epochs,
            args.max_epochs,
        )
    elif args.what == "once":
        if (args.target is None) != (args.budget is None):
            parser.error("--target and --budget go together")
        ok = once(bench, args.name, options, args.tta, args.target, args.budget)
    elif args.what == "throughput":
        ok = throughput(bench, args.name, args.target, options)
    elif args.what == "table":
        print(bench.markdown(), end="")
        ok = True
    else:
        ok = check(bench, args.names)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
