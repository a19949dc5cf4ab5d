"""ShuffleNetV2-style net: channel split, branch, concatenation and a channel shuffle written
with ``view`` / ``transpose`` on sizes read from the tensor (written from the paper)."""

from __future__ import annotations

import torch
import torch.nn as nn


def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, -1, h, w)


def conv_bn(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, s: int):
        super().__init__()
        self.s = s
        c = cout // 2
        if s > 1:
            self.left = nn.Sequential(conv_bn(cin, cin, 3, s, cin, relu=False), conv_bn(cin, c))
        self.right = nn.Sequential(conv_bn(cin if s > 1 else c, c), conv_bn(c, c, 3, s, c, relu=False), conv_bn(c, c))

    def forward(self, x):
        if self.s == 1:
            a, b = x.chunk(2, dim=1)
            out = torch.cat((a, self.right(b)), 1)
        else:
            out = torch.cat((self.left(x), self.right(x)), 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(4, 8, 4), widths=(24, 116, 232, 464, 1024), num_classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 3, 2), nn.MaxPool2d(3, 2, 1))
        units, cin = [], widths[0]
        for n, w in zip(repeats, widths[1:4]):
            for i in range(n):
                units.append(ShuffleUnit(cin, w, 2 if i == 0 else 1))
                cin = w
        self.stages = nn.Sequential(*units)
        self.head = conv_bn(cin, widths[4])
        self.fc = nn.Linear(widths[4], num_classes)

    def forward(self, x):
        x = self.head(self.stages(self.stem(x)))
        return self.fc(x.mean([2, 3]))


def shufflenet_v2(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> ShuffleNetV2:
    """ShuffleNetV2 1.0x's layout scaled by ``width`` and ``depth``."""
    widths = (24, *(max(8, int(c * width)) // 2 * 2 for c in (116, 232, 464)), 1024)
    return ShuffleNetV2(tuple(max(1, round(n * depth)) for n in (4, 8, 4)), widths, num_classes)
