"""IDX reading, the read-only data folder, the seeded split, and the missing-data error."""

from __future__ import annotations

import gzip
import os
import sys
import time
from pathlib import Path

import pytest
import torch
from support.errors import one_line
from support.fakedata import N_TEST, N_TRAIN, fake_split, idx_bytes, write_fashion_dir
from support.files import listing

from fmnist_accel.engine.data import (
    ALL_FILES,
    IMAGES_MAGIC,
    LABELS_MAGIC,
    Split,
    ensure_files,
    load_split,
    raw_dir,
    read_idx,
    train_valid_split,
)
from fmnist_accel.errors import UserError


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_reads_the_files_written(tmp_path, gz):
    root = write_fashion_dir(tmp_path, N_TRAIN, N_TEST, gz=gz)
    names = {p.name for p in raw_dir(root).iterdir()}
    assert all(n.endswith(".gz") == gz for n in names) and len(names) == 4
    for split, n, seed in (("train", N_TRAIN, 1), ("test", N_TEST, 2)):
        got = load_split(root, split, allow_download=False)
        images, labels = fake_split(n, seed)  # what fakedata wrote
        assert got.images.dtype == torch.uint8 and got.images.shape == (n, 28, 28)
        assert got.labels.dtype == torch.int64 and got.labels.shape == (n,)
        assert torch.equal(got.images, images)
        assert torch.equal(got.labels, labels.long())
        assert len(got) == n


def test_gzip_and_plain_files_read_the_same(tmp_path):
    gz = load_split(write_fashion_dir(tmp_path / "a", 50, 20, gz=True), "test")
    plain = load_split(write_fashion_dir(tmp_path / "b", 50, 20, gz=False), "test")
    assert torch.equal(gz.images, plain.images) and torch.equal(gz.labels, plain.labels)


def test_plain_file_is_preferred_over_gzip(tmp_path):
    root = write_fashion_dir(tmp_path, 30, 10, gz=True)
    raw = raw_dir(root)
    other, _ = fake_split(10, 99)
    (raw / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(other))
    assert torch.equal(load_split(root, "test").images, other)


def test_read_only_folder_is_only_read(readonly_data, tiny_run, cli):
    """The folder is 0555/0444 (root ignores that, so the check is that nothing under it
    changed: not a name, size, mtime or mode) after a training run, eval and predict."""
    root = readonly_data.path
    assert all(mode & 0o222 == 0 for *_, mode in listing(root).values())
    res = cli("eval", "last", "--run-dir", tiny_run.run_dir, "--json")
    assert res.rc == 0, str(res)
    assert res.json()["num_samples"] == N_TEST
    res = cli("predict", "best", "--run-dir", tiny_run.run_dir, "--index", "0")
    assert res.rc == 0, str(res)
    assert listing(root) == readonly_data.listing_before


