"""fold-bn on PyTorch models.

Pattern: a conv / transposed conv / linear op whose output flows, through values with no other
reader, into one or more per-channel affine steps:

* a module whose whole forward is ``batch_norm`` in inference mode (any class);
* a custom module that probes as per-channel affine (Caffe ``Scale``, frozen BN from buffers...);
* a module whose forward is ``batch_norm`` followed by child modules (timm/mmcv BN+activation):
  the module is replaced by those children, so the activation is kept;
* an inline ``batch_norm`` / ``x * p`` / ``x + p`` on parameters in a host forward: folded, and
  the parameter set to the identity value (1 or 0), since the host's code cannot be edited.

Rewrite: ``W' = W * s``, ``b' = s * b + t`` (float64, rounded to the storage dtype); a bias-free
conv gains a bias; the affine modules become ``nn.Identity`` (or their kept children).

Every BatchNorm that is not folded is reported with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from ...match.affine import (
    BATCH_NORM, ELEMENTWISE, MUL, DIV, ChannelAffine, batch_norm_affine, batch_norm_args,
    elementwise_affine, probe_module, PROBE_MAX_EVENTS,
)
from ...match.conv import CONV_OPS, ConvUnit, conv_unit
from ...rewrite.affine import fold_bias
from ..base import Applied, Match, Pass, Skipped, TorchContext


@dataclass
class Removal:
    kind: str  # "identity" | "children" | "neutralise"
    module: Any = None
    children: list = field(default_factory=list)
    params: list = field(default_factory=list)  # (tensor, fill) pairs; fill may be "var:<eps>"


@dataclass
class Step:
    affine: ChannelAffine
    label: str
    path: str
    source: str  # "batch_norm" | "probe" | "inline"
    removal: Removal
    out_value: int
    bn_events: list[int] = field(default_factory=list)


@dataclass
class FoldMatch(Match):
    unit: ConvUnit = None
    steps: list[Step] = field(default_factory=list)


class _Reason(str):
    """Why a BN-like candidate cannot be folded (ends the chain, reported as skipped)."""


class FoldBN(Pass):
    name = "fold-bn"

    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        g: DataflowGraph = ctx.graph
        handled: set[int] = set()
        for ev in g.events:
            if ev.name not in CONV_OPS or not ev.outputs:
                continue
            out = g.value(ev.outputs[0])
            if out.shape is None or len(out.shape) < 2:
                continue
            axis = len(out.shape) - 1 if ev.name == "linear" else 1
            steps, stop = self._walk(g, ev.outputs[0], axis)
            if not steps:
                if stop is not None:
                    cand, reason = stop
                    handled.update(_bn_events(g, cand))
                    yield Skipped(_target(g, cand), reason)
                continue
            for s in steps:
                handled.update(s.bn_events)
            unit = conv_unit(g, ev)
            target = " → ".join(s.path for s in steps)
            if isinstance(unit, str):
                yield Skipped(target, f"the layer before it cannot be rewritten: {unit}")
            elif unit.bias is None and not unit.can_add_bias:
                yield Skipped(target, f"{unit.path} has no bias and is no torch conv/linear module, so none can be added")
            elif steps[0].affine.channels != unit.out_channels:
                yield Skipped(target, f"channel count {steps[0].affine.channels} differs from {unit.path}'s {unit.out_channels} outputs")
            else:
                yield FoldMatch(target=unit.path, unit=unit, steps=steps)
        for ev in g.events:
            if ev.name in BATCH_NORM and ev.id not in handled and not _neutral_bn(g, ev):
                yield Skipped(_target(g, ev), self._unfolded_reason(g, ev))

    # -- matching ------------------------------------------------------------------------------
    def _walk(self, g: DataflowGraph, vid: int, axis: int):
        steps: list[Step] = []
        cur = vid
        while True:
            uses = g.uses(cur)
            if len(uses) != 1 or uses[0] == OUTPUT:
                if not steps and len(uses) > 1:
                    bn = next((g.event(e) for e in uses if e != OUTPUT and g.event(e).name in BATCH_NORM), None)
                    if bn is not None:
                        return [], (bn, f"the layer output it normalises has {len(uses)} readers, so the layer cannot be changed")
                break
            ev = g.event(uses[0])
            step = self._step(g, ev, cur, axis)
            if step is None:
                break
            if isinstance(step, tuple):
                if not steps:
                    return [], step
                break
            steps.append(step)
            cur = step.out_value
            if step.removal.kind == "children":
                break
        return steps, None

    def _step(self, g: DataflowGraph, ev: OpEvent, cur: int, axis: int):
        """The affine step starting at ``ev``; ``None`` if not affine; ``(event, reason)`` if an
        affine candidate cannot be folded."""
        reason = None
        for call in reversed(g.calls_starting_with(ev)):
            if call.parent is None:
                continue
            r = self._module_step(g, call, ev, cur, axis)
            if isinstance(r, Step):
                return r
            if isinstance(r, _Reason) and reason is None:
                reason = r
        r = self._op_step(g, ev, cur, axis)
        if isinstance(r, Step):
            return r
        if reason is not None:
            return (ev, str(reason))
        if isinstance(r, _Reason):
            return (ev, str(r))
        return None

    def _module_step(self, g: DataflowGraph, call: ModuleCall, ev: OpEvent, cur: int, axis: int):
        import torch

        mod = call.module
        evs = list(g.events_in(call))
        has_bn = any(e.name in BATCH_NORM for e in evs)
        n_calls = g.call_count(mod)
        if n_calls > 1:
            return _Reason(f"{call.path} is called {n_calls} times (a shared module)") if has_bn else None
        if len(call.outputs) != 1:
            return None
        outside = _params_read_outside(g, mod, call)
        if outside:
            return _Reason(f"{outside} is also read outside {call.path}") if has_bn else None
        label = f"{type(mod).__name__} {call.path}"
        bn_ids = [e.id for e in evs if e.name in BATCH_NORM]
        active = g.active_events(call)
        # A: the whole data path is one batch_norm
        if active == [ev] and ev.name in BATCH_NORM and call.outputs[0] == ev.outputs[0]:
            aff = batch_norm_affine(g, ev)
            if isinstance(aff, str):
                return _Reason(aff)
            if axis != 1:
                return _Reason("it normalises another axis than the layer's output channels")
            return Step(aff, label, call.path, "batch_norm", Removal("identity", mod), call.outputs[0], bn_ids)
        # B: a custom module that probes as a per-channel affine map
        in_shape = g.value(cur).shape
        out_shape = g.value(call.outputs[0]).shape
        custom = not type(mod).__module__.startswith("torch.")
        if custom and len(evs) <= PROBE_MAX_EVENTS and in_shape == out_shape:
            aff = probe_module(mod, in_shape, axis)
            if isinstance(aff, ChannelAffine):
                return Step(aff, label + " (probed)", call.path, "probe", Removal("identity", mod),
                            call.outputs[0], bn_ids)
        # C: an affine op first, then child modules only (BN + activation classes)
        direct = [e for e in active if e.scope == call.id]
        if direct == [ev] and ev.outputs:
            aff = self._op_affine(g, ev, cur, axis)
            if isinstance(aff, ChannelAffine):
                chain = _child_chain(g, call, ev.outputs[0])
                if chain is not None:
                    return Step(aff, label, call.path, "batch_norm" if ev.name in BATCH_NORM else "inline",
                                Removal("children", mod, children=chain), ev.outputs[0], bn_ids)
            elif isinstance(aff, _Reason):
                return aff
        return _Reason(f"{label}'s forward is not a foldable per-channel map") if has_bn else None

    def _op_affine(self, g: DataflowGraph, ev: OpEvent, cur: int, axis: int):
        if ev.name in BATCH_NORM:
            if not ev.args or ev.args[0] != Ref(cur):
                return None
            aff = batch_norm_affine(g, ev)
            if isinstance(aff, str):
                return _Reason(aff)
            if axis != 1:
                return _Reason("it normalises another axis than the layer's output channels")
            return aff
        r = elementwise_affine(g, ev, cur, axis)
        return None if r is None else r[0]

    def _op_step(self, g: DataflowGraph, ev: OpEvent, cur: int, axis: int):
        """An inline op in some host forward: folded, then neutralised through its parameters."""
        if ev.name not in BATCH_NORM and ev.name not in ELEMENTWISE:
            return None
        aff = self._op_affine(g, ev, cur, axis)
        if not isinstance(aff, ChannelAffine):
            return aff
        if ev.name not in BATCH_NORM and bool((aff.scale == 1).all() and (aff.shift == 0).all()):
            return None  # ``x * 1`` / ``x + 0``: already neutralised (folded in an earlier round)
        host = g.call(ev.scope).path
        where = f"{host}.forward" if host else "the model's forward"
        label = f"{ev.name} in {where}"
        if ev.name in BATCH_NORM:
            if _neutral_bn(g, ev):
                return None  # made the identity in an earlier round
            a = batch_norm_args(ev)
            params = []
            for key, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", "var")):
                r = a.get(key)
                if r is None:
                    continue
                v = g.value(r.value)
                if not v.is_param or len(g.param_uses(v.tensor)) != 1:
                    return _Reason(f"the batch_norm inline in {where} reads computed or shared statistics, so it cannot be made the identity")
                params.append((v.tensor, f"var:{float(a.get('eps', 1e-5))}" if fill == "var" else fill))
            return Step(aff, label, host or "<model>", "inline", Removal("neutralise", params=params), ev.outputs[0], [ev.id])
        operand = ev.args[1] if ev.args[0] == Ref(cur) else ev.args[0]
        if not isinstance(operand, Ref):
            return None  # arithmetic with a literal: not a learnt affine layer
        root = g.const_root(operand.value)
        if root is None or not g.value(operand.value).const:
            return None
        if len(g.param_uses(root.tensor)) != 1:
            return _Reason(f"the per-channel parameter {root.name} is read by other ops too")
        if ev.name in MUL or ev.name in DIV:
            fill = 1.0
        elif ev.args[0] == Ref(cur) or ev.name.endswith(("add", "__add__", "__radd__", "add_", "__iadd__")):
            fill = 0.0
        else:
            return _Reason(f"{ev.name} with the layer output on the right cannot be made the identity")
        return Step(aff, f"{ev.name} by {root.name} in {where}", host or "<model>", "inline",
                    Removal("neutralise", params=[(root.tensor, fill)]), ev.outputs[0], [])

    def _unfolded_reason(self, g: DataflowGraph, ev: OpEvent) -> str:
        a = batch_norm_args(ev)
        if a.get("training"):
            return "it normalises with batch statistics (training mode or no running statistics)"
        src = ev.args[0] if ev.args else None
        if not isinstance(src, Ref):
            return "its input is not a tensor"
        p = g.producer(src.value)
        if p is None:
            return "its input is a model input, not a layer output"
        where = g.call(p.scope).path or "the model"
        return f"its input comes from {p.name} in {where}, not from a conv or linear layer"

    # -- rewriting -----------------------------------------------------------------------------
    def rewrite(self, ctx: TorchContext, m: FoldMatch) -> Applied:
        import torch

        unit, ed = m.unit, ctx.editor
        total = m.steps[0].affine
        for s in m.steps[1:]:
            total = total.then(s.affine)
        # an inline batch_norm is neutralised through its running_var, which can only get as
        # close to the identity as the storage dtype allows: the scale it keeps is folded too
        variances, residual = [], 1.0
        for s in m.steps:
            for tensor, fill in s.removal.params:
                if isinstance(fill, str):
                    stored = ed.storage.storage_dtype(tensor) if ed.storage is not None else tensor.dtype
                    v, r = _identity_var(tensor.dtype, stored, float(fill.split(":", 1)[1]))
                    variances.append((tensor, v))
                    residual *= r
        if residual != 1.0:
            total = total.then(ChannelAffine(torch.full_like(total.scale, 1.0 / residual),
                                             torch.zeros_like(total.shift)))
        b = fold_bias(unit.bias, total.scale, total.shift)
        ed.scale_weight(unit.weight, total.scale, unit.kind, unit.groups, unit.module)
        bias_added = unit.bias is None
        if bias_added:
            ed.add_bias(unit.module, b)
        else:
            ed.set_param(unit.bias, b, unit.module)
        for s in m.steps:
            r = s.removal
            if r.kind == "identity":
                ed.replace(r.module, torch.nn.Identity())
            elif r.kind == "children":
                kept = r.children
                new = torch.nn.Identity() if not kept else kept[0] if len(kept) == 1 else torch.nn.Sequential(*kept)
                ed.replace(r.module, new)
            else:
                for tensor, fill in r.params:
                    if not isinstance(fill, str):
                        ed.neutralise(tensor, fill)
        with torch.no_grad():
            for tensor, v in variances:
                tensor.data = torch.full_like(tensor.data, v)
        detail = f"{unit.describe()} ← " + " → ".join(s.label for s in m.steps)
        return Applied(unit.path, detail, {
            "layer": unit.path,
            "folded": [{"path": s.path, "what": s.label, "source": s.source} for s in m.steps],
            "bias_added": bias_added,
        })


def _target(g: DataflowGraph, ev: OpEvent) -> str:
    return g.call(ev.scope).path or f"{ev.name} in the model's forward"


def _bn_events(g: DataflowGraph, ev: OpEvent) -> list[int]:
    if ev.name in BATCH_NORM:
        return [ev.id]
    for call in g.calls_starting_with(ev):
        ids = [e.id for e in g.events_in(call) if e.name in BATCH_NORM]
        if ids:
            return ids
    return []


def _params_read_outside(g: DataflowGraph, mod: Any, call: ModuleCall) -> str | None:
    for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
        if t is None:
            continue
        for e in g.param_uses(t):
            if not (call.start <= e < call.end):
                return f"{call.path}.{name}" if call.path else name
    return None


def _child_chain(g: DataflowGraph, call: ModuleCall, start_value: int) -> list | None:
    """Child modules of ``call`` applied one after another from ``start_value`` to its output."""
    cur = start_value
    chain = []
    for cid in call.children:
        child = g.call(cid)
        if child.inputs != (cur,) or len(child.outputs) != 1:
            return None
        chain.append(child.module)
        cur = child.outputs[0]
    if call.outputs != (cur,):
        return None
    if len({id(m) for m in chain}) != len(chain):
        return None
    return chain


def _neutral_bn(g: DataflowGraph, ev: OpEvent) -> bool:
    """An inline batch_norm already made the identity by an earlier fold: weight 1, bias 0,
    mean 0, and the running variance :func:`_identity_var` chooses (for the tensor's dtype or a
    half-precision storage dtype) -- so ``optimize``'s repeated rounds do not fold it again."""
    import torch

    a = batch_norm_args(ev)
    if not a or a.get("training"):
        return False
    vals = {}
    for key in ("weight", "bias", "running_mean", "running_var"):
        r = a.get(key)
        if r is None:
            vals[key] = None
            continue
        if not isinstance(r, Ref) or g.value(r.value).tensor is None:
            return False
        vals[key] = g.value(r.value).tensor.detach()
    var = vals["running_var"]
    if var is None or vals["running_mean"] is None:
        return False
    eps = float(a.get("eps", 1e-5))
    identity = {_identity_var(var.dtype, stored, eps)[0] for stored in (var.dtype, torch.float16, torch.bfloat16)}
    with torch.no_grad():
        ok = any(bool((var == v).all()) for v in identity) and bool((vals["running_mean"] == 0).all())
        ok = ok and (vals["weight"] is None or bool((vals["weight"] == 1).all()))
        ok = ok and (vals["bias"] is None or bool((vals["bias"] == 0).all()))
    return ok


def _identity_var(compute: Any, stored: Any, eps: float) -> tuple[float, float]:
    """A positive running variance ``v``, exactly representable in the ``stored`` dtype, that
    makes ``1 / sqrt(v + eps)`` (evaluated in ``compute``) as close to 1 as it gets; returns
    ``(v, r)`` with ``r`` that remaining scale. With ``eps >= 1`` no positive ``v`` gives 1:
    ``v = 1`` then, and ``r`` is folded all the same."""
    import torch

    def scale(c):
        return float(torch.rsqrt(c.to(compute) + torch.tensor(eps, dtype=compute)))

    start = torch.tensor(1.0 - eps if eps < 1.0 else 1.0, dtype=torch.float64).to(stored)
    candidates = [start]
    for direction in (float("inf"), float("-inf")):
        c = start
        for _ in range(4):
            c = torch.nextafter(c, torch.tensor(direction, dtype=stored))
            candidates.append(c)
    positive = [c for c in candidates if float(c) > 0]
    best = min(positive, key=lambda c: abs(scale(c) - 1.0))
    return float(best), scale(best)
