"""An ONNX file written by `fmnist-accel export`: its metadata, and its logits through
onnxruntime on the CPU. No torch: `predict --onnx` classifies with this alone.

The file's graph takes what a user has, uint8 grey levels (N x 1 x 28 x 28, any N, a light
item on black as Fashion-MNIST has them), and does the scaling and normalisation that
training used itself; it returns float32 logits (N x 10). (An ONNX input has one rank: an
N x 28 x 28 array needs its channel axis, which OnnxClassifier.logits adds.) Its
metadata_props say which classes the logits are for and where the model came from
(METADATA_KEYS).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..store.atomic import special_file_kind

# The extra that `export` and `predict --onnx` need, and the modules it brings.
EXTRA = "export"
INSTALL_HINT = f"pip install 'fmnist-accel[{EXTRA}]'"
FORMAT = "fmnist-accel-onnx/1"  # metadata_props["format"] of every file export writes
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
# What a user of the file reads in its metadata_props (all strings; *_json ones hold JSON).
METADATA_KEYS = (
    "format",  # FORMAT
    "model",  # the toolkit's model name (cnn-bn, airbench-s, ...)
    "classes",  # JSON list: the class name of each logit, in order
    "epoch",  # the checkpoint's epoch
    "metrics",  # JSON object: the checkpoint's metrics at that epoch (validation accuracy...)
    "checkpoint",  # RUN/best.safetensors: the run folder's name and the checkpoint's
    "tta",  # "true": the graph averages the logits of each image and its mirror
    "toolkit_version",  # the fmnist-accel version that exported it
    "input",  # what the graph takes, in words
    "output",  # what it returns, in words
    "normalisation",  # JSON object: the mean and std (of grey levels 0..255) the graph applies
)


def import_onnxruntime():
    """onnxruntime, or one line that says which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"this needs onnxruntime, which is not installed: {INSTALL_HINT}") from None
    return onnxruntime


def ort_error(exc: Exception) -> str:
    """onnxruntime's reason, without its '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load
    model from PATH failed:' prefix, on one line."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from .* failed:\s*", "", text).strip() or type(exc).__name__


def check_model_file(path: str) -> None:
    """A regular file, or one line: a FIFO would block for ever, a folder has no model."""
    kind = special_file_kind(path)
    if kind == "missing":
        raise UserError(f"no ONNX model at {path}")
    if kind is not None and kind.startswith("unreadable"):
        raise UserError(f"cannot read {path}: {kind.removeprefix('unreadable (')[:-1]}")
    if kind == "a folder":
        raise UserError(f"{path} is a folder: give the .onnx file that export wrote")
    if kind is not None:
        raise UserError(f"{path} is not a regular file: give the .onnx file that export wrote")


@dataclass
class OnnxClassifier:
    """An exported model opened in onnxruntime (CPU)."""

    path: str
    session: object  # onnxruntime.InferenceSession
    metadata: dict[str, str]

    @property
    def classes(self) -> list[str]:
        return json.loads(self.metadata["classes"])

    def logits(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """float32 (N, 10) logits of uint8 images (N, 28, 28) or (N, 1, 28, 28)."""
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim == 3:
            images = images[:, None]
        parts = [
            self.session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(parts) if parts else np.zeros((0, 10), np.float32)


def open_onnx_model(path: str, threads: int = 0, *, check_ours: bool = True) -> OnnxClassifier:
    """The ONNX file at `path` in an onnxruntime session on the CPU (threads 0: onnxruntime
    decides), or one line: no such file, not an ONNX model, or (check_ours) not one that
    `fmnist-accel export` wrote."""
    ort = import_onnxruntime()
    path = str(path)
    check_model_file(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings are not the user's business
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        raise UserError(
            f"{path} is not an ONNX model onnxruntime can load ({ort_error(exc)})"
        ) from None
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if check_ours:
        problem = metadata_problem(metadata, session)
        if problem:
            raise UserError(
                f"{path} is an ONNX model but not one that fmnist-accel export wrote "
                f"({problem}): export a checkpoint with fmnist-accel export"
            )
    return OnnxClassifier(path, session, metadata)


def metadata_problem(metadata: dict[str, str], session) -> str | None:
    if metadata.get("format") != FORMAT:
        return f"its metadata has no format {FORMAT}"
    try:
        classes = json.loads(metadata.get("classes", ""))
    except json.JSONDecodeError:
        classes = None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return "its metadata has no list of class names"
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
        return f"its inputs are {inputs} and outputs {outputs}"
    return None
