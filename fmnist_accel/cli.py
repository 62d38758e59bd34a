"""The `fmnist-accel` command: train, eval, predict.

The train options are generated from config.TrainConfig, so `fmnist-accel train`,
`python -m fmnist_accel.train` and `accelerate launch -m fmnist_accel.train` share one
definition. torch is imported only inside the commands: `fmnist-accel --help` stays fast.
"""

from __future__ import annotations

import math
import os
import sys
import typing

import click

from . import elastic, errors
from .config import RECIPES, TrainConfig, config_fields
from .errors import EXIT_PEER_FAILED, EXIT_USER_ERROR, UserError


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
    from .train import train

    return train(options)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fmnist-accel")
def cli():
    """Fashion-MNIST training on CPU, GPUs and clusters through Hugging Face Accelerate.

    \b
    fmnist-accel train --model cnn --epochs 20
    accelerate launch -m fmnist_accel.train --epochs 20
    fmnist-accel eval best --json
    fmnist-accel predict best --index 10
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
    help="Test-time augmentation: average the logits of each image and its mirror.",
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
def eval_command(checkpoint, run_dir, output_dir, data_dir, batch_size, tta, split, as_json):
    """Test (or validation) loss, accuracy, per-class accuracy and confusion matrix of a
    checkpoint.

    Runs on one process, or on several with `accelerate launch -m fmnist_accel eval ...`:
    the figures are the same.
    """
    from .evaluate import run_eval

    return run_eval(checkpoint, run_dir, output_dir, data_dir, batch_size, tta, split, as_json)


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
    help="A picture file (PNG, JPEG...): made greyscale, resized to 28x28.",
)
@click.option(
    "--invert",
    is_flag=True,
    help="Invert --image first: for a dark object on a light background (Fashion-MNIST is "
    "light on dark).",
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
def predict_command(
    checkpoint, run_dir, output_dir, data_dir, index, image_path, invert, top, save_path, as_json
):
    """Classify one test image (--index) or a picture file (--image)."""
    from .predict import run_predict

    if (index is None) == (image_path is None):
        raise click.UsageError("give exactly one of --index N or --image FILE")
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


def run_cli(command: click.Command, argv: list[str] | None, prog_name: str) -> None:
    """Run a click command; any user error becomes one line on stderr and a non-zero exit."""
    errors.PROGRAM = prog_name
    try:
        code = command.main(args=argv, prog_name=prog_name, standalone_mode=False) or 0
    except click.ClickException as exc:
        _error_line(prog_name, exc.format_message())
        code = exc.exit_code if exc.exit_code else EXIT_USER_ERROR
    except click.Abort:
        code = 130
    except UserError as exc:
        if not exc.reported:
            _error_line(prog_name, str(exc), every_rank=exc.every_rank_says_it)
        code = exc.exit_code
    except RuntimeError as exc:
        from .hardware import collective_failure

        failure = collective_failure(exc)  # another process hung or died: one line, not a trace
        if failure is None:
            raise
        _error_line(prog_name, str(failure), every_rank=True)
        code = failure.exit_code
    if code not in (0, EXIT_PEER_FAILED):  # a restart would only do the same again
        elastic.remember_deliberate_exit(code)
    _exit(code)


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
        print(f"{prog_name}: error: {message}", file=sys.stderr)


def main() -> None:
    """Console script `fmnist-accel`."""
    run_cli(cli, None, prog_name="fmnist-accel")
