"""Small Fashion-MNIST look-alikes written as real IDX files (the real reading code path).

Each class is a fixed random 28x28 template plus per-image noise, so models learn it in a few
epochs and tests can tell learning from chance.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch

# Sizes of the fake data of most tests: tiny, so a training epoch of the MLP takes a fraction
# of a second.
N_TRAIN = 200
N_TEST = 100
# What the session's tiny run trains (conftest.tiny_run): 2 epochs of the MLP.
TINY_RUN_ARGS = ("--model", "mlp", "--epochs", "2", "--batch-size", "32", "--seed", "0")


def idx_bytes(array: torch.Tensor) -> bytes:
    """IDX encoding of a uint8 tensor: magic 0x0000080<ndim>, big-endian dims, data."""
    header = struct.pack(">I", 0x0800 + array.dim()) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    return header + array.contiguous().numpy().tobytes()


def fake_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)  # templates: the same for every split
    templates = torch.rand(10, 28, 28, generator=g) * 200
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.randn(n, 28, 28, generator=g) * 40
    images = (templates[labels] + noise).clamp(0, 255).to(torch.uint8)
    return images, labels.to(torch.uint8)


def write_fashion_dir(root: Path, n_train: int = 600, n_test: int = 200, gz: bool = True) -> Path:
    """root/FashionMNIST/raw/ with the four files; returns root (the --data-dir)."""
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = fake_split(n, seed)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data, compresslevel=1))
            else:
                (raw / name).write_bytes(data)
    return Path(root)


def write_noisy_fashion_dir(root: Path, n_train: int = 600, n_test: int = 100) -> Path:
    """write_fashion_dir's images with half the labels (train and test) drawn at random, as
    plain files: a model learns them only halfway, and overfits them."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(99)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = fake_split(n, seed)
        noisy = torch.rand(n, generator=g) < 0.5
        random_labels = torch.randint(0, 10, (n,), generator=g).to(torch.uint8)
        labels = torch.where(noisy, random_labels, labels)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root
