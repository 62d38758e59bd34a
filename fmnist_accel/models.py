"""The seed's three models, a ResNet-9 and two faster ResNets, by name.

Every model takes normalised images of shape (N, 1, 28, 28) and returns (N, 10) logits.
The layer shapes of mlp, cnn and cnn-bn follow the seed (docs/original-recipe.md), including its
quirks (no activation between the two fully connected layers of the CNNs), with one bug
fixed: the seed's cnn-bn called F.dropout(x, 0.5), which stays on in eval mode; here it is
an nn.Dropout module, so model.eval() turns it off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class UniformMaskDropout(nn.Dropout):
    """nn.Dropout with a faster mask on CPU; the same on GPUs (`inplace` is not supported).

    On a CPU, torch draws the mask with bernoulli_, which took a quarter of cnn-bn's
    training step on the 2-core machine (torch.profiler). Comparing a uniform draw with p
    gives the same mask distribution in under half the time. GPUs keep torch's fused kernel.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return super().forward(x)
        # float32 draws whatever x's dtype: a bf16 uniform would bias P(keep)
        keep = torch.rand_like(x, dtype=torch.float32).ge_(self.p)
        return x * keep.to(x.dtype).mul_(1 / (1 - self.p))


def conv_block(c_in: int, c_out: int, *, batch_norm: bool = False, dropout: float = 0.0):
    """3x3 convolution (padding 1), [BatchNorm], ReLU, [Dropout], 2x2 max-pool: the seed's block."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(UniformMaskDropout(dropout))
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """The seed's fully connected network on flattened 784-pixel images.

    The write-up shows only its training loop (`images.resize_(N, 784)`); the layers are the
    common bootcamp shape 784-128-64-10 with ReLU.
    """

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    """The seed's basic CNN: two conv blocks, fc 3136 -> 128 -> 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_block(1, 32)  # 32 x 14 x 14
        self.conv2 = conv_block(32, 64)  # 64 x 7 x 7
        self.fc1 = nn.Linear(64 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv2(self.conv1(x))
        return self.fc2(self.fc1(x.flatten(1)))


class CNNBN(nn.Module):
    """The seed's improved CNN: three conv blocks with BatchNorm and Dropout 0.2/0.4,
    fc 1152 -> 128, BatchNorm1d, Dropout 0.5, fc -> 10."""

    def __init__(self):
        super().__init__()
        self.conv1 = conv_block(1, 32, batch_norm=True)  # 32 x 14 x 14
        self.conv2 = conv_block(32, 64, batch_norm=True, dropout=0.2)  # 64 x 7 x 7
        self.conv3 = conv_block(64, 128, batch_norm=True, dropout=0.4)  # 128 x 3 x 3
        self.fc1 = nn.Linear(128 * 3 * 3, 128)
        self.bn1 = nn.BatchNorm1d(128)
        self.dropout = UniformMaskDropout(0.5)  # the seed's F.dropout(x, 0.5), now off in eval mode
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv3(self.conv2(self.conv1(x)))
        x = self.bn1(self.fc1(x.flatten(1)))
        return self.fc2(self.dropout(x))


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(channels, channels), conv_bn_relu(channels, channels)
        )

    def forward(self, x):
        return x + self.body(x)


class ResNet9(nn.Module):
    """The DAWNBench-shaped ResNet-9 with widths 32/64/128/256 (1.65M parameters).

    conv-BN-ReLU blocks, residual blocks after the 2nd and 4th conv, max-pooling, a global
    max-pool and one linear layer whose output is scaled by 1/8 (as in the DAWNBench
    entry: it keeps the logits small at the high learning rates of OneCycle SGD).

    pool_after_stem: the first max-pool comes right after the one-channel first convolution
    instead of after the second (resnet-s, resnet-m). ResNet-9 spends most of a step in its
    second convolution and first residual block, at 28 x 28 and 14 x 14; pooled first, every
    layer but the stem runs at 14 x 14 or below, where a convolution costs a quarter as much.
    With narrower widths a step then costs a third of ResNet-9's or less (2 to 4 times the
    images/s on a 2-core CPU), for almost the same accuracy per epoch on these small images
    (benchmarks/RESULTS.md, "Time to accuracy").
    """

    def __init__(
        self, widths: tuple[int, int, int, int] = (32, 64, 128, 256), pool_after_stem=False
    ):
        super().__init__()
        w0, w1, w2, w3 = widths
        # Layers are made in their order in the network, so a seed draws the same weights as
        # before pool_after_stem existed.
        stem = conv_bn_relu(1, w0)  # 28 x 28
        if pool_after_stem:
            second = [nn.MaxPool2d(2), conv_bn_relu(w0, w1)]  # 14 x 14 from here on
        else:
            second = [conv_bn_relu(w0, w1), nn.MaxPool2d(2)]  # 28 x 28, then 14 x 14
        self.features = nn.Sequential(
            stem,
            *second,
            Residual(w1),
            conv_bn_relu(w1, w2),
            nn.MaxPool2d(2),  # 7 x 7
            conv_bn_relu(w2, w3),
            nn.MaxPool2d(2),  # 3 x 3
            Residual(w3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(w3, 10)
        self.logit_scale = 0.125

    def forward(self, x):
        return self.classifier(self.features(x)) * self.logit_scale


def resnet_s() -> ResNet9:
    """0.42M parameters, pooled after the stem: the `fast` recipe's model."""
    return ResNet9((24, 32, 64, 128), pool_after_stem=True)


def resnet_m() -> ResNet9:
    """0.93M parameters, pooled after the stem: the `accurate` recipe's model."""
    return ResNet9((32, 48, 96, 192), pool_after_stem=True)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "cnn-bn": CNNBN,
    "resnet9": ResNet9,
    "resnet-s": resnet_s,
    "resnet-m": resnet_m,
}


def build_model(name: str) -> nn.Module:
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
