"""A minimal Ultralytics-style host: ``Conv`` / ``ConvTranspose`` with ``forward_fuse``, a
``RepConv`` whose own ``fuse_convs`` reads its branches' BatchNorm statistics, and a model whose
``fuse()`` is written the way Ultralytics' ``BaseModel.fuse`` is (``is_fused`` first: fewer than
10 norm layers means "already fused"). Written for these tests; the loader below loads as
Ultralytics' ``attempt_load_one_weight`` does (``ema`` or ``model``, ``.float().fuse().eval()``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def autopad(k, p=None, d=1):
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class ConvTranspose(nn.Module):
    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=2, s=2, p=0, bn=True, act=True):
        super().__init__()
        self.conv_transpose = nn.ConvTranspose2d(c1, c2, k, s, p, bias=not bn)
        self.bn = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.act = self.default_act if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv_transpose(x)))

    def forward_fuse(self, x):
        return self.act(self.conv_transpose(x))


class RepConv(nn.Module):
    """3x3 + 1x1 (+ identity BN) branches, re-parameterised into one conv by ``fuse_convs``."""

    default_act = nn.SiLU()

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1, act=True, bn=False):
        super().__init__()
        self.g, self.c1, self.c2 = g, c1, c2
        self.act = self.default_act if act is True else nn.Identity()
        self.bn = nn.BatchNorm2d(c1) if bn and c2 == c1 and s == 1 else None
        self.conv1 = Conv(c1, c2, k, s, p=p, g=g, act=False)
        self.conv2 = Conv(c1, c2, 1, s, p=p - k // 2, g=g, act=False)

    def forward(self, x):
        identity = 0 if self.bn is None else self.bn(x)
        return self.act(self.conv1(x) + self.conv2(x) + identity)

    def forward_fuse(self, x):
        return self.act(self.conv(x))

    def _fuse_bn_tensor(self, branch):
        if branch is None:
            return 0, 0
        if isinstance(branch, Conv):
            kernel, bn = branch.conv.weight, branch.bn
            mean, var, gamma, beta, eps = bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        else:  # the identity branch's own BatchNorm
            per_group = self.c1 // self.g
            kernel = torch.zeros(self.c1, per_group, 3, 3, dtype=branch.weight.dtype)
            for i in range(self.c1):
                kernel[i, i % per_group, 1, 1] = 1
            mean, var, gamma, beta, eps = (branch.running_mean, branch.running_var, branch.weight,
                                           branch.bias, branch.eps)
        std = (var + eps).sqrt()
        return kernel * (gamma / std).reshape(-1, 1, 1, 1), beta - mean * gamma / std

    def fuse_convs(self):
        if hasattr(self, "conv"):
            return
        k3, b3 = self._fuse_bn_tensor(self.conv1)
        k1, b1 = self._fuse_bn_tensor(self.conv2)
        kid, bid = self._fuse_bn_tensor(self.bn)
        kernel = k3 + nn.functional.pad(k1, [1, 1, 1, 1]) + kid
        c = self.conv1.conv
        self.conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation,
                              c.groups, bias=True).requires_grad_(False)
        self.conv.weight.data, self.conv.bias.data = kernel, b3 + b1 + bid
        for attr in ("conv1", "conv2", "bn"):
            if hasattr(self, attr):
                delattr(self, attr)


def fuse_conv_and_bn(conv, bn):
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).requires_grad_(False)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


def fuse_deconv_and_bn(deconv, bn):
    fused = nn.ConvTranspose2d(deconv.in_channels, deconv.out_channels, deconv.kernel_size, deconv.stride,
                               deconv.padding, deconv.output_padding, deconv.groups, bias=True,
                               dilation=deconv.dilation).requires_grad_(False)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused.weight.copy_(deconv.weight * scale.view(1, -1, 1, 1))
    bias = deconv.bias if deconv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias)
    return fused


class DetectionModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            Conv(3, 16, 3, 2), Conv(16, 16, 3), RepConv(16, 16, bn=True), RepConv(16, 16), Conv(16, 32, 3, 2),
            RepConv(32, 32, bn=True), RepConv(32, 32), ConvTranspose(32, 16), Conv(16, 16, 1),
            nn.Conv2d(16, 6, 1),
        )

    def forward(self, x):
        return self.model(x)

    def is_fused(self, thresh=10):
        norms = tuple(v for k, v in nn.__dict__.items() if "Norm" in k)
        return sum(isinstance(v, norms) for v in self.modules()) < thresh

    def fuse(self):
        if not self.is_fused():
            for m in self.model.modules():
                if isinstance(m, Conv) and hasattr(m, "bn"):
                    m.conv = fuse_conv_and_bn(m.conv, m.bn)
                    delattr(m, "bn")
                    m.forward = m.forward_fuse
                if isinstance(m, ConvTranspose) and hasattr(m, "bn"):
                    m.conv_transpose = fuse_deconv_and_bn(m.conv_transpose, m.bn)
                    delattr(m, "bn")
                    m.forward = m.forward_fuse
                if isinstance(m, RepConv):
                    m.fuse_convs()
                    m.forward = m.forward_fuse
        return self


def randomized(seed: int = 0) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                mod.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(n, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return m.eval()


def attempt_load_one_weight(path):
    """As Ultralytics loads: the checkpoint dict, ``ema`` or ``model``, float, fused, eval."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).float()
    return model.fuse().eval()
