"""YOLOv5-style detector: a layer list with routing attributes (``i``, ``f``, ``type``, ``np``)
read by ``Model.forward``, and a ``Detect`` head whose grid is rebuilt when the input size
changes (shape-dependent Python control flow: not symbolically traceable)."""

import torch
import torch.nn as nn

from models.common import C3, SPPF, Concat, Conv, DWConv, Focus, fuse_conv_and_bn


class Detect(nn.Module):
    stride = None

    def __init__(self, nc=80, anchors=(), ch=()):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.zeros(1)] * self.nl
        a = torch.tensor(anchors).float().view(self.nl, -1, 2)
        self.register_buffer("anchors", a)
        self.register_buffer("anchor_grid", a.clone().view(self.nl, 1, -1, 1, 1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i] = self._make_grid(nx, ny).to(x[i].device)
                y = x[i].sigmoid()
                xy = (y[..., 0:2] * 2.0 - 0.5 + self.grid[i]) * self.stride[i]
                wh = (y[..., 2:4] * 2) ** 2 * self.anchor_grid[i]
                y = torch.cat((xy, wh, y[..., 4:]), -1)
                z.append(y.view(bs, -1, self.no))
        return x if self.training else (torch.cat(z, 1), x)

    @staticmethod
    def _make_grid(nx=20, ny=20):
        yv, xv = torch.meshgrid([torch.arange(ny), torch.arange(nx)], indexing="ij")
        return torch.stack((xv, yv), 2).view((1, 1, ny, nx, 2)).float()


ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]]


def _layers(width, nc, focus):
    w = [int(c * width) for c in (64, 128, 256, 512)]
    stem = (Focus, [3, w[0], 3]) if focus else (Conv, [3, w[0], 6, 2, 2])
    return [
        (-1, *stem),                        # 0  P1/2
        (-1, Conv, [w[0], w[1], 3, 2]),     # 1  P2/4
        (-1, C3, [w[1], w[1], 1]),          # 2
        (-1, Conv, [w[1], w[2], 3, 2]),     # 3  P3/8
        (-1, C3, [w[2], w[2], 1]),          # 4
        (-1, Conv, [w[2], w[3], 3, 2]),     # 5  P4/16
        (-1, SPPF, [w[3], w[3], 5]),        # 6
        (-1, Conv, [w[3], w[2], 1, 1]),     # 7
        (-1, nn.Upsample, [None, 2, "nearest"]),  # 8
        ([-1, 4], Concat, [1]),             # 9
        (-1, C3, [w[2] * 2, w[2], 1, False]),  # 10
        ([10, 7], Detect, [nc, ANCHORS, [w[2], w[2]]]),  # 11
    ]


class Model(nn.Module):
    def __init__(self, nc=3, width=0.25, focus=True):
        super().__init__()
        layers, save = [], set()
        for i, (f, cls, args) in enumerate(_layers(width, nc, focus)):
            m = cls(*args)
            m.i, m.f, m.type = i, f, f"{cls.__module__}.{cls.__name__}".replace("__main__.", "")
            m.np = sum(p.numel() for p in m.parameters())
            save.update(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
            layers.append(m)
        self.model = nn.Sequential(*layers)
        self.save = sorted(save)
        self.names = [f"class{i}" for i in range(nc)]
        det = self.model[-1]
        det.stride = torch.tensor([8.0, 16.0])
        det.anchors /= det.stride.view(-1, 1, 1)

    def fuse(self):  # fuse model Conv2d() + BatchNorm2d() layers, as YOLOv5's deploy path does
        for m in self.model.modules():
            if isinstance(m, (Conv, DWConv)) and hasattr(m, "bn"):
                m.conv = fuse_conv_and_bn(m.conv, m.bn)  # update conv
                delattr(m, "bn")  # remove batchnorm
                m.forward = m.forward_fuse  # update forward
        return self

    def forward(self, x):
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x
