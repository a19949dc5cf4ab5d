"""Training-form multi-branch blocks for the reparam tests, written the way each project writes
them (attribute names, forward style, their own deploy method), importable without
modelsurgeon: RepVGG (A-layout), MobileOne (depthwise + pointwise blocks, over-parameterised
branches, ``out +=``), YOLOv6 RepVGGBlock and QARepVGGBlock, YOLOv7 RepConv, RepGhost, ACNet's
ACBlock, DBB (``reparam_dbb``), and a 1×1 → BN → zero-padded 3×3 branch that is not one conv
at the border."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _fuse(kernel, bn):
    """conv kernel + following BatchNorm -> (kernel, bias), the projects' ``_fuse_bn_tensor``."""
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, 1, 1, 1)
    return kernel * t, bn.bias - bn.running_mean * bn.weight / std


def _id_kernel(channels, groups, k):
    n = channels // groups
    w = torch.zeros(channels, n, k, k)
    for i in range(channels):
        w[i, i % n, k // 2, k // 2] = 1
    return w


def conv_bn(c1, c2, k, s, p, g=1):
    m = nn.Sequential()
    m.add_module("conv", nn.Conv2d(c1, c2, k, s, p, groups=g, bias=False))
    m.add_module("bn", nn.BatchNorm2d(c2))
    return m


class RepVGGBlock(nn.Module):
    """RepVGG's block; ``switch_to_deploy`` as its authors' (kernel padded to 3×3 at the centre)."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1):
        super().__init__()
        self.groups = g
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
        self.rbr_dense = conv_bn(c1, c2, k, s, p, g)
        self.rbr_1x1 = conv_bn(c1, c2, 1, s, p - k // 2, g)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    def get_equivalent_kernel_bias(self):
        k3, b3 = _fuse(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        k1, b1 = _fuse(self.rbr_1x1.conv.weight, self.rbr_1x1.bn)
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            c = self.rbr_identity.num_features
            ki, bi = _fuse(_id_kernel(c, self.groups, 3), self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, conv.dilation, conv.groups, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            if hasattr(self, name):
                delattr(self, name)


class RepVGG(nn.Module):
    """A-layout: a stride-2 stem block, stages whose first block has stride 2, GAP + linear."""

    def __init__(self, blocks=(1, 2, 2, 1), width=(8, 8, 16, 16), groups=1):
        super().__init__()
        self.stage0 = RepVGGBlock(3, width[0], s=2)
        c, stages = width[0], []
        for n, w in zip(blocks, width):
            layers = []
            for i in range(n):
                layers.append(RepVGGBlock(c, w, s=2 if i == 0 else 1, g=groups if i else 1))
                c = w
            stages.append(nn.Sequential(*layers))
        self.stage1, self.stage2, self.stage3, self.stage4 = stages
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c, 10)

    def forward(self, x):
        out = self.stage0(x)
        for stage in (self.stage1, self.stage2, self.stage3, self.stage4):
            out = stage(out)
        return self.linear(self.gap(out).view(out.size(0), -1))


class MobileOneBlock(nn.Module):
    """MobileOne's block: k over-parameterised conv branches, a 1×1 scale branch, a BN skip."""

    def __init__(self, c1, c2, k, s=1, p=0, g=1, num_conv_branches=2):
        super().__init__()
        self.inference_mode = False
        self.groups, self.stride, self.kernel_size, self.in_channels = g, s, k, c1
        self.num_conv_branches = num_conv_branches
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
        self.rbr_conv = nn.ModuleList([conv_bn(c1, c2, k, s, p, g) for _ in range(num_conv_branches)])
        self.rbr_scale = conv_bn(c1, c2, 1, s, 0, g) if k > 1 else None

    def forward(self, x):
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def reparameterize(self):
        if self.inference_mode:
            return
        k = self.kernel_size
        kernel, bias = 0, 0
        if self.rbr_scale is not None:
            ks, bs = _fuse(self.rbr_scale.conv.weight, self.rbr_scale.bn)
            kernel, bias = F.pad(ks, [k // 2] * 4), bs
        if self.rbr_skip is not None:
            ki, bi = _fuse(_id_kernel(self.in_channels, self.groups, k), self.rbr_skip)
            kernel, bias = kernel + ki, bias + bi
        for branch in self.rbr_conv:
            kc, bc = _fuse(branch.conv.weight, branch.bn)
            kernel, bias = kernel + kc, bias + bc
        conv = self.rbr_conv[0].conv
        self.reparam_conv = nn.Conv2d(conv.in_channels, conv.out_channels, k, conv.stride, conv.padding,
                                      groups=conv.groups, bias=True)
        self.reparam_conv.weight.data, self.reparam_conv.bias.data = kernel.detach(), bias.detach()
        for name in ("rbr_conv", "rbr_scale", "rbr_skip"):
            delattr(self, name)
        self.inference_mode = True


class MobileOne(nn.Module):
    """Stem, then per stage depthwise (3×3, groups = channels) + pointwise (1×1) blocks."""

    def __init__(self, widths=(8, 16), k=2):
        super().__init__()
        self.stage0 = MobileOneBlock(3, widths[0], 3, 2, 1)
        layers, c = [], widths[0]
        for w in widths:
            for s in (2, 1):
                layers.append(MobileOneBlock(c, c, 3, s, 1, g=c, num_conv_branches=k))
                layers.append(MobileOneBlock(c, w, 1, 1, 0, num_conv_branches=k))
                c = w
        self.stage1 = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(c, 10)

    def forward(self, x):
        x = self.stage1(self.stage0(x))
        return self.linear(torch.flatten(self.gap(x), 1))


class ConvModule(nn.Module):
    """YOLOv6's ConvModule without activation (``conv``, ``bn``)."""

    def __init__(self, c1, c2, k, s, p, g=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, p, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class V6RepVGGBlock(nn.Module):
    """YOLOv6's RepVGGBlock (ConvModule branches)."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1):
        super().__init__()
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(c1) if c1 == c2 and s == 1 else None
        self.rbr_dense = ConvModule(c1, c2, k, s, p, g)
        self.rbr_1x1 = ConvModule(c1, c2, 1, s, p - k // 2, g)

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))


class QARepVGGBlock(V6RepVGGBlock):
    """YOLOv6's quantisation-aware block: a bias-free 1×1 conv, a plain identity, BN after the sum;
    ``switch_to_deploy`` keeps that BN."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1):
        super().__init__(c1, c2, k, s, p, g)
        self.bn = nn.BatchNorm2d(c2)
        self.rbr_1x1 = nn.Conv2d(c1, c2, 1, s, groups=g, bias=False)
        self.rbr_identity = nn.Identity() if c1 == c2 and s == 1 else None

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.bn(self.se(self.rbr_reparam(inputs))))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.bn(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)))

    def switch_to_deploy(self):
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = _fuse(self.rbr_dense.conv.weight, self.rbr_dense.bn)
        kernel = kernel + F.pad(self.rbr_1x1.weight, [1, 1, 1, 1])
        if self.rbr_identity is not None:
            kernel = kernel + _id_kernel(kernel.shape[0], 1, 3)
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1, groups=conv.groups)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)


