"""Train named recipes to the end and measure them on the test set: the README's results table
and the high-accuracy targets.

    python benchmarks/recipes.py --data-dir ../shared/data --set seed-table
    python benchmarks/recipes.py --data-dir ../shared/data --set high-accuracy \
        --mixed-precision bf16
    python benchmarks/recipes.py --data-dir ../shared/data --set high-accuracy-cpu
    python benchmarks/recipes.py --data-dir ../shared/data --set time-to-accuracy
        # the CPU targets, seeds 0, 1 and 2; also draws time-to-accuracy.png

Each row is one `python -m fmnist_accel.train` process (its exact options are printed), then
`fmnist-accel eval` of its best and last checkpoints (and of last with `--tta`: flips, and
one-pixel shifts for a model trained with shifts). Times:
"training" is the run's own elapsed time (training and validation, without start-up or
checkpoint writing), "wall" the whole process. Results go to OUT/recipes-SET.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from benchmark import TARGETS, first_reaching, run_toolkit

# name -> options. Seed figures from seed/fmnist-blog-ko.md (best, last checkpoint).
SEED_TABLE = {
    "mlp": (["--model", "mlp"], (0.8784, 0.8765)),
    "cnn": (["--model", "cnn"], (0.9176, 0.9154)),
    "cnn-bn": (["--model", "cnn-bn"], (0.9298, 0.9289)),
}
# The high-accuracy recipe, trained on all 60k training images (no validation: a fixed
# schedule) for a 30 s and a 60 s training budget on one GPU.
HIGH_ACCURACY = ["--recipe", "high-accuracy", "--valid-size", "0"]
# Candidates for the default cnn-bn recipe (batch size, lr, ...), each a full run with early
# stopping: the default must reach 0.925 test accuracy within 15 epochs and 0.93 fast on a GPU.
DEFAULT_CANDIDATES = {
    "b256-lr1e-3": ["--batch-size", "256", "--lr", "1e-3"],
    "b256-lr3e-3": ["--batch-size", "256", "--lr", "3e-3"],
    "b256-lr2e-3-ls": ["--batch-size", "256", "--lr", "2e-3", "--label-smoothing", "0.1"],
    "b128-lr1e-3": ["--batch-size", "128", "--lr", "1e-3"],
    "b512-lr3e-3": ["--batch-size", "512", "--lr", "3e-3"],  # the default since
    "b256-lr2e-3-aug": ["--batch-size", "256", "--lr", "2e-3", "--augment"],
}


# Time to accuracy on a small CPU: each recipe with every seed of --seeds (a user runs one
# seed, so a target is met only when every seed meets it), beside the previous `fast`
# recipe once. name -> (options, targets: (test accuracy, within seconds), TTA used).
TIME_TO_ACCURACY = {
    "fast": (["--recipe", "fast"], (0.935, 60), False),  # no flips trained: no flip TTA
    "accurate": (["--recipe", "accurate"], (0.95, 180), True),
    "accurate-long": (["--recipe", "accurate-long"], (0.96, 900), True),
    # the fast recipe before the seventh session: resnet-s, 3 epochs
    "resnet-s-3-epochs": (
        ["--recipe", "fast", "--model", "resnet-s", "--epochs", "3"],
        (0.935, 60),
        False,
    ),  # fmt: skip
}
NEW_RECIPES = ("fast", "accurate", "accurate-long")


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    # The model name and whether it has bf16 instructions: the recipes' speed depends on both
    # (an AMD EPYC without AMX took 2.3 times as long per epoch as an Intel Xeon with it).
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip() + ", "
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return (f"CPU ({model}{platform.machine()}, {torch.get_num_threads()} threads"
            f"{', ' + bf16[0] if bf16 else ''})")  # fmt: skip


def run_recipe(name: str, options: list[str], data_dir: str, workdir: Path) -> dict:
    # The test set is evaluated after every epoch for the learning curve (not timed, not used).
    run = run_toolkit(["--test-every-epoch", *options], data_dir, workdir, name)
    print(run["stdout"][-1500:], flush=True)
    run_dir, records = run["run_dir"], run["records"]
    summary = json.loads((run_dir / "summary.json").read_text())
    row = {
        "name": name,
        "command": "fmnist-accel train " + " ".join(options),
        "hardware": hardware(),
        # the recipes pick bf16 or fp32 themselves on a CPU: what the run used
        "precision": {"no": "fp32"}.get(summary["mixed_precision"], summary["mixed_precision"]),
        "status": summary["status"],
        "epochs": len(records),
        "training_seconds": records[-1]["elapsed"],
        "wall_seconds": run["wall_seconds"],
        "startup_seconds": run["startup_seconds"],
        "trained_on_validation_images": "--valid-size" in options,
        "curve": [(r["epoch"], r["elapsed"], r["test_accuracy"]) for r in records],
    }
    for target in TARGETS:
        row[f"seconds_to_{target}"] = first_reaching([(t, a) for _, t, a in row["curve"]], target)
        row[f"epochs_to_{target}"] = first_reaching([(e, a) for e, _, a in row["curve"]], target)
    for kind in ("best", "last"):
        if (run_dir / f"{kind}.safetensors").exists():
            row[f"{kind}_test_accuracy"] = evaluate(run_dir, kind, data_dir)
    tta = evaluate_json(run_dir, "last", data_dir, "--tta")
    row["last_tta_test_accuracy"] = tta["accuracy"]
    row["tta_views"] = tta.get("tta_views", "flip")  # what eval --tta averaged for this model
    print(json.dumps(row), flush=True)
    return row


def evaluate(run_dir: Path, kind: str, data_dir: str, *extra: str) -> float:
    return evaluate_json(run_dir, kind, data_dir, *extra)["accuracy"]


def evaluate_json(run_dir: Path, kind: str, data_dir: str, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fmnist_accel", "eval", kind, "--run-dir", str(run_dir),
         "--data-dir", data_dir, "--json", *extra],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout)


def high_accuracy_rows(data_dir: str, workdir: Path, common: list[str]) -> list[dict]:
    """40 epochs (about 26 s on an H100 in the probe of DESIGN.md), then as many epochs as
    fit in 58 s at the speed that run measured; the 30 s row is redone shorter if needed."""
    rows = [run_recipe("ha-40", [*HIGH_ACCURACY, "--epochs", "40", *common], data_dir, workdir)]
    per_epoch = rows[0]["training_seconds"] / rows[0]["epochs"]
    if rows[0]["training_seconds"] > 30:
        epochs = int(29.5 / per_epoch)
        rows.append(
            run_recipe(
                f"ha-{epochs}",
                [*HIGH_ACCURACY, "--epochs", str(epochs), *common],
                data_dir,
                workdir,
            )
        )
    epochs = int(58 / per_epoch)
    rows.append(
        run_recipe(
            f"ha-{epochs}", [*HIGH_ACCURACY, "--epochs", str(epochs), *common], data_dir, workdir
        )
    )
    return rows


def time_to_accuracy_rows(data_dir: str, workdir: Path, common: list[str], seeds, quick, only):
    rows = []
    for name, (options, _, _) in TIME_TO_ACCURACY.items():
        if only and name not in only:
            continue
        for seed in seeds if name in NEW_RECIPES else seeds[:1]:
            extra = ["--epochs", "1"] if quick else []
            row = run_recipe(
                f"{name}-seed{seed}", [*options, "--seed", str(seed), *extra, *common],
                data_dir, workdir,
            )  # fmt: skip
            rows.append({**row, "recipe": name, "seed": seed})
    return rows


def headline(rows: list[dict]) -> str:
    """Per recipe: each seed's test accuracy (with eval --tta where it trained flips) and training
    time, the worst seed, and the target: met only if every seed meets it."""
    lines = ["| recipe | seeds: test accuracy (training time) | worst seed | target | met |",
             "| --- | --- | ---: | --- | --- |"]  # fmt: skip
    for name, (_, (target, seconds), tta) in TIME_TO_ACCURACY.items():
        runs = [r for r in rows if r["recipe"] == name]
        if not runs:
            continue
        key = "last_tta_test_accuracy" if tta else "last_test_accuracy"
        worst = min(r[key] for r in runs)
        slowest = max(r["training_seconds"] for r in runs)
        seeds = ", ".join(
            f"seed {r['seed']}: {r[key]:.4f} ({r['training_seconds']:.0f} s)" for r in runs
        )
        met = "yes" if worst >= target and slowest <= seconds else "no"
        label = f"{name} ({runs[0].get('tta_views', 'flip')} TTA)" if tta else name
        lines.append(
            f"| {label} | {seeds} | {worst:.4f}, {slowest:.0f} s | "
            f">= {target} within {seconds} s | {met} |"
        )
    return "\n".join(lines) + "\n"


def draw_curves(rows: list[dict], path: Path) -> None:
    """Test accuracy after every epoch against training seconds and against epochs."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_epoch) = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    colours = dict(zip(TIME_TO_ACCURACY, ("C0", "C1", "C2", "C7"), strict=True))
    seeds = sorted({r["seed"] for r in rows})
    for r in rows:
        epochs, seconds, accuracy = zip(*r["curve"], strict=True)
        label = f"{r['recipe']} (seed {r['seed']})"
        style = dict(color=colours[r["recipe"]], marker="o", markersize=3,
                     linestyle=("-", "--", ":", "-.")[seeds.index(r["seed"]) % 4])  # fmt: skip
        by_time.plot(seconds, accuracy, label=label, **style)
        by_epoch.plot(epochs, accuracy, label=label, **style)
    for ax in (by_time, by_epoch):
        for target in sorted({t for _, (t, _), _ in TIME_TO_ACCURACY.values()}):
            ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
        ax.grid(alpha=0.3)
        ax.set_ylim(0.85, 0.97)
    for budget in sorted({s for _, (_, s), _ in TIME_TO_ACCURACY.values()}):
        by_time.axvline(budget, color="grey", linewidth=0.8, linestyle=":")
    by_time.set_xlabel("training seconds (the run's elapsed: no start-up, no test passes)")
    by_epoch.set_xlabel("epoch")
    by_epoch.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    by_time.set_ylabel("test accuracy after the epoch (no TTA)")
    by_epoch.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"Time to accuracy, {rows[0]['hardware']}, {rows[0]['precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], with_seed: bool) -> str:
    lines = [
        "| model / recipe | command | hardware | epochs | training | wall | best ckpt | "
        "last ckpt | last + TTA | to 0.93 |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        best = f"{r['best_test_accuracy']:.4f}" if "best_test_accuracy" in r else "-"
        cells = [
            r["name"], f"`{r['command']}`", r["hardware"], str(r["epochs"]),
            f"{r['training_seconds']:.1f} s", f"{r['wall_seconds']:.1f} s", best,
            f"{r['last_test_accuracy']:.4f}", f"{r['last_tta_test_accuracy']:.4f}",
            "-" if r["seconds_to_0.93"] is None
            else f"{r['seconds_to_0.93']:.1f} s (epoch {r['epochs_to_0.93']})",
        ]  # fmt: skip
        if with_seed and r["name"] in SEED_TABLE:
            seed_best, seed_last = SEED_TABLE[r["name"]][1]
            cells[6] += f" (seed {seed_best})"
            cells[7] += f" (seed {seed_last})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    sets = ["seed-table", "high-accuracy", "high-accuracy-cpu", "default-sweep", "time-to-accuracy"]
    parser.add_argument("--set", required=True, choices=sets)
    parser.add_argument("--models", default="mlp,cnn,cnn-bn", help="seed-table: which rows")
    parser.add_argument("--mixed-precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--epochs", default=None, help="high-accuracy-cpu: epochs of the run")
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--seeds", default="0,1,2", help="time-to-accuracy: the recipes' seeds")
    parser.add_argument("--png", default="benchmarks/time-to-accuracy.png",
                        help="time-to-accuracy: where the curves go")  # fmt: skip
    parser.add_argument("--from-json", default=None,
                        help="time-to-accuracy: tables and PNG again from its JSON")  # fmt: skip
    parser.add_argument("--only", default="",
                        help="time-to-accuracy: only these rows (comma-separated)")  # fmt: skip
    parser.add_argument("--quick", action="store_true",
                        help="time-to-accuracy: 1 epoch per run, to check the script")  # fmt: skip
    args = parser.parse_args()
    common = ["--mixed-precision", args.mixed_precision] if args.mixed_precision else []
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
        draw_curves(rows, Path(args.png))
        print(headline(rows) + "\n" + markdown(rows, with_seed=False) + f"curves: {args.png}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if args.set == "seed-table":
            rows = [
                run_recipe(name, [*SEED_TABLE[name][0], *common], args.data_dir, workdir)
                for name in args.models.split(",")
            ]
        elif args.set == "default-sweep":
            rows = [
                run_recipe(name, [*options, *common], args.data_dir, workdir)
                for name, options in DEFAULT_CANDIDATES.items()
            ]
        elif args.set == "high-accuracy":
            rows = high_accuracy_rows(args.data_dir, workdir, common)
        elif args.set == "time-to-accuracy":
            seeds = [int(s) for s in args.seeds.split(",")]
            only = [name for name in args.only.split(",") if name]
            unknown = set(only) - set(TIME_TO_ACCURACY)
            if unknown:
                parser.error(
                    f"--only: no rows named {sorted(unknown)}; choose from {list(TIME_TO_ACCURACY)}"
                )
            rows = time_to_accuracy_rows(args.data_dir, workdir, common, seeds, args.quick, only)
        else:
            # The 10-minute CPU figure: the recipe with validation kept, as many epochs as fit.
            options = ["--recipe", "high-accuracy", "--epochs", args.epochs or "8", *common]
            rows = [run_recipe("ha-cpu", options, args.data_dir, workdir)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"recipes-{args.set}.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = markdown(rows, with_seed=args.set == "seed-table")
    if args.set == "time-to-accuracy":
        table = headline(rows) + "\n" + table
        draw_curves(rows, Path(args.png))
        print(f"curves: {args.png}")
    (out / f"recipes-{args.set}.md").write_text(table)
    print("\n" + table)


if __name__ == "__main__":
    main()
