"""Everything a training run writes into its folder (the names are in store/layout.py):
config.json, metrics.jsonl and TensorBoard, last/best.safetensors and their repair after a
kill, resume.pt, summary.json; once the run has ended, what ending.py measured:
summary.json's final_test, the pictures in TensorBoard and the HParams entry (built by
hparams.py).

Only the main process writes: every write of a run is in this module, behind
`is_main_process`. The functions are called on every rank, because some of them first gather
what each rank holds (a collective that must not sit inside a main-process branch). Before
training, plan.py has created and locked the folder and removed the temporary files of writes
that a kill interrupted; all writes are atomic (store/atomic.py; the HParams entry by a rename
of its own). A failed write stops the run with WriteFailed on every rank
(cluster/shared_errors.main_process_writes), except the pictures and the HParams entry:
extras of a run that has ended, whose failure is a note.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..cluster.shared_errors import main_process_writes
from ..config import TrainConfig
from ..engine.loop import EpochProgress
from ..engine.models import count_parameters
from ..store import layout, provenance
from ..store.atomic import atomic_copy, atomic_write_text, write_failed
from ..store.checkpoint import checkpoint_epoch, save_model_checkpoint, save_resume_state
from ..store.run_folder import read_json, remove_unused
from ..store.run_info import read_metrics, read_starts
from .hparams import PARTIAL_PREFIX, SUFFIX, entry_events, entry_file_name, run_entry

if TYPE_CHECKING:
    from .ending import Ending
    from .plan import RunPlan
    from .session import Session


def discard_unused_run(accelerator, plan: RunPlan) -> None:
    """A new run that failed before training (bad data): remove the folder made only to
    prove it writable, so that no empty run is left behind."""
    if accelerator.is_main_process and plan.resume_state is None:
        remove_unused(Path(plan.run_dir))


def start_outputs(s: Session, state: dict | None) -> None:
    """config.json, metrics.jsonl cut back to the resume point, TensorBoard."""
    accelerator = s.accelerator
    quiet_tensorboard_thread_errors()
    with main_process_writes(accelerator):  # every rank learns if a write failed
        if accelerator.is_main_process:
            # The options as this start runs them (a resume may change --epochs, the
            # precision...); provenance.json keeps what each start changed.
            before = read_json(s.run_dir / layout.CONFIG) if state is not None else None
            config = s.cfg.to_dict()
            changed = {
                k: [before.get(k), v]
                for k, v in config.items()
                if before and before.get(k) != v and k not in ("resume", "output_dir")
            }
            atomic_write_text(s.run_dir / layout.CONFIG, json.dumps(config, indent=2) + "\n")
            s.metrics.keep_epochs_up_to(s.start_epoch)
            if state is not None:
                repair_checkpoints(s, state)
            record_start(s.run_dir, s.reporter.print, changed)
    open_tensorboard(accelerator, s.run_dir, s.start_epoch + 1)


def record_start(run_dir: Path, say: Callable[[str], None], changed: dict) -> None:
    """Add this start to provenance.json, with the options it changed ({name: [before,
    now]}); say so when it runs other code than the first."""
    starts = read_starts(run_dir)
    if not starts and (run_dir / layout.PROVENANCE).exists():
        say(f"note: {run_dir / layout.PROVENANCE} was unreadable: its record starts again here")
    now = provenance.this_start()
    if changed:
        now["changed"] = changed
    note = provenance.code_change_note(starts[0] if starts else None, now)
    if note:
        say(note)
    text = json.dumps({"starts": [*starts, now]}, indent=2) + "\n"
    atomic_write_text(run_dir / layout.PROVENANCE, text)


def open_tensorboard(accelerator, run_dir: Path, purge_step: int) -> None:
    """The run's TensorBoard writer (run_dir/tensorboard), on the main process: events of
    epochs from purge_step on are dropped, since they will be written again."""
    accelerator.project_configuration.set_directories(str(run_dir))
    accelerator.project_configuration.logging_dir = str(run_dir)
    accelerator.init_trackers(
        layout.TENSORBOARD,
        # No config=: accelerate would add_hparams into a new timestamped sub-run per start;
        # write_hparams writes the run's one HParams entry when it ends.
        init_kwargs={"tensorboard": {"purge_step": purge_step}},
    )


def log_epoch(s: Session, record: dict) -> None:
    """The epoch's line in metrics.jsonl and its TensorBoard scalars. Collective: every rank
    learns if the write failed."""
    with main_process_writes(s.accelerator):
        if s.accelerator.is_main_process:
            append_epoch(s, record)


def append_epoch(s: Session, record: dict) -> None:
    s.metrics.append(record)
    scalars = {"Loss/train": record["train_loss"], "LearningRate": record["lr"]}
    if "valid_loss" in record:
        scalars.update(
            {"Loss/valid": record["valid_loss"], "Accuracy/valid": record["valid_accuracy"]}
        )
    if "test_loss" in record:
        scalars.update({"Loss/test": record["test_loss"], "Accuracy/test": record["test_accuracy"]})
    log_scalars(s.accelerator, scalars, record["epoch"], s.run_dir / layout.TENSORBOARD)


def rank_state(progress: EpochProgress, device: torch.device, snapshot: dict | None) -> dict:
    """What differs between ranks: RNG streams (dropout) and the partial epoch's loss sums and
    time (session.restore_rank_state reads it back). snapshot: the RNG states as they were
    before a step that is given up (engine/loop.StepFence)."""
    if snapshot is not None:
        cpu_rng, cuda_rng = snapshot["cpu_rng"], snapshot["cuda_rng"]
    else:
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {
        "cpu_rng": cpu_rng,
        "cuda_rng": cuda_rng,
        "loss_sum": progress.loss_sum,
        "count": progress.count,
        "seconds": progress.seconds,
    }


def save_resume(
    s: Session, epoch_done: int, progress: EpochProgress, snapshot: dict | None = None
) -> None:
    """resume.pt (session.restore_training_state reads it back). Collective: every rank sends
    its RNG state; the main process writes one file. snapshot: what a step that is given up
    has changed so far, as it was before it (engine/loop.StepFence): saved instead."""
    from accelerate.utils import gather_object

    rank_states = gather_object([rank_state(progress, s.accelerator.device, snapshot)])
    if s.accelerator.is_main_process:
        model = s.plain_model.state_dict()
        if snapshot is not None:  # BatchNorm statistics before the forward pass of that step
            model = {k: snapshot["buffers"].get(k, v) for k, v in model.items()}
        state = {
            "config": s.cfg.to_dict(),
            "epoch": epoch_done,
            "step": progress.step,
            "elapsed": s.elapsed,
            "world_size": s.accelerator.num_processes,
            "model": model,
            "ema": s.ema.state_dict() if s.ema is not None else None,
            "optimizer": s.optimizer.state_dict(),
            "plateau": s.plateau.state_dict() if s.plateau is not None else None,
            "step_scheduler": s.step_scheduler.state_dict() if s.step_scheduler else None,
            # fp16's loss scale: without it a resumed run starts again at 2**16 and skips steps
            "grad_scaler": s.accelerator.scaler.state_dict() if s.accelerator.scaler else None,
            "early_stopping": s.stopper.state_dict(),
            "best": s.best.state_dict(),
            "rank_states": rank_states,
            "data": s.data,
        }
    # Every rank waits for the write, and learns if it failed (a full disk).
    with main_process_writes(s.accelerator):
        if s.accelerator.is_main_process:
            save_resume_state(s.run_dir / layout.RESUME, state)


def write_checkpoints(s: Session, record: dict) -> None:
    """last.safetensors, and best.safetensors as a copy of it when this epoch is the best.
    Called after resume.pt is saved, so that a kill in between leaves checkpoints that
    repair_checkpoints can write again from resume.pt. Collective: every rank learns if the
    write failed."""
    with main_process_writes(s.accelerator):
        if s.accelerator.is_main_process:
            save_checkpoints(s, record)


def save_checkpoints(s: Session, record: dict) -> None:
    """Main process only: the writes of write_checkpoints."""
    last = layout.checkpoint_path(s.run_dir, "last")
    meta = checkpoint_metadata(s.cfg, record, count_parameters(s.plain_model))
    save_model_checkpoint(last, s.eval_model.state_dict(), meta)
    if record.get("is_best"):
        atomic_copy(last, layout.checkpoint_path(s.run_dir, "best"))


def repair_checkpoints(s: Session, state: dict) -> None:
    """Main process, on resume: if the run was killed after saving resume.pt at the end of an
    epoch but before that epoch's checkpoints were written, write them now from the state."""
    if state["step"]:
        return  # stopped mid-epoch: the last epoch's checkpoints were complete before it
    record = next((r for r in s.metrics.read() if r["epoch"] == state["epoch"]), None)
    if record is None:
        return
    stale = [
        name
        for name in ("last", "best")
        if (name == "last" or record.get("is_best"))
        and checkpoint_epoch(layout.checkpoint_path(s.run_dir, name)) != record["epoch"]
    ]
    if stale:
        save_checkpoints(s, record)
        s.reporter.print(f"rewrote {' and '.join(stale)} checkpoint(s) of epoch {record['epoch']}")


