"""fold-bn on PyTorch models, matching: the per-channel affine steps after a conv / linear layer
(a BatchNorm module or op, a probed custom norm, an inline scale), what removing each takes, and
why a candidate cannot be folded. Details: docs/architecture.md (*fold-bn, in one paragraph*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from ...match.affine import (
    ADD, BATCH_NORM, DIV, ELEMENTWISE, MUL, NORM_LIKE, PROBE_MAX_EVENTS, RSUB, SUB, ChannelAffine, batch_norm_affine,
    batch_norm_args, elementwise_affine, is_bn_like, probe_module,
)
from ...match.calls import call_obstacle, read_outside
from ...match.conv import CONV_OPS, unwritable
from ...match.host import statistics_reader
from ...match.reshape import channel_axis_after, shape_only_use
from ...report.codes import Refusal
from .neutral import _identity_var, _neutral_bn  # noqa: F401 (fold-bn's rewrite imports it from here)


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
    via: list[int] = field(default_factory=list)  # reshapes crossed before it (channel axis kept)


HOST_READS = "host-reads"
"""The host's own re-parameterisation reads the norm: not folded in any form."""


_bn_like = is_bn_like


def _identity_fill(ev: OpEvent, x_first: bool) -> float | Refusal:
    """The value making ``ev`` the identity when written into its parameter operand ``p``, or why
    none does: only ``x * p``, ``p * x``, ``x / p`` (1) and ``x + a*p``, ``p + x``, ``x - a*p``,
    ``rsub(p, x)`` (0) become ``x``; ``add(p, x, alpha=a)`` and ``p - x`` would keep a factor."""
    name = ev.name
    if "out" in ev.kwargs:
        return Refusal("not-foldable", f"{name} writes into an out= tensor")
    if ev.inplace and not x_first:
        return Refusal("not-foldable", f"{name} updates the parameter in place")
    alpha = ev.kwargs.get("alpha", ev.args[2] if len(ev.args) > 2 else 1)
    if name in MUL or name in DIV:
        return 1.0
    if name in ADD:
        if x_first or alpha == 1:
            return 0.0
        return Refusal("not-foldable", f"{name} with alpha={alpha} scales the layer output, so it cannot be made the identity")
    if name in SUB:
        if x_first:
            return 0.0
        return Refusal("not-foldable", f"{name} subtracts the layer output from the parameter, so it cannot be made the identity")
    if name in RSUB:
        if not x_first:
            return 0.0
        return Refusal("not-foldable", f"{name} subtracts the layer output from the parameter, so it cannot be made the identity")
    return Refusal("not-foldable", f"{name} cannot be made the identity")


def _input_reason(g: DataflowGraph, vid: int) -> Refusal:
    """Why the norm reading value ``vid`` was not folded, from where ``vid`` comes from."""
    p = g.producer(vid)
    if p is None:
        return Refusal("not-foldable", "its input is a model input, not a layer output")
    where = g.call(p.scope).path or "the model"
    if p.name in CONV_OPS:
        n = len(g.uses(vid))
        if n > 1:
            return Refusal("other-readers", f"the layer output it normalises has {n} readers, so the layer cannot be changed")
        return Refusal("not-affine", f"it is not a foldable per-channel map of the {p.name} output in {where}")
    return Refusal("not-foldable", f"its input comes from {p.name} in {where}, not from a conv or linear layer")


def _bn_events(g: DataflowGraph, ev: OpEvent) -> list[int]:
    if ev.name in BATCH_NORM:
        return [ev.id]
    for call in g.calls_starting_with(ev):
        ids = [e.id for e in g.events_in(call) if e.name in BATCH_NORM]
        if ids:
            return ids
    return []


def _params_read_outside(g: DataflowGraph, mod: Any, call: ModuleCall) -> str | None:
    found = read_outside(g, list(mod.named_parameters()) + list(mod.named_buffers()), call)
    if found is None:
        return None
    return f"{call.path}.{found[0]}" if call.path else found[0]


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


