"""Fashion-MNIST from IDX files: find, download, read, validate, split.

The files live in torchvision's layout, DIR/FashionMNIST/raw/<name>[.gz]. They are read
directly (gzip or plain), so DIR may be read-only. Only missing files are downloaded, with
torchvision's own mirrors and checksums.
"""

from __future__ import annotations

import gzip
import math
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28
# Training-set pixel statistics (of x/255), used to normalise every split.
MEAN = 0.2860
STD = 0.3530

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_FILES = (*FILES["train"], *FILES["test"])
SPLIT_SIZES = {"train": 60000, "test": 10000}
IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


@dataclass
class Split:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,), on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> Split:
        return Split(self.images[indices], self.labels[indices])


def raw_dir(data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / "FashionMNIST" / "raw"


def find_file(data_dir: str | os.PathLike, name: str) -> Path | None:
    """The plain file if present, else the gzipped one, else None. A name that is taken by
    something other than a file (a folder, a named pipe that would block the read) is a
    UserError that says what it is, not a missing file to download."""
    folder = raw_dir(data_dir)
    candidates = (folder / name, folder / f"{name}.gz")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    for candidate in candidates:
        what = not_a_file(candidate)
        if what:
            raise UserError(f"{candidate} is {what}, not a data file: put the file there")
    return None


def not_a_file(path: Path) -> str | None:
    """What `path` is when it exists but is no regular file (None otherwise)."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "a broken symbolic link" if path.is_symlink() else None
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def missing_files(data_dir: str | os.PathLike, split: str) -> list[str]:
    return [name for name in FILES[split] if find_file(data_dir, name) is None]


def missing_message(data_dir: str | os.PathLike, missing: list[str], why: str = "") -> str:
    """One line for a user whose data folder lacks files: which ones, where they were looked
    for, all four a data folder needs, and --data-dir."""
    which = "all four" if len(missing) == len(ALL_FILES) else ", ".join(missing)
    needed = ", ".join(f"{name}.gz" for name in ALL_FILES)
    return (
        f"Fashion-MNIST files missing from {raw_dir(data_dir)}/ ({which}){why}: put {needed} "
        "(or the unpacked files) there, or point --data-dir at the folder that holds "
        "FashionMNIST/raw/"
    )


def download(data_dir: str | os.PathLike, names: list[str]) -> None:
    """Fetch the named files (as .gz) with torchvision's mirrors and MD5 sums.

    Raises UserError naming the files and the folder when it cannot.
    """
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    folder = raw_dir(data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = f" and that folder cannot be created ({exc.strerror})"
        raise UserError(missing_message(data_dir, names, why)) from None
    checksums = dict(FashionMNIST.resources)
    for name in names:
        archive = f"{name}.gz"
        errors = []
        for mirror in FashionMNIST.mirrors:
            try:
                download_url(
                    mirror + archive, str(folder), filename=archive, md5=checksums[archive]
                )
                break
            except Exception as exc:  # noqa: BLE001 - any network or checksum failure
                errors.append(f"{mirror}: {type(exc).__name__}")
                (folder / archive).unlink(missing_ok=True)
        else:
            why = f" and the download failed ({'; '.join(errors)})"
            raise UserError(missing_message(data_dir, names, why))


def ensure_files(data_dir: str | os.PathLike, splits: tuple[str, ...] = ("train", "test")) -> None:
    """Download whatever files of `splits` are missing, all at once: a run that will need the
    test files later fails now, naming every missing file, rather than after training."""
    missing = [name for split in splits for name in missing_files(data_dir, split)]
    if missing:
        download(data_dir, missing)


# Bytes read at a time: a header that claims billions of items costs no memory before the
# data themselves show that it lies.
READ_CHUNK = 1 << 20


def read_idx(path: Path, magic: int, shape_tail: tuple[int, ...]) -> torch.Tensor:
    """Read one IDX file of unsigned bytes, checking its magic number, shape and size.

    The size is checked against the header before the data are read: a plain file by its
    length on disk, a gzipped one by reading no more than the header promises plus a byte.
    """
    ndim = len(shape_tail) + 1
    header_size = 4 + 4 * ndim
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            header = f.read(header_size)
            dims = check_idx_header(path, header, magic, shape_tail)
            expected = header_size + dims[0] * math.prod(shape_tail)
            if path.suffix != ".gz":
                size = os.fstat(f.fileno()).st_size
                if size != expected:
                    raise UserError(
                        f"{path} is truncated or corrupt: {size} bytes, its header promises "
                        f"{expected}"
                    )
            body = read_at_most(f, expected - header_size + 1)
    except (OSError, EOFError, zlib.error) as exc:  # zlib.error: damaged gzip data
        raise UserError(f"cannot read {path}: {exc}") from None
    size = header_size + len(body)
    if size != expected:
        more = "at least " if size > expected else ""
        raise UserError(
            f"{path} is truncated or corrupt: {more}{size} bytes, its header promises {expected}"
        )
    data = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    return data.view(dims)


def check_idx_header(
    path: Path, header: bytes, magic: int, shape_tail: tuple[int, ...]
) -> tuple[int, ...]:
    """The dimensions an IDX header announces, or a UserError saying what is wrong."""
    ndim = len(shape_tail) + 1
    if len(header) < 4 + 4 * ndim:
        raise UserError(f"{path} is not an IDX file: only {len(header)} bytes")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        raise UserError(
            f"{path} is not the expected IDX file: magic number 0x{found:08x}, "
            f"expected 0x{magic:08x}"
        )
    dims = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if dims[1:] != shape_tail:
        raise UserError(f"{path} holds items of shape {dims[1:]}, expected {shape_tail}")
    if dims[0] == 0:
        raise UserError(f"{path} holds no items: its header says 0")
    return dims


def read_at_most(f, limit: int) -> bytes:
    """Up to `limit` bytes from f, read in chunks (see READ_CHUNK)."""
    chunks, total = [], 0
    while total < limit:
        chunk = f.read(min(READ_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def load_split(data_dir: str | os.PathLike, split: str, allow_download: bool = True) -> Split:
    """Images and labels of 'train' (60k) or 'test' (10k), downloading missing files."""
    missing = missing_files(data_dir, split)
    if missing:
        if not allow_download:
            raise UserError(missing_message(data_dir, missing))
        download(data_dir, missing)
    image_name, label_name = FILES[split]
    images = read_idx(find_file(data_dir, image_name), IMAGES_MAGIC, (IMAGE_SIZE, IMAGE_SIZE))
    labels = read_idx(find_file(data_dir, label_name), LABELS_MAGIC, ()).long()
    if len(images) != len(labels):
        raise UserError(
            f"{raw_dir(data_dir)}: {split} has {len(images)} images but {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= NUM_CLASSES:
        raise UserError(f"{raw_dir(data_dir)}: {split} labels go up to {int(labels.max())}, not 9")
    return Split(images, labels)


def data_identity(split: Split) -> dict:
    """What identifies a training set, saved in resume.pt and compared on resume: its size and
    a fingerprint of its images and labels (SHA-256 of their bytes; 0.1 s for 60k)."""
    import hashlib

    digest = hashlib.sha256(split.images.contiguous().numpy().tobytes())
    digest.update(split.labels.contiguous().numpy().tobytes())
    return {"images": len(split), "fingerprint": digest.hexdigest()[:16]}


def train_valid_split(train: Split, valid_size: int, seed: int) -> tuple[Split, Split]:
    """The seed's random 50k/10k split, made repeatable: a permutation seeded by `seed`.

    With fewer training images than the full 60k (generated test data), the validation part
    shrinks in proportion so both sides keep images.
    """
    n = len(train)
    if valid_size and n < SPLIT_SIZES["train"]:
        valid_size = max(1, n * valid_size // SPLIT_SIZES["train"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(order[valid_size:]), train.subset(order[:valid_size])
