"""The pictures the toolkit draws, as the tests check them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fmnist_accel import figures

FIGURE_NAMES = ("confusion_matrix", "per_class_accuracy", "mistakes")


def expected_size(name: str) -> tuple[int, int]:
    width, height = figures.SIZES[name]
    return round(width * figures.DPI), round(height * figures.DPI)


def assert_picture(image: Image.Image, name: str) -> np.ndarray:
    """A PNG of the figure's size with real content (many colours, not a blank canvas)."""
    assert image.format == "PNG"
    assert image.size == expected_size(name)
    pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f"{name} is (nearly) uniform"
    return pixels


def png_description(path: Path) -> dict:
    return json.loads(Image.open(path).text["Description"])
