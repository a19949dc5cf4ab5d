"""RepVGG-style net as trained: every block sums a 3x3 conv-BN, a 1x1 conv-BN and (when the
shapes allow) an identity BN, then ReLU (written from the paper, training-time form)."""

from __future__ import annotations

import torch
import torch.nn as nn


def conv_bn(cin: int, cout: int, k: int, s: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, s: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, s)
        self.point = conv_bn(cin, cout, 1, s)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and s == 1 else None
        self.act = nn.ReLU()

    def forward(self, x):
        y = self.dense(x) + self.point(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(y)


class RepVGG(nn.Module):
    def __init__(self, blocks=(1, 2, 4, 14, 1), widths=(48, 48, 96, 192, 1280), num_classes: int = 1000):
        super().__init__()
        layers, cin = [], 3
        for n, w in zip(blocks, widths):
            for i in range(n):
                layers.append(RepVGGBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.fc(x)


def repvgg(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> RepVGG:
    """RepVGG-A0's layout scaled by ``width`` and ``depth``."""
    blocks = tuple(max(1, round(n * depth)) for n in (1, 2, 4, 14, 1))
    widths = tuple(max(8, int(c * width)) for c in (48, 48, 96, 192, 1280))
    return RepVGG(blocks, widths, num_classes)
