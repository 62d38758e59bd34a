"""`fmnist-accel predict`: the class of one image, with the seed's picture of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.data import CLASS_NAMES, load_split
from ..engine.device_data import normalise
from ..engine.trained_model import data_dir_for, may_download, model_from_checkpoint
from ..errors import OutputsOverflowed, UserError
from ..store.run_folder import resolve_checkpoint
from .eval import finite_or_null
from .picture import read_picture


def run_predict(
    checkpoint: str,
    run_dir: str | None,
    output_dir: str,
    data_dir: str | None,
    index: int | None,
    image_path: str | None,
    invert: bool | None,
    top: int,
    save_path: str | None,
    as_json: bool,
) -> int:
    if int(os.environ.get("RANK", "0")) != 0:
        # Started by a multi-process launcher: one image needs one process. The others end
        # at once and successfully, so the launcher stops nobody before the main process
        # has printed its answer or its error.
        return 0
    path = resolve_checkpoint(checkpoint, run_dir, output_dir)
    model, meta = model_from_checkpoint(path)
    image, true_label, picture, source = chosen_image(
        index, image_path, invert, data_dir_for(meta, data_dir), may_download(data_dir)
    )
    with torch.no_grad():
        logits = model(normalise(image[None]))[0]
    return report_prediction(
        str(path), logits, image, true_label, picture, source, top, save_path, as_json
    )


def run_predict_onnx(
    onnx_path: str,
    data_dir: str | None,
    index: int | None,
    image_path: str | None,
    invert: bool | None,
    top: int,
    save_path: str | None,
    as_json: bool,
) -> int:
    """predict with a file of `fmnist-accel export`, through onnxruntime: no model classes,
    the same image (the picture preparation of commands/picture.py) and the same report. The
    test images are read from --data-dir, else ./data (the file does not say where its run
    trained)."""
    from .onnx_model import open_onnx_model

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    classifier = open_onnx_model(onnx_path)
    image, true_label, picture, source = chosen_image(
        index, image_path, invert, data_dir or "data", may_download(data_dir)
    )
    logits = torch.from_numpy(classifier.logits(image[None].numpy()))[0]
    return report_prediction(
        onnx_path,
        logits,
        image,
        true_label,
        picture,
        source,
        top,
        save_path,
        as_json,
        classes=classifier.classes,
    )


def chosen_image(
    index: int | None, image_path: str | None, invert: bool | None, data_dir: str, download: bool
):
    """(uint8 (28, 28) image, its true label or None, the Picture or None, its name)."""
    if index is not None:
        test = load_split(data_dir, "test", download)
        if index >= len(test):
            raise UserError(f"--index {index} is out of range: the test set has {len(test)} images")
        return test.images[index], int(test.labels[index]), None, f"test image {index}"
    picture = read_picture(image_path, invert)
    return picture.image, None, picture, image_path


def report_prediction(
    path: str,
    logits: torch.Tensor,
    image: torch.Tensor,
    true_label: int | None,
    picture,
    source: str,
    top: int,
    save_path: str | None,
    as_json: bool,
    classes: tuple[str, ...] | list[str] = CLASS_NAMES,
) -> int:
    """The prediction from one image's logits: lines or one JSON object, and the picture."""
    if not bool(torch.isfinite(logits).all()):
        raise OutputsOverflowed(
            f"{path}: the model's outputs overflow for {source} (non-finite logits; its "
            "weights are finite but too large): use another checkpoint"
        )
    probs = logits.softmax(0)
    values, indices = probs.topk(top)
    ranking = [
        (classes[c], float(p)) for p, c in zip(values.tolist(), indices.tolist(), strict=True)
    ]
    result = {
        "checkpoint": path,
        "source": source,
        "predicted_class": ranking[0][0],
        "predicted_index": int(indices[0]),
        "probability": ranking[0][1],
        "top": [{"class": name, "probability": p} for name, p in ranking],
        "true_class": classes[true_label] if true_label is not None else None,
    }
    if picture is not None:
        result.update(background=picture.background, inverted=picture.inverted)
    if save_path:
        save_figure(image, result, Path(save_path))
        result["figure"] = save_path
    if as_json:
        print(json.dumps(finite_or_null(result), allow_nan=False))
    else:
        if picture is not None:
            print(f"{source}: {picture.describe()}")
        print(
            f"{source}: {result['predicted_class']} ({result['probability']:.1%})"
            + (f", true class {result['true_class']}" if true_label is not None else "")
        )
        for name, p in ranking:
            print(f"  {name:<12} {p:7.2%}")
        if save_path:
            print(f"picture saved to {save_path}")
    return 0


def save_figure(image: torch.Tensor, result: dict, path: Path) -> None:
    """The image enlarged 8x, with the prediction written under it (the seed's imshow)."""
    from PIL import Image, ImageDraw

    scale, caption_height = 8, 40
    picture = Image.frombytes("L", (28, 28), bytes(image.contiguous().numpy().tobytes()))
    picture = picture.resize((28 * scale, 28 * scale), Image.Resampling.NEAREST)
    canvas = Image.new("L", (picture.width, picture.height + caption_height), color=255)
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    lines = [f"predicted: {result['predicted_class']} ({result['probability']:.1%})"]
    if result["true_class"] is not None:
        lines.append(f"true: {result['true_class']}")
    draw.multiline_text((6, picture.height + 4), "\n".join(lines), fill=0)
    try:
        canvas.save(path, format="PNG")
    except OSError as exc:
        raise UserError(f"cannot save the picture to {path}: {exc.strerror or exc}") from None
