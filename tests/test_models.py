"""The models: output shapes, parameter counts from the seed's layer shapes, eval determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmnist_accel.config import MODEL_NAMES
from fmnist_accel.engine.models import MODELS, build_model, count_parameters


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def conv3x3(c_in: int, c_out: int, bias: bool = True) -> int:
    return c_in * c_out * 9 + (c_out if bias else 0)


def batch_norm(c: int) -> int:
    return 2 * c  # weight and bias (running statistics are buffers, not parameters)


# The seed's layer shapes, counted by hand.
EXPECTED_PARAMETERS = {
    # 784 -> 128 -> 64 -> 10
    "mlp": linear(784, 128) + linear(128, 64) + linear(64, 10),
    # conv 1->32, 32->64 (3x3, bias), fc 64*7*7=3136 -> 128 -> 10
    "cnn": conv3x3(1, 32) + conv3x3(32, 64) + linear(3136, 128) + linear(128, 10),
    # convs 1->32->64->128, each with BatchNorm; fc 128*3*3=1152 -> 128, BatchNorm1d, -> 10
    "cnn-bn": conv3x3(1, 32)
    + batch_norm(32)
    + conv3x3(32, 64)
    + batch_norm(64)
    + conv3x3(64, 128)
    + batch_norm(128)
    + linear(1152, 128)
    + batch_norm(128)
    + linear(128, 10),
    # DAWNBench ResNet-9, widths 32/64/128/256: conv-BN blocks without conv bias,
    # residual blocks of two convs after the 2nd and 4th conv, one linear layer.
    "resnet9": sum(
        conv3x3(i, o, bias=False) + batch_norm(o)
        for i, o in [(1, 32), (32, 64), (64, 64), (64, 64), (64, 128), (128, 256)]
        + [(256, 256), (256, 256)]
    )
    + linear(256, 10),
}
# resnet-s, resnet-m (ResNet9 pooled after the stem): ResNet-9's layers with widths w0..w3
# (stem 1->w0, w0->w1, residual w1, w1->w2, w2->w3, residual w3), and one linear layer.
for _name, (w0, w1, w2, w3) in {
    "resnet-s": (24, 32, 64, 128),
    "resnet-m": (32, 48, 96, 192),
}.items():
    EXPECTED_PARAMETERS[_name] = sum(
        conv3x3(i, o, bias=False) + batch_norm(o)
        for i, o in [(1, w0), (w0, w1), (w1, w1), (w1, w1), (w1, w2), (w2, w3), (w3, w3), (w3, w3)]
    ) + linear(w3, 10)


# airbench-s, airbench-m: a 3x3 whitening conv 1 -> 18 with bias, three groups of two convs
# without bias (18 -> w1, w1 -> w1; w1 -> w2, w2 -> w2; w2 -> w2, w2 -> w2), each followed by
# BatchNorm, and a linear layer without bias. Frozen: the whitening filters (fitted to the
# data) and every BatchNorm scale (fixed at 1).
FROZEN_PARAMETERS = {}
for _name, (w1, w2) in {"airbench-s": (32, 96), "airbench-m": (32, 128)}.items():
    _convs = [(18, w1), (w1, w1), (w1, w2), (w2, w2), (w2, w2), (w2, w2)]
    EXPECTED_PARAMETERS[_name] = (
        conv3x3(1, 18) + sum(conv3x3(i, o, bias=False) + batch_norm(o) for i, o in _convs) + w2 * 10
    )
    FROZEN_PARAMETERS[_name] = 18 * 9 + sum(o for _, o in _convs)  # whitening, BN scales


def test_every_model_is_registered_offered_and_counted():
    """models.MODELS, the --model choices (config.py keeps its own tuple so that --help does
    not import torch) and the hand counts above name the same eight models."""
    assert set(MODELS) == set(MODEL_NAMES) == set(EXPECTED_PARAMETERS)
    assert len(MODELS) == 8


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count(name):
    model = build_model(name)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained == count_parameters(model) - FROZEN_PARAMETERS.get(name, 0)


@pytest.mark.parametrize("name", ["resnet9", "resnet-s", "resnet-m", "airbench-s", "airbench-m"])
def test_new_models_are_under_two_million_parameters(name):
    assert count_parameters(build_model(name)) <= 2_000_000


def test_half_resnets_run_every_layer_after_the_stem_at_half_resolution():
    """The point of resnet-s and resnet-m: the first max-pool comes right after the stem."""
    for name in ("resnet-s", "resnet-m"):
        layers = list(build_model(name).features)
        assert isinstance(layers[1], nn.MaxPool2d), name
        stem_conv = layers[0][0]
        assert stem_conv.in_channels == 1 and stem_conv.kernel_size == (3, 3), name


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_output_shape(name, channels_last):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(3, 1, 28, 28)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (3, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_cnn_layer_shapes_are_the_seeds():
    model = build_model("cnn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
        (1, 32, (3, 3)),
        (32, 64, (3, 3)),
    ]
    assert all(c.bias is not None for c in convs)
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(3136, 128), (128, 10)]


def test_cnn_bn_layer_shapes_are_the_seeds():
    model = build_model("cnn-bn")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 32), (32, 64), (64, 128)]
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == [
        32,
        64,
        128,
    ]
    assert [m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm1d)] == [128]
    fcs = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(f.in_features, f.out_features) for f in fcs] == [(1152, 128), (128, 10)]
    assert sorted(m.p for m in model.modules() if isinstance(m, nn.Dropout)) == [0.2, 0.4, 0.5]


def test_cnn_bn_is_deterministic_in_eval_mode_and_random_in_train_mode():
    """The seed's F.dropout(x, 0.5) stayed on in eval mode; here eval mode is deterministic."""
    torch.manual_seed(0)
    model = build_model("cnn-bn")
    x = torch.randn(8, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)
    model.train()
    with torch.no_grad():
        c, d = model(x), model(x)
    assert not torch.equal(c, d)  # dropout draws differ between the two passes


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose from mlp, cnn"):
        build_model("vgg")


