"""DenseNet-style net: every layer's output is concatenated to its input, so the feature map
grows by ``growth`` channels per layer; transitions halve the channels and the size.

Layers are conv → BN → ReLU (post-activation, as in VoVNet / CSP-style dense blocks), so every
BatchNorm follows a conv. (DenseNet's own pre-activation BN → ReLU → conv reads a concatenation
that other layers read too: such a BN cannot be folded into any conv.)
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int = 4):
        super().__init__()
        self.reduce = ConvBNReLU(cin, bottleneck * growth, 1)
        self.conv = ConvBNReLU(bottleneck * growth, growth, 3)

    def forward(self, x):
        return torch.cat([x, self.conv(self.reduce(x))], 1)


class DenseNet(nn.Module):
    def __init__(self, blocks=(6, 12, 24, 16), growth: int = 32, stem: int = 64, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1)]
        c = stem
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                layers += [ConvBNReLU(c, c // 2, 1), nn.AvgPool2d(2, 2)]
                c //= 2
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def densenet(growth: int = 32, depth: float = 1.0, num_classes: int = 1000) -> DenseNet:
    """DenseNet-121's block layout scaled by ``depth``."""
    return DenseNet(tuple(max(1, round(n * depth)) for n in (6, 12, 24, 16)), growth, 2 * growth, num_classes)
