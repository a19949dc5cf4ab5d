"""Caffe-converted style: Conv -> BatchNorm(affine=False) -> Scale, and Caffe's own BatchNorm
layer that stores mean/var multiplied by a moving-average factor (divide both by it)."""

from __future__ import annotations

import torch
import torch.nn as nn


class Scale(nn.Module):
    """Caffe Scale layer (with bias_term), as converters write it."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


class CaffeBatchNorm(nn.Module):
    """Caffe BatchNorm blobs: mean, variance, and the moving-average factor they were
    accumulated with; Caffe divides both statistics by the factor and uses eps=1e-5."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("blob_mean", torch.zeros(channels))
        self.register_buffer("blob_var", torch.ones(channels))
        self.register_buffer("factor", torch.tensor([1.0]))
        self.eps = eps

    def forward(self, x):
        f = 0.0 if float(self.factor) == 0 else 1.0 / float(self.factor)
        mean = (self.blob_mean * f).view(1, -1, 1, 1)
        var = (self.blob_var * f).view(1, -1, 1, 1)
        return (x - mean) / torch.sqrt(var + self.eps)


class CaffeNet(nn.Module):
    """A VGG-ish net as a Caffe converter emits it: conv / bn (affine=False) / scale / relu."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10, caffe_bn: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=True),
                       CaffeBatchNorm(w) if caffe_bn else nn.BatchNorm2d(w, affine=False),
                       Scale(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(cin, num_classes, 1)

    def forward(self, x):
        return self.head(self.body(x)).mean((2, 3))


def caffenet(caffe_bn: bool = False) -> CaffeNet:
    m = CaffeNet(caffe_bn=caffe_bn)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, CaffeBatchNorm):
                factor = 0.5 + torch.rand(1, generator=g).item() * 999.0
                mod.factor.fill_(factor)
                mod.blob_mean.copy_(torch.randn(mod.blob_mean.shape, generator=g) * 0.5 * factor)
                mod.blob_var.copy_((torch.rand(mod.blob_var.shape, generator=g) * 1.5 + 0.05) * factor)
    return m
