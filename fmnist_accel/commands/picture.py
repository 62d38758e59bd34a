"""A picture file made into a Fashion-MNIST image: 28x28 grey, a light item on a black
background, framed the way the data set frames its items.

Fashion-MNIST made its images from product photos (Xiao et al., 2017): trim the edges that
are close to the background colour, scale the longest edge to 28 pixels, centre the item on
a 28x28 canvas, negate (the items are light on black). Here, for any picture:

1. grey levels in 0..255 from any mode: 16-bit and 32-bit images are scaled, not clipped;
   palette images go through their palette; transparency becomes white paper; a photo's
   EXIF orientation is applied;
2. the background is judged from the picture's border: a light border (a dark item on white
   paper, the usual photo or drawing) is inverted, a dark one is kept (`invert` overrides);
3. the background level becomes 0 (a grey paper would otherwise be a grey canvas);
4. the item's bounding box is cut out, padded to a square with the background (the aspect
   ratio is kept) and scaled to 28x28.

A 28x28 picture is taken as already framed: only steps 1 and 2 apply, so a picture of a data
set image is classified exactly like the image itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.data import IMAGE_SIZE
from ..errors import UserError
from ..store.atomic import special_file_kind

# The border ring whose median grey level decides the background: 2% of the shorter side.
BORDER_FRACTION = 0.02
# Pixels that differ from the background by more than 5% of full scale can belong to the
# item (the paper's trimming threshold) ...
ITEM_THRESHOLD = 0.05 * 255
ITEM_SHARE = 0.25  # ... if they also differ by this share of the item's contrast (item_extent)


@dataclass
class Picture:
    image: torch.Tensor  # uint8 (28, 28): what the model sees
    size: tuple[int, int]  # (width, height) of the file's picture
    border: float  # median grey level of the picture's border, 0..255, before any inversion
    inverted: bool
    forced: bool  # the inversion was chosen by --invert/--no-invert, not by the border

    @property
    def background(self) -> str:
        return "light" if self.border > 127.5 else "dark"

    def describe(self) -> str:
        """The choice made, in one line, with how to make the other one."""
        if self.forced:
            return "inverted, as --invert asks" if self.inverted else "not inverted (--no-invert)"
        seen = f"{self.background} background (border grey level {self.border:.0f}/255)"
        if self.inverted:
            return f"{seen}: inverted to a light item on black; --no-invert keeps it as it is"
        return f"{seen}: used as it is; --invert inverts it"


def read_picture(path: str, invert: bool | None = None) -> Picture:
    """The picture file at `path` as the model's input. invert: None decides from the border.
    Raises UserError with one line for anything that is not a readable picture."""
    grey, size = load_grey(path)
    border = border_level(grey)
    inverted = border > 127.5 if invert is None else invert
    if inverted:
        grey = 255.0 - grey
    if grey.shape != (IMAGE_SIZE, IMAGE_SIZE):
        grey = frame(grey, background=255.0 - border if inverted else border)
    image = torch.from_numpy(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
    return Picture(image, size, border, inverted, forced=invert is not None)


def refuse_special_file(path: str) -> None:
    """Only a regular file is read: a FIFO or a socket would block for ever, a device read
    without end."""
    kind = special_file_kind(path)
    if kind == "missing":
        raise UserError(f"--image {path}: no such file")
    if kind is not None and kind.startswith("unreadable"):
        raise UserError(f"--image {path}: cannot read it {kind.removeprefix('unreadable ')}")
    if kind == "a folder":
        raise UserError(f"--image {path} is a folder: give a picture file")
    if kind is not None:
        raise UserError(f"--image {path} is {kind}, not a regular file: give a picture file")


def load_grey(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(float32 (H, W) grey levels in 0..255, (width, height)) of a picture file."""
    from PIL import Image, ImageOps

    limit = Image.MAX_IMAGE_PIXELS
    refuse_special_file(path)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its limit and twice it; both refuse here, with one line.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img = ImageOps.exif_transpose(img)  # a phone photo upright, as it is shown
                return grey_levels(img), img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(
            f"{path} is too large to open safely: more than {limit:,} pixels (Pillow's guard "
            "against decompression bombs); scale it down first"
        ) from None
    except FileNotFoundError:
        raise UserError(f"cannot read {path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"cannot read {path} as a picture: it is a folder") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types for bad files
        raise UserError(f"cannot read {path} as a picture ({picture_error(exc)})") from None


def picture_error(exc: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not a picture format Pillow knows"
    reason = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def grey_levels(img) -> np.ndarray:
    """float32 grey levels in 0..255 of an open PIL image of any mode."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16"):  # 16-bit grey (PNG, TIFF): 65535 is white
        return np.asarray(img, dtype=np.float32) / 257.0
    if mode == "I":  # 32-bit integers; 16-bit files open like this with some Pillow versions
        values = np.asarray(img, dtype=np.float32)
        return values / 257.0 if values.max(initial=0) > 255 else values
    if mode == "F":  # floats: 0..1 or 0..255
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        return values * 255.0 if values.max(initial=0) <= 1 else np.clip(values, 0, 255)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        # Transparent parts are white paper: a cut-out product photo is then a dark item on
        # a light background, like any other photo.
        rgba = img.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(paper, rgba)
    elif mode not in ("L", "RGB", "P", "1"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB...: through RGB
    return np.asarray(img.convert("L"), dtype=np.float32)


def border_level(grey: np.ndarray) -> float:
    """Median grey level of a ring around the picture, 2% of its shorter side wide."""
    h, w = grey.shape
    k = max(1, round(min(h, w) * BORDER_FRACTION))
    ring = np.concatenate(
        [grey[:k].ravel(), grey[-k:].ravel(), grey[k:-k, :k].ravel(), grey[k:-k, -k:].ravel()]
    )
    return float(np.median(ring))


def item_extent(contrast: np.ndarray) -> tuple[slice, slice]:
    """The rows and columns of the item's bounding box, from each pixel's distance to the
    background grey level.

    A pixel is the item's when it stands out by more than 5% of full scale and by more than
    a quarter of the item's own contrast (a photo's uneven paper and noise stay below that),
    and a row or column is the item's when at least 1% of it is: a stray speck does not widen
    the box. An empty picture stays whole."""
    h, w = contrast.shape
    bright = float(np.percentile(contrast, 99.5))
    item = contrast > max(ITEM_THRESHOLD, ITEM_SHARE * bright)
    rows = np.flatnonzero(item.sum(axis=1) >= max(1, w // 100))
    cols = np.flatnonzero(item.sum(axis=0) >= max(1, h // 100))
    if not len(rows) or not len(cols):
        return slice(None), slice(None)
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def frame(grey: np.ndarray, background: float) -> np.ndarray:
    """A picture framed as Fashion-MNIST frames its items: the item's bounding box padded to a
    square with the background and scaled to 28x28. A dark background (the model's kind of
    picture) is first made 0; a light one (kept by --no-invert) stays as it is."""
    from PIL import Image

    if background <= 127.5:
        span = 255.0 - background
        grey = np.clip((grey - background) * (255.0 / span), 0, 255)
        background = 0.0
    rows, cols = item_extent(np.abs(grey - background))
    item = grey[rows, cols]
    h, w = item.shape
    side = max(h, w)
    square = np.full((side, side), background, dtype=np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = item
    scaled = Image.fromarray(square).resize(  # float32: Pillow's "F" mode
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS
    )
    return np.asarray(scaled, dtype=np.float32)
