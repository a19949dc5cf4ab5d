"""Norm layers written the way timm writes them: ``FrozenBatchNormAct2d`` (a frozen affine
computed from buffers in the forward, then ``act(drop(x))``), ``NormLinear`` (LeViT's head:
BatchNorm1d then Linear) and ``MixedConv2d`` (convs of different kernel sizes on channel
splits, concatenated, then one BatchNorm)."""

from __future__ import annotations

import torch
import torch.nn as nn


class FrozenBatchNormAct2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5, act: bool = True):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        return self.act(self.drop(x))


class ConvFrozenBnAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 3, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn1 = FrozenBatchNormAct2d(cout, act=act)

    def forward(self, x):
        return self.bn1(self.conv(x))


class FrozenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = ConvFrozenBnAct(3, 8)
        self.b = ConvFrozenBnAct(8, 6, act=False)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.b(self.a(x)).mean((2, 3)))


class NormLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.drop = nn.Dropout(0.0)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class NormLinearNet(nn.Module):
    """LeViT's tail: features, mean over tokens, two NormLinear heads averaged."""

    def __init__(self, dim: int = 12, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, 2, 1)
        self.head, self.head_dist = NormLinear(dim, classes), NormLinear(dim, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x)).flatten(2).mean(2)
        return (self.head(x) + self.head_dist(x)) / 2


class BnThenConv(nn.Module):
    """A BatchNorm before a conv: foldable forward into a 1x1 conv without padding (also
    grouped), not into a padded 3x3 (the shift would reach the zero padding)."""

    def __init__(self, padding: int = 0, k: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, k, padding=padding, groups=groups, bias=bias)

    def forward(self, x):
        return self.conv(self.bn(torch.relu(self.stem(x))))


def _split(n: int, k: int) -> list[int]:
    s = [n // k] * k
    s[0] += n - sum(s)
    return s


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: one conv per kernel size on its channel split, outputs concatenated."""

    def __init__(self, cin: int, cout: int, kernels=(3, 5, 7), depthwise: bool = False):
        super().__init__()
        ins, outs = _split(cin, len(kernels)), _split(cout, len(kernels))
        for i, (k, a, b) in enumerate(zip(kernels, ins, outs)):
            self.add_module(str(i), nn.Conv2d(a, b, k, padding=k // 2, groups=b if depthwise else 1, bias=False))
        self.splits = ins

    def forward(self, x):
        xs = torch.split(x, self.splits, 1)
        return torch.cat([c(xs[i]) for i, c in enumerate(self.values())], 1)


class MixedBlock(nn.Module):
    def __init__(self, depthwise: bool = False):
        super().__init__()
        c = 9 if depthwise else 8
        self.conv_stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv_dw = MixedConv2d(c, c if depthwise else 10, depthwise=depthwise)
        self.bn = nn.BatchNorm2d(c if depthwise else 10)

    def forward(self, x):
        return torch.relu(self.bn(self.conv_dw(torch.relu(self.conv_stem(x)))))


def randomize(m: nn.Module, seed: int = 0) -> nn.Module:
    """Random statistics and affine parameters for every norm (FrozenBatchNormAct2d's buffers too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.modules.batchnorm._BatchNorm, FrozenBatchNormAct2d)):
                n = mod.running_mean.numel()
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return m.eval()