class StepMatcher:
    """The affine steps after a layer's output, and why a candidate cannot be folded: the
    matching half of :class:`FoldBN` (its state -- ``_neutralised``, ``_pending`` -- set by it)."""

    def _walk(self, g: DataflowGraph, vid: int, axis: int):
        steps: list[Step] = []
        cur, via = vid, []
        while True:
            uses = [u for u in g.uses(cur) if u == OUTPUT or not shape_only_use(g, u, cur)]
            if len(uses) != 1 or uses[0] == OUTPUT:
                if not steps and len(uses) > 1:
                    bn = next((g.event(e) for e in uses if e != OUTPUT and g.event(e).name in BATCH_NORM), None)
                    if bn is not None:
                        return [], (bn, Refusal("other-readers", f"the layer output it normalises has {len(uses)} "
                                                "readers, so the layer cannot be changed"))
                break
            ev = g.event(uses[0])
            step = self._step(g, ev, cur, axis)
            if step is None:
                moved = channel_axis_after(g, ev, cur, axis)  # LeViT: flatten(0, 1) -> BatchNorm1d
                if moved is None:
                    break
                via.append(ev.outputs[0])
                cur, axis = ev.outputs[0], moved
                continue
            if isinstance(step, tuple):
                return steps, step
            step.via, via = via, []
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
            if isinstance(r, Refusal) and r.code == HOST_READS:  # not even neutralised in place: the host's code reads it
                return (ev, r)
            if isinstance(r, Refusal) and reason is None:
                reason = r
        r = self._op_step(g, ev, cur, axis)
        if isinstance(r, Step):
            return r
        if reason is not None:
            return (ev, reason)
        if isinstance(r, Refusal):
            return (ev, r)
        return None

    def _module_step(self, g: DataflowGraph, call: ModuleCall, ev: OpEvent, cur: int, axis: int):
        r = self._module_affine(g, call, ev, cur, axis)
        if isinstance(r, (Step, Refusal)):
            kept = r.removal.children if isinstance(r, Step) and r.removal.kind == "children" else []
            why = call_obstacle(call, kept)
            if why is not None:
                return why
        if isinstance(r, Step) and call.path and getattr(self, "_host_code", True):
            reader = statistics_reader(g.root.module, call.path)
            if reader is not None:  # Ultralytics RepConv: its own fuse reads branch.bn's statistics
                return Refusal(HOST_READS, f"the host's {reader} reads its running statistics and its layer's "
                               "weights (its own re-parameterisation would break): left to it")
        return r

    def _module_affine(self, g: DataflowGraph, call: ModuleCall, ev: OpEvent, cur: int, axis: int):
        mod = call.module
        evs = list(g.events_in(call))
        # a block whose data path starts with a conv/linear layer is no candidate (that layer's
        # own walk folds or reports its norms); one starting with a norm-like map is
        has_bn = ev.name not in CONV_OPS and (any(e.name in BATCH_NORM for e in evs) or _bn_like(mod))
        n_calls = g.call_count(mod)
        if n_calls > 1:
            return Refusal("shared-module", f"{call.path} is called {n_calls} times (a shared module)") if has_bn else None
        if len(call.outputs) != 1:
            return None
        outside = _params_read_outside(g, mod, call)
        if outside:
            return Refusal("read-outside", f"{outside} is also read outside {call.path}") if has_bn else None
        label = f"{type(mod).__name__} {call.path}"
        bn_ids = [e.id for e in evs if e.name in BATCH_NORM]
        active = g.active_events(call)
        # A: the whole data path is one batch_norm
        if active == [ev] and ev.name in BATCH_NORM and call.outputs[0] == ev.outputs[0]:
            aff = batch_norm_affine(g, ev)
            if isinstance(aff, Refusal):
                return aff
            if axis != 1:
                return Refusal("other-axis", "it normalises another axis than the layer's output channels")
            return Step(aff, label, call.path, "batch_norm", Removal("identity", mod), call.outputs[0], bn_ids)
        # B: a custom module that probes as a per-channel affine map
        in_shape = g.value(cur).shape
        out_shape = g.value(call.outputs[0]).shape
        custom = not type(mod).__module__.startswith("torch.")
        probed = None
        if custom and len(evs) <= PROBE_MAX_EVENTS and in_shape == out_shape:
            aff = probe_module(mod, in_shape, axis)
            if isinstance(aff, ChannelAffine):
                return Step(aff, label + " (probed)", call.path, "probe", Removal("identity", mod),
                            call.outputs[0], bn_ids)
            probed = aff
        # C: affine ops first, then child modules only (BN + activation classes; timm's
        # FrozenBatchNormAct2d: ``x * scale + bias`` from its buffers, then ``act(drop(x))``)
        direct = [e for e in active if e.scope == call.id]
        if direct and direct[0] is ev and ev.outputs:
            aff = self._leading_affine(g, direct, cur, axis)
            if isinstance(aff, tuple):
                aff, last = aff
                chain = _child_chain(g, call, last.outputs[0])
                if chain is not None:
                    # only the leading ops are folded: a BatchNorm among the kept children is not
                    return Step(aff, label, call.path, "batch_norm" if ev.name in BATCH_NORM else "inline",
                                Removal("children", mod, children=chain), last.outputs[0],
                                [ev.id] if ev.name in BATCH_NORM else [])
            elif isinstance(aff, Refusal):
                return aff
        if probed is not None and (has_bn or probed.code == NORM_LIKE):
            return probed.reworded(f"{label} is not a per-channel affine map: {probed}")
        if not has_bn:
            return None
        return Refusal("not-affine", f"{label}'s forward is not a foldable per-channel map")

    def _leading_affine(self, g: DataflowGraph, direct: list[OpEvent], cur: int, axis: int):
        """``(affine, last event)`` for a module's own ops applied one after another from
        ``cur`` (all of them per-channel affine, each reading the previous one's sole output
        only), or the refusal of the first op, or ``None``."""
        total, last = None, None
        for e in direct:
            if not e.outputs or len(e.outputs) != 1:
                return None
            aff = self._op_affine(g, e, cur, axis)
            if not isinstance(aff, ChannelAffine):
                return aff if last is None else None
            if last is not None and len([u for u in g.uses(cur) if u == OUTPUT or not shape_only_use(g, u, cur)]) != 1:
                return None
            total = aff if total is None else total.then(aff)
            cur, last = e.outputs[0], e
        return total, last

    def _op_affine(self, g: DataflowGraph, ev: OpEvent, cur: int, axis: int):
        if ev.name in BATCH_NORM:
            if not ev.args or ev.args[0] != Ref(cur):
                return None
            aff = batch_norm_affine(g, ev)
            if isinstance(aff, Refusal):
                return aff
            if axis != 1:
                return Refusal("other-axis", "it normalises another axis than the layer's output channels")
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
            if self._neutral(g, ev):
                return None  # made the identity in an earlier round
            a = batch_norm_args(ev)
            params = []
            for key, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", "var")):
                r = a.get(key)
                if r is None:
                    continue
                v = g.value(r.value)
                if not v.is_param or len(g.param_uses(v.tensor)) != 1:
                    return Refusal("computed-tensor", f"the batch_norm inline in {where} reads computed or shared "
                                   "statistics, so it cannot be made the identity")
                why = unwritable(g, v.tensor, v.name)
                if why is not None:
                    return why.reworded(f"the batch_norm inline in {where} cannot be made the identity: {why}")
                params.append((v.tensor, f"var:{float(a.get('eps', 1e-5))}" if fill == "var" else fill))
            return Step(aff, label, host or "<model>", "inline", Removal("neutralise", params=params), ev.outputs[0], [ev.id])
        x_first = ev.args[0] == Ref(cur)
        operand = ev.args[1] if x_first else ev.args[0]
        if not isinstance(operand, Ref):
            return None  # arithmetic with a literal: not a learnt affine layer
        root = g.const_root(operand.value)
        if root is None or not g.value(operand.value).const:
            return None
        shape = g.value(operand.value).shape
        if shape is None or math.prod(shape) != root.tensor.numel():
            # ``pos[:, :, :H, :W]``: the part read was per-channel at the captured size only
            return Refusal("size-dependent", f"{ev.name} reads part of {root.name} {tuple(root.tensor.shape)} (a slice "
                           "that may depend on the input size), not the whole parameter per channel")
        if len(g.param_uses(root.tensor)) != 1:
            return Refusal("other-readers", f"the per-channel parameter {root.name} is read by other ops too")
        why = unwritable(g, root.tensor, root.name)
        if why is not None:
            return why.reworded(f"the per-channel parameter cannot be made the identity: {why}")
        fill = _identity_fill(ev, x_first)
        if isinstance(fill, Refusal):
            return fill
        return Step(aff, f"{ev.name} by {root.name} in {where}", host or "<model>", "inline",
                    Removal("neutralise", params=[(root.tensor, fill)]), ev.outputs[0], [])

    def _neutral(self, g: DataflowGraph, ev: OpEvent) -> bool:
        return _neutral_bn(g, ev, getattr(self, "_neutralised", ()))

    def _unfolded_reason(self, g: DataflowGraph, ev: OpEvent) -> Refusal:
        a = batch_norm_args(ev)
        if a.get("training"):
            return Refusal("training-mode", "it normalises with batch statistics (training mode or no running statistics)")
        src = ev.args[0] if ev.args else None
        if not isinstance(src, Ref):
            return Refusal("not-foldable", "its input is not a tensor")
        return _input_reason(g, src.value)
