"""A LeViT-style model (timm's ``levit``): ``LinearNorm`` -- ``Linear`` then ``BatchNorm1d`` over
``x.flatten(0, 1)``, reshaped back -- in the attention and MLP blocks, ``ConvNorm`` in the stem,
and a ``BatchNorm1d`` before each classifier ``Linear`` (folded forward into it)."""

from __future__ import annotations

import torch
import torch.nn as nn


class LinearNorm(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class ConvNorm(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.linear = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.linear(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2, key: int = 8):
        super().__init__()
        self.heads, self.key, self.val = heads, key, 2 * key
        self.qkv = LinearNorm(dim, heads * (2 * key + 2 * key))
        self.proj = nn.Sequential(nn.Hardswish(), LinearNorm(heads * 2 * key, dim))
        self.scale = key ** -0.5

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).split([self.key, self.key, self.val], dim=3)
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 3, 1), v.permute(0, 2, 1, 3)
        attn = (q @ k * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Residual(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x):
        return x + self.m(x)


class NormLinear(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(cin)
        self.linear = nn.Linear(cin, cout)

    def forward(self, x):
        return self.linear(self.bn(x))


class LeViTish(nn.Module):
    def __init__(self, dim: int = 32, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(ConvNorm(3, 16), nn.Hardswish(), ConvNorm(16, dim))
        self.blocks = nn.Sequential(
            Residual(Attention(dim)),
            Residual(nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))),
            Residual(Attention(dim)),
            Residual(nn.Sequential(LinearNorm(dim, 2 * dim), nn.Hardswish(), LinearNorm(2 * dim, dim))),
        )
        self.head, self.head_dist = NormLinear(dim, classes), NormLinear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = self.blocks(x).mean(1)
        return (self.head(x) + self.head_dist(x)) / 2


def levitish(seed: int = 0) -> LeViTish:
    torch.manual_seed(seed)
    m = LeViTish()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return m.eval()
