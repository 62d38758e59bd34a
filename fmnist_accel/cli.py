"""The `fmnist-accel` command: train, eval, predict, export, plot, runs.

The train options are generated from config.TrainConfig, so `fmnist-accel train`,
`python -m fmnist_accel.train` and `accelerate launch -m fmnist_accel.train` share one
definition. Each command's work is in run/training.py or commands/, imported only when the
command runs: `fmnist-accel --help` imports no torch and stays fast.
"""

from __future__ import annotations

import errno
import math
import os
import sys
import typing

import click

from .cluster import restarts
from .commands.runs import SORT_KEYS
from .config import RECIPES, TrainConfig, config_fields
from .errors import EXIT_PEER_FAILED, EXIT_USER_ERROR, UserError, error_line


class FiniteFloat(click.FloatRange):
    """A float option that refuses nan and inf (a plain range check lets nan through)."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def _click_type(f) -> tuple[typing.Any, bool]:
    """(click type, is_flag) for a TrainConfig field."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    meta = f.metadata
    if "choices" in meta:
        return click.Choice(meta["choices"]), False
    if base is bool:
        return bool, True
    if base in (int, float) and "min" in meta:
        range_type = click.IntRange if base is int else FiniteFloat
        limits = {
            "min": meta["min"],
            "min_open": meta.get("min_open", False),
            "max": meta.get("max"),
        }
        return range_type(**limits), False
    if base is float:
        return FiniteFloat(), False
    return base, False


def _help(f) -> str:
    default = f.default
    shown = (
        "not set"
        if default is None
        else ("on" if default is True else "off" if default is False else default)
    )
    text = f"{f.metadata['help']} [default: {shown}"
    for recipe, overrides in RECIPES.items():
        if f.name in overrides:
            value = overrides[f.name]
            value = "on" if value is True else "off" if value is False else value
            text += f"; {recipe} recipe: {value}"
    return text + "]"


def train_options(command):
    """Add one click option per TrainConfig field. Every default is None, meaning 'not
    given', so that config.resolve_config can layer recipe and user choices."""
    for f in reversed(config_fields()):
        click_type, is_flag = _click_type(f)
        name = f.name.replace("_", "-")
        decls = [f"--{name}/--no-{name}"] if is_flag else [f"--{name}"]
        command = click.option(
            *decls, f.name, default=None, type=None if is_flag else click_type, help=_help(f)
        )(command)
    return command


