"""`fmnist-accel export`: a checkpoint's model as one ONNX file that takes what a user has
(uint8 28 x 28 images) and gives the logits that `eval` and `predict` compute, checked
against PyTorch with onnxruntime before it replaces anything.

- The graph: the images scaled and normalised as training did (engine/device_data.normalise),
  the model in eval mode, and with --tta the mean of the logits of each image and its mirror,
  and its one-pixel shifts for a model trained with shifts (engine/evaluation.predict_logits
  and tta_views, as `eval --tta`); exported by torch's current exporter
  (torch.onnx.export(dynamo=True)) with a dynamic batch dimension. Its input is N x 1 x 28 x
  28: an ONNX graph's input has one rank (onnx's checker refuses an input of open rank), so
  an N x 28 x 28 array needs its channel axis (`images[:, None]`; `predict --onnx` and
  commands/onnx_model.py add it themselves).
- The metadata (metadata_props, commands/onnx_model.METADATA_KEYS): the class names, the
  model, the checkpoint's epoch and metrics, the toolkit's version.
- The check: the file is written to a temporary file beside --output, run by onnxruntime on
  the test split and on random images (also at batch 1), and compared with
  the PyTorch model. Only a file that passes is renamed over --output (store/atomic.py): a
  failed check or a failed write leaves the old file as it was, and no temporary file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..engine.data import CLASS_NAMES, IMAGE_SIZE, MEAN, STD, Split, load_split
from ..engine.device_data import normalise
from ..engine.evaluation import TTA_FLIP, TTA_FLIP_SHIFT, predict_logits, tta_views
from ..engine.trained_model import data_dir_for, may_download, model_from_checkpoint
from ..errors import OutputsOverflowed, UserError
from ..store.atomic import atomic_write
from ..store.run_folder import resolve_checkpoint
from .eval import finite_or_null, tta_warning
from .onnx_model import (
    FORMAT,
    INPUT_NAME,
    INSTALL_HINT,
    OUTPUT_NAME,
    OnnxClassifier,
    open_onnx_model,
)

# The check's tolerance: the largest difference between onnxruntime's and PyTorch's logits
# may be at most this share of the largest logit (of at least 1). fp32 on a CPU differs by
# about 1e-7 of it (other kernels, BatchNorm folded into the convolutions by the exporter);
# a wrong graph differs by whole units.
LOGIT_TOLERANCE = 1e-4
RANDOM_IMAGES = 64  # random uint8 images checked besides the test split
CHECK_BATCH = 256  # images per onnxruntime call and per PyTorch forward in the check
EXPORTER_MODULES = ("onnx", "onnxscript", "onnxruntime")


class DeployedModel(nn.Module):
    """uint8 images (N, 1, 28, 28) -> float32 logits (N, 10), as eval computes them."""

    def __init__(self, model: nn.Module, tta: bool | str):
        super().__init__()
        self.model = model
        self.tta = tta
        self.eval()  # the whole tree: BatchNorm's running statistics, no dropout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return predict_logits(self.model, normalise(images), self.tta)


@dataclass
class ParityCheck:
    """onnxruntime against PyTorch on the test split and on random images."""

    test_images: int
    ort_accuracy: float
    torch_accuracy: float
    max_difference: float  # the largest |onnxruntime - PyTorch| logit, over every image
    tolerance: float  # LOGIT_TOLERANCE of the largest |logit| (at least 1)
    classes_differ: int  # test images whose predicted class differs
    tie_margin: float  # the largest top-two logit gap of those images (PyTorch's)


def run_export(
    checkpoint: str,
    run_dir: str | None,
    output_dir: str,
    data_dir: str | None,
    output: str,
    tta: bool,
    opset: int | None,
    program: str = "fmnist-accel",
) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one file needs one process; the others end at once (as predict does)
    import_exporter()
    path = resolve_checkpoint(checkpoint, run_dir, output_dir)
    target = check_output(Path(output))
    if target.exists() and os.path.samefile(target, path):
        raise UserError(f"--output {output} is the checkpoint itself: name a new .onnx file")
    model, meta = model_from_checkpoint(path)
    test = load_split(data_dir_for(meta, data_dir), "test", may_download(data_dir))
    warning = tta_warning(path, meta.get("config", {})) if tta else None
    if warning:
        print(f"{program}: warning: {warning}", file=sys.stderr)
    views = tta_views(meta.get("config", {})) if tta else False  # eval --tta's views
    check = export_checkpoint(model, meta, path, target, test, views, opset)
    print(parity_line(target, meta, check))
    return 0


def import_exporter() -> None:
    """onnx, onnxscript and onnxruntime, or one line that names the extra to install."""
    missing = []
    for name in EXPORTER_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(
            f"export needs {', '.join(EXPORTER_MODULES)}; not installed: {', '.join(missing)}: "
            f"{INSTALL_HINT}"
        )


def check_output(output: Path) -> Path:
    """--output, checked before the work: not a folder, in a folder that exists and takes a
    new file (the same probe as the write's own temporary file)."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: name the .onnx file to write")
    folder = output.parent
    if not folder.exists():
        raise UserError(f"--output {output}: the folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise UserError(f"--output {output}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{output.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"--output {output}: cannot write to the folder {folder} ({exc.strerror or exc})"
        ) from None
    return output


def export_checkpoint(
    model: nn.Module,
    meta: dict,
    path: Path,
    output: Path,
    test: Split,
    tta: bool | str,
    opset: int | None = None,
) -> ParityCheck:
    """Export, write to a temporary file, check it, rename it over `output`; the check."""
    deployed = DeployedModel(model, tta)
    proto = build_onnx(deployed, opset)
    set_metadata(proto, onnx_metadata(meta, path, tta), tta)
    data = proto.SerializeToString()
    found: list[ParityCheck] = []

    def write_and_check(tmp: str) -> None:
        Path(tmp).write_bytes(data)
        found.append(check_parity(tmp, deployed, test, output))

    atomic_write(output, write_and_check)
    return found[0]


def build_onnx(deployed: DeployedModel, opset: int | None):
    """The onnx.ModelProto of `deployed`: torch's dynamo exporter, the batch dimension
    dynamic, checked by onnx's checker (with shape inference)."""
    import onnx

    latest = onnx.defs.onnx_opset_version()
    if opset is not None and opset > latest:
        raise UserError(
            f"--opset {opset}: onnx {onnx.__version__} knows opsets up to {latest}; choose an "
            f"--opset from 18 to {latest}"
        )
    example = torch.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    quiet = io.StringIO()
    try:
        # The exporter's progress lines and warnings are not the user's business; an error is.
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(quiet),
            contextlib.redirect_stderr(quiet),
        ):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                deployed,
                (example,),
                None,
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}},
                verbose=False,
            )
        proto = program.model_proto
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"torch {torch.__version__} could not export the model to ONNX"
            + (f" at opset {opset}" if opset else "")
            + f" ({reason[:300]})"
        ) from None
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise UserError(
            f"torch {torch.__version__}'s exporter cannot write opset {opset} (it wrote "
            f"{written}): choose an --opset from 18 to {latest}"
        )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # noqa: BLE001 - onnx's checker and shape inference
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"the exported ONNX model does not pass onnx's checker ({reason})"
        ) from None
    return proto


