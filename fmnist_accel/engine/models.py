"""The seed's three models, a ResNet-9, two faster ResNets and two airbench-shaped nets, by name.

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


# Patches the whitening layer's filters are fitted to: 5000 images give 3.4M 3 x 3 patches,
# plenty for a 9 x 9 covariance, in a fraction of a second.
WHITENING_IMAGES = 5000


def frozen_scale_batch_norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with its scale fixed at 1 and only its shift learned, as airbench has it.
    momentum 0.4 (airbench's 0.6 in the opposite convention): the running statistics weigh
    about the last 2 or 3 steps, where torch's default 0.1 weighs about the last 10, so they
    keep up with weights that change fast in a schedule of a few epochs."""
    norm = nn.BatchNorm2d(channels, momentum=0.4)
    norm.weight.requires_grad_(False)
    return norm


class ConvGroup(nn.Module):
    """conv 3x3 -> max-pool 2 -> BN -> GELU -> conv 3x3 -> BN -> GELU.

    Pooling before the normalisation, as airbench does, normalises a quarter of the values.
    The convolutions start as partial identities (dirac): the first c_in filters pass their
    input through, so the untrained net already carries the whitened image forward.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.norm1 = frozen_scale_batch_norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = frozen_scale_batch_norm(c_out)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                nn.init.dirac_(conv.weight[: conv.in_channels])

    def forward(self, x):
        x = nn.functional.gelu(self.norm1(nn.functional.max_pool2d(self.conv1(x), 2)))
        return nn.functional.gelu(self.norm2(self.conv2(x)))


class AirbenchNet(nn.Module):
    """Shaped after Keller Jordan's airbench (CIFAR-10 speed runs), for 28 x 28 grey images.

    A frozen 3 x 3 whitening convolution (18 filters: the 9 eigenvectors of the training
    patches' covariance, scaled by 1/sqrt(eigenvalue), and their negatives), then three
    ConvGroups at 26 -> 13, 13 -> 6 and 6 -> 3, a global max-pool and a linear layer without
    bias, scaled by 1/9. No residual connections. It learns much faster per epoch than the
    ResNets here (benchmarks/RESULTS.md, "Time to accuracy").

    The whitening filters come from the data: `fit_whitening(images)` before training (the
    training session calls it); a checkpoint carries them like any other weight.
    """

    def __init__(self, widths: tuple[int, int] = (32, 96)):
        super().__init__()
        w1, w2 = widths
        self.whiten = nn.Conv2d(1, 18, kernel_size=3, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # fitted to the data, never trained
        self.groups = nn.Sequential(ConvGroup(18, w1), ConvGroup(w1, w2), ConvGroup(w2, w2))
        self.classifier = nn.Linear(w2, 10, bias=False)
        self.logit_scale = 1 / 9

    @torch.no_grad()
    def fit_whitening(self, images: torch.Tensor) -> None:
        """images: normalised (N, 1, 28, 28). Deterministic (float64 on the CPU), so every
        rank of a multi-process run computes the same filters."""
        patches = nn.functional.unfold(images.detach().cpu().double().contiguous(), 3)
        patches = patches.transpose(1, 2).reshape(-1, 9)
        eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
        # 1e-2 keeps the flattest directions (noise) from being amplified without bound
        filters = (eigenvectors.T / torch.sqrt(eigenvalues + 1e-2)[:, None]).reshape(9, 1, 3, 3)
        weight = torch.cat([filters, -filters]).to(self.whiten.weight)
        self.whiten.weight.copy_(weight)
        self.whiten.bias.zero_()

    def forward(self, x):
        x = self.groups(nn.functional.gelu(self.whiten(x)))
        x = nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return self.classifier(x) * self.logit_scale


def airbench_s() -> AirbenchNet:
    """0.29M parameters, widths 32/96: the `accurate` recipe's model."""
    return AirbenchNet((32, 96))


def airbench_m() -> AirbenchNet:
    """0.50M parameters, widths 32/128: the `accurate-long` recipe's model. About 18% slower
    per image than airbench-s on a 2-core CPU, for a little more accuracy per epoch."""
    return AirbenchNet((32, 128))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "cnn-bn": CNNBN,
    "resnet9": ResNet9,
    "resnet-s": resnet_s,
    "resnet-m": resnet_m,
    "airbench-s": airbench_s,
    "airbench-m": airbench_m,
}


def build_model(name: str) -> nn.Module:
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