# The same -h/--help as the group's: `python -m fmnist_accel.train` runs this command alone.
@click.command(
    "train",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@train_options
def train_command(**options):
    """Train a model (defaults: cnn-bn with the seed's recipe, in large batches)."""
    from .cluster.stop_signals import StopRequest

    # Before torch is imported: a stop signal during the seconds of start-up is kept, and
    # acted on at the training's first check (under SLURM the processes start with the stop
    # signals ignored, slurm/lib.sh's node_main, so they would be lost).
    stop_request = StopRequest().install()
    from .run.training import train

    return train(options, program=program_name(), stop_request=stop_request)


def program_name() -> str:
    """The name the running command was called by (`fmnist-accel`, `python -m
    fmnist_accel.train`), which its error lines start with."""
    return click.get_current_context().find_root().info_name or "fmnist-accel"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fmnist-accel")
def cli():
    """Fashion-MNIST training on CPU, GPUs and clusters through Hugging Face Accelerate.

    \b
    fmnist-accel train --model cnn --epochs 20
    accelerate launch -m fmnist_accel.train --epochs 20
    fmnist-accel eval best --json
    fmnist-accel predict best --index 10
    fmnist-accel export best --output model.onnx
    """


cli.add_command(train_command)

checkpoint_argument = click.argument("checkpoint", default="best", metavar="best|last|PATH")
run_dir_option = click.option(
    "--run-dir",
    default=None,
    help="Run folder of best/last [default: the newest run in --output-dir].",
)
output_dir_option = click.option(
    "--output-dir", default="runs", show_default=True, help="Where to look for the newest run."
)
data_dir_option = click.option(
    "--data-dir", default=None, help="Fashion-MNIST folder [default: the one the run trained on]."
)


@cli.command("eval")
@checkpoint_argument
@run_dir_option
@output_dir_option
@data_dir_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Images per process per forward pass.",
)
@click.option(
    "--tta/--no-tta",
    default=False,
    show_default=True,
    help="Test-time augmentation: average the logits of each image and its mirror, and, for "
    "a model trained with random shifts (--augment, --crop-padding above 0), of the pair "
    "shifted one pixel up-left and one down-right.",
)
@click.option(
    "--split",
    type=click.Choice(["test", "valid"]),
    default="test",
    show_default=True,
    help="valid: the run's own validation images (its seeded split, rebuilt), to check the "
    "figures it logged.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
@click.option(
    "--save-figures",
    metavar="DIR",
    default=None,
    help="Also draw confusion_matrix.png, per_class_accuracy.png and mistakes.png (the most "
    "confidently misclassified images) into DIR.",
)
def eval_command(
    checkpoint, run_dir, output_dir, data_dir, batch_size, tta, split, as_json, save_figures
):
    """Test (or validation) loss, accuracy, per-class accuracy and confusion matrix of a
    checkpoint.

    Runs on one process, or on several with `accelerate launch -m fmnist_accel eval ...`:
    the figures are the same.
    """
    from .commands.eval import run_eval

    return run_eval(
        checkpoint,
        run_dir,
        output_dir,
        data_dir,
        batch_size,
        tta,
        split,
        as_json,
        save_figures,
        program=program_name(),
    )


@cli.command("plot")
@click.argument("runs", nargs=-1, required=True, metavar="RUN [RUN ...]")
@click.option(
    "--output-dir",
    default="runs",
    show_default=True,
    help="Where a RUN given by name is looked for (a RUN may also be a folder path).",
)
@click.option(
    "--save",
    "save_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The picture to write: a .png, .pdf or .svg file.",
)
def plot_command(runs, output_dir, save_path):
    """Learning curves of runs, drawn into one picture.

    Losses, accuracies and the learning rate against the epoch, one colour per run, the
    best epoch and learning-rate drops marked. RUN: a run folder, or its name in
    --output-dir.
    """
    from .commands.plot import run_plot

    return run_plot(list(runs), output_dir, save_path)


@cli.command("runs")
@click.option("--output-dir", default="runs", show_default=True, help="The folder of run folders.")
@click.option(
    "--sort",
    type=click.Choice(list(SORT_KEYS)),
    default="name",
    show_default=True,
    help="Order of the lines (valid, test, epochs: highest first).",
)
@click.option(
    "--sweep",
    metavar="NAME",
    help="Only the runs of this sweep (slurm/sweep.sbatch), the best validation accuracy marked.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list, one object per run.")
def runs_command(output_dir, sort, sweep, as_json):
    """A table of the run folders in --output-dir.

    One line per folder: model, recipe, status (running, completed, early-stopped,
    preempted, write-failed: stopped by a full disk or a failing write, diverged, or
    interrupted: killed without a word), epochs, best validation accuracy and its epoch, test
    accuracy, training time, processes, precision, the SLURM job of its latest start (an
    array task as JOB_TASK), and what is wrong with a damaged folder.
    """
    from .commands.runs import run_runs

    return run_runs(output_dir, sort, as_json, sweep)


@cli.command("predict")
@checkpoint_argument
@run_dir_option
@output_dir_option
@data_dir_option
@click.option("--index", type=click.IntRange(min=0), default=None, help="Index of a test image.")
@click.option(
    "--image",
    "image_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="A picture file (PNG, JPEG...): made grey, the item cut out, padded to a square and "
    "scaled to 28x28, the way Fashion-MNIST frames its items.",
)
@click.option(
    "--invert/--no-invert",
    default=None,
    help="Invert --image (Fashion-MNIST items are light on black) or keep it [default: "
    "decided from the picture's border: a light background is inverted].",
)
@click.option(
    "--top",
    type=click.IntRange(min=1, max=10),
    default=3,
    show_default=True,
    help="How many classes to list.",
)
@click.option(
    "--save",
    "save_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Save the image with its prediction as a PNG here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--onnx",
    "onnx_path",
    metavar="FILE",
    default=None,
    help="Classify with this ONNX file (written by `fmnist-accel export`) through onnxruntime "
    "instead of a checkpoint; --index reads the test images from --data-dir [default: data].",
)
def predict_command(
    checkpoint,
    run_dir,
    output_dir,
    data_dir,
    index,
    image_path,
    invert,
    top,
    save_path,
    as_json,
    onnx_path,
):
    """Classify one test image (--index) or a picture file (--image), with a checkpoint or
    an exported ONNX file (--onnx)."""
    from .commands.predict import run_predict, run_predict_onnx

    if (index is None) == (image_path is None):
        raise click.UsageError("give exactly one of --index N or --image FILE")
    if onnx_path is not None:
        ctx = click.get_current_context()
        given = [
            shown
            for name, shown in (
                ("checkpoint", f"the checkpoint {checkpoint}"),
                ("run_dir", "--run-dir"),
            )
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(
                f"--onnx classifies with the ONNX file alone: leave out {' and '.join(given)}"
            )
        return run_predict_onnx(
            onnx_path, data_dir, index, image_path, invert, top, save_path, as_json
        )
    return run_predict(
        checkpoint,
        run_dir,
        output_dir,
        data_dir,
        index,
        image_path,
        invert,
        top,
        save_path,
        as_json,
    )


@cli.command("export")
@checkpoint_argument
@run_dir_option
@output_dir_option
@click.option(
    "--data-dir",
    default=None,
    help="Fashion-MNIST folder of the check's test images [default: the one the run trained on].",
)
@click.option(
    "--output",
    "-o",
    required=True,
    metavar="FILE.onnx",
    help="The ONNX file to write; an existing file is replaced only by one that passed the check.",
)
@click.option(
    "--tta/--no-tta",
    default=False,
    show_default=True,
    help="Put `eval --tta`'s test-time augmentation into the graph: the mean of the logits of "
    "each image and its mirror (and its one-pixel shifts, for a model trained with them).",
)
@click.option(
    "--opset",
    type=click.IntRange(min=18),
    default=None,
    help="ONNX opset version [default: the exporter's; 18 or higher].",
)
def export_command(checkpoint, run_dir, output_dir, data_dir, output, tta, opset):
    """Export a checkpoint's model to ONNX, and check it against PyTorch with onnxruntime.

    \b
    fmnist-accel export best --output model.onnx
    fmnist-accel predict --onnx model.onnx --index 10

    The graph takes uint8 images N x 1 x 28 x 28 (any N; grey levels 0..255, a light item on
    black; an N x 28 x 28 array needs images[:, None]), scales and normalises them as
    training did, and returns the logits (N x 10). Its metadata holds the class names, the
    model, the checkpoint's epoch and metrics and the toolkit's version. Before the file
    replaces anything, onnxruntime runs it on the test split and on random images, and every
    logit must be within 1e-4 x the largest |logit| (at least 1) of PyTorch's, or nothing is
    written. The last line names the file, its size, the onnxruntime test accuracy and the
    largest difference. Needs the export extra: pip install 'fmnist-accel[export]'.
    """
    from .commands.export import run_export

    return run_export(
        checkpoint, run_dir, output_dir, data_dir, output, tta, opset, program=program_name()
    )


def run_cli(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """Run a click command; any user error becomes one line on stderr and a non-zero exit.

    click's own main() is not used: it turns a closed stdout pipe into a silent exit 1 and
    a bare `fmnist-accel` into an error. Here a closed pipe (`fmnist-accel eval best | head`)
    ends the process the way other command-line tools end, by SIGPIPE, and a bare command
    group prints its help.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = _invoke(command, args, prog_name)
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_is_a_pipe():
            raise  # not the reader of our output going away: a bug worth its traceback
        _die_of_closed_pipe()
    if code not in (0, EXIT_PEER_FAILED):  # a restart would only do the same again
        restarts.remember_deliberate_exit(code)
    _exit(code)


def _invoke(command: click.Command, args: list[str], prog_name: str) -> int:
    try:
        with command.make_context(prog_name, args) as ctx:
            _let_closed_pipes_through_rich()
            return command.invoke(ctx) or 0
    except _NO_ARGS_IS_HELP as exc:  # a bare `fmnist-accel`: its help, as --help shows it
        click.echo(exc.ctx.get_help())
        return 0
    except click.exceptions.Exit as exc:  # --help, --version
        return exc.exit_code
    except click.ClickException as exc:
        _error_line(prog_name, exc.format_message())
        return exc.exit_code if exc.exit_code else EXIT_USER_ERROR
    except (click.Abort, KeyboardInterrupt):
        print(file=sys.stderr)  # ends the terminal's ^C echo line
        return 130
    except UserError as exc:
        if not exc.reported:
            _error_line(prog_name, str(exc), every_rank=exc.every_rank_says_it)
        return exc.exit_code


# click 8.2 raises this for a group called without a command; older click exits 0 itself.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _let_closed_pipes_through_rich() -> None:
    """rich exits 1 when stdout's reader has gone (Console.on_broken_pipe, which rich means
    to be overridden): let the error reach run_cli instead, which ends as other tools do.
    Only once a command runs: --help stays free of the import."""
    from rich.console import Console

    def pass_on(console) -> None:
        raise BrokenPipeError(errno.EPIPE, "the reader of stdout has gone")

    Console.on_broken_pipe = pass_on


def _stdout_is_a_pipe() -> bool:
    import stat

    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _die_of_closed_pipe() -> None:
    """The reader of stdout went away: end silently, killed by SIGPIPE as `cat` or `ls`
    would be (the shell reports 141). Python ignores SIGPIPE so that sockets raise instead,
    which is why this is done by hand, and only here."""
    import signal

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush into the closed pipe
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)


def _exit(code: int) -> None:
    """Exit with `code`. A rank of a multi-process run skips the interpreter's finalization:
    gloo's worker threads may still hold tensors then, and freeing them while the interpreter
    is torn down aborts the process ("terminate called without an active exception"), which
    the launcher reports as a failure of a run that has finished. Every file it wrote is
    closed by then; only the standard streams need flushing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _error_line(prog_name: str, message: str, every_rank: bool = False) -> None:
    # Under a multi-process launcher every rank hits the same error: say it once.
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(error_line(prog_name, message), file=sys.stderr)


def main() -> None:
    """Console script `fmnist-accel`."""
    run_cli(cli, None, prog_name="fmnist-accel")
