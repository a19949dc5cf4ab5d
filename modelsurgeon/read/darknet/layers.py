"""Darknet layers as darknet builds them from the ``.cfg``: options with darknet's defaults,
input layers, output sizes (darknet's own formulas) and the weights each layer reads.

Details: docs/formats.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import BadInput
from .cfg import Cfg, Section

ACTIVATIONS = {"linear", "leaky", "revleaky", "relu", "relu6", "logistic", "tanh", "swish", "mish", "hard_mish",
               "elu", "selu", "relie", "ramp", "loggy", "hardtan"}
HEADS = {"yolo", "region", "gaussian_yolo"}
IDENTITY = {"dropout", "empty", "cost"} | HEADS
KEEP_FLAT = {"connected", "softmax", "activation"} | IDENTITY  # layers that take a vector as it is
SHORT = {"convolutional": "conv", "connected": "connected", "maxpool": "maxpool", "avgpool": "avgpool",
         "softmax": "softmax", "route": "route", "shortcut": "shortcut", "upsample": "upsample", "reorg": "reorg",
         "reorg3d": "reorg3d", "yolo": "yolo", "region": "region", "gaussian_yolo": "yolo", "dropout": "dropout",
         "scale_channels": "scale_channels", "sam": "sam", "batchnorm": "batchnorm", "activation": "activation",
         "empty": "empty", "cost": "cost"}
WEIGHTS_NORMALIZATION = ("weights_normalization", "weights_normalizion")  # the second: cfgs of early 2020


@dataclass
class Layer:
    index: int
    kind: str
    section: Section
    inputs: list[int]  # layer indices; -1 is the network input
    c: int
    h: int
    w: int
    flat: bool = False  # a vector (connected / softmax output), not an image
    p: dict[str, Any] = field(default_factory=dict)  # parameters read from the section
    weights: list[tuple[str, tuple]] = field(default_factory=list)  # (name, shape) in file order

    @property
    def name(self) -> str:
        return f"{SHORT[self.kind]}_{self.index}"

    @property
    def count(self) -> int:
        n = 0
        for _, shape in self.weights:
            k = 1
            for d in shape:
                k *= d
            n += k
        return n

    def where(self) -> str:
        return f"layer {self.index} {self.section.where()}"


def _bad(layer_where: str, cfg: Cfg, why: str, code: str | None = None) -> BadInput:
    return BadInput(f"{cfg.name}: {layer_where}: {why}", code=code)


UNSUPPORTED = "unsupported-layer"


def _activation(s: Section, cfg: Cfg, where: str, default: str, kind: str) -> str:
    act = s.text("activation", default)
    if act not in ACTIVATIONS:
        raise _bad(where, cfg, f"activation {act!r} is not supported (supported: {', '.join(sorted(ACTIVATIONS))})",
                   UNSUPPORTED)
    if kind in ("scale_channels", "sam") and act in ("swish", "mish"):
        raise _bad(where, cfg, f"darknet does not support activation {act!r} in [{kind}]", UNSUPPORTED)
    return act


def _resolve(index: int, i: int, n: int, cfg: Cfg, where: str) -> int:
    j = i + index if index < 0 else index
    if not 0 <= j < i:
        raise _bad(where, cfg, f"refers to layer {index} ({j} absolute), which is not an earlier layer")
    return j


def _c_div(a: int, b: int) -> int:
    """C's integer division (towards zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def read_layers(cfg: Cfg, shape: tuple[int, int, int]) -> list[Layer]:
    """The network's layers for an input of ``shape`` = (c, h, w)."""
    layers: list[Layer] = []
    c, h, w, flat = shape[0], shape[1], shape[2], False
    for i, s in enumerate(cfg.layers):
        kind = s.kind
        where = f"layer {i} {s.where()}"
        if kind is None:
            raise _bad(where, cfg, "unknown section type (darknet would not recognise it either)", UNSUPPORTED)
        if kind not in SHORT:
            raise _bad(where, cfg, f"[{kind}] layers are not supported", UNSUPPORTED)
        inputs = [i - 1]
        L = Layer(index=i, kind=kind, section=s, inputs=inputs, c=c, h=h, w=w, flat=flat)
        build = _BUILDERS.get(kind)
        if build is not None:
            build(L, s, cfg, where, layers)
        if kind not in KEEP_FLAT:
            L.flat = False  # a vector input (connected, softmax) is read as a C x 1 x 1 image
        if min(L.c, L.h, L.w) <= 0:
            raise _bad(where, cfg, f"output size {L.c}x{L.h}x{L.w} is empty for input {c}x{h}x{w}")
        layers.append(L)
        c, h, w, flat = L.c, L.h, L.w, L.flat
    return layers


