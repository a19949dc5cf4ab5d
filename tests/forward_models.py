"""Modules for the forward-rewrite tests (tests/test_forward_rewrite.py), importable without
modelsurgeon (pickled models load in a process that never imports it): a training-form
RepVGG block, YOLOv5's Conv with a host whose ``fuse()`` is written the way YOLOv5 writes it,
and weighted sums written so that torch.fx traces them, cannot trace them, or must be refused."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

X = (1, 4, 8, 8)


def conv_bn(c1, c2, k, p):
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(c1, c2, k, padding=p, bias=False))
    m.add_module("bn", nn.BatchNorm2d(c2))
    return m


class RepVGGBlock(nn.Module):
    """Training-form RepVGG block, as its authors write it (the deploy form: ``rbr_reparam``)."""

    def __init__(self, c):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.rbr_identity = nn.BatchNorm2d(c)
        self.rbr_dense = conv_bn(c, c, 3, 1)
        self.rbr_1x1 = conv_bn(c, c, 1, 0)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)


class Conv(nn.Module):
    """YOLOv5's Conv: conv, BN, SiLU; ``forward_fuse`` once ``fuse()`` removed the BN."""

    def __init__(self, c1, c2, k=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class PlainConv(nn.Module):
    """conv, BN, SiLU with no fused forward of its own."""

    def __init__(self, c1, c2, k=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Net(nn.Module):
    """A host whose ``fuse()`` is written the way YOLOv5 writes it."""

    def __init__(self, block):
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 3, padding=1)
        self.block = block
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))

    def fuse(self):
        for m in self.modules():
            if isinstance(m, Conv) and hasattr(m, "bn"):
                raise AssertionError("the folded BatchNorm is still there")
        return self


class Weighted(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(2) + 0.5)
        self.a, self.b = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        w = torch.softmax(self.w, 0)
        return w[0] * self.a(x) + w[1] * self.b(x)


class Untraceable(Weighted):
    """``math.sqrt`` of a traced size stops torch.fx: replayed from the recording (where the
    channel count, the same at every input size, is a literal)."""

    def forward(self, x):
        w = torch.softmax(self.w, 0) / math.sqrt(x.shape[1] / 4)
        return w[0] * self.a(x) + w[1] * self.b(x)


class SizeBaked(Untraceable):
    def forward(self, x):
        y = super().forward(x)
        return y.reshape(y.shape[0], -1).reshape(y.shape)  # the recording holds the example's sizes


class DataBranch(Weighted):
    def forward(self, x):
        if float(x.abs().max()) > 1e6:
            return x
        return super().forward(x)


class OwnCall(Weighted):
    def __call__(self, *a):
        return super().__call__(*a)


class FixedSize(nn.Module):
    """A host that runs at the example's shape only."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        assert tuple(x.shape) == X
        return self.block(x)
