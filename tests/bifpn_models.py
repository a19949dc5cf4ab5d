"""EfficientDet-style models for the inline-weight tests, in the style of the most used PyTorch
EfficientDet: a BiFPN cell is one big forward over five levels (P3-P7) computing every fusion
weight inline (``w = self.p4_w1_relu(self.p4_w1); weight = w / (torch.sum(w, dim=0) +
self.epsilon)``), a top-down path of 2-input fusions and a bottom-up path of 3-input ones, each
``conv(swish(weight[0] * a + weight[1] * resample(b)))`` with separable convs (depthwise,
pointwise, BatchNorm), a memory-efficient swish (a custom autograd function), nearest
upsampling and "same"-padded max-pool downsampling, and on the first cell the channel-reducing
convs (conv + BatchNorm) of the backbone's maps. Weighting variants: ``fast`` (ReLU, then
normalised), ``softmax``, ``sigmoid``; scalar weights, or one per channel (``per_channel``).
Written from the published architecture; random weights, BatchNorm statistics and affine
parameters (``build``)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from testmodels import randomize_all


class SwishImplementation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, i):
        result = i * torch.sigmoid(i)
        ctx.save_for_backward(i)
        return result

    @staticmethod
    def backward(ctx, grad_output):
        i = ctx.saved_tensors[0]
        s = torch.sigmoid(i)
        return grad_output * (s * (1 + i * (1 - s)))


class MemoryEfficientSwish(nn.Module):
    def forward(self, x):
        return SwishImplementation.apply(x)


def _same_pad(x, kernel, stride):
    """TensorFlow "SAME" padding for the input's own size: [left, right, top, bottom]."""
    h, w = x.shape[-2:]
    extra_w = (math.ceil(w / stride[1]) - 1) * stride[1] - w + kernel[1]
    extra_h = (math.ceil(h / stride[0]) - 1) * stride[0] - h + kernel[0]
    left, top = extra_w // 2, extra_h // 2
    return [left, extra_w - left, top, extra_h - top]


class Conv2dStaticSamePadding(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias, groups=groups)
        self.stride = list(self.conv.stride)
        self.kernel_size = list(self.conv.kernel_size)

    def forward(self, x):
        return self.conv(F.pad(x, _same_pad(x, self.kernel_size, self.stride)))


class MaxPool2dStaticSamePadding(nn.Module):
    def __init__(self, kernel_size, stride):
        super().__init__()
        self.pool = nn.MaxPool2d(kernel_size, stride)
        self.stride = [stride] * 2
        self.kernel_size = [kernel_size] * 2

    def forward(self, x):
        return self.pool(F.pad(x, _same_pad(x, self.kernel_size, self.stride)))


class SeparableConvBlock(nn.Module):
    def __init__(self, in_channels, out_channels=None, norm=True, activation=False):
        super().__init__()
        out_channels = out_channels or in_channels
        self.depthwise_conv = Conv2dStaticSamePadding(in_channels, in_channels, 3, groups=in_channels, bias=False)
        self.pointwise_conv = Conv2dStaticSamePadding(in_channels, out_channels, 1)
        self.norm = norm
        if norm:
            self.bn = nn.BatchNorm2d(out_channels, momentum=0.01, eps=1e-3)
        self.activation = activation
        if activation:
            self.swish = MemoryEfficientSwish()

    def forward(self, x):
        x = self.pointwise_conv(self.depthwise_conv(x))
        if self.norm:
            x = self.bn(x)
        if self.activation:
            x = self.swish(x)
        return x


def _reduce(c_in, c_out):
    return nn.Sequential(Conv2dStaticSamePadding(c_in, c_out, 1), nn.BatchNorm2d(c_out, momentum=0.01, eps=1e-3))


