"""BiFPN-style neck (EfficientDet's fast normalised fusion) on a small conv backbone.

Each fusion node computes ``sum_i relu(w_i) / (sum_j relu(w_j) + eps) * x_i`` with learnt
``w``; at inference those weights are constants, which ``modelsurgeon fold-fusion`` evaluates
once and moves into the convs producing the fused maps.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNAct(nn.Sequential):
    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU())


class FastFusion(nn.Module):
    """EfficientDet fast normalised fusion of ``n`` same-shaped maps."""

    def __init__(self, n: int, eps: float = 1e-4):
        super().__init__()
        self.w = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, xs):
        w = F.relu(self.w)
        w = w / (w.sum() + self.eps)
        return sum(w[i] * x for i, x in enumerate(xs))


class BiFPNNet(nn.Module):
    def __init__(self, c: int = 32, num_outputs: int = 8):
        super().__init__()
        self.stem = ConvBNAct(3, c, 3, 2)
        self.c3 = ConvBNAct(c, 2 * c, 3, 2)
        self.c4 = ConvBNAct(2 * c, 4 * c, 3, 2)
        self.c5 = ConvBNAct(4 * c, 8 * c, 3, 2)
        self.lat3 = nn.Conv2d(2 * c, c, 1)
        self.lat4 = nn.Conv2d(4 * c, c, 1)
        self.lat5 = nn.Conv2d(8 * c, c, 1)
        self.fuse4_td = FastFusion(2)
        self.fuse3_out = FastFusion(2)
        self.fuse4_out = FastFusion(3)
        self.conv4_td = ConvBNAct(c, c)
        self.conv3_out = ConvBNAct(c, c)
        self.conv4_out = ConvBNAct(c, c)
        self.heads = nn.ModuleList(nn.Conv2d(c, num_outputs, 1) for _ in range(2))

    def forward(self, x):
        p3 = self.c3(self.stem(x))
        p4 = self.c4(p3)
        p5 = self.c5(p4)
        l3, l4, l5 = self.lat3(p3), self.lat4(p4), self.lat5(p5)
        p4_td = self.conv4_td(self.fuse4_td([l4, F.interpolate(l5, scale_factor=2.0, mode="nearest")]))
        p3_out = self.conv3_out(self.fuse3_out([l3, F.interpolate(p4_td, scale_factor=2.0, mode="nearest")]))
        p4_out = self.conv4_out(self.fuse4_out([l4, p4_td, F.max_pool2d(p3_out, 2)]))
        return self.heads[0](p3_out), self.heads[1](p4_out)


def bifpn(c: int = 32, seed: int = 0) -> BiFPNNet:
    """A BiFPN net with random fusion weights (so that normalisation matters)."""
    m = BiFPNNet(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, FastFusion):
                mod.w.copy_(torch.rand(mod.w.shape, generator=g) * 1.5 + 0.1)
    return m
