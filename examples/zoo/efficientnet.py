"""EfficientNet-style classifiers with TensorFlow "SAME" padding computed in ``forward``.

As the ``tf_`` ports of EfficientNet do it: a strided conv pads its input by an amount computed
from ``x.shape`` at run time (so an export is full of ``Shape``/``Gather``/arithmetic before a
``Pad``), stride-1 convs pad statically. ``efficientnet_lite``: ReLU6, no squeeze-excitation;
``efficientnet``: SiLU and squeeze-excitation (B0's layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def same_padding(size, k: int, s: int, d: int = 1):
    """Total padding TensorFlow's SAME gives an input of ``size`` (an int or a traced size)."""
    if isinstance(size, torch.Tensor):
        return torch.clamp(((size / s).ceil() - 1) * s + (k - 1) * d + 1 - size, min=0).to(torch.int64)
    return max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)


class Conv2dSame(nn.Conv2d):
    """A conv padding like TensorFlow's SAME: the padding depends on the input size."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        ph = same_padding(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = same_padding(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv(cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1) -> nn.Conv2d:
    if s > 1:
        return Conv2dSame(cin, cout, k, s, groups=groups, bias=False)
    return nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, groups=groups, bias=False)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act=nn.ReLU6):
        super().__init__(conv(cin, cout, k, s, groups), nn.BatchNorm2d(cout, eps=1e-3), act())


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, reduced: int, act=nn.SiLU):
        super().__init__()
        self.reduce = nn.Conv2d(c, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, s: int, expand: int, se: bool, act):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [ConvBNAct(cin, hidden, 1, act=act)] if expand != 1 else []
        layers.append(ConvBNAct(hidden, hidden, k, s, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(1, cin // 4), act))
        layers += [conv(hidden, cout, 1), nn.BatchNorm2d(cout, eps=1e-3)]
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


# expand, channels, repeats, stride, kernel (B0)
SETTINGS = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
            (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]


class EfficientNet(nn.Module):
    def __init__(self, width: float = 1.0, depth: float = 1.0, se: bool = True, act=nn.SiLU,
                 num_classes: int = 1000, head: int = 1280):
        super().__init__()

        def ch(c: int) -> int:
            return max(8, int(c * width + 4) // 8 * 8)

        cin = ch(32)
        self.stem = ConvBNAct(3, cin, 3, 2, act=act)
        blocks = []
        for e, c, n, s, k in SETTINGS:
            for i in range(max(1, math.ceil(n * depth))):
                blocks.append(MBConv(cin, ch(c), k, s if i == 0 else 1, e, se, act))
                cin = ch(c)
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(cin, head, 1, act=act)
        self.dropout = nn.Dropout(0.2)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(self.dropout(x))


def efficientnet_lite(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-Lite0's layout: ReLU6, no squeeze-excitation."""
    return EfficientNet(width, depth, se=False, act=nn.ReLU6, num_classes=num_classes)


def efficientnet(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0's layout: SiLU, squeeze-excitation."""
    return EfficientNet(width, depth, se=True, act=nn.SiLU, num_classes=num_classes)
