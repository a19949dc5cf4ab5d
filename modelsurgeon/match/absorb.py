"""Which layer can absorb a per-channel scale applied to a value: walk back to its producer.

Details: docs/architecture.md (*fold-fusion, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.graph import OUTPUT, DataflowGraph, OpEvent, Ref
from ..report.codes import Refusal
from .affine import BATCH_NORM, batch_norm_args
from .conv import CONV_OPS, ConvUnit, conv_unit, unwritable

LINEAR_PASS = frozenset({
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "Tensor.contiguous", "Tensor.clone", "clone",
})
"""Ops that commute with any per-channel scale (linear, channel by channel)."""

POSITIVE_PASS = frozenset({
    "relu", "relu_", "Tensor.relu", "Tensor.relu_", "leaky_relu", "leaky_relu_", "max_pool1d",
    "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
})
"""Ops that commute with a non-negative per-channel scale (positively homogeneous)."""


@dataclass
class Absorber:
    kind: str  # "conv" | "bn"
    path: str  # module path (or parameter name) of the layer that takes the scale
    channels: int
    unit: ConvUnit | None = None
    bn_weight: Any = None
    bn_bias: Any = None
    bn_module: Any = None
    through: list[str] = field(default_factory=list)  # ops crossed on the way back
    conv: str | None = None  # the conv/linear carrying the scale in the end (before a BatchNorm: once fold-bn ran)

    @property
    def direct(self) -> bool:
        return not self.through

    def can_shift(self) -> bool:
        """Can it also absorb an additive constant (into a bias)?"""
        if not self.direct:
            return False
        if self.kind == "bn":
            return True
        return self.unit.bias is not None or self.unit.can_add_bias

    def describe(self) -> str:
        what = self.path if self.kind == "conv" else f"{self.path} (BatchNorm)"
        return what + (f" via {', '.join(self.through)}" if self.through else "")

    def apply(self, editor: Any, scale: Any, shift: Any = None) -> None:
        """``layer(x) -> scale * layer(x) + shift`` (float64 maths, rounded by the editor)."""
        import torch

        from ..rewrite.affine import fold

        scale = scale.to(torch.float64)
        if self.kind == "bn":
            w = self.bn_weight.detach().to(torch.float64) * scale
            b = self.bn_bias.detach().to(torch.float64) * scale
            if shift is not None:
                b = b + shift.to(torch.float64)
            editor.set_param(self.bn_weight, w, self.bn_module)
            editor.set_param(self.bn_bias, b, self.bn_module)
            return
        u = self.unit
        zero = torch.zeros_like(scale)
        w, b = fold(u.weight, u.bias, scale, zero if shift is None else shift, u.kind, u.groups)
        editor.set_param(u.weight, w, u.module)
        if u.bias is not None:
            editor.set_param(u.bias, b, u.module)
        elif shift is not None and bool((shift != 0).any()):
            editor.add_bias(u.module, b)


def describe_use(g: DataflowGraph, eid: int) -> str:
    if eid == OUTPUT:
        return "the model's output"
    ev = g.event(eid)
    path = g.call(ev.scope).path
    return f"{ev.name} in {path or 'the model'}"


def describe_value(g: DataflowGraph, vid: int, inside: Any = None) -> str:
    """A readable name for a value: the outermost module call returning it (not ``inside`` or
    a call around it), else the op producing it."""
    v = g.value(vid)
    if v.kind == "input":
        return f"input {g.inputs.index(vid)}" if vid in g.inputs else "an input"
    if v.is_param:
        return v.name or "a parameter"
    around = set()
    c = inside
    while c is not None:
        around.add(c.id)
        c = g.call(c.parent) if c.parent is not None else None
    best = None
    for c in g.calls:
        if c.parent is None or c.id in around or vid not in c.outputs:
            continue
        if best is None or len(c.path) < len(best.path):
            best = c
    if best is not None:
        return best.path
    ev = g.producer(vid)
    if ev is None:
        return "a tensor"
    path = g.call(ev.scope).path
    return f"{ev.name} in {path or 'the model'}"


def find_absorber(g: DataflowGraph, vid: int, scale: Any, allowed: set[int]) -> Absorber | Refusal:
    """The layer that can compute ``scale * v`` for value ``vid`` in place of a multiply, when
    ``vid`` is read only by the events in ``allowed``; else the reason there is none."""
    import torch

    others = [e for e in g.uses(vid) if e not in allowed]
    if others:
        return Refusal("other-readers", f"it is also read by {describe_use(g, others[0])}")
    nonneg = bool((scale >= 0).all())
    through: list[str] = []
    cur = vid
    for _ in range(64):
        ev = g.producer(cur)
        if ev is None:
            v = g.value(cur)
            return Refusal("not-foldable", "it is an input of the model" if v.kind == "input" else "it has no recorded producer")
        where = g.call(ev.scope).path or "the model"
        if ev.name in CONV_OPS:
            return _conv_absorber(g, ev, cur, through)
        if ev.name in BATCH_NORM:
            return _bn_absorber(g, ev, cur, through)
        if ev.name in POSITIVE_PASS or ev.name in LINEAR_PASS or _zero_pad(ev):
            if ev.name in POSITIVE_PASS and not nonneg:
                return Refusal("not-foldable", f"a weight is negative, so it cannot be moved through the {ev.name} in {where}")
            src = ev.args[0] if ev.args else None
            if not isinstance(src, Ref) or any(not g.value(i).const for i in ev.inputs if i != src.value):
                return Refusal("not-foldable", f"it comes from {ev.name} in {where}, which a weight cannot be moved through")
            a, b = g.value(src.value).shape, g.value(cur).shape
            if a is None or b is None or len(a) < 2 or len(b) < 2 or a[1] != b[1]:
                return Refusal("not-foldable", f"the {ev.name} in {where} changes the channel layout")
            readers = [e for e in g.uses(src.value) if e != ev.id]
            if readers:
                return Refusal("other-readers", f"the input of the {ev.name} in {where} is also read by {describe_use(g, readers[0])}")
            through.append(f"{ev.name} ({where})" if where != "the model" else ev.name)
            cur = src.value
            continue
        return Refusal("not-foldable", f"it comes from {ev.name} in {where}, which a weight cannot be moved through")
    return Refusal("not-foldable", "its producer chain is too long")  # pragma: no cover


def _zero_pad(ev: OpEvent) -> bool:
    """``F.pad(x, pad)`` with zeros (a constant pad of 0 commutes with any per-channel scale)."""
    return ev.name == "pad" and ev.arg(2, "mode", "constant") == "constant" and ev.arg(3, "value", None) in (None, 0)


def _conv_absorber(g: DataflowGraph, ev: OpEvent, cur: int, through: list[str]) -> Absorber | Refusal:
    unit = conv_unit(g, ev)
    if isinstance(unit, Refusal):
        return unit.reworded(f"the layer producing it cannot be rewritten: {unit}")
    shape = g.value(cur).shape
    if unit.kind == "linear" and (shape is None or len(shape) != 2):
        return Refusal("other-axis", f"{unit.path} is a linear layer whose output channels are not on axis 1")
    if shape is None or len(shape) < 2 or shape[1] != unit.out_channels:
        return Refusal("other-axis", f"its channels do not match {unit.path}'s outputs")
    return Absorber("conv", unit.path, unit.out_channels, unit=unit, through=list(through), conv=unit.path)


def _bn_absorber(g: DataflowGraph, ev: OpEvent, cur: int, through: list[str]) -> Absorber | Refusal:
    a = batch_norm_args(ev)
    where = g.call(ev.scope).path or "the model"
    if not a or a.get("training"):
        return Refusal("training-mode", f"the BatchNorm {where} producing it normalises with batch statistics")
    w, b = a.get("weight"), a.get("bias")
    if not isinstance(w, Ref) or not isinstance(b, Ref):
        return Refusal("layer-settings", f"the BatchNorm {where} producing it has no affine weight and bias to scale")
    wv, bv = g.value(w.value), g.value(b.value)
    if not (wv.is_param and bv.is_param):
        return Refusal("computed-tensor", f"the BatchNorm {where} producing it computes its weight or bias")
    if len(g.param_uses(wv.tensor)) != 1 or len(g.param_uses(bv.tensor)) != 1:
        return Refusal("shared-module", f"the BatchNorm {where} producing it shares its parameters with other layers")
    call = g.call(ev.scope)
    module = call.module if getattr(call.module, "weight", None) is wv.tensor else None
    for role, v in (("weight", wv), ("bias", bv)):
        why = unwritable(g, v.tensor, v.name or f"its {role}", module)
        if why is not None:
            return why.reworded(f"the BatchNorm {where} producing it cannot be scaled: {why}")
    shape = g.value(cur).shape
    if shape is None or len(shape) < 2 or shape[1] != wv.tensor.numel():
        return Refusal("other-axis", f"its channels do not match the BatchNorm {where}")
    src = ev.args[0] if ev.args else None
    before = g.producer(src.value) if isinstance(src, Ref) else None
    conv = None
    if before is not None and before.name in CONV_OPS:
        unit = conv_unit(g, before)
        conv = unit.path if not isinstance(unit, Refusal) else None
    return Absorber("bn", where, int(wv.tensor.numel()), bn_weight=wv.tensor, bn_bias=bv.tensor,
                    bn_module=module, through=list(through), conv=conv)
