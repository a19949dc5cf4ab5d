"""A U-Net-style segmenter: conv-BN-ReLU pairs, max-pool down, upsampling to the size of the skip
connection read from the tensor (``F.interpolate(size=skip.shape[-2:])``), concatenation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, base: int = 16, levels: int = 4, classes: int = 3):
        super().__init__()
        widths = [base * 2 ** i for i in range(levels + 1)]
        self.down = nn.ModuleList([DoubleConv(3, widths[0])] + [DoubleConv(widths[i], widths[i + 1]) for i in range(levels)])
        self.reduce = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(levels))
        self.up = nn.ModuleList(DoubleConv(2 * widths[i], widths[i]) for i in range(levels))
        self.out = nn.Conv2d(widths[0], classes, 1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            skip = skips.pop()
            x = F.interpolate(self.reduce[i](x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([skip, x], 1))
        return self.out(x)


def unet(base: int = 16, levels: int = 4, classes: int = 3) -> UNet:
    return UNet(base, levels, classes)