def _conv(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    for opt in ("binary", "xnor", "antialiasing", "sway", "rotate", "stretch", "stretch_sway", "coordconv",
                "deform"):
        if s.int(opt, 0):
            raise _bad(where, cfg, f"{opt}=1 is not supported", UNSUPPORTED)
    if s.has("share_index"):
        raise _bad(where, cfg, "share_index (weights shared with another layer) is not supported", UNSUPPORTED)
    n, groups, size = s.int("filters", 1), s.int("groups", 1), s.int("size", 1)
    sx, sy = s.int("stride_x", -1), s.int("stride_y", -1)
    if sx < 1 or sy < 1:
        stride = s.int("stride", 1)
        sx, sy = (stride if sx < 1 else sx), (stride if sy < 1 else sy)
    dilation = 1 if size == 1 else s.int("dilation", 1)
    pad = size // 2 if s.int("pad", 0) else s.int("padding", 0)
    if n < 1 or size < 1 or groups < 1 or dilation < 1 or pad < 0:
        raise _bad(where, cfg, f"filters={n} size={size} groups={groups} dilation={dilation} padding={pad}: invalid")
    if L.c % groups or n % groups:
        raise _bad(where, cfg, f"groups={groups} does not divide the input channels ({L.c}) and filters ({n})")
    if size == 1 and sx == 1 and sy == 1 and pad:
        raise _bad(where, cfg, f"a 1x1 stride-1 convolution with padding={pad} (darknet skips the padding there)")
    oh, ow = _c_div(L.h + 2 * pad - size, sy) + 1, _c_div(L.w + 2 * pad - size, sx) + 1
    if dilation > 1:  # darknet's im2col pads pad*dilation and sizes its columns its own way
        eh = (L.h + 2 * pad * dilation - dilation * (size - 1) - 1) // sy + 1
        ew = (L.w + 2 * pad * dilation - dilation * (size - 1) - 1) // sx + 1
        if (eh, ew) != (oh, ow):
            raise _bad(where, cfg, f"dilation={dilation} with padding={pad}: darknet's output size {oh}x{ow} and "
                                   f"its im2col's {eh}x{ew} disagree (darknet computes garbage here)")
    bn = s.int("batch_normalize", 0) or s.int("cbn", 0)
    L.p.update(filters=n, groups=groups, size=size, stride=(sy, sx), dilation=dilation, pad=pad,
               bn=bool(bn), activation=_activation(s, cfg, where, "logistic", "convolutional"),
               flipped=bool(s.int("flipped", 0)))
    L.weights = [("biases", (n,))]
    if bn:
        L.weights += [("scales", (n,)), ("rolling_mean", (n,)), ("rolling_variance", (n,))]
    L.weights.append(("weights", (n, L.c // groups, size, size)))
    L.c, L.h, L.w = n, oh, ow


def _connected(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    n, inputs = s.int("output", 1), L.c * L.h * L.w
    bn = s.int("batch_normalize", 0)
    L.p.update(outputs=n, inputs=inputs, bn=bool(bn),
               activation=_activation(s, cfg, where, "logistic", "connected"))
    L.weights = [("biases", (n,)), ("weights", (n, inputs))]
    if bn:
        L.weights += [("scales", (n,)), ("rolling_mean", (n,)), ("rolling_variance", (n,))]
    L.c, L.h, L.w, L.flat = n, 1, 1, True


def _maxpool(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    if s.int("antialiasing", 0):
        raise _bad(where, cfg, "antialiasing=1 is not supported", UNSUPPORTED)
    stride = s.int("stride", 1)
    sx, sy = s.int("stride_x", stride), s.int("stride_y", stride)
    size = s.int("size", stride)
    padding = s.int("padding", size - 1)
    depth, out_c = s.int("maxpool_depth", 0), s.int("out_channels", 1)
    if size < 1 or sx < 1 or sy < 1 or padding < 0:
        raise _bad(where, cfg, f"size={size} stride={sx}x{sy} padding={padding}: invalid")
    L.p.update(size=size, stride=(sy, sx), padding=padding, depth=bool(depth), out_channels=out_c)
    if depth:
        if out_c < 1 or L.c % out_c:
            raise _bad(where, cfg, f"maxpool_depth with out_channels={out_c} needs it to divide the {L.c} channels")
        L.c = out_c
    else:
        L.h, L.w = _c_div(L.h + padding - size, sy) + 1, _c_div(L.w + padding - size, sx) + 1


def _avgpool(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    L.h = L.w = 1


def _softmax(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    if s.has("tree") or s.float("spatial", 0):
        raise _bad(where, cfg, "softmax with a tree or spatial=1 is not supported", UNSUPPORTED)
    groups, inputs = s.int("groups", 1), L.c * L.h * L.w
    if groups < 1 or inputs % groups:
        raise _bad(where, cfg, f"groups={groups} does not divide the {inputs} inputs")
    L.p.update(groups=groups, temperature=s.float("temperature", 1.0))
    L.c, L.h, L.w, L.flat = inputs, 1, 1, True


def _route(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    refs = s.ints("layers")
    if not refs:
        raise _bad(where, cfg, "route needs layers=")
    L.inputs[:] = [_resolve(r, L.index, len(layers), cfg, where) for r in refs]
    groups, gid = s.int("groups", 1), s.int("group_id", 0)
    first = layers[L.inputs[0]]
    c = 0
    for j in L.inputs:
        src = layers[j]
        if (src.h, src.w) != (first.h, first.w):
            raise _bad(where, cfg, f"layers {L.inputs[0]} and {j} have different sizes "
                                   f"({first.h}x{first.w} and {src.h}x{src.w})")
        if groups < 1 or src.c % groups or not 0 <= gid < groups:
            raise _bad(where, cfg, f"groups={groups} group_id={gid} does not split layer {j}'s {src.c} channels")
        c += src.c
    L.p.update(groups=groups, group_id=gid)
    L.c, L.h, L.w = c // groups, first.h, first.w


def _shortcut(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    refs = s.ints("from")
    if not refs:
        raise _bad(where, cfg, "shortcut needs from=")
    sources = [_resolve(r, L.index, len(layers), cfg, where) for r in refs]
    L.inputs[:] = [L.index - 1] + sources
    for j in sources:
        if (layers[j].h, layers[j].w) != (L.h, L.w):
            raise _bad(where, cfg, f"layer {j} is {layers[j].h}x{layers[j].w}, the layer before is {L.h}x{L.w} "
                                   "(darknet asserts equal sizes)")
    wtype = s.text("weights_type", "none")
    if wtype == "per_layer":
        wtype = "per_feature"
    if wtype not in ("none", "per_feature", "per_channel"):
        raise _bad(where, cfg, f"weights_type={wtype!r}: use none, per_feature or per_channel")
    norm = next((s.text(k) for k in WEIGHTS_NORMALIZATION if s.has(k)), "none")
    norm = {"avg_relu": "relu"}.get(norm, norm)
    if norm not in ("none", "relu", "softmax"):
        if wtype != "none":
            raise _bad(where, cfg, f"weights_normalization={norm!r}: use none, relu or softmax")
        norm = "none"
    L.p.update(weights_type=wtype, normalization=norm if wtype != "none" else "none",
               activation=_activation(s, cfg, where, "linear", "shortcut"))
    n = len(L.inputs)
    if wtype == "per_feature":
        L.weights = [("weights", (n,))]
    elif wtype == "per_channel":
        L.weights = [("weights", (n, L.c))]


def _upsample(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    stride, scale = s.int("stride", 2), s.float("scale", 1.0)
    if stride == 0:
        raise _bad(where, cfg, "stride=0")
    L.p.update(stride=stride, scale=scale)
    if stride > 0:
        L.h, L.w = L.h * stride, L.w * stride
    else:
        if L.h % -stride or L.w % -stride:
            raise _bad(where, cfg, f"stride={stride} does not divide the input {L.h}x{L.w} (darknet would read "
                                   "its rows at the wrong width)")
        L.h, L.w = L.h // -stride, L.w // -stride


def _reorg(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    stride, reverse = s.int("stride", 1), bool(s.int("reverse", 0))
    s2 = stride * stride
    if stride < 1:
        raise _bad(where, cfg, f"stride={stride}")
    c, h, w = L.c, L.h, L.w
    out = (c // s2, h * stride, w * stride) if reverse else (c * s2, h // stride, w // stride)
    # the C x H x W darknet's reorg_cpu is called with: [reorg] passes its input's, [reorg3d] its output's
    call = (c, h, w) if L.kind == "reorg" else out
    if reverse:  # depth-to-space of the buffer read as call C x H x W
        ok = c % s2 == 0 and call[0] % s2 == 0
    else:  # space-to-depth of the buffer read as (C/s2) x (H*s) x (W*s)
        ok = call[0] % s2 == 0 and h % stride == 0 and w % stride == 0
    if not ok:
        raise _bad(where, cfg, f"stride={stride} does not divide the input {c}x{h}x{w} evenly "
                               "(darknet would mix up the buffer)")
    L.p.update(stride=stride, reverse=reverse, call=call)
    L.c, L.h, L.w = out


def _head(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    classes = s.int("classes", 20)
    if L.kind == "region":
        per = classes + s.int("coords", 4) + 1
        n = s.int("num", 1)
    else:
        mask = s.ints("mask")
        n = len(mask) if mask else s.int("num", 1)
        per = classes + (8 if L.kind == "gaussian_yolo" else 4) + 1
    if n * per != L.c:
        raise _bad(where, cfg, f"expects {n}x({per}) = {n * per} channels from the layer before, which has {L.c} "
                               "(filters= of that layer does not match classes= / mask= / num=)")
    L.p.update(classes=classes, anchors=n)


def _from_layer(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    refs = s.ints("from")
    if not refs:
        raise _bad(where, cfg, f"[{L.kind}] needs from=")
    src = layers[_resolve(refs[0], L.index, len(layers), cfg, where)]
    L.inputs[:] = [L.index - 1, src.index]
    if L.kind == "sam":
        ok = (L.c, L.h, L.w) == (src.c, src.h, src.w)
    elif s.int("scale_wh", 0):
        ok = L.c == 1 and (L.h, L.w) == (src.h, src.w)
    else:
        ok = L.h == 1 and L.w == 1 and L.c == src.c
    if not ok:
        raise _bad(where, cfg, f"input {L.c}x{L.h}x{L.w} does not fit layer {src.index}'s {src.c}x{src.h}x{src.w}")
    L.p.update(scale_wh=bool(s.int("scale_wh", 0)), activation=_activation(s, cfg, where, "linear", L.kind))
    L.c, L.h, L.w = src.c, src.h, src.w


def _batchnorm(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    L.weights = [("biases", (L.c,)), ("scales", (L.c,)), ("rolling_mean", (L.c,)), ("rolling_variance", (L.c,))]


def _activation_layer(L: Layer, s: Section, cfg: Cfg, where: str, layers: list) -> None:
    L.p.update(activation=_activation(s, cfg, where, "linear", "activation"))


_BUILDERS = {
    "convolutional": _conv, "connected": _connected, "maxpool": _maxpool, "avgpool": _avgpool,
    "softmax": _softmax, "route": _route, "shortcut": _shortcut, "upsample": _upsample, "reorg": _reorg,
    "reorg3d": _reorg, "yolo": _head, "region": _head, "gaussian_yolo": _head, "scale_channels": _from_layer,
    "sam": _from_layer, "batchnorm": _batchnorm, "activation": _activation_layer,
}


def input_shape(cfg: Cfg) -> tuple[int, int, int]:
    net = cfg.net
    c, h, w = net.int("channels", 0), net.int("height", 0), net.int("width", 0)
    if min(c, h, w) <= 0:
        raise BadInput(f"{cfg.name}: [net] must give width=, height= and channels= (got {w}x{h}x{c})")
    return c, h, w
