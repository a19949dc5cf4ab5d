"""Feature-fusion reference modules for the fold-fusion / optimize tests, written from the
published descriptions: Darknet's weighted multi-input [shortcut] (per_feature / per_channel,
none / relu / softmax, channel-mismatched inputs sliced or zero-padded), EfficientDet/BiFPN fast
normalised fusion, a BiFPN node with its conv inside, sigmoid-weighted fusion, and RFCR-style
inline per-input scalars. Every fusion weight is random so that normalisation matters."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from testmodels import randomize_all


class ConvBN(nn.Module):
    def __init__(self, c1, c2, act="leaky", k=1, bn=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, padding=k // 2, bias=not bn)
        self.bn = nn.BatchNorm2d(c2) if bn else nn.Identity()
        self.act = {"leaky": nn.LeakyReLU(0.1, inplace=True), "relu": nn.ReLU(), "silu": nn.SiLU(),
                    "none": nn.Identity()}[act]

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


# -- Darknet weighted [shortcut] --------------------------------------------------------------


class ShortcutLayer(nn.Module):
    """``[shortcut] from=... weights_type=... weights_normalization=...``: the output has the
    channels of ``x`` (the previous layer); a narrower input is added into the first channels, a
    wider one is cut (partial residual connections)."""

    def __init__(self, layers, n_out, weights_type="per_feature", normalization="none"):
        super().__init__()
        self.layers = list(layers)
        self.weights_type = weights_type
        self.normalization = normalization
        n = len(self.layers) + 1
        shape = (n,) if weights_type == "per_feature" else (n, n_out)
        self.w = nn.Parameter(torch.randn(shape))

    def _weights(self):
        w = self.w
        if self.normalization == "relu":
            w = F.relu(w)
            w = w / (w.sum(0, keepdim=True) + 0.0001)
        elif self.normalization == "softmax":
            w = torch.softmax(w, 0)
        return w

    def _weigh(self, w, i, t):
        if self.weights_type == "per_feature":
            return t * w[i]
        return t * w[i, :t.shape[1]].view(1, -1, 1, 1)

    def forward(self, x, outputs):
        w = self._weights()
        out = self._weigh(w, 0, x)
        nc = out.shape[1]
        for i, layer in enumerate(self.layers):
            a = outputs[layer]
            ac = a.shape[1]
            if ac < nc:  # zero-pad the input: add into the first channels
                out[:, :ac] = out[:, :ac] + self._weigh(w, i + 1, a)
            elif ac > nc:  # slice the input
                out = out + self._weigh(w, i + 1, a[:, :nc])
            else:
                out = out + self._weigh(w, i + 1, a)
        return out


class Route(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = list(layers)


class DarknetHost(nn.Module):
    """A cfg-style layer list run by the host, dispatching on the layer's class name (as
    Darknet-in-PyTorch ports do). Layer 0 feeds layers 1-3 (three branches); from layer 4 on,
    each layer reads the previous one (``[shortcut]`` also reads ``outputs``, ``[route]`` only
    ``outputs``). A data-dependent check makes it untraceable by torch.fx."""

    def __init__(self, cfg):
        super().__init__()
        mods = []
        for entry in cfg:
            kind, args = entry[0], entry[1:]
            mods.append(ConvBN(*args) if kind == "conv" else ShortcutLayer(*args) if kind == "shortcut" else Route(*args))
        self.layers = nn.ModuleList(mods)

    def forward(self, x):
        x0 = self.layers[0](x)
        if float(x0.detach().abs().sum()) < 0:  # decided on data: not symbolically traceable
            raise RuntimeError("unreachable")
        outputs = [x0] + [self.layers[i](x0) for i in (1, 2, 3)]
        x = outputs[3]
        for m in list(self.layers)[4:]:
            name = type(m).__name__
            if name == "ShortcutLayer":
                x = m(x, outputs)
            elif name == "Route":
                x = torch.cat([outputs[i] for i in m.layers], 1)
            else:
                x = m(x)
            outputs.append(x)
        return x


def darknet(weights_type="per_feature", normalization="relu", n_inputs=2, mismatch=False, act="leaky",
            shared_output=False, seed=0, routed=1):
    """Three conv branches feeding one weighted shortcut (x = layer 3, from = layers 1[, 2]),
    then a head conv.

    ``mismatch``: layers 1 and 2 have 4 (zero-padded) and 12 (sliced) channels instead of 8;
    ``shared_output``: layer ``routed``'s output is also routed to the end (its multiply must stay)."""
    c = [8, 4, 12] if mismatch else [8, 8, 8]
    cfg = [
        ("conv", 3, 8, "relu", 3),  # 0
        ("conv", 8, c[1], act),     # 1
        ("conv", 8, c[2], act),     # 2
        ("conv", 8, c[0], act),     # 3
        ("shortcut", [1] if n_inputs == 2 else [1, 2], c[0], weights_type, normalization),  # 4
        ("conv", c[0], 6, "leaky"),  # 5
    ]
    if shared_output:
        cfg += [("route", [5, routed]), ("conv", 6 + c[routed], 5, "none")]  # 6, 7: read again
    return finish(DarknetHost(cfg), seed)


