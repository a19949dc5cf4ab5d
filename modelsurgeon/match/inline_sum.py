"""Recognise inline weighted sums in a forward: ``w * x``, ``x * w`` or ``x / w`` with ``w`` a
constant (a parameter, a view of one, or computed from parameters) and the product summed with
another feature map (RFCR ``self.scale[0] * a + ...``, BiFPN ``weight[0] * p4_in + weight[1] *
up(p5)``). A Python ``sum()``'s ``0 + w[0] * x_0`` counts as the start of the sum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..capture.graph import OUTPUT, VIEW_OPS, DataflowGraph, OpEvent, Ref
from .absorb import Absorber, describe_value
from .affine import ADD, DIV, MUL, RSUB, SUB, _per_channel, elementwise_affine


@dataclass
class InlineTerm:
    event: OpEvent
    value: int
    desc: str
    scale: Any
    root: int  # event id of the sum this term belongs to
    host: str
    target: str = ""
    param: Any = None  # Value of the parameter the weight is a view of
    absorber: Absorber | None = None
    reason: str | None = None
    code: str | None = None  # the stable code of ``reason`` (report/codes.py)

    @property
    def one(self) -> bool:
        return bool((self.scale == 1).all())


def inline_terms(g: DataflowGraph, skip: set[int]) -> list[InlineTerm]:
    """Every inline weighted term of the recording (events in ``skip`` left out), each named by
    its sum: ``host: weighted sum [k]``."""
    terms = []
    for ev in g.events:
        if ev.id not in skip and (ev.name in MUL or ev.name in DIV):
            t = inline_term(g, ev)
            if t is not None:
                terms.append(t)
    roots: dict[str, list[int]] = {}
    for t in terms:
        lst = roots.setdefault(t.host, [])
        if t.root not in lst:
            lst.append(t.root)
    for t in terms:
        lst = roots[t.host]
        t.target = f"{t.host or 'the model'}: weighted sum" + (f" {lst.index(t.root) + 1}" if len(lst) > 1 else "")
    return terms


def inline_term(g: DataflowGraph, ev: OpEvent) -> InlineTerm | None:
    """``x * w`` / ``w * x`` / ``x / w`` with ``w`` a constant tensor and the product summed
    with another feature map."""
    a0, a1 = (ev.args + (None, None))[:2]
    refs = [a for a in (a0, a1) if isinstance(a, Ref)]
    if len(refs) != 2 or not ev.outputs:
        return None
    var = [r for r in refs if not g.value(r.value).const]
    const = [r for r in refs if g.value(r.value).const]
    if len(var) != 1 or len(const) != 1:
        return None
    x = var[0].value
    if ev.name in DIV and a0 != var[0]:
        return None
    r = elementwise_affine(g, ev, x, 1)
    if r is None:
        return None
    cur = ev.outputs[0]
    nxt = single_reader(g, cur)
    if nxt is not None and _adds_zero(nxt, cur):  # ``sum(w[i] * x_i ...)`` starts from the int 0
        cur = nxt.outputs[0]
        nxt = single_reader(g, cur)
    if nxt is None or nxt.name not in ADD | SUB | RSUB:
        return None
    if not any(i != cur and not g.value(i).const for i in nxt.inputs):
        return None
    root = nxt
    while root.outputs:
        u = g.uses(root.outputs[0])
        if len(u) != 1 or u[0] == OUTPUT:
            break
        e = g.event(u[0])
        if e.name not in ADD | SUB | RSUB or e.scope != root.scope:
            break
        root = e
    host = g.call(root.scope).path
    scope_call = g.call(root.scope)
    return InlineTerm(ev, x, describe_value(g, x, scope_call), r[0].scale, root.id, host)


def single_reader(g: DataflowGraph, vid: int) -> OpEvent | None:
    """The one op reading ``vid``; ``None`` when it has several readers or is a model output."""
    uses = g.uses(vid)
    if len(uses) != 1 or uses[0] == OUTPUT:
        return None
    return g.event(uses[0])


def _adds_zero(ev: OpEvent, vid: int) -> bool:
    """Is ``ev`` ``vid + 0`` (or ``0 + vid``), the start of a Python ``sum()``?"""
    if ev.name not in ADD or ev.inplace or len(ev.outputs) != 1 or len(ev.args) < 2:
        return False
    a0, a1 = ev.args[:2]
    other = a1 if a0 == Ref(vid) else a0 if a1 == Ref(vid) else None
    return isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0


def const_operand(g: DataflowGraph, ev: OpEvent) -> int | None:
    """The constant operand of a weighting ``x * w`` / ``w * x`` / ``x / w`` (the divisor of a
    division: :func:`inline_term` accepts no ``w / x``)."""
    for a in ev.args[:2]:
        if isinstance(a, Ref) and g.value(a.value).const:
            return a.value
    return None


def computation(g: DataflowGraph, vid: int | None) -> str:
    """``relu, sum, add, div of w`` for a constant computed from parameters."""
    if vid is None:
        return "a computation"
    ops: list[str] = []
    params: list[str] = []
    stack, seen = [vid], set()
    while stack and len(seen) < 64:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        val = g.value(v)
        if val.is_param:
            if val.name and val.name not in params:
                params.append(val.name)
            continue
        ev = g.producer(v)
        if ev is None:
            continue
        name = ev.name.replace("Tensor.", "").strip("_")
        if name not in ops:
            ops.insert(0, name)
        stack.extend(ev.inputs)
    what = ", ".join(ops) or "a computation"
    return f"{what} of {', '.join(params)}" if params else what


def view_leaves(g: DataflowGraph, vid: int) -> list[int]:
    """Events reading value ``vid`` through pure views (the views themselves excluded)."""
    out = []

    def step(v: int, e: int) -> list[int]:
        ev = g.event(e) if e != OUTPUT else None
        if ev is not None and ev.name in VIEW_OPS and ev.inputs and ev.inputs[0] == v and not ev.inplace:
            return ev.outputs
        out.append(e)
        return []

    g.walk_uses(vid, step)
    return list(dict.fromkeys(out))


def exact_constant(g: DataflowGraph, vid: int, depth: int = 0) -> Any:
    """A recorded constant recomputed in float64 from the parameters, by the recorded ops (what
    a weight computed in the model's dtype is meant to be), or ``None`` when it cannot be."""
    import torch

    v = g.value(vid)
    t = v.tensor
    if v.is_param or g.producer(vid) is None:
        return None if t is None else t.detach().to(torch.float64) if t.is_floating_point() else t
    ev = g.producer(vid)
    if ev.inplace or len(ev.outputs) != 1 or depth > 64:
        return None
    missing = []

    def sub(a: Any) -> Any:
        if isinstance(a, Ref):
            c = exact_constant(g, a.value, depth + 1)
            if c is None:
                missing.append(a)
            return c
        if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
            return type(a)(sub(x) for x in a)
        if isinstance(a, dict):
            return {k: sub(x) for k, x in a.items()}
        return a

    args, kwargs = sub(tuple(ev.args)), sub(dict(ev.kwargs))
    if missing:
        return None
    try:
        with torch.no_grad():
            r = ev.func(*args, **kwargs)
    except Exception:
        return None
    return r if isinstance(r, torch.Tensor) and r.dtype == torch.float64 else None


def exact_scale(g: DataflowGraph, t: InlineTerm) -> Any:
    """The term's per-channel weight from its constant recomputed in float64 (its recorded
    value's when that cannot be done)."""
    operand = const_operand(g, t.event)
    c = exact_constant(g, operand) if operand is not None else None
    vec = _per_channel(c, g.value(t.value).shape, 1) if c is not None else None
    if vec is None or vec.shape != t.scale.shape:
        return t.scale
    return 1.0 / vec if t.event.name in DIV else vec