class BiFPN(nn.Module):
    def __init__(self, num_channels, conv_channels, first_time=False, epsilon=1e-4, weighting="fast",
                 per_channel=False):
        super().__init__()
        self.epsilon = epsilon
        self.weighting = weighting
        c = num_channels
        for name in ("conv6_up", "conv5_up", "conv4_up", "conv3_up", "conv4_down", "conv5_down", "conv6_down",
                     "conv7_down"):
            setattr(self, name, SeparableConvBlock(c))
        for level in (6, 5, 4, 3):
            setattr(self, f"p{level}_upsample", nn.Upsample(scale_factor=2, mode="nearest"))
        for level in (4, 5, 6, 7):
            setattr(self, f"p{level}_downsample", MaxPool2dStaticSamePadding(3, 2))
        self.swish = MemoryEfficientSwish()
        self.first_time = first_time
        if first_time:
            self.p5_down_channel = _reduce(conv_channels[2], c)
            self.p4_down_channel = _reduce(conv_channels[1], c)
            self.p3_down_channel = _reduce(conv_channels[0], c)
            self.p5_to_p6 = nn.Sequential(*_reduce(conv_channels[2], c), MaxPool2dStaticSamePadding(3, 2))
            self.p6_to_p7 = nn.Sequential(MaxPool2dStaticSamePadding(3, 2))
            self.p4_down_channel_2 = _reduce(conv_channels[1], c)
            self.p5_down_channel_2 = _reduce(conv_channels[2], c)
        shape = (lambda n: (n, c, 1, 1)) if per_channel else (lambda n: (n,))
        for name, n in (("p6_w1", 2), ("p5_w1", 2), ("p4_w1", 2), ("p3_w1", 2),
                        ("p4_w2", 3), ("p5_w2", 3), ("p6_w2", 3), ("p7_w2", 2)):
            setattr(self, name, nn.Parameter(torch.ones(shape(n))))
            setattr(self, name + "_relu", nn.ReLU())

    def _weights(self, w, relu):
        """The normalised fusion weights, computed inline in the cell's forward."""
        if self.weighting == "softmax":
            return torch.softmax(w, dim=0)
        if self.weighting == "sigmoid":
            return torch.sigmoid(w)
        w = relu(w)
        return w / (torch.sum(w, dim=0) + self.epsilon)

    def forward(self, inputs):
        if self.first_time:
            p3, p4, p5 = inputs
            p6_in = self.p5_to_p6(p5)
            p7_in = self.p6_to_p7(p6_in)
            p3_in = self.p3_down_channel(p3)
            p4_in = self.p4_down_channel(p4)
            p5_in = self.p5_down_channel(p5)
        else:
            p3_in, p4_in, p5_in, p6_in, p7_in = inputs

        # top-down: P7_0 and P6_0 to P6_1, ..., P4_1 and P3_0 to P3_2
        weight = self._weights(self.p6_w1, self.p6_w1_relu)
        p6_up = self.conv6_up(self.swish(weight[0] * p6_in + weight[1] * self.p6_upsample(p7_in)))
        weight = self._weights(self.p5_w1, self.p5_w1_relu)
        p5_up = self.conv5_up(self.swish(weight[0] * p5_in + weight[1] * self.p5_upsample(p6_up)))
        weight = self._weights(self.p4_w1, self.p4_w1_relu)
        p4_up = self.conv4_up(self.swish(weight[0] * p4_in + weight[1] * self.p4_upsample(p5_up)))
        weight = self._weights(self.p3_w1, self.p3_w1_relu)
        p3_out = self.conv3_up(self.swish(weight[0] * p3_in + weight[1] * self.p3_upsample(p4_up)))

        if self.first_time:
            p4_in = self.p4_down_channel_2(p4)
            p5_in = self.p5_down_channel_2(p5)

        # bottom-up: P4_0, P4_1 and P3_2 to P4_2, ..., P7_0 and P6_2 to P7_2
        weight = self._weights(self.p4_w2, self.p4_w2_relu)
        p4_out = self.conv4_down(
            self.swish(weight[0] * p4_in + weight[1] * p4_up + weight[2] * self.p4_downsample(p3_out)))
        weight = self._weights(self.p5_w2, self.p5_w2_relu)
        p5_out = self.conv5_down(
            self.swish(weight[0] * p5_in + weight[1] * p5_up + weight[2] * self.p5_downsample(p4_out)))
        weight = self._weights(self.p6_w2, self.p6_w2_relu)
        p6_out = self.conv6_down(
            self.swish(weight[0] * p6_in + weight[1] * p6_up + weight[2] * self.p6_downsample(p5_out)))
        weight = self._weights(self.p7_w2, self.p7_w2_relu)
        p7_out = self.conv7_down(self.swish(weight[0] * p7_in + weight[1] * self.p7_downsample(p6_out)))
        return p3_out, p4_out, p5_out, p6_out, p7_out


class TinyBackbone(nn.Module):
    """Three maps of stride 2, 4 and 8 from a few conv-BN-swish stages (an EfficientNet stand-in
    at a quarter of its strides, so that the tests run on small images: 32 x 32 gives P3-P7 of
    16 down to 1 pixel)."""

    def __init__(self, channels=(12, 16, 24)):
        super().__init__()

        def stage(c_in, c_out, stride=2):
            return nn.Sequential(Conv2dStaticSamePadding(c_in, c_out, 3, stride=stride, bias=False),
                                 nn.BatchNorm2d(c_out, momentum=0.01, eps=1e-3), MemoryEfficientSwish())

        self.stem = nn.Sequential(stage(3, 8, 1), stage(8, 8, 1))
        self.stages = nn.ModuleList([stage(8, channels[0]), stage(channels[0], channels[1]), stage(channels[1], channels[2])])

    def forward(self, x):
        x = self.stem(x)
        feats = []
        for s in self.stages:
            x = s(x)
            feats.append(x)
        return feats


class EfficientDetLike(nn.Module):
    """Backbone, ``repeats`` BiFPN cells (the first one reducing the backbone's channels), and a
    1x1 conv head per level."""

    def __init__(self, weighting="fast", per_channel=False, repeats=2, num_channels=8, conv_channels=(12, 16, 24)):
        super().__init__()
        self.backbone_net = TinyBackbone(conv_channels)
        self.bifpn = nn.Sequential(*[BiFPN(num_channels, conv_channels, first_time=i == 0, weighting=weighting,
                                           per_channel=per_channel) for i in range(repeats)])
        self.heads = nn.ModuleList(nn.Conv2d(num_channels, 4, 1) for _ in range(5))

    def forward(self, x):
        p3, p4, p5 = self.backbone_net(x)
        feats = self.bifpn((p3, p4, p5))
        return [h(f) for h, f in zip(self.heads, feats)]


class DataBranchBiFPN(BiFPN):
    """A BiFPN cell whose forward also takes a branch on data (a NaN guard): it cannot be
    regenerated, so its inline weights stay where they are (and are reported)."""

    def forward(self, inputs):
        if bool(torch.isnan(inputs[0]).any()):
            raise ValueError("NaN in the features")
        return super().forward(inputs)


def build(weighting="fast", per_channel=False, repeats=2, seed=0, cls=None):
    """A randomised :class:`EfficientDetLike` in eval mode: random convs, BatchNorm statistics
    and affine parameters, fusion weights random and distinct (so normalisation matters)."""
    torch.manual_seed(seed)
    model = EfficientDetLike(weighting, per_channel, repeats)
    if cls is not None:
        model.bifpn[0].__class__ = cls
    randomize_all(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_w" in name.rsplit(".", 1)[-1]:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.1)
    return model.eval()


# factories for --arch (state_dict / safetensors round trips)


def softmax_per_channel():
    return build("softmax", per_channel=True)
