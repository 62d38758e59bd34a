"""`predict --image`: pictures drawn here, made into Fashion-MNIST images the way the data set
frames its items (light item on black, background decided from the border, aspect ratio
kept, any bit depth), and one clear error line for files that are not usable pictures."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from fmnist_accel.commands.picture import read_picture
from fmnist_accel.errors import UserError

PAPER, INK = 230, 30  # a dark item drawn on light paper


def drawing(paper: int = PAPER, ink: int = INK) -> np.ndarray:
    """A 200x100 (wide) picture: an item 40 wide and 80 tall, off-centre to the left."""
    picture = np.full((100, 200), paper, np.uint8)
    picture[10:90, 30:70] = ink
    return picture


def save(tmp_path, name: str, image: Image.Image) -> str:
    path = tmp_path / name
    image.save(path)
    return str(path)


def test_a_dark_item_on_light_paper_is_inverted_and_framed_like_fashion_mnist(tmp_path):
    picture = read_picture(save(tmp_path, "light.png", Image.fromarray(drawing())))
    assert picture.inverted and not picture.forced and picture.background == "light"
    assert picture.border == PAPER
    image = picture.image
    assert image.dtype == torch.uint8 and image.shape == (28, 28)
    # The item's box (40x80) padded to an 80x80 square and scaled: 40/80 of 28 columns,
    # centred (columns 7..20), over the full height; the paper is black, the item light.
    columns = image.float().mean(0)
    assert torch.nonzero(columns > 111).flatten().tolist() == list(range(7, 21))
    assert (image == image[0]).all()  # every row the same: the item spans the full height
    assert image[:, :5].max() <= 1 and image[:, 23:].max() <= 1
    assert image[:, 10:18].float().mean() == pytest.approx(255 * (225 - 25) / 230, abs=1)


def test_the_same_item_light_on_dark_gives_the_same_image(tmp_path):
    light = read_picture(save(tmp_path, "light.png", Image.fromarray(drawing())))
    dark_drawing = 255 - drawing()
    dark = read_picture(save(tmp_path, "dark.png", Image.fromarray(dark_drawing)))
    assert not dark.inverted and dark.background == "dark"
    assert torch.equal(dark.image, light.image)


def test_invert_and_no_invert_override_the_border(tmp_path):
    path = save(tmp_path, "light.png", Image.fromarray(drawing()))
    kept = read_picture(path, invert=False)
    assert not kept.inverted and kept.forced and "--no-invert" in kept.describe()
    # Still a dark item on light paper, framed the same way.
    assert kept.image[:, :5].min() >= PAPER - 1 and kept.image[:, 12:16].max() <= INK + 1
    forced = read_picture(path, invert=True)
    assert forced.inverted and forced.forced
    assert torch.equal(forced.image, read_picture(path).image)


def test_16_bit_palette_and_transparent_pictures_are_scaled_not_clipped(tmp_path):
    expected = read_picture(save(tmp_path, "light.png", Image.fromarray(drawing()))).image
    sixteen = Image.fromarray(drawing().astype(np.uint16) * 257)  # 65535 is white
    assert sixteen.mode.startswith("I;16")
    assert torch.equal(read_picture(save(tmp_path, "16bit.png", sixteen)).image, expected)
    # A palette picture: the pixels are indices (0 paper, 1 ink), the palette their colours.
    palette = Image.fromarray((drawing() == INK).astype(np.uint8), mode="P")
    palette.putpalette([PAPER, PAPER, PAPER, INK, INK, INK])
    assert torch.equal(read_picture(save(tmp_path, "palette.png", palette)).image, expected)
    # A cut-out on a transparent background: the background is white paper.
    white = read_picture(save(tmp_path, "white.png", Image.fromarray(drawing(paper=255)))).image
    rgba = np.zeros((100, 200, 4), np.uint8)
    rgba[10:90, 30:70] = (INK, INK, INK, 255)
    cutout = read_picture(save(tmp_path, "cutout.png", Image.fromarray(rgba)))
    assert cutout.inverted and torch.equal(cutout.image, white)


def test_a_28x28_picture_is_used_pixel_for_pixel(tmp_path):
    item = torch.zeros(28, 28, dtype=torch.uint8)
    item[3:25, 9:19] = torch.arange(22, dtype=torch.uint8)[:, None] * 10 + 30
    picture = read_picture(save(tmp_path, "fmnist.png", Image.fromarray(item.numpy())))
    assert not picture.inverted and torch.equal(picture.image, item)


def png_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit PNG whose header states width x height (its data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("bomb", "too large to open safely: more than 89,478,485 pixels"),
        ("above-the-warning-size", "too large to open safely"),
        ("truncated", "as a picture (OSError: image file is truncated"),
        ("text", "as a picture (not a picture format Pillow knows)"),
        ("missing", "no such file"),
    ],
)
def test_unusable_picture_files_are_one_line(tmp_path, kind, expected):
    path = tmp_path / f"{kind}.png"
    if kind == "bomb":
        path.write_bytes(png_bytes(20000, 20000))  # Pillow refuses more than twice its limit
    elif kind == "above-the-warning-size":
        path.write_bytes(png_bytes(10000, 10000))  # Pillow only warns below twice its limit
    elif kind == "truncated":
        Image.fromarray(drawing()).save(path)
        path.write_bytes(path.read_bytes()[:-30])  # the image data cut short
    elif kind == "text":
        path.write_text("not a picture\n")
    with pytest.raises(UserError) as exc:
        read_picture(str(path))
    message = str(exc.value)
    assert "\n" not in message and str(path) in message and expected in message


def test_predict_says_what_it_did_with_the_picture(tiny_run, cli, tmp_path):
    path = save(tmp_path, "light.png", Image.fromarray(drawing()))
    res = cli("predict", "best", "--run-dir", tiny_run.run_dir, "--image", path)
    assert res.rc == 0, str(res)
    assert res.stdout.splitlines()[0] == (
        f"{path}: light background (border grey level 230/255): inverted to a light item on "
        "black; --no-invert keeps it as it is"
    )
    res = cli("predict", "best", "--run-dir", tiny_run.run_dir, "--image", path, "--json")
    assert res.json()["background"] == "light" and res.json()["inverted"] is True
    res = cli("predict", "best", "--run-dir", tiny_run.run_dir, "--image", path, "--no-invert")
    assert res.rc == 0, str(res)
    assert res.stdout.splitlines()[0] == f"{path}: not inverted (--no-invert)"
