"""Structural re-parameterisation maths: linear branches as 2-D convolutions, merged into one.

Pure float64 tensor functions, no modules, no graph (the plumbing is in
``passes/reparam``). A branch is a :class:`ConvMap` -- ``y = conv(x, weight, bias)`` with its
stride, padding, dilation and groups -- built from a conv, an identity (a delta kernel), an
average pooling (``count_include_pad=True``: a constant kernel) or a per-channel affine, and
composed with the maps around it (a BatchNorm or scale after a conv; a 1×1 conv before a k×k
one, exact when the k×k conv's padding holds the 1×1 stage's bias, as DBB pads it). Branches
whose centres align (``padding − dilation·(k − 1)/2`` equal on each axis) and whose stride
matches are summed into one kernel, each embedded at its place; mixed dilations become one
dense kernel (the gcd of the dilations).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import gcd
from typing import Any

import torch


@dataclass
class ConvMap:
    """``y = conv2d(x, weight, bias, stride, padding, dilation, groups)`` in float64."""

    weight: Any  # (out, in / groups, kh, kw)
    bias: Any  # (out,)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    def offset2(self, axis: int) -> int:
        """Twice the centre's offset on ``axis``: ``2·padding − dilation·(k − 1)``."""
        return 2 * self.padding[axis] - self.dilation[axis] * (self.kernel[axis] - 1)


def bn_affine(mean: Any, var: Any, weight: Any, bias: Any, eps: float) -> tuple[Any, Any]:
    """``(scale, shift)`` of an inference BatchNorm."""
    scale = torch.rsqrt(var.double() + eps)
    if weight is not None:
        scale = scale * weight.double()
    shift = -mean.double() * scale
    if bias is not None:
        shift = shift + bias.double()
    return scale, shift


def then_affine(m: ConvMap, scale: Any, shift: Any) -> ConvMap:
    """``scale[c] · m(x) + shift[c]``."""
    return replace(m, weight=m.weight * scale.view(-1, 1, 1, 1), bias=m.bias * scale + shift)


def identity(channels: int, groups: int | None = None) -> ConvMap:
    """The identity as a 1×1 conv of ``groups`` groups (default: depthwise): for group size
    ``n = channels / groups`` output ``c`` reads input ``c mod n`` of its group."""
    g = channels if groups is None else groups
    n = channels // g
    w = torch.zeros(channels, n, 1, 1, dtype=torch.float64)
    w[torch.arange(channels), torch.arange(channels) % n, 0, 0] = 1.0
    return ConvMap(w, torch.zeros(channels, dtype=torch.float64), groups=g)


def avg_pool(channels: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> ConvMap:
    """``avg_pool2d(count_include_pad=True)`` as a depthwise conv with a constant kernel."""
    kh, kw = kernel
    w = torch.full((channels, 1, kh, kw), 1.0 / (kh * kw), dtype=torch.float64)
    return ConvMap(w, torch.zeros(channels, dtype=torch.float64), tuple(stride), tuple(padding), (1, 1), channels)


def dense(m: ConvMap) -> Any:
    """The weight as one group: ``(out, in, kh, kw)``, zero off the groups' blocks."""
    o, n, kh, kw = m.weight.shape
    if m.groups == 1:
        return m.weight
    w = torch.zeros(o, n * m.groups, kh, kw, dtype=m.weight.dtype)
    per = o // m.groups
    for g in range(m.groups):
        w[g * per:(g + 1) * per, g * n:(g + 1) * n] = m.weight[g * per:(g + 1) * per]
    return w


def grouped(w: Any, groups: int) -> Any:
    """A dense weight as ``groups`` groups (its off-block entries must be zero)."""
    if groups == 1:
        return w
    o, i = w.shape[:2]
    per, n = o // groups, i // groups
    return torch.cat([w[g * per:(g + 1) * per, g * n:(g + 1) * n] for g in range(groups)])


def compose(first: ConvMap, second: ConvMap) -> ConvMap:
    """``second(first(x))`` when one of them is a 1×1, stride-1, unpadded conv: the 1×1 → k×k
    sequence (exact when ``second`` pads with ``first``'s bias, pads nothing, or that bias is
    zero: the caller checks) or a k×k conv followed by a 1×1 one."""
    g = gcd(first.groups, second.groups)
    if first.kernel == (1, 1) and first.stride == (1, 1) and first.padding == (0, 0):
        w2 = dense(second)  # (out, mid, kh, kw)
        w = torch.einsum("omhw,mi->oihw", w2, dense(first)[:, :, 0, 0])
        b = second.bias + torch.einsum("omhw,m->o", w2, first.bias)
        return replace(second, weight=grouped(w, g), bias=b, groups=g)
    if second.kernel == (1, 1) and second.stride == (1, 1) and second.padding == (0, 0):
        w2 = dense(second)[:, :, 0, 0]  # (out, mid)
        w = torch.einsum("om,mihw->oihw", w2, dense(first))
        return replace(first, weight=grouped(w, g), bias=second.bias + w2 @ first.bias, groups=g)
    raise ValueError("sequence")


def merge(branches: list[ConvMap]) -> ConvMap:
    """One conv computing the sum of ``branches``. Raises ``ValueError`` (with the reason) for
    differing strides, misaligned centres or incompatible groups."""
    first = branches[0]
    if any(b.stride != first.stride for b in branches):
        raise ValueError("stride")
    if any(b.out_channels != first.out_channels or b.in_channels != first.in_channels for b in branches):
        raise ValueError("channels")
    for axis in (0, 1):
        if len({b.offset2(axis) for b in branches}) != 1:
            raise ValueError("centres")
    g = 0
    for b in branches:
        g = gcd(g, b.groups)
    dil, pad, size = [], [], []
    for axis in (0, 1):
        d = 0
        for b in branches:
            if b.kernel[axis] > 1:
                d = gcd(d, b.dilation[axis])
        d = d or 1
        p = max(b.padding[axis] for b in branches)
        for b in branches:
            if (p - b.padding[axis]) % d or (b.kernel[axis] > 1 and b.dilation[axis] % d):
                raise ValueError("centres")
        k = max((p - b.padding[axis]) // d + (b.kernel[axis] - 1) * (b.dilation[axis] // d) + 1 for b in branches)
        dil.append(d)
        pad.append(p)
        size.append(k)
    out, per = first.out_channels, first.in_channels // g
    w = torch.zeros(out, per, size[0], size[1], dtype=torch.float64)
    bias = torch.zeros(out, dtype=torch.float64)
    for b in branches:
        bw = grouped(dense(b), g)
        oy, ox = ((pad[a] - b.padding[a]) // dil[a] for a in (0, 1))
        sy = b.dilation[0] // dil[0] if b.kernel[0] > 1 else 1
        sx = b.dilation[1] // dil[1] if b.kernel[1] > 1 else 1
        kh, kw = b.kernel
        w[:, :, oy:oy + (kh - 1) * sy + 1:sy, ox:ox + (kw - 1) * sx + 1:sx] += bw
        bias += b.bias
    return ConvMap(w, bias, first.stride, (pad[0], pad[1]), (dil[0], dil[1]), g)
