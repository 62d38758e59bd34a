"""Mutation testing: put one realistic bug at a time into the package, run the tests that
should notice it, and count how many bugs they catch. Slow (up to hours on 2 cores): not
run in CI. See docs/testing.md.

    python tools/mutation.py                          # every mutant, the tests of this checkout
    python tools/mutation.py --only-tests-from main   # only test files that exist at main
    python tools/mutation.py --list                   # where each mutant lands; runs nothing
    python tools/mutation.py --mutant onecycle-end-extrapolates --mutant ...

Each mutant finds its code by a snippet that must occur exactly once in all of
fmnist_accel/**/*.py (not by file or line, so mutants survive moves between modules); a
snippet found zero or several times is an error, never a kill. The mutated file is restored
(content and modification time) in a `finally`, also on Ctrl-C or SIGTERM, and the run ends
by checking that `git status` shows fmnist_accel/ untouched.

Run it in a checkout you are not editing: the tests run against the mutated files (the run
puts this checkout first on PYTHONPATH, so every subprocess the tests start imports them).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fmnist_accel"

# Test selections, fastest first (pytest runs them in the order given, and stops at the first
# failure).
DECISIONS = "tests/test_decisions.py"  # scripted losses first, then real runs
EMA_FILE = "tests/test_ema.py::"
EMA_UNIT = EMA_FILE + "test_the_average_moves_a_fraction_of_the_way_to_the_weights"
EMA_STEPS = EMA_FILE + "test_every_optimizer_step_updates_the_weight_average"
PLAN = "tests/test_plan.py"
CHECKPOINT = "tests/test_checkpoint.py"
ATOMIC = "tests/test_atomic_writes.py::test_failed_write_keeps_the_old_file_and_leaves_no_temp"
AUGMENT = "tests/test_augment.py"
CLI_RUN = "tests/test_cli.py::test_train_writes_the_run_folder"
CLI_EVAL = "tests/test_cli.py::test_eval_json_is_one_object_with_the_test_metrics"
CLI_VALID = "tests/test_cli.py::test_eval_of_the_validation_split_gives_the_figures_the_run_logged"
NONFINITE = "tests/test_bad_input.py::test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint"
RESUME = "tests/test_resume.py::test_kills_at_several_points_resume_to_identical_results"
DIST = "tests/test_distributed.py::"
DIST_EVAL = DIST + "test_eval_identical_on_1_2_3_processes"
DIST_PLATEAU = DIST + "test_plateau_lowers_lr_at_the_same_epoch_on_1_and_2_processes"
DIST_EARLY = DIST + "test_early_stopping_stops_every_rank_at_the_same_epoch"
DIST_AGREE = DIST + "test_one_and_two_processes_agree_at_the_same_global_batch"
SEEDED = "tests/test_seeded_run.py"
CONFUSION = "tests/test_eval.py::test_eval_confusion_matrix_rows_are_the_true_classes"
SCHEDULES = "tests/test_schedules.py"
BATCHNORM = "tests/test_batchnorm_ranks.py"
TORN = "tests/test_atomic_writes.py::test_writes_killed_halfway_leave_the_previous_files_whole"
EMA_RUN = EMA_FILE + "test_a_run_validates_and_saves_the_average"


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # the realistic bug it imitates
    find: str  # occurs exactly once in the package
    replace: str
    tests: tuple[str, ...]  # test files or node ids, in the order to run them
    timeout: int = 900  # seconds for the whole selection


def m(name, bug, find, replace, *tests, timeout=900) -> Mutant:
    return Mutant(name, bug, find, replace, tests, timeout)


MUTANTS = [
    # --- engine: early stopping, evaluation, the training step ------------------------
    m("early-stop-equal-improves", "an equal validation loss counts as an improvement",
      "if loss < self.best - self.min_delta:", "if loss <= self.best - self.min_delta:",
      DECISIONS),
    m("early-stop-patience-off-by-one", "stops at the patience-th bad epoch, not after it",
      "return self.bad_epochs > self.patience", "return self.bad_epochs >= self.patience",
      DECISIONS),
    m("early-stop-counter-not-loaded", "EarlyStopping.load_state_dict forgets the count",
      'self.bad_epochs = int(state["bad_epochs"])', "self.bad_epochs = 0",
      DECISIONS),
    m("bn-average-is-a-sum", "BatchNorm statistics summed over ranks instead of averaged",
      'flat = accelerator.reduce(flat, "mean")', 'flat = accelerator.reduce(flat, "sum")',
      BATCHNORM),
    m("bn-average-finds-no-buffers", "average_buffers averages nothing",
      "buffers = [b for b in module.buffers() if b.is_floating_point()]", "buffers = []",
      BATCHNORM),
    m("eval-loss-smoothed", "the evaluation loss with label smoothing",
      'F.cross_entropy(logits, y, reduction="sum")',
      'F.cross_entropy(logits, y, reduction="sum", label_smoothing=0.1)',
      CLI_EVAL, SEEDED),
    m("eval-confusion-transposed", "confusion matrix rows and columns swapped",
      "y * NUM_CLASSES + predicted", "predicted * NUM_CLASSES + y",
      CLI_EVAL, CONFUSION),
    m("eval-sums-not-reduced", "evaluation sums stay per rank (no all-reduce)",
      'totals = accelerator.reduce(torch.cat([loss_sum[None], confusion]), "sum").cpu()',
      "totals = torch.cat([loss_sum[None], confusion]).cpu()",
      BATCHNORM, DIST_EVAL),
    m("nonfinite-loss-unnoticed", "a non-finite training loss is not flagged",
      "flags[world + accelerator.process_index] = float(not torch.isfinite(loss_sum))",
      "flags[world + accelerator.process_index] = 0.0",
      NONFINITE),
    m("step-schedule-never-stepped", "the per-step scheduler is never stepped",
      "if step_scheduler is not None and not accelerator.optimizer_step_was_skipped:",
      "if False:",
      SCHEDULES),
    m("train-loss-ignores-smoothing", "--label-smoothing does not reach the training loss",
      "F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)",
      "F.cross_entropy(logits.float(), labels)",
      SEEDED),
    m("train-loss-sum-unweighted", "the epoch's loss sum adds batch means, not sums",
      "loss_sum.add_(loss.detach(), alpha=len(y))", "loss_sum.add_(loss.detach())",
      SEEDED, DIST_AGREE),
    m("resumed-epoch-restarts-at-step-0", "a mid-epoch resume redoes the epoch's first steps",
      "step = start.step", "step = 0",
      RESUME),
    # --- device data -------------------------------------------------------------------
    m("order-not-seeded-by-epoch", "every epoch the same permutation",
      "generator=seeded_generator(seed, epoch))", "generator=seeded_generator(seed))",
      AUGMENT, SEEDED),
    m("shards-contiguous", "ranks take contiguous blocks, not interleaved positions",
      "return order[: per_rank * world_size].view(per_rank, world_size)[:, rank]",
      "return order[rank * per_rank : (rank + 1) * per_rank]",
      AUGMENT),
    m("single-image-batch-kept", "a last batch of one image is trained (BatchNorm fails)",
      "return full + (rest > 1)", "return full + (rest > 0)",
      AUGMENT),
    m("eval-shards-overlap", "evaluation shards overlap by one image",
      "return rank * n // world_size, (rank + 1) * n // world_size",
      "return rank * n // world_size, min(n, (rank + 1) * n // world_size + 1)",
      BATCHNORM, DIST_EVAL),
    m("eval-images-not-normalised", "evaluation images are not normalised",
      "self.inputs = normalise(split.images[start:stop].to(device), channels_last)",
      "self.inputs = split.images[start:stop].to(device).float().unsqueeze(1)",
      CLI_EVAL),
    # --- the training loop and its outputs ---------------------------------------------
    m("best-not-strict", "an equal metric replaces the best checkpoint",
      "(value > self.value if self.maximize else value < self.value)",
      "(value >= self.value if self.maximize else value < self.value)",
      DECISIONS),
    m("best-metric-ignored", "--best-metric ignored: the best checkpoint by validation loss",
      'record["is_best"] = s.best.update(record[cfg.best_metric], epoch)',
      'record["is_best"] = s.best.update(record["valid_loss"], epoch)',
      CLI_RUN, DECISIONS),
    m("best-copied-every-epoch", "best.safetensors rewritten every epoch",
      'if record.get("is_best"):\n        atomic_copy(', "if True:\n        atomic_copy(",
      CLI_RUN, DECISIONS),
    m("plateau-on-accuracy", "the plateau scheduler watches validation accuracy",
      "s.plateau.step(valid.loss)", "s.plateau.step(valid.accuracy)",
      DIST_PLATEAU, DECISIONS),
    m("early-stop-on-accuracy", "early stopping watches validation accuracy",
      "s.stopper.step(valid.loss)", "s.stopper.step(valid.accuracy)",
      DIST_EARLY, DECISIONS),
    m("onecycle-end-extrapolates", "OneCycle sized to the optimizer steps (lr ends negative)",
      "total_steps=total_steps + 1,", "total_steps=total_steps,",
      SCHEDULES),
    m("schedule-length-in-epochs", "per-step schedule sized in epochs, not steps",
      "make_schedulers(cfg, optimizer, cfg.epochs * stream.steps_per_epoch)",
      "make_schedulers(cfg, optimizer, cfg.epochs)",
      SCHEDULES),
    m("plain-bn-not-averaged", "BatchNorm statistics of the model not averaged over ranks",
      "average_buffers(s.plain_model, accelerator)", "None",
      BATCHNORM),
    m("ema-bn-not-averaged", "BatchNorm statistics of the EMA not averaged over ranks",
      "average_buffers(s.ema.module, accelerator)", "None",
      BATCHNORM),
    m("ema-not-used", "the EMA is kept but the raw weights validated and saved",
      "return self.ema.module if self.ema is not None else self.plain_model",
      "return self.plain_model",
      EMA_RUN, EMA_STEPS, RESUME),
    m("same-order-every-epoch", "the loop asks for the first epoch's data every epoch",
      "epoch_data = s.stream.epoch(epoch)", "epoch_data = s.stream.epoch(s.start_epoch + 1)",
      SEEDED, RESUME),
    m("train-loss-not-reduced", "the logged training loss is the main rank's alone",
      'loss_sum, count = accelerator.reduce(totals.to(accelerator.device), "sum").tolist()',
      "loss_sum, count = totals.tolist()",
      DIST_AGREE),
    # --- resume ------------------------------------------------------------------------
    m("early-stop-state-not-restored", "resume forgets the early-stopping counters",
      's.stopper.load_state_dict(state["early_stopping"])', "None",
      DECISIONS),
    m("plateau-state-not-restored", "resume forgets the plateau scheduler",
      'for scheduler, key in ((s.plateau, "plateau"), (s.step_scheduler, "step_scheduler")):',
      'for scheduler, key in ((s.step_scheduler, "step_scheduler"),):',
      DECISIONS, RESUME),
    m("best-not-restored", "resume forgets the best metric so far",
      's.best.load_state_dict(state["best"])', "None",
      DECISIONS, RESUME),
    m("rng-not-restored", "resume forgets the rank's RNG state (dropout)",
      'torch.set_rng_state(state["cpu_rng"])', "None",
      RESUME),
    m("metrics-not-cut-back", "a resumed run keeps the records of epochs it redoes",
      "s.metrics.keep_epochs_up_to(s.start_epoch)", "None",
      RESUME),
    m("temp-files-kept-on-resume", "a resume leaves the torn temporary files of a kill",
      "    remove_temp_files(folder)  # of writes a kill interrupted",
      "    None  # of writes a kill interrupted",
      TORN, RESUME, "tests/test_faults.py::test_no_temporary_file_survives_a_resume"),
    m("completed-run-not-extended", "a completed run resumed with more --epochs does nothing",
      'status == COMPLETED and state["epoch"] < resumed["epochs"]',
      'status == COMPLETED and state["epoch"] > resumed["epochs"]',
      PLAN, DECISIONS),
    # --- checkpoints -------------------------------------------------------------------
    m("checkpoint-write-in-place", "save_model_checkpoint writes the file in place",
      "atomic_write_bytes(path, save(tensors, metadata=header))",
      "Path(path).write_bytes(save(tensors, metadata=header))",
      TORN, RESUME),
    m("resume-write-in-place", "save_resume_state writes resume.pt in place",
      "atomic_write_bytes(path, buffer.getbuffer())", "Path(path).write_bytes(buffer.getbuffer())",
      TORN, RESUME),
    m("failed-write-leaves-temp", "a failed atomic write leaves its temporary file",
      "Path(tmp).unlink(missing_ok=True)\n        raise write_failed(path, exc)",
      "raise write_failed(path, exc)",
      ATOMIC),
    m("resume-state-unpickled", "resume.pt read with arbitrary unpickling",
      'torch.load(path, map_location="cpu", weights_only=True)',
      'torch.load(path, map_location="cpu", weights_only=False)',
      CHECKPOINT),
    # --- evaluation ----------------------------------------------------------------------
    m("eval-split-seed-ignored", "eval --split valid rebuilds the split of seed 0",
      'config["valid_size"],\n        config["seed"],', 'config["valid_size"],\n        0,',
      CLI_VALID, SEEDED),
    m("eval-split-swapped", "eval --split valid evaluates the training part",
      "_, valid = train_valid_split(", "valid, _ = train_valid_split(",
      CLI_VALID),
    m("eval-model-in-train-mode", "the rebuilt model is left in training mode",
      "return model.eval(), meta", "return model, meta",
      CHECKPOINT),
    m("tta-not-averaged", "flip TTA uses the mirror's logits alone",
      "return (model(images).float() + model(images.flip(-1)).float()) / 2",
      "return model(images.flip(-1)).float()",
      AUGMENT),
    m("tta-one-shift", "flip+shift TTA averages one shifted pair, not two",
      "(with_mirror(shifted(x, -1, -1)) + with_mirror(shifted(x, 1, 1))) / 4",
      "with_mirror(shifted(x, 1, 1)) / 2",
      AUGMENT),
    m("tta-shifts-for-flip-only-models", "--tta adds shifts for a model trained on flips alone",
      'int(config.get("crop_padding", CROP_PADDING)) > 0',
      'int(config.get("crop_padding", CROP_PADDING)) >= 0',
      AUGMENT),
    # --- the weight average ------------------------------------------------------------
    m("ema-decay-swapped", "EMA weights new values by decay instead of 1 - decay",
      "1.0 - self.decay)", "self.decay)",
      EMA_UNIT),
    m("ema-skips-buffers", "the EMA averages parameters but not BatchNorm statistics",
      "for ours, source in zip(mine[:2], theirs[:2], strict=True):",
      "for ours, source in zip(mine[:1], theirs[:1], strict=True):",
      EMA_UNIT),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def locate(mutant: Mutant) -> tuple[Path | None, str]:
    """(the one file holding the snippet, '') or (None, why not)."""
    hits = [(p, p.read_text().count(mutant.find)) for p in package_files()]
    hits = [(p, n) for p, n in hits if n]
    total = sum(n for _, n in hits)
    if total == 1:
        return hits[0][0], ""
    where = ", ".join(f"{p.relative_to(ROOT)} x{n}" for p, n in hits)
    return None, f"snippet found {total} times" + (f" ({where})" if where else "")


def tests_at(ref: str) -> set[str]:
    """Test files that exist at git ref `ref`."""
    out = subprocess.run(
        ["git", "-C", str(ROOT), "ls-tree", "-r", "--name-only", ref, "tests/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def selection(mutant: Mutant, allowed: set[str] | None) -> list[str]:
    tests = list(mutant.tests)
    if allowed is not None:
        tests = [t for t in tests if t.split("::")[0] in allowed]
    return tests


def run_pytest(tests: list[str], timeout: int) -> tuple[str, float, str]:
    """('passed' | 'failed' | 'timeout' | 'error', seconds, output tail)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # A mutant of the same size written within the same second as its restoration would
        # leave a .pyc that Python takes for the restored file: write no bytecode at all.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slurm",
           "-p", "no:cacheprovider", *tests]  # fmt: skip
    started = time.monotonic()
    # A session of its own: a timeout kills pytest and every training process it started.
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", time.monotonic() - started, out[-2000:]
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    seconds = time.monotonic() - started
    # pytest: 0 all passed, 1 some failed, 2 interrupted (e.g. a collection error the mutant
    # caused), 3 internal error, 4 usage error, 5 no tests collected.
    status = {0: "passed", 1: "failed", 2: "failed"}.get(proc.returncode, "error")
    return status, seconds, out[-2000:]