class RepConv(nn.Module):
    """YOLOv7's RepConv: Sequential(conv, BN) branches named ``0``/``1``, SiLU, groups ``g``."""

    def __init__(self, c1, c2, k=3, s=1, p=None, g=1):
        super().__init__()
        self.groups, self.deploy = g, False
        p = k // 2 if p is None else p
        self.act = nn.SiLU()
        self.rbr_identity = nn.BatchNorm2d(c1) if c2 == c1 and s == 1 else None
        self.rbr_dense = nn.Sequential(nn.Conv2d(c1, c2, k, s, p, groups=g, bias=False), nn.BatchNorm2d(c2))
        self.rbr_1x1 = nn.Sequential(nn.Conv2d(c1, c2, 1, s, p - k // 2, groups=g, bias=False), nn.BatchNorm2d(c2))

    def forward(self, inputs):
        if hasattr(self, "rbr_reparam"):
            return self.act(self.rbr_reparam(inputs))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.act(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out)

    def fuse_repvgg_block(self):
        if self.deploy:
            return
        k3, b3 = _fuse(self.rbr_dense[0].weight, self.rbr_dense[1])
        k1, b1 = _fuse(self.rbr_1x1[0].weight, self.rbr_1x1[1])
        kernel, bias = k3 + F.pad(k1, [1, 1, 1, 1]), b3 + b1
        if self.rbr_identity is not None:
            ki, bi = _fuse(_id_kernel(kernel.shape[0], self.groups, 3), self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        conv = self.rbr_dense[0]
        self.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, groups=conv.groups, bias=True)
        self.rbr_reparam.weight.data, self.rbr_reparam.bias.data = kernel.detach(), bias.detach()
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)
        self.deploy = True


class RepGhostModule(nn.Module):
    """RepGhost's module: ``x2 = cheap_operation(x1)`` plus re-parameterisable BN identities."""

    def __init__(self, c1, c2, k=1, dw=3, relu=True):
        super().__init__()
        self.primary_conv = nn.Sequential(nn.Conv2d(c1, c2, k, 1, k // 2, bias=False), nn.BatchNorm2d(c2),
                                          nn.ReLU(inplace=True) if relu else nn.Sequential())
        self.fusion_conv = nn.ModuleList([nn.Identity()])
        self.fusion_bn = nn.ModuleList([nn.BatchNorm2d(c2)])
        self.cheap_operation = nn.Sequential(nn.Conv2d(c2, c2, dw, 1, dw // 2, groups=c2, bias=False),
                                             nn.BatchNorm2d(c2))
        self.relu = nn.ReLU(inplace=False) if relu else nn.Sequential()

    def forward(self, x):
        x1 = self.primary_conv(x)
        x2 = self.cheap_operation(x1)
        for conv, bn in zip(self.fusion_conv, self.fusion_bn):
            x2 = x2 + bn(conv(x1))
        return self.relu(x2)

    def switch_to_deploy(self):
        kernel, bias = _fuse(self.cheap_operation[0].weight, self.cheap_operation[1])
        for bn in self.fusion_bn:
            ki, bi = _fuse(_id_kernel(kernel.shape[0], kernel.shape[0], 3), bn)
            kernel, bias = kernel + ki, bias + bi
        c = kernel.shape[0]
        self.cheap_operation = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=True)
        self.cheap_operation.weight.data, self.cheap_operation.bias.data = kernel.detach(), bias.detach()
        self.fusion_conv, self.fusion_bn = nn.ModuleList(), nn.ModuleList()


class ACBlock(nn.Module):
    """ACNet's asymmetric convolution block: k×k, k×1 and 1×k convs, each with its BN."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1):
        super().__init__()
        self.deploy = False
        self.square_conv = nn.Conv2d(c1, c2, (k, k), s, p, groups=g, bias=False)
        self.square_bn = nn.BatchNorm2d(c2)
        off = p - k // 2
        self.ver_conv = nn.Conv2d(c1, c2, (k, 1), s, (p, off), groups=g, bias=False)
        self.hor_conv = nn.Conv2d(c1, c2, (1, k), s, (off, p), groups=g, bias=False)
        self.ver_bn, self.hor_bn = nn.BatchNorm2d(c2), nn.BatchNorm2d(c2)

    def forward(self, input):
        if self.deploy:
            return self.fused_conv(input)
        square_outputs = self.square_bn(self.square_conv(input))
        vertical_outputs = self.ver_bn(self.ver_conv(input))
        horizontal_outputs = self.hor_bn(self.hor_conv(input))
        return square_outputs + vertical_outputs + horizontal_outputs

    def get_equivalent_kernel_bias(self):
        ks, bs = _fuse(self.square_conv.weight, self.square_bn)
        kv, bv = _fuse(self.ver_conv.weight, self.ver_bn)
        kh, bh = _fuse(self.hor_conv.weight, self.hor_bn)
        k = ks.shape[2]
        ks = ks.clone()
        ks[:, :, :, k // 2:k // 2 + 1] += kv
        ks[:, :, k // 2:k // 2 + 1, :] += kh
        return ks, bs + bv + bh


class ACNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(ACBlock(3, 8, s=2), nn.ReLU(), ACBlock(8, 8, p=2, k=5), nn.ReLU(),
                                  ACBlock(8, 16, g=2), nn.ReLU())

    def forward(self, x):
        return self.body(x)


class PaddedSequence(nn.Module):
    """A 1×1 conv + BN then a zero-padded 3×3 conv, summed with a 3×3 conv + BN: the BN's bias
    reaches the border pixels through the padding only in the un-merged form."""

    def __init__(self, c=4, pad_value=False):
        super().__init__()
        self.a = conv_bn(c, c, 3, 1, 1)
        self.b1, self.b2 = conv_bn(c, c, 1, 1, 0), nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.a(x) + self.b2(self.b1(x)))



def __getattr__(name):  # DBB lives in reparam_dbb, which imports the helpers above
    if name in ("BNAndPadLayer", "DBBNet", "DiverseBranchBlock", "IdentityBasedConv1x1"):
        import reparam_dbb

        return getattr(reparam_dbb, name)
    raise AttributeError(name)