def test_loading_never_opens_the_data_folder_for_writing(readonly_data):
    """In-process proof, independent of permissions: an audit hook sees every open, mkdir,
    rename and remove while both splits are read."""
    root = str(readonly_data.path.resolve())
    writes: list[tuple] = []
    active = True

    def inside(path) -> bool:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # an open file descriptor
        return os.path.realpath(os.fsdecode(path)).startswith(root)

    def hook(event, args):
        if not active:
            return
        if event == "open":
            path, mode, flags = args
            writing = (mode and any(c in str(mode) for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
            if writing and inside(path):
                writes.append((event, path))
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.chmod") and inside(
            args[0]
        ):
            writes.append((event, args[0]))

    sys.addaudithook(hook)
    try:
        train = load_split(readonly_data.path, "train")
        test = load_split(readonly_data.path, "test")
    finally:
        active = False
    assert len(train) == N_TRAIN and len(test) == N_TEST
    assert writes == []
    assert listing(readonly_data.path) == readonly_data.listing_before


# ------------------------------------------------------------------------------------------
# Bad files: one-line UserError naming the file
# ------------------------------------------------------------------------------------------
def raw_images(tmp_path: Path) -> Path:
    root = write_fashion_dir(tmp_path, 30, 10, gz=False)
    return raw_dir(root) / "t10k-images-idx3-ubyte"


def test_wrong_magic_number(tmp_path):
    path = raw_images(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[3] = 0x01  # 0x00000801: the labels' magic
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as exc:
        read_idx(path, IMAGES_MAGIC, (28, 28))
    assert "magic number 0x00000801" in one_line(exc) and str(path) in one_line(exc)


@pytest.mark.parametrize("cut", [1, 28 * 28, 1000])
def test_truncated_file(tmp_path, cut):
    path = raw_images(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    with pytest.raises(UserError) as exc:
        read_idx(path, IMAGES_MAGIC, (28, 28))
    assert f"{len(raw) - cut} bytes, its header promises {len(raw)}" in one_line(exc)
    assert "truncated" in one_line(exc)


def test_file_too_long_is_refused(tmp_path):
    path = raw_images(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_idx(path, IMAGES_MAGIC, (28, 28))


def test_header_only_fragment(tmp_path):
    path = raw_images(tmp_path)
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(UserError, match="not an IDX file: only 6 bytes"):
        read_idx(path, IMAGES_MAGIC, (28, 28))


def test_wrong_item_shape(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(idx_bytes(torch.zeros(4, 32, 32, dtype=torch.uint8)))
    with pytest.raises(UserError, match=r"shape \(32, 32\), expected \(28, 28\)"):
        read_idx(path, IMAGES_MAGIC, (28, 28))


@pytest.mark.parametrize(
    "damage",
    ["cut", "flip", "not-gzip"],
    ids=["truncated-gzip", "corrupt-gzip-stream", "not-gzip"],
)
def test_damaged_gzip(tmp_path, damage):
    root = write_fashion_dir(tmp_path, 30, 10, gz=True)
    path = raw_dir(root) / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    if damage == "cut":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        for i in range(20, len(raw) - 20, 37):
            raw[i] ^= 0xFF
    else:
        raw = bytearray(b"this is not gzip data at all")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError) as exc:
        load_split(root, "test")
    assert one_line(exc).startswith(f"cannot read {path}")


def test_image_and_label_counts_must_agree(tmp_path):
    root = write_fashion_dir(tmp_path, 30, 10, gz=False)
    labels = raw_dir(root) / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(torch.zeros(9, dtype=torch.uint8)))
    with pytest.raises(UserError, match="test has 10 images but 9 labels"):
        load_split(root, "test")


def test_labels_above_nine_are_refused(tmp_path):
    root = write_fashion_dir(tmp_path, 30, 10, gz=False)
    labels = raw_dir(root) / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(torch.full((10,), 10, dtype=torch.uint8)))
    with pytest.raises(UserError, match="labels go up to 10"):
        load_split(root, "test")


def test_labels_file_in_place_of_images(tmp_path):
    root = write_fashion_dir(tmp_path, 30, 10, gz=False)
    raw = raw_dir(root)
    (raw / "t10k-images-idx3-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes())
    with pytest.raises(UserError, match="magic number 0x00000801, expected 0x00000803"):
        load_split(root, "test")
    assert LABELS_MAGIC == 0x801


# ------------------------------------------------------------------------------------------
# Missing files and no network
# ------------------------------------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Every download goes to a closed local port: fails at once, never waits."""
    from torchvision.datasets import FashionMNIST

    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


def test_missing_files_and_failed_download_name_files_and_folder(tmp_path, no_network):
    started = time.monotonic()
    with pytest.raises(UserError) as exc:
        ensure_files(tmp_path / "nothing")  # what training checks before it starts
    message = one_line(exc)
    assert time.monotonic() - started < 10
    folder = raw_dir(tmp_path / "nothing")
    assert message.startswith(f"Fashion-MNIST files missing from {folder}/ (all four) and ")
    assert "download failed" in message
    # A new user learns in one line every file the folder needs, and where else to point.
    for name in ALL_FILES:
        assert f"{name}.gz" in message
    assert "--data-dir" in message
    assert not any(folder.iterdir())  # no partial download left behind
    # Reading one split names that split's files as the missing ones.
    with pytest.raises(UserError) as exc:
        load_split(tmp_path / "nothing", "train")
    assert "/ (train-images-idx3-ubyte, train-labels-idx1-ubyte) and " in one_line(exc)


def test_only_the_missing_file_is_named(tmp_path, no_network):
    root = write_fashion_dir(tmp_path, 30, 10, gz=True)
    (raw_dir(root) / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError) as exc:
        load_split(root, "test")
    message = one_line(exc)
    # The missing file is the one named as missing; the folder's full contents follow.
    assert f"missing from {raw_dir(root)}/ (t10k-labels-idx1-ubyte) and" in message
    assert all(f"{name}.gz" in message for name in ALL_FILES)
    assert sorted(p.name for p in raw_dir(root).iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]


def test_missing_files_without_download(tmp_path):
    with pytest.raises(UserError) as exc:
        load_split(tmp_path, "test", allow_download=False)
    assert "t10k-images-idx3-ubyte" in one_line(exc) and str(raw_dir(tmp_path)) in one_line(exc)


def test_missing_folder_that_cannot_be_created(tmp_path, no_network):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError) as exc:
        load_split(blocker, "test")
    assert "cannot be created" in one_line(exc)
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------------------------------
# The seeded train/valid split
# ------------------------------------------------------------------------------------------
def numbered(n: int) -> Split:
    """A split whose image i carries i in its first two pixels: samples can be traced."""
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = torch.arange(n) % 256
    images[:, 0, 1] = torch.arange(n) // 256
    return Split(images, torch.arange(n) % 10)


def ids(split: Split) -> list[int]:
    return (split.images[:, 0, 0].long() + 256 * split.images[:, 0, 1].long()).tolist()


def test_split_is_disjoint_complete_and_repeatable():
    full = numbered(600)
    train, valid = train_valid_split(full, 10000, seed=0)
    assert len(valid) == 600 * 10000 // 60000 == 100 and len(train) == 500
    assert set(ids(train)).isdisjoint(ids(valid))
    assert sorted(ids(train) + ids(valid)) == list(range(600))
    # labels travel with their images
    assert [i % 10 for i in ids(train)] == train.labels.tolist()
    again_train, again_valid = train_valid_split(full, 10000, seed=0)
    assert ids(again_train) == ids(train) and ids(again_valid) == ids(valid)
    _, other_valid = train_valid_split(full, 10000, seed=1)
    assert set(ids(other_valid)) != set(ids(valid))


def test_split_of_the_full_training_set_is_50k_10k():
    full = Split(torch.zeros(60000, 1, 1, dtype=torch.uint8), torch.zeros(60000, dtype=torch.long))
    full.images[:, 0, 0] = torch.arange(60000) % 251
    train, valid = train_valid_split(full, 10000, seed=0)
    assert (len(train), len(valid)) == (50000, 10000)


def test_valid_size_zero_keeps_everything_for_training():
    train, valid = train_valid_split(numbered(50), 0, seed=0)
    assert len(valid) == 0 and sorted(ids(train)) == list(range(50))


def test_gzip_helper_roundtrip_is_the_real_format(tmp_path):
    """The fake files are real IDX: the header is what the spec says, byte for byte."""
    root = write_fashion_dir(tmp_path, 3, 2, gz=True)
    raw = gzip.decompress((raw_dir(root) / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert raw[:16] == bytes.fromhex("00000803 00000002 0000001c 0000001c".replace(" ", ""))
    assert len(raw) == 16 + 2 * 28 * 28