def apply_and_test(mutant: Mutant, path: Path, tests: list[str]) -> tuple[str, float, str]:
    original = path.read_bytes()
    stat = path.stat()
    try:
        path.write_text(original.decode().replace(mutant.find, mutant.replace, 1))
        return run_pytest(tests, mutant.timeout)
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def package_is_clean() -> bool:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "fmnist_accel"],
        capture_output=True,
        text=True,
    )
    return out.returncode == 0 and not out.stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only-tests-from",
        metavar="REF",
        help="run only test files that exist at this git ref (e.g. main)",
    )
    parser.add_argument("--mutant", action="append", metavar="NAME", help="run only these")
    parser.add_argument("--list", action="store_true", help="show the mutants; run nothing")
    parser.add_argument(
        "--no-baseline",
        action="store_true",
        help="skip the check that the selected tests pass unmutated",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    parser.add_argument("--verbose", action="store_true", help="print each run's output tail")
    args = parser.parse_args()  # fmt: skip

    names = [mu.name for mu in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    chosen = [mu for mu in MUTANTS if not args.mutant or mu.name in args.mutant]
    unknown = set(args.mutant or ()) - set(names)
    if unknown:
        parser.error(f"no mutant named {', '.join(sorted(unknown))}")
    allowed = tests_at(args.only_tests_from) if args.only_tests_from else None

    if args.list:
        for mu in chosen:
            path, problem = locate(mu)
            where = path.relative_to(ROOT) if path else f"ERROR: {problem}"
            print(f"{mu.name:34} {where}\n    {mu.bug}\n    tests: {selection(mu, allowed)}")
        return 0
    if not package_is_clean():
        print("fmnist_accel/ has uncommitted changes: commit or stash them first")
        return 2

    # SIGTERM (a killed job) must restore the file too: turn it into KeyboardInterrupt.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if not args.no_baseline:
        union = list(dict.fromkeys(t for mu in chosen for t in selection(mu, allowed)))
        print(f"baseline: {len(union)} test selections, unmutated ...", flush=True)
        status, seconds, out = run_pytest(union, timeout=3600)
        print(f"baseline: {status} in {seconds:.0f} s", flush=True)
        if status != "passed":
            print(out)
            return 2

    results = []
    try:
        for i, mu in enumerate(chosen, 1):
            path, problem = locate(mu)
            tests = selection(mu, allowed)
            if path is None:
                status, seconds, out = "error", 0.0, problem
            elif not tests:
                status, seconds, out = "passed", 0.0, "no test selected"
            else:
                status, seconds, out = apply_and_test(mu, path, tests)
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}
            result = {
                "mutant": mu.name,
                "file": str(path.relative_to(ROOT)) if path else "",
                "result": verdict.get(status, "ERROR"),
                "seconds": round(seconds),
                "bug": mu.bug,
                "tests": tests,
                "detail": out if status in ("error", "passed") else "",
            }
            results.append(result)
            print(f"[{i}/{len(chosen)}] {mu.name}: {result['result']} ({seconds:.0f} s)"
                  + (f"  {out}" if status == "error" or args.verbose else ""),
                  flush=True)  # fmt: skip
    finally:
        clean = package_is_clean()

    print(f"\n{'mutant':34} {'file':30} {'result':17} {'s':>5}")
    for r in results:
        print(f"{r['mutant']:34} {r['file']:30} {r['result']:17} {r['seconds']:>5}")
    killed = sum(r["result"].startswith("killed") for r in results)
    errors = sum(r["result"] == "ERROR" for r in results)
    scored = len(results) - errors
    score = killed / scored if scored else 0.0
    print(
        f"\nscore: {killed}/{scored} killed = {score:.0%}"
        + (f"; {errors} ERRORS" if errors else "")
    )
    survivors = [r["mutant"] for r in results if r["result"] == "SURVIVED"]
    if survivors:
        print("survived: " + ", ".join(survivors))
    if args.json:
        Path(args.json).write_text(json.dumps({"score": score, "results": results}, indent=2))
    if not clean:
        print("WARNING: git status shows changes under fmnist_accel/ after the run")
        return 3
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
