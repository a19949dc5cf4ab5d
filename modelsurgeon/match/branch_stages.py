"""The linear maps a branch of a multi-branch block is made of, read from recorded ops
(:mod:`.branches` finds the blocks), and a branch's stages composed into one
:class:`~modelsurgeon.rewrite.kernels.ConvMap`: 2-D convs (constant weights, computed ones
included), inference BatchNorm, constant per-channel multiplies and adds, average pooling
(``count_include_pad=True``), zero padding, and DBB's padding with the BatchNorm's bias (a
``pad`` whose border is then set to one constant per channel): the 1×1 → k×k sequence is one
conv exactly when the k×k conv's padding holds the bias of what comes before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..capture.graph import DataflowGraph, OpEvent, Ref
from ..rewrite import kernels as K
from ..report.codes import Refusal
from .affine import ADD, batch_norm_affine, elementwise_affine

Problem = Refusal  # a stage or branch that is not one conv, with its stable code

PASS_THROUGH = {"Tensor.contiguous", "contiguous", "clone", "Tensor.clone", "dropout", "feature_dropout"}


@dataclass
class Stage:
    kind: str  # "conv" | "affine" | "avg" | "pad"
    event: OpEvent
    source: int  # the value it reads
    map: Any = None  # ConvMap (conv, avg) or (scale, shift) (affine) or (top, left) zero padding (pad)
    problem: Problem | None = None


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _const(g: DataflowGraph, r: Any) -> Any:
    if r is None:
        return None
    if isinstance(r, Ref) and g.value(r.value).const and g.value(r.value).tensor is not None:
        return g.value(r.value).tensor
    return False


def _conv(g: DataflowGraph, ev: OpEvent) -> K.ConvMap | Problem:
    import torch

    w, b = _const(g, ev.arg(1, "weight")), _const(g, ev.arg(2, "bias"))
    if w is False or w is None or b is False or w.dim() != 4:
        return Refusal("computed-tensor", "its weight or bias is computed in the forward")
    stride, dil, groups = _pair(ev.arg(3, "stride", 1)), _pair(ev.arg(5, "dilation", 1)), int(ev.arg(6, "groups", 1))
    pad = ev.arg(4, "padding", 0)
    if pad == "valid":
        pad = 0
    elif pad == "same":
        total = [d * (k - 1) for d, k in zip(dil, w.shape[2:])]
        if any(t % 2 for t in total):
            return Refusal("misaligned-centres", "padding='same' with an even kernel pads one side more")
        pad = [t // 2 for t in total]
    bias = b.double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return K.ConvMap(w.detach().double(), bias.detach().reshape(-1), stride, _pair(pad), dil, groups)


def stage(g: DataflowGraph, ev: OpEvent, v: int) -> Stage | None:
    """The linear map ``ev`` applies to produce ``v`` (``None``: not a linear op this matcher
    knows; the chain stops there)."""
    if ev.name == "conv2d" and isinstance(ev.args[0], Ref):
        m = _conv(g, ev)
        return Stage("conv", ev, ev.args[0].value, m if isinstance(m, K.ConvMap) else None,
                     m if isinstance(m, Problem) else None)
    if ev.name == "batch_norm" and isinstance(ev.args[0], Ref):
        a = batch_norm_affine(g, ev)
        if isinstance(a, Refusal):
            return Stage("affine", ev, ev.args[0].value, None, a)
        if isinstance(a, str):
            return Stage("affine", ev, ev.args[0].value, None, Refusal("not-affine", a))
        return Stage("affine", ev, ev.args[0].value, (a.scale, a.shift))
    if ev.name in PASS_THROUGH and ev.args and isinstance(ev.args[0], Ref):
        if ev.name.endswith("dropout") and ev.arg(2, "training", False):
            return None
        return Stage("affine", ev, ev.args[0].value, None)
    if ev.name == "avg_pool2d" and isinstance(ev.args[0], Ref):
        k = _pair(ev.arg(1, "kernel_size"))
        s = ev.arg(2, "stride", None)
        s = k if s in (None, []) else _pair(s)
        p = _pair(ev.arg(3, "padding", 0))
        x = g.value(ev.args[0].value).shape
        if ev.arg(4, "ceil_mode", False) or not ev.arg(5, "count_include_pad", True) or \
                ev.arg(6, "divisor_override", None) is not None or x is None:
            return Stage("avg", ev, ev.args[0].value, None,
                         Refusal("pooling", "average pooling without count_include_pad=True or with ceil_mode"))
        return Stage("avg", ev, ev.args[0].value, K.avg_pool(x[1], k, s, p))
    if ev.name == "Tensor.__setitem__" and isinstance(ev.args[0], Ref):
        return _value_pad(g, ev)
    if ev.name == "pad" and isinstance(ev.args[0], Ref):
        p = list(ev.arg(1, "pad"))
        mode, value = ev.arg(2, "mode", "constant"), ev.arg(3, "value", None)
        if mode != "constant" or value not in (None, 0, 0.0):
            return Stage("pad", ev, ev.args[0].value, None, Refusal(
                "padding-mode", f"a branch pads with mode {mode!r}" + (f" value {value}" if value else "")))
        if len(p) != 4 or p[0] != p[1] or p[2] != p[3]:
            return Stage("pad", ev, ev.args[0].value, None, Refusal("misaligned-centres", "a branch pads one side more"))
        return Stage("pad", ev, ev.args[0].value, (p[2], p[0], None))
    if ev.name in ADD or ev.name in {"mul", "Tensor.mul", "Tensor.__mul__", "Tensor.__rmul__", "Tensor.mul_",
                                     "Tensor.__imul__", "sub", "Tensor.sub", "Tensor.__sub__", "div",
                                     "Tensor.div", "Tensor.__truediv__"}:
        for a in ev.args[:2]:
            if isinstance(a, Ref) and not g.value(a.value).const:
                r = elementwise_affine(g, ev, a.value, 1)
                if r is not None and len(g.value(a.value).shape or ()) == 4:
                    aff = r[0]
                    return Stage("affine", ev, a.value, (aff.scale, aff.shift))
    return None


def _border(index: Any, p: int) -> tuple[int, int] | None:
    """``(axis, side)`` when ``index`` selects one border strip of width ``p`` of a 4-D tensor."""
    if not isinstance(index, tuple) or len(index) != 4 or any(i != slice(None) for i in index[:2]):
        return None
    full = slice(None)
    for axis in (2, 3):
        other = index[5 - axis]
        i = index[axis]
        if other != full or not isinstance(i, slice) or i.step not in (None, 1):
            continue
        if i.start in (0, None) and i.stop == p:
            return axis, 0
        if i.start == -p and i.stop is None:
            return axis, 1
    return None


def _value_pad(g: DataflowGraph, ev: OpEvent) -> Stage | None:
    """DBB's padding with values: ``F.pad`` by ``p`` then each of the four border strips set to
    one constant per channel (``out[:, :, 0:p, :] = v`` ...)."""
    import torch

    strips, values, cur = [], [], ev
    while cur is not None and cur.name == "Tensor.__setitem__" and isinstance(cur.args[0], Ref):
        if len(cur.args) < 3:
            return None
        values.append(_const(g, cur.args[2]))
        strips.append(cur.args[1])
        cur = g.producer(cur.args[0].value)
    if cur is None or cur.name != "pad" or not isinstance(cur.args[0], Ref):
        return None
    p = list(cur.arg(1, "pad"))
    if len(p) != 4 or len(set(p)) != 1 or cur.arg(2, "mode", "constant") != "constant" or p[0] <= 0:
        return None
    if sorted(_border(i, p[0]) or (0, 0) for i in strips) != [(2, 0), (2, 1), (3, 0), (3, 1)]:
        return None
    if any(v is None or v is False or not isinstance(v, torch.Tensor) or v.numel() != values[0].numel() for v in values):
        return None
    vec = values[0].detach().double().reshape(-1)
    if any(not torch.equal(v.detach().double().reshape(-1), vec) for v in values):
        return None
    return Stage("pad", ev, cur.args[0].value, (p[0], p[0], vec))


def branch_map(stages: list[Stage], channels: int) -> K.ConvMap | Problem:
    """One branch (its stages from the source outward) as one conv map, or why it is none."""
    import torch

    cur: K.ConvMap | None = None
    pending, value = (0, 0), None
    for s in stages:
        if s.kind == "pad":
            if pending != (0, 0):
                return Refusal("sequence", "a branch pads twice")
            pending, value = (s.map[0], s.map[1]), s.map[2]
            continue
        if s.kind == "affine":
            if s.map is None:
                continue
            cur = K.then_affine(cur if cur is not None else K.identity(channels), *s.map)
            continue
        m = s.map
        biased = cur is not None and bool(cur.bias.abs().max() > 0)
        if biased and (m.padding != (0, 0) or (pending != (0, 0) and value is None)):
            return Refusal("zero-padding-after-bn", "a k×k stage pads with zeros after a stage with a bias "
                                                    "(a BatchNorm): the sum is not one conv at the border")
        if value is not None:
            base = cur.bias if cur is not None else torch.zeros_like(value)
            if value.shape != base.shape or not torch.allclose(value, base, rtol=1e-5, atol=1e-6):
                return Refusal("pad-value", "a branch pads with values other than the bias of what it pads")
        if pending != (0, 0):
            m = K.ConvMap(m.weight, m.bias, m.stride, (m.padding[0] + pending[0], m.padding[1] + pending[1]),
                          m.dilation, m.groups)
            pending, value = (0, 0), None
        if cur is None:
            cur = m
            continue
        try:
            cur = K.compose(cur, m)
        except ValueError:
            return Refusal("sequence", "two k×k stages in one branch")
        channels = cur.out_channels
    if pending != (0, 0):
        return Refusal("misaligned-centres", "a branch pads without a conv after it")
    return cur if cur is not None else K.identity(channels)