def checkpoint_metadata(cfg: TrainConfig, record: dict, n_params: int) -> dict:
    metric_names = ("train_loss", "valid_loss", "valid_accuracy")
    return {
        "model": cfg.model,
        "epoch": record["epoch"],
        "metrics": {k: v for k, v in record.items() if k in metric_names},
        "num_parameters": n_params,
        "config": cfg.to_dict(),
    }


def write_summary(
    s: Session, status: str, detail: str, epoch: int | None, stopped_by: str | None = None
) -> None:
    """summary.json, with where every rank ended: they must agree. Collective. stopped_by:
    the stop signal the main process got (SIGUSR1 asks a SLURM job to requeue)."""
    from accelerate.utils import gather_object

    ranks = gather_object(
        [
            {
                "rank": s.accelerator.process_index,
                "epoch": epoch,
                "lr": s.optimizer.param_groups[0]["lr"],
                "early_stopping_bad_epochs": s.stopper.bad_epochs,
            }
        ]
    )
    if s.accelerator.is_main_process:
        summary = {
            "status": status,
            "detail": detail,
            "epochs_completed": len(s.metrics.read()),
            "best": s.best.state_dict(),
            "world_size": s.accelerator.num_processes,
            "distributed_type": s.accelerator.distributed_type.value,
            "mixed_precision": s.accelerator.mixed_precision,
            "elapsed": s.elapsed,
            "ranks": ranks,
        }
        if status in layout.SUCCESSFUL_STATUSES:
            summary["ending"] = layout.ENDING_PENDING  # write_ending says done
        if stopped_by:
            summary["stopped_by"] = stopped_by
    with main_process_writes(s.accelerator):
        if s.accelerator.is_main_process:
            atomic_write_text(s.run_dir / layout.SUMMARY, json.dumps(summary, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# When the run has ended: what ending.py measured, written in
# --------------------------------------------------------------------------------------------
def write_ending(accelerator, run_dir: Path, ending: Ending, say: Callable[[str], None]) -> None:
    """Collective: on the main process, the pictures go into TensorBoard's Images tab and the
    run's HParams entry is written; then summary.json gains `final_test` and says the ending
    is done. Every rank learns if summary.json could not be written; the pictures and the
    entry are extras of a run that has ended, whose failure is one note."""
    run_dir = Path(run_dir)
    if not accelerator.is_main_process:
        if ending.due:
            with main_process_writes(accelerator):
                pass  # the main process's summary.json: every rank learns if it failed
        return
    if ending.pictures:
        log_pictures(accelerator, run_dir, ending, say)
    write_hparams(run_dir, ending.test_accuracy, say)
    if ending.due:  # last: a start that finds it pending does the end again
        with main_process_writes(accelerator):
            summary = read_json(run_dir / layout.SUMMARY) or {}
            if ending.final_test is not None:
                summary["final_test"] = ending.final_test
            summary["ending"] = layout.ENDING_DONE
            atomic_write_text(run_dir / layout.SUMMARY, json.dumps(summary, indent=2) + "\n")


def log_pictures(accelerator, run_dir: Path, ending: Ending, say) -> None:
    """Main process: the end's pictures in the run's TensorBoard, at the step of the last
    finished epoch (a resume never purges it)."""
    try:
        records, _ = read_metrics(run_dir)
        step = max((r["epoch"] for r in records), default=0)
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for tag, pixels in ending.pictures:
            writer.add_image(tag, pixels, step, dataformats="HWC")
        writer.flush()
        evaluation = ending.evaluation
        where = f"{evaluation.path.name} on the {evaluation.split_name} split"
        say(
            f"figures (per-class accuracy, confusion matrix, mistakes) of {where}: in "
            f"TensorBoard's Images tab (tensorboard --logdir {run_dir.parent})"
        )
    except Exception as exc:  # noqa: BLE001 - an extra must not fail an ended run
        say(f"note: no figures in TensorBoard: {type(exc).__name__}: {exc}")


def write_hparams(run_dir: Path, test_accuracy: float | None, say) -> None:
    """Main process: the run's HParams entry (hparams.py), once summary.json says how it
    ended; test_accuracy: measured at the end of the run, for a folder that holds none. A
    failure is one note and changes neither the status nor the exit code, so the other ranks
    need not learn of it (no collective)."""
    try:
        write_hparams_entry(run_dir / layout.TENSORBOARD, *run_entry(run_dir, test_accuracy))
    except OSError as exc:
        say(f"note: the HParams entry was not written: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - an extra must not fail an ended run
        say(f"note: the HParams entry was not written: {type(exc).__name__}: {exc}")


def write_hparams_entry(
    tb_dir: Path, hparams: dict[str, Any], metrics: dict[str, float], status: str, step: int
) -> Path:
    """Write a run's HParams entry as a new event file in tb_dir and remove the older ones.

    The file is written under a name TensorBoard ignores and renamed into place: a kill
    leaves the old entry or the new one, never a torn one (at worst both, and TensorBoard
    shows the older until the next write removes it). Not store/atomic.atomic_write: its
    temporary name would keep "tfevents", and TensorBoard would read the torn file."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    tb_dir = Path(tb_dir)
    tb_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = entry_file_name(now)
    events = entry_events(hparams, metrics, status, step, now)
    fd, tmp = tempfile.mkstemp(dir=tb_dir, prefix=PARTIAL_PREFIX, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = RecordWriter(f)
            for event in events:
                writer.write(event.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, tb_dir / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in tb_dir.iterdir():
        is_old_entry = old.name.endswith(SUFFIX) and old.name != name
        if is_old_entry or old.name.startswith(PARTIAL_PREFIX):
            old.unlink(missing_ok=True)
    return tb_dir / name


# --------------------------------------------------------------------------------------------
# TensorBoard's scalars, written now
# --------------------------------------------------------------------------------------------
def log_scalars(accelerator, scalars: dict, step: int, folder: Path) -> None:
    """Main process: TensorBoard scalars, written to disk now, so that a full disk shows up
    here, as one line naming `folder`, and not later in a background thread or at exit."""
    quiet_tensorboard_thread_errors()
    try:
        accelerator.log(scalars, step=step)
        for tracker in accelerator.trackers:
            flush = getattr(tracker.tracker, "flush", None)
            if flush is not None:
                flush()
    except OSError as exc:
        raise write_failed(folder, exc) from None


_quiet_installed = False


def quiet_tensorboard_thread_errors() -> None:
    """TensorBoard writes its events from a background thread; on a full disk that thread
    dies with a traceback on stderr, and the main thread gets the same OSError at its next
    write (reported there as one line). Leave that thread's traceback out."""
    global _quiet_installed
    if _quiet_installed:
        return
    import threading

    previous = threading.excepthook

    def hook(args) -> None:
        from_tensorboard = type(args.thread).__module__.startswith("tensorboard.")
        if not (from_tensorboard and issubclass(args.exc_type, OSError)):
            previous(args)

    threading.excepthook = hook
    _quiet_installed = True
