"""YOLO-style layer lists whose space-to-depth is a layer of its own (``nn.PixelUnshuffle``,
SPD-Conv's ``space_to_depth``, YOLOv5's ``Contract``), followed by a conv layer and routed by the
host's forward with ``f`` / ``i`` / ``type`` / ``np`` -- as a yaml-built YOLO model has them.

Imports torch and the tests' helpers only (no modelsurgeon): a pickled model of these classes
must load where modelsurgeon is not installed."""

from __future__ import annotations

import torch
import torch.nn as nn

from testmodels import randomize_all


class ConvBNAct(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class space_to_depth(nn.Module):  # noqa: N801 - SPD-Conv's name
    def forward(self, x):
        return torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)


class Contract(nn.Module):
    """YOLOv5's Contract: space-to-depth by view/permute."""

    def __init__(self, gain=2):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        b, c, h, w = x.size()
        s = self.gain
        x = x.view(b, c, h // s, s, w // s, s).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * s * s, h // s, w // s)


class Concat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


S2D = {"pixel_unshuffle": lambda: nn.PixelUnshuffle(2), "spd": space_to_depth, "contract": Contract}


class Layered(nn.Module):
    """``model.0`` the space-to-depth layer, ``model.1`` a conv layer reading it, then two more
    conv layers and, with ``routed``, a Concat that reads the space-to-depth output again."""

    def __init__(self, s2d="pixel_unshuffle", routed=False):
        super().__init__()
        spec = [(-1, S2D[s2d]()), (-1, ConvBNAct(12, 8, 3)), (-1, ConvBNAct(8, 8, 3, 2))]
        if routed:
            spec += [(-1, nn.Upsample(scale_factor=2)), ([-1, 0], Concat()), (-1, ConvBNAct(20, 4, 1))]
        else:
            spec += [(-1, ConvBNAct(8, 4, 1))]
        layers, save = [], set()
        for i, (f, m) in enumerate(spec):
            m.i, m.f, m.type = i, f, type(m).__name__
            m.np = sum(p.numel() for p in m.parameters())
            save.update(x for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x


def layered(s2d: str = "pixel_unshuffle", routed: bool = False, seed: int = 0) -> nn.Module:
    """Factory (also for ``--arch``): random weights and BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    return randomize_all(Layered(s2d, routed), seed).eval()
