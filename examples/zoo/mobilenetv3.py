"""MobileNetV3-Large layout: hard-swish, squeeze-excitation gated by hard-sigmoid, a
Linear → Hardswish → Dropout → Linear classifier (written from the paper)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _div8(v: float) -> int:
    new = max(8, int(v + 4) // 8 * 8)
    return new + 8 if new < 0.9 * v else new


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act=nn.Hardswish):
        layers = [nn.Conv2d(cin, cout, k, s, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        r = _div8(c // 4)
        self.fc1 = nn.Conv2d(c, r, 1)
        self.fc2 = nn.Conv2d(r, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, act, s: int):
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(cin, hidden, 1, act=act)] if hidden != cin else []
        layers.append(ConvBNAct(hidden, hidden, k, s, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


RE, HS = nn.ReLU, nn.Hardswish
# kernel, expanded, out, SE, activation, stride (Large)
SETTINGS = [(3, 16, 16, False, RE, 1), (3, 64, 24, False, RE, 2), (3, 72, 24, False, RE, 1),
            (5, 72, 40, True, RE, 2), (5, 120, 40, True, RE, 1), (5, 120, 40, True, RE, 1),
            (3, 240, 80, False, HS, 2), (3, 200, 80, False, HS, 1), (3, 184, 80, False, HS, 1),
            (3, 184, 80, False, HS, 1), (3, 480, 112, True, HS, 1), (3, 672, 112, True, HS, 1),
            (5, 672, 160, True, HS, 2), (5, 960, 160, True, HS, 1), (5, 960, 160, True, HS, 1)]


class MobileNetV3(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, last: int = 1280):
        super().__init__()
        cin = _div8(16 * width)
        layers: list[nn.Module] = [ConvBNAct(3, cin, 3, 2)]
        for k, e, c, se, act, s in SETTINGS:
            cout = _div8(c * width)
            layers.append(InvertedResidual(cin, k, _div8(e * width), cout, se, act, s))
            cin = cout
        layers.append(ConvBNAct(cin, 6 * cin, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(6 * cin, last), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(last, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3(width: float = 1.0, num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(width, num_classes)