# -- BiFPN ------------------------------------------------------------------------------------


class FastNormalizedFusion(nn.Module):
    """EfficientDet fast normalised fusion: ``sum_i relu(w_i) / (sum_j relu(w_j) + eps) * x_i``."""

    def __init__(self, n, eps=1e-4):
        super().__init__()
        self.w = nn.Parameter(torch.rand(n) + 0.1)
        self.eps = eps

    def forward(self, *xs):
        w = F.relu(self.w)
        w = w / (torch.sum(w, dim=0) + self.eps)
        return sum(w[i] * x for i, x in enumerate(xs))


class SoftmaxFusion(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, xs):
        w = torch.softmax(self.w, dim=0)
        return torch.stack([w[i] * x for i, x in enumerate(xs)]).sum(0)


class SigmoidFusion(nn.Module):
    """Sigmoid-weighted feature fusion (``w = sigmoid(w) * 2 / n``), as in YOLOv3 ports."""

    def __init__(self, n):
        super().__init__()
        self.n = n
        self.w = nn.Parameter(torch.randn(n))

    def forward(self, xs):
        w = torch.sigmoid(self.w) * (2 / self.n)
        out = xs[0] * w[0]
        for i in range(1, self.n):
            out = out + xs[i] * w[i]
        return out


class BiFPNAdd(nn.Module):
    """A BiFPN node with its conv inside: ``conv(silu(sum w_i x_i / (sum w + eps)))``."""

    def __init__(self, c1, c2, n=2):
        super().__init__()
        self.w = nn.Parameter(torch.rand(n) + 0.2)
        self.epsilon = 0.0001
        self.conv = nn.Conv2d(c1, c2, 1)
        self.silu = nn.SiLU()

    def forward(self, x):
        w = self.w
        weight = w / (torch.sum(w, dim=0) + self.epsilon)
        return self.conv(self.silu(sum(weight[i] * x[i] for i in range(len(x)))))


class Neck(nn.Module):
    """Branch blocks producing the fused inputs, one fusion, a head conv.

    ``call``: how the fusion takes its inputs -- "varargs" (``f(a, b)``), "list" (``f([a, b])``);
    ``side``: branch 0's output also feeds a side conv (its weight must stay a multiply);
    ``upsample``: branch 1 is produced at half resolution and upsampled (nearest) before fusing."""

    def __init__(self, fusion, n=2, act="none", call="varargs", side=False, upsample=False, out=8, bn=True):
        super().__init__()
        self.stem = ConvBN(3, 8, "relu", k=3)
        self.branches = nn.ModuleList(ConvBN(8, 8, act, bn=bn) for _ in range(n))
        self.fusion = fusion
        self.call = call
        self.up = nn.Upsample(scale_factor=2, mode="nearest") if upsample else None
        self.pool = nn.MaxPool2d(2) if upsample else None
        self.head = nn.Conv2d(out, 4, 1)
        self.side = nn.Conv2d(8, 4, 1) if side else None

    def forward(self, x):
        x = self.stem(x)
        feats = [self.branches[i](x if i != 1 or self.up is None else self.pool(x)) for i in range(len(self.branches))]
        if self.up is not None:
            feats[1] = self.up(feats[1])
        y = self.fusion(*feats) if self.call == "varargs" else self.fusion(feats)
        y = self.head(y)
        if self.side is not None:
            y = y + self.side(feats[0])
        return y


# -- RFCR: inline per-input scalars in a host forward ------------------------------------------


class RFCR(nn.Module):
    """RFCR-style module (seed 003): pointwise convs, a sum weighted by one learnable scalar per
    input (inline in this forward), a separable conv, and redistribution by concatenation."""

    def __init__(self, in_channels=(8, 12, 16), mid=8, out=8):
        super().__init__()
        self.scale = nn.ParameterList(nn.Parameter(torch.tensor([1.0])) for _ in in_channels)
        self.pwconv = nn.ModuleList(nn.Conv2d(c, mid, 1, bias=False) for c in in_channels)
        self.mb = nn.Sequential(nn.Conv2d(mid, mid, 5, padding=2, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.ReLU6(), nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out), nn.ReLU6())

    def forward(self, feats):
        fuse = [F.max_pool2d(feats[0], 2), feats[1], F.interpolate(feats[2], scale_factor=2, mode="bilinear")]
        fuse = [self.pwconv[i](f) for i, f in enumerate(fuse)]
        s = self.scale[0] * fuse[0] + self.scale[1] * fuse[1] + self.scale[2] * fuse[2]
        m = self.mb(s)
        return [torch.cat([F.interpolate(m, scale_factor=2, mode="bilinear"), feats[0]], 1),
                torch.cat([m, feats[1]], 1),
                torch.cat([F.max_pool2d(m, 2), feats[2]], 1)]


class RFCRNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c3 = ConvBN(3, 8, "relu", k=3)
        self.c4 = nn.Sequential(nn.MaxPool2d(2), ConvBN(8, 12, "relu", k=3))
        self.c5 = nn.Sequential(nn.MaxPool2d(2), ConvBN(12, 16, "relu", k=3))
        self.rfcr = RFCR()

    def forward(self, x):
        p3 = self.c3(x)
        p4 = self.c4(p3)
        p5 = self.c5(p4)
        return self.rfcr([p3, p4, p5])


class InlineComputed(nn.Module):
    """Inline weights computed from a parameter in the host: cannot be neutralised."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.w = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return torch.sigmoid(self.w[0]) * self.a(x) + torch.sigmoid(self.w[1]) * self.b(x)


class InlineVector(nn.Module):
    """One weight vector indexed inline: set to all ones only if every weight moves."""

    def __init__(self, side=False):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.w = nn.Parameter(torch.randn(2))
        self.side = nn.Conv2d(6, 6, 1) if side else None

    def forward(self, x):
        a = self.a(x)
        y = self.w[0] * a + self.w[1] * self.b(x)
        return y + self.side(a) if self.side is not None else y


def finish(model, seed=0):
    """Random BN statistics/affine everywhere, random positive fusion weights (all
    distinct, so normalisation matters), eval mode."""
    randomize_all(model, seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1] == "w" or ".scale." in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.2 + 0.1)
    return model.eval()


# factories for --arch (state_dict / safetensors round trips)


def darknet_mismatch():
    return darknet("per_channel", "softmax", 3, mismatch=True)


def bifpn_node():
    return finish(Neck(BiFPNAdd(8, 8), call="list"))


class SizeDependent(nn.Module):
    """A weighted sum at the recorded size, something else at other sizes: not replaceable."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(2) + 0.1)

    def forward(self, a, b):
        w = torch.softmax(self.w, 0)
        if a.shape[-1] == 16:
            return w[0] * a + w[1] * b
        return w[0] * a + w[1] * b.flip(-1)


class WeightedConcat(nn.Module):
    """BiFPN-style weighted concatenation (YOLO BiFPN ports' ``BiFPN_Concat``), here with the
    inputs concatenated in reverse order."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(2) + 0.1)

    def forward(self, x):
        w = self.w / (self.w.sum() + 1e-4)
        return torch.cat([w[1] * x[1], w[0] * x[0]], 1)


class Interleaved(nn.Module):
    """Weighted inputs interleaved channel by channel: neither a sum nor a concatenation."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(2) + 0.1)

    def forward(self, x):
        y = torch.stack([self.w[0] * x[0], self.w[1] * x[1]], 2)
        return y.flatten(1, 2)


class BiasedFusion(nn.Module):
    """A weighted sum plus a learnt per-channel bias (an additive constant)."""

    def __init__(self, c=8):
        super().__init__()
        self.w = nn.Parameter(torch.rand(2) + 0.1)
        self.bias = nn.Parameter(torch.randn(c))

    def forward(self, a, b):
        w = torch.softmax(self.w, 0)
        return w[0] * a + w[1] * b + self.bias.view(1, -1, 1, 1)


# -- tensors a fold must not write or remove ------------------------------------------------------


class InlineNonPersistent(nn.Module):
    """Inline weights in a non-persistent buffer: a state_dict does not hold them, so a model
    rebuilt from one gets the initial weights back -- they must not be set to 1."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 8, "none")
        self.b = ConvBN(3, 8, "none")
        self.register_buffer("w", torch.tensor([0.3, 0.7]), persistent=False)

    def forward(self, x):
        return self.w[0] * self.a(x) + self.w[1] * self.b(x)


def inline_non_persistent(seed=0):
    """Factory (also for ``--arch``): random convs and BatchNorm statistics, eval mode."""
    torch.manual_seed(seed)
    return randomize_all(InlineNonPersistent(), seed).eval()


class TiedAffine(nn.Module):
    """Two conv-BN branches summed with inline weights; a BatchNorm that forward never runs
    shares the first branch's affine weight and bias (tied): scaling them would change it."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 8, "none")
        self.b = ConvBN(3, 8, "none")
        self.aux = nn.BatchNorm2d(8)
        self.aux.weight, self.aux.bias = self.a.bn.weight, self.a.bn.bias
        self.fw = nn.Parameter(torch.tensor([0.4, 0.9]))

    def forward(self, x):
        return self.fw[0] * self.a(x) + self.fw[1] * self.b(x)


class ReadsFusionWeight(Neck):
    """The host's forward reads the fusion module's own weight besides calling it."""

    def forward(self, x):
        return super().forward(x) + self.fusion.w.sum()
