"""DBB (Diverse Branch Block) in training form, as its authors write it: an identity-based 1×1
conv, a BatchNorm padded with its own bias, four branches summed with ``out +=``, and
``switch_to_deploy`` through their transforms. Imported by ``reparam_models``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from reparam_models import _fuse, _id_kernel, conv_bn


class IdentityBasedConv1x1(nn.Conv2d):
    """DBB's 1×1 conv that adds the identity to its weight in forward."""

    def __init__(self, channels, groups=1):
        super().__init__(channels, channels, 1, 1, 0, groups=groups, bias=False)
        self.register_buffer("id_tensor", _id_kernel(channels, groups, 1))
        nn.init.zeros_(self.weight)

    def forward(self, input):
        kernel = self.weight + self.id_tensor.to(self.weight.device).type_as(self.weight)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)


class BNAndPadLayer(nn.Module):
    """DBB's BatchNorm whose output is padded with the BN's own bias (its value for a zero input)."""

    def __init__(self, pad_pixels, num_features):
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features)
        self.pad_pixels = pad_pixels

    def forward(self, input):
        output = self.bn(input)
        if self.pad_pixels > 0:
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / \
                torch.sqrt(self.bn.running_var + self.bn.eps)
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            p = self.pad_pixels
            output[:, :, 0:p, :] = pad_values
            output[:, :, -p:, :] = pad_values
            output[:, :, :, 0:p] = pad_values
            output[:, :, :, -p:] = pad_values
        return output


class DiverseBranchBlock(nn.Module):
    """DBB: k×k conv+BN, 1×1 conv+BN, 1×1 → BN-padded → average pooling → BN, and
    1×1 (identity-based) → BN-padded → k×k → BN; summed with ``out +=`` before the activation."""

    def __init__(self, c1, c2, k=3, s=1, p=1, g=1):
        super().__init__()
        self.nonlinear = nn.ReLU()
        self.dbb_origin = conv_bn(c1, c2, k, s, p, g)
        self.dbb_avg = nn.Sequential()
        if g < c2:
            self.dbb_avg.add_module("conv", nn.Conv2d(c1, c2, 1, 1, 0, groups=g, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(p, c2))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, s, 0))
            self.dbb_1x1 = conv_bn(c1, c2, 1, s, 0, g)
        else:
            self.dbb_avg.add_module("avg", nn.AvgPool2d(k, s, p))
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(c2))
        self.dbb_1x1_kxk = nn.Sequential()
        self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(c1, g))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(p, c1))
        self.dbb_1x1_kxk.add_module("conv2", nn.Conv2d(c1, c2, k, s, 0, groups=g, bias=False))
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(c2))

    def forward(self, inputs):
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    def get_equivalent_kernel_bias(self):
        """DBB's transforms: BN fusion (I), 1×1 → k×k by convolving the kernels (III), average
        pooling as a kernel (V), smaller kernels padded to k×k (VI)."""
        conv = self.dbb_origin.conv
        k, g = conv.kernel_size[0], conv.groups
        kernel, bias = _fuse(conv.weight, self.dbb_origin.bn)
        if hasattr(self, "dbb_1x1"):
            k1, b1 = _fuse(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            kernel, bias = kernel + F.pad(k1, [k // 2] * 4), bias + b1
        c2 = kernel.shape[0]
        avg = torch.zeros(c2, c2 // g, k, k)
        avg[torch.arange(c2), torch.arange(c2) % (c2 // g)] = 1.0 / (k * k)
        ka, ba = _fuse(avg, self.dbb_avg.avgbn)
        if hasattr(self.dbb_avg, "conv"):
            kf, bf = _fuse(self.dbb_avg.conv.weight, self.dbb_avg.bn.bn)
            ka, ba = _trans_iii(kf, bf, ka, ba, g)
        seq = self.dbb_1x1_kxk
        kf, bf = _fuse(seq.idconv1.weight + seq.idconv1.id_tensor, seq.bn1.bn)
        ks, bs = _fuse(seq.conv2.weight, seq.bn2)
        kk, bk = _trans_iii(kf, bf, ks, bs, g)
        return kernel + ka + kk, bias + ba + bk

    def switch_to_deploy(self):
        if hasattr(self, "dbb_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = self.dbb_origin.conv
        self.dbb_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                     conv.padding, groups=conv.groups, bias=True)
        self.dbb_reparam.weight.data, self.dbb_reparam.bias.data = kernel.detach(), bias.detach()
        for name in ("dbb_origin", "dbb_avg", "dbb_1x1", "dbb_1x1_kxk"):
            if hasattr(self, name):
                delattr(self, name)


def _trans_iii(k1, b1, k2, b2, groups):
    """A 1×1 conv (k1, b1) then a k×k conv (k2, b2) padded with b1: one k×k conv, per group."""
    ks, bs = [], []
    n1, n2 = k1.shape[0] // groups, k2.shape[0] // groups
    for i in range(groups):
        a, b = k1[i * n1:(i + 1) * n1].permute(1, 0, 2, 3), k2[i * n2:(i + 1) * n2]
        ks.append(F.conv2d(b, a))
        bs.append((b * b1[i * n1:(i + 1) * n1].reshape(1, -1, 1, 1)).sum((1, 2, 3)))
    return torch.cat(ks), torch.cat(bs) + b2


class DBBNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(DiverseBranchBlock(3, 8, s=2), DiverseBranchBlock(8, 8),
                                  DiverseBranchBlock(8, 8, g=8))

    def forward(self, x):
        return self.body(x)