@pytest.mark.parametrize("p", [0.2, 0.4, 0.5])
def test_cpu_dropout_drops_a_fraction_p_and_scales_the_rest(p):
    """The CPU mask (a uniform draw compared with p) is torch's inverted dropout."""
    from fmnist_accel.engine.models import UniformMaskDropout

    torch.manual_seed(0)
    x = torch.rand(64, 32, 14, 14) + 1.0  # no zeros of its own
    y = UniformMaskDropout(p).train()(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.01  # 401k draws: sd about 0.0008
    assert torch.allclose(y[kept], x[kept] / (1 - p))
    assert torch.equal(UniformMaskDropout(p).eval()(x), x)


def test_cpu_dropout_keeps_dtype_and_memory_format_and_follows_the_seed():
    from fmnist_accel.engine.models import UniformMaskDropout

    x = torch.randn(16, 8, 7, 7).contiguous(memory_format=torch.channels_last)
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        outputs.append(UniformMaskDropout(0.4).train()(x.bfloat16()))
    assert outputs[0].dtype == torch.bfloat16
    assert outputs[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(outputs[0], outputs[1])


def test_cpu_dropout_gradient_is_the_same_mask():
    from fmnist_accel.engine.models import UniformMaskDropout

    torch.manual_seed(1)
    x = torch.randn(4, 100, requires_grad=True)
    y = UniformMaskDropout(0.5).train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y != 0).float() * 2)


def test_cpu_dropout_draws_a_uniform_mask_not_torchs_bernoulli():
    """The speed comes from the uniform draw: the same seed gives exactly x * (u >= p) / (1-p)."""
    from fmnist_accel.engine.models import UniformMaskDropout

    x = torch.randn(32, 16, 14, 14)
    torch.manual_seed(5)
    got = UniformMaskDropout(0.2).train()(x)
    torch.manual_seed(5)
    expected = x * (torch.rand_like(x) >= 0.2).float() * (1 / 0.8)
    assert torch.equal(got, expected)
    models = [build_model(name) for name in ("cnn", "cnn-bn")]
    droppers = [m for model in models for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(droppers) == 3 and all(type(m) is UniformMaskDropout for m in droppers)


def test_whitening_filters_decorrelate_the_patches_they_were_fitted_to():
    """airbench-*: after fit_whitening, the first 9 channels of the whitening convolution
    (before its bias) have nearly uncorrelated outputs of nearly unit variance on those images
    (the eigenvalues below the 1e-2 floor come out smaller); the other 9 are their negatives."""
    torch.manual_seed(0)
    smooth = nn.functional.avg_pool2d(torch.randn(200, 1, 30, 30), 3, stride=1)  # correlated
    model = build_model("airbench-s")
    model.fit_whitening(smooth)
    with torch.no_grad():
        out = nn.functional.conv2d(smooth, model.whiten.weight)  # (200, 18, 26, 26)
    first = out[:, :9].permute(1, 0, 2, 3).reshape(9, -1)
    cov = first @ first.T / first.shape[1]
    off_diagonal = cov - torch.diag(torch.diagonal(cov))
    assert off_diagonal.abs().max() < 1e-3
    assert torch.diagonal(cov).max() < 1.0 and torch.diagonal(cov).max() > 0.9
    assert torch.equal(model.whiten.weight[9:], -model.whiten.weight[:9])
    assert not model.whiten.weight.requires_grad


def test_airbench_convolutions_start_as_partial_identities():
    """Each group's convolutions pass their first c_in channels through at initialisation."""
    group = build_model("airbench-s").groups[1]  # 32 -> 96, 96 -> 96
    for conv in (group.conv1, group.conv2):
        expected = torch.zeros_like(conv.weight[: conv.in_channels])
        nn.init.dirac_(expected)
        assert torch.equal(conv.weight[: conv.in_channels], expected)
    assert group.conv1.weight[32:].abs().sum() > 0  # the filters beyond the first 32: random
