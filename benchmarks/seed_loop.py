"""A faithful copy of the seed's training loop (seed/fmnist-blog-ko.md), the baseline of the
benchmark.

What is kept from the seed: torchvision's FashionMNIST dataset class with per-image PIL
transforms (ToTensor, Normalize), random_split 50k/10k, DataLoader(batch_size=16,
shuffle=True) with its default single-process loading, the MLP's `images.resize_(N, 784)`,
Adam(lr=1e-3), `loss.item()` after every step, a validation pass with `.item()` per batch,
TensorBoard scalars, torch.save of the best state dict, early stopping and
ReduceLROnPlateau stepped once per epoch. The only change: the model classes are the
toolkit's (the same layer shapes), so that accuracy differences come from the loop alone;
the seed's cnn-bn also left its last dropout on in eval mode. Their dropout layers are put
back to torch's nn.Dropout, as the seed had (the toolkit's draws its mask faster on CPUs).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn, optim
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

from fmnist_accel.engine.data import load_split
from fmnist_accel.engine.models import build_model

SEED_BATCH_SIZE = 16


def seed_dataset(data_dir: str, split: str) -> datasets.FashionMNIST:
    """torchvision's own FashionMNIST class (its __getitem__: PIL image, then transform),
    filled from the IDX files here: the copy in ../shared/data is read-only and gzipped,
    which torchvision's download check does not accept (DESIGN.md, data README)."""
    raw = load_split(data_dir, split)
    ds = datasets.FashionMNIST.__new__(datasets.FashionMNIST)
    datasets.VisionDataset.__init__(
        ds,
        root=data_dir,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]),
    )
    ds.train = split == "train"
    ds.data, ds.targets = raw.images, raw.labels
    return ds


def seed_loaders(data_dir: str):
    trainset = seed_dataset(data_dir, "train")
    testset = seed_dataset(data_dir, "test")
    trainset, validset = random_split(trainset, [50000, 10000])
    return (
        DataLoader(trainset, batch_size=SEED_BATCH_SIZE, shuffle=True),
        DataLoader(validset, batch_size=SEED_BATCH_SIZE),
        DataLoader(testset, batch_size=SEED_BATCH_SIZE),
    )


def forward(model, model_name: str, images):
    if model_name == "mlp":
        images.resize_(images.size()[0], 784)  # the seed's MLP input preparation
    return model.forward(images)


def validation(model, model_name, loader, criterion, device):
    """The seed's validation(): per-batch `.item()`, mean of batch means."""
    valid_accuracy = 0
    valid_loss = 0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = forward(model, model_name, images)
            _, preds = torch.max(logits, 1)
            correct = (preds == labels).sum()
            valid_accuracy += (correct / images.shape[0]).item()
            valid_loss += criterion(logits, labels).item()
    return valid_loss, valid_accuracy


def with_torch_dropout(model: nn.Module) -> nn.Module:
    """The model with torch's own nn.Dropout in place of the toolkit's CPU-faster one."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Dropout) and type(child) is not nn.Dropout:
                setattr(module, name, nn.Dropout(child.p))
    return model


class SeedRun:
    """The seed's train() as a generator of epochs, so the benchmark can time and stop it."""

    def __init__(self, model_name: str, data_dir: str, device: torch.device, seed: int = 0):
        torch.manual_seed(seed)
        self.model_name = model_name
        self.device = device
        self.trainloader, self.validloader, self.testloader = seed_loaders(data_dir)
        self.model = with_torch_dropout(build_model(model_name)).to(device)
        self.criterion = nn.CrossEntropyLoss()
        self.optimizer = optim.Adam(self.model.parameters(), lr=0.001)
        self.scheduler = optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, "min", patience=5, factor=0.1
        )
        from torch.utils.tensorboard import SummaryWriter

        self.tmp = tempfile.TemporaryDirectory()
        self.writer = SummaryWriter(self.tmp.name)

    def step(self, images, labels) -> float:
        """The body of the seed's inner loop, its `loss.item()` included."""
        images, labels = images.to(self.device), labels.to(self.device)
        outputs = forward(self.model, self.model_name, images)
        loss = self.criterion(outputs, labels)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def train_steps(self, seconds: float) -> tuple[int, float]:
        """Train (the seed's inner loop) for about `seconds`; returns (images, elapsed)."""
        self.model.train()
        images_seen, start = 0, time.perf_counter()
        while True:
            for images, labels in iter(self.trainloader):
                self.step(images, labels)
                images_seen += len(labels)
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    return images_seen, elapsed

    def epochs(self, max_epochs: int = 50, patience: int = 10):
        """Yield (epoch, seconds of this epoch's training + validation) like the seed's train()."""
        model = self.model
        min_loss, max_accuracy, trigger = 10000, 0, 0
        for epoch in range(max_epochs):
            start = time.perf_counter()
            model.train()
            train_loss = 0
            for images, labels in iter(self.trainloader):
                train_loss += self.step(images, labels)
            model.eval()
            valid_loss, valid_accuracy = validation(
                model, self.model_name, self.validloader, self.criterion, self.device
            )
            n = len(self.validloader)
            self.writer.add_scalar("Loss/train", train_loss / len(self.trainloader), epoch)
            self.writer.add_scalar("Loss/valid", valid_loss / n, epoch)
            self.writer.add_scalar("Valid Accuracy", valid_accuracy / n, epoch)
            if valid_accuracy > max_accuracy:
                max_accuracy = valid_accuracy
                torch.save(model.state_dict(), Path(self.tmp.name) / "best_checkpoint.pth")
            stop = False
            if valid_loss > min_loss:
                trigger += 1
                stop = trigger > patience
            else:
                trigger, min_loss = 0, valid_loss
            self.scheduler.step(valid_loss)
            yield epoch + 1, time.perf_counter() - start
            if stop:
                return

    def test_accuracy(self) -> float:
        """Exact test accuracy of the current weights (not timed by the benchmark)."""
        self.model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in self.testloader:
                images, labels = images.to(self.device), labels.to(self.device)
                correct += (forward(self.model, self.model_name, images).argmax(1) == labels).sum()
                total += len(labels)
        return int(correct) / total