def toolkit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fmnist-accel")
    except PackageNotFoundError:
        return "unknown"


def onnx_metadata(meta: dict, path: Path, tta: bool | str) -> dict[str, str]:
    """The file's metadata_props (commands/onnx_model.METADATA_KEYS), all strings."""
    path = Path(path)
    return {
        "format": FORMAT,
        "model": str(meta.get("model")),
        "classes": json.dumps(list(CLASS_NAMES)),
        "epoch": str(meta.get("epoch")),
        "metrics": json.dumps(finite_or_null(meta.get("metrics", {})), sort_keys=True),
        "checkpoint": f"{path.resolve().parent.name}/{path.name}",
        "tta": "true" if tta else "false",
        "toolkit_version": toolkit_version(),
        "input": f"{INPUT_NAME}: uint8 grey levels 0..255, N x 1 x 28 x 28 (any N), a light "
        "item on black as in Fashion-MNIST; the graph scales and normalises them",
        "output": f"{OUTPUT_NAME}: float32 N x {len(CLASS_NAMES)}, one per class of 'classes'"
        + (f"; {TTA_WORDS[tta if isinstance(tta, str) else TTA_FLIP]}" if tta else "")
        + "; softmax gives the probabilities",
        "normalisation": json.dumps({"mean": round(255 * MEAN, 6), "std": round(255 * STD, 6)}),
    }


# What the graph's output is, in the file's metadata, for each of eval --tta's views.
TTA_WORDS = {
    TTA_FLIP: "the mean of each image's and its mirror image's logits",
    TTA_FLIP_SHIFT: "the mean of each image's and its mirror image's logits (weight 1/2) and "
    "of the same pair shifted one pixel up-left and one down-right (1/4 each)",
}


def set_metadata(proto, values: dict[str, str], tta: bool | str) -> None:
    from onnx import helper

    del proto.metadata_props[:]
    helper.set_model_props(proto, values)
    proto.doc_string = (
        f"fmnist-accel {values['model']}, epoch {values['epoch']}"
        + (f", {tta if isinstance(tta, str) else TTA_FLIP} TTA" if tta else "")
        + f", from {values['checkpoint']}: uint8 images in, logits out"
    )


def check_parity(tmp: str, deployed: DeployedModel, test: Split, output: Path) -> ParityCheck:
    """onnxruntime runs the file at `tmp` on the test split and on random images (in batches
    and at batch 1); each logit is compared with PyTorch's.
    Raises a UserError when the largest difference exceeds the tolerance."""
    classifier = open_for_check(tmp, output)
    g = torch.Generator().manual_seed(0)
    random = torch.randint(0, 256, (RANDOM_IMAGES, 1, IMAGE_SIZE, IMAGE_SIZE), generator=g)
    random = random.to(torch.uint8)
    reference_test = torch_logits(deployed, test.images[:, None])
    reference_random = torch_logits(deployed, random)
    if not (np.isfinite(reference_test).all() and np.isfinite(reference_random).all()):
        raise OutputsOverflowed(
            "the model's outputs overflow (non-finite logits in PyTorch; its weights are "
            f"finite but too large): nothing written to {output}; use another checkpoint"
        )
    got_test = classifier.logits(test.images[:, None].numpy(), CHECK_BATCH)
    runs = [
        (got_test, reference_test, "the test split"),
        (classifier.logits(random.numpy(), CHECK_BATCH), reference_random, "random images"),
        (classifier.logits(random[:1].numpy()), reference_random[:1], "batch 1"),
    ]
    scale = max(1.0, float(np.abs(reference_test).max(initial=0)))
    scale = max(scale, float(np.abs(reference_random).max(initial=0)))
    tolerance = LOGIT_TOLERANCE * scale
    worst, where = 0.0, runs[0][2]
    for got, expected, name in runs:
        if got.shape != expected.shape:
            raise UserError(
                f"the exported model gives logits of shape {got.shape} for {name}, PyTorch "
                f"{expected.shape}: nothing written to {output}"
            )
        difference = np.abs(got.astype(np.float64) - expected)
        largest = float(np.nan_to_num(difference, nan=np.inf).max(initial=0))
        if largest > worst or not np.isfinite(largest):
            worst, where = largest, name
    if not worst <= tolerance:
        raise UserError(
            f"the exported model's logits differ from PyTorch's by up to {worst:.3g} on "
            f"{where}, beyond the tolerance {tolerance:.3g} ({LOGIT_TOLERANCE:g} of the largest "
            f"logit): nothing written to {output} (an older file there is unchanged)"
        )
    labels = test.labels.numpy()
    ours, theirs = got_test.argmax(1), reference_test.argmax(1)
    differ = ours != theirs
    top_two = np.sort(reference_test[differ], axis=1)[:, -2:] if differ.any() else None
    return ParityCheck(
        test_images=len(labels),
        ort_accuracy=float((ours == labels).mean()) if len(labels) else float("nan"),
        torch_accuracy=float((theirs == labels).mean()) if len(labels) else float("nan"),
        max_difference=worst,
        tolerance=tolerance,
        classes_differ=int(differ.sum()),
        tie_margin=float((top_two[:, 1] - top_two[:, 0]).max()) if top_two is not None else 0.0,
    )


def open_for_check(tmp: str, output: Path) -> OnnxClassifier:
    """The freshly written file in onnxruntime, with as many threads as PyTorch has."""
    import onnxruntime

    try:
        return open_onnx_model(tmp, threads=torch.get_num_threads())
    except UserError as exc:
        reason = str(exc).replace(str(tmp), "it")
        raise UserError(
            f"onnxruntime {onnxruntime.__version__} cannot run the exported model ({reason}): "
            f"nothing written to {output}; a lower --opset may help"
        ) from None


@torch.no_grad()
def torch_logits(deployed: DeployedModel, images: torch.Tensor) -> np.ndarray:
    """float64 logits of uint8 images by the PyTorch model, CHECK_BATCH at a time."""
    parts = [
        deployed(images[i : i + CHECK_BATCH]).double() for i in range(0, len(images), CHECK_BATCH)
    ]
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(CLASS_NAMES)))


def parity_line(output: Path, meta: dict, check: ParityCheck) -> str:
    """The one line export ends with: file, size, onnxruntime's accuracy, the difference."""
    size = output.stat().st_size
    accuracy = f"onnxruntime test accuracy {check.ort_accuracy:.4f} on {check.test_images:,} images"
    if check.classes_differ:
        accuracy += f" (PyTorch {check.torch_accuracy:.4f})"
        classes = (
            f"{check.classes_differ} predicted class(es) differ, all near-ties (top two logits "
            f"{check.tie_margin:.2g} apart at most, within twice the largest difference)"
        )
    else:
        classes = "predicted classes identical to PyTorch's"
    return (
        f"{output}: {size / 1e6:.2f} MB ({meta.get('model')}, epoch {meta.get('epoch')}), "
        f"{accuracy}, largest logit difference {check.max_difference:.1e} over the test and "
        f"{RANDOM_IMAGES} random images (tolerance {check.tolerance:.1e}); {classes}"
    )
