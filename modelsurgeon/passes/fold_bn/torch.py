"""fold-bn on PyTorch models.

Details: docs/architecture.md (*fold-bn, in one paragraph*).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from ...match.affine import (
    ADD, BATCH_NORM, ELEMENTWISE, MUL, DIV, RSUB, SUB, ChannelAffine, batch_norm_affine, batch_norm_args,
    elementwise_affine, is_bn_like, probe_module, NORM_LIKE, PROBE_MAX_EVENTS,
)
from ...match.calls import call_obstacle, read_outside
from ...match.conv import CONV_OPS, ConvUnit, conv_unit, output_channel_axis, unwritable
from ...match.host import statistics_reader
from ...match.reshape import channel_axis_after, shape_only_use
from ...rewrite.affine import fold_bias
from ...report.codes import Refusal
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
    via: list[int] = field(default_factory=list)  # reshapes crossed before it (channel axis kept)


@dataclass
class FoldMatch(Match):
    unit: ConvUnit = None
    steps: list[Step] = field(default_factory=list)


HOST_READS = "host-reads"
"""The host's own re-parameterisation reads the norm: not folded in any form."""


class FoldBN(Pass):
    name = "fold-bn"

    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        found = list(self._match(ctx))
        yield from found
        yield from self._unreported(ctx, found)
        if any(isinstance(m, FoldMatch) for m in found):
            warning = _stored_training(ctx)
            if warning and warning not in ctx.warnings:
                ctx.warnings.append(warning)

    def _match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        g: DataflowGraph = ctx.graph
        # tensors this run's earlier folds made the identity (optimize's later rounds)
        self._neutralised = getattr(ctx.editor, "neutralised", set())
        handled: set[int] = set()
        # why a candidate met after foldable steps was not folded too: reported only if nothing
        # folds it from its own layer (a block met after a fold usually starts with that layer)
        self._pending: dict[int, Refusal] = {}  # batch_norm event id or id(module) -> reason
        hooked = _hooked_outputs(g)
        for ev in g.events:
            if ev.name not in CONV_OPS or not ev.outputs:
                continue
            out = g.value(ev.outputs[0])
            if out.shape is None or len(out.shape) < 2:
                continue
            axis = output_channel_axis(ev.name, len(out.shape))
            if axis < 0:
                continue
            steps, stop = self._walk(g, ev.outputs[0], axis)
            if stop is not None:
                cand, reason = stop
                if not steps:
                    handled.update(_bn_events(g, cand))
                    yield Skipped(_target(g, cand), reason)
                    continue
                for key in _bn_events(g, cand) + [id(c.module) for c in g.calls_starting_with(cand) if _bn_like(c.module)]:
                    self._pending.setdefault(key, reason)
            if not steps:
                continue
            # The fold changes the layer's output and every step's but the last: a hook seeing
            # one of them (on the layer, a container, a BatchNorm neutralised in place; a module
            # removed with its hook is refused by call_obstacle) would see folded values. The
            # chain stops before the step whose input a hook sees.
            entering = [([ev.outputs[0]] if i == 0 else [steps[i - 1].out_value]) + s.via for i, s in enumerate(steps)]
            cut = next((i for i, vs in enumerate(entering) if any(v in hooked for v in vs)), None)
            observer = None
            if cut is not None:
                seen_by = next(v for v in entering[cut] if v in hooked)
                observer = Refusal("hook", f"{hooked[seen_by]}, which would see folded values")
                if cut > 0:
                    for s in steps[cut:]:
                        keys = s.bn_events + ([id(s.removal.module)] if s.removal.module is not None else [])
                        for key in keys:
                            self._pending.setdefault(key, observer)
                    steps, observer = steps[:cut], None
            for s in steps:
                handled.update(s.bn_events)
            unit = conv_unit(g, ev)
            target = " → ".join(s.path for s in steps)
            if isinstance(unit, Refusal):
                yield _SkippedSteps(target, unit.reworded(f"the layer before it cannot be rewritten: {unit}"), steps=steps)
            elif observer is not None:
                yield _SkippedSteps(target, observer, steps=steps)
            elif unit.bias is None and not unit.can_add_bias:
                yield _SkippedSteps(target, unit.no_bias_reason, steps=steps)
            elif steps[0].affine.channels != unit.out_channels:
                yield _SkippedSteps(target, f"channel count {steps[0].affine.channels} differs from {unit.path}'s "
                                    f"{unit.out_channels} outputs", steps=steps, code="other-axis")
            else:
                yield FoldMatch(target=unit.path, unit=unit, steps=steps)
        for ev in g.events:
            if ev.name in BATCH_NORM and ev.id not in handled and not self._neutral(g, ev):
                yield Skipped(_target(g, ev), self._pending.get(ev.id) or self._unfolded_reason(g, ev))

    def _unreported(self, ctx: TorchContext, found: list) -> Iterable[Skipped]:
        """Every BN-like module neither folded nor reported yet: not executed on the example
        input, or never reached from a layer's output (a frozen BN after an activation)."""
        g: DataflowGraph = ctx.graph
        modules: set[int] = set()  # folded or already reported (with their removed sub-trees)
        paths: set[str] = set()
        for m in found:
            if isinstance(m, Skipped):
                paths.update(m.target.split(" → "))
            for s in getattr(m, "steps", None) or ():
                r = s.removal
                if r.module is not None:
                    subtree = [r.module] if r.kind == "children" else list(r.module.modules())
                    modules.update(id(x) for x in subtree)
        tensors: set[int] = set()  # statistics some batch_norm op read (folded, reported or neutral)
        for ev in g.events:
            if ev.name in BATCH_NORM:
                tensors.update(id(g.value(r.value).tensor) for r in batch_norm_args(ev).values()
                               if isinstance(r, Ref) and g.value(r.value).tensor is not None)
        for path, mod in ctx.model.named_modules():
            if not _bn_like(mod) or id(mod) in modules:
                continue
            path = path or f"{type(mod).__name__} (the model)"
            if any(p in paths for p in g.paths_of(mod) or [path]):
                continue
            stats = [t for t in (mod._buffers.get("running_mean"), mod._buffers.get("running_var")) if t is not None]
            if stats and all(id(t) in tensors for t in stats):
                continue
            calls = g.calls_of(mod)
            if id(mod) in self._pending:
                yield Skipped(path, self._pending[id(mod)])
            elif not calls:
                yield Skipped(path, "not executed on the example input", code="not-executed")
            elif len(calls[0].inputs) != 1:
                yield Skipped(path, f"it is called with {len(calls[0].inputs)} tensor inputs", code="call-arguments")
            else:
                yield Skipped(path, _input_reason(g, calls[0].inputs[0]))

    # -- matching ------------------------------------------------------------------------------
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
        if isinstance(r, Step) and call.path:
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
        # C: an affine op first, then child modules only (BN + activation classes)
        direct = [e for e in active if e.scope == call.id]
        if direct == [ev] and ev.outputs:
            aff = self._op_affine(g, ev, cur, axis)
            if isinstance(aff, ChannelAffine):
                chain = _child_chain(g, call, ev.outputs[0])
                if chain is not None:
                    # only the leading op is folded: a BatchNorm among the kept children is not
                    return Step(aff, label, call.path, "batch_norm" if ev.name in BATCH_NORM else "inline",
                                Removal("children", mod, children=chain), ev.outputs[0],
                                [ev.id] if ev.name in BATCH_NORM else [])
            elif isinstance(aff, Refusal):
                return aff
        if probed is not None and (has_bn or probed.code == NORM_LIKE):
            return probed.reworded(f"{label} is not a per-channel affine map: {probed}")
        if not has_bn:
            return None
        return Refusal("not-affine", f"{label}'s forward is not a foldable per-channel map")

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
            if r.kind == "identity" or (r.kind == "children" and not r.children):
                ed.remove(r.module)  # a placeholder until the host's own fused forward replaces it
            elif r.kind == "children":
                kept = r.children
                ed.replace(r.module, kept[0] if len(kept) == 1 else torch.nn.Sequential(*kept))
            else:
                for tensor, fill in r.params:
                    if not isinstance(fill, str):
                        ed.neutralise(tensor, fill)
        for tensor, v in variances:
            ed.neutralise(tensor, v)
        detail = f"{unit.describe()} ← " + " → ".join(s.label for s in m.steps)
        return Applied(unit.path, detail, {
            "layer": unit.path,
            "folded": [{"path": s.path, "what": s.label, "source": s.source} for s in m.steps],
            "bias_added": bias_added,
        })


@dataclass
class _SkippedSteps(Skipped):
    """A chain found but not folded; keeps its steps so the modules count as reported."""

    steps: list = field(default_factory=list, repr=False)


def _target(g: DataflowGraph, ev: OpEvent) -> str:
    return g.call(ev.scope).path or f"{ev.name} in the model's forward"


_bn_like = is_bn_like


def _hooked_outputs(g: DataflowGraph) -> dict[int, str]:
    """Value id -> "P has a forward hook" for the inputs and outputs of a module call whose
    hooks see them (a forward hook gets both, a pre-hook the inputs)."""
    out: dict[int, str] = {}
    for c in g.calls:
        where = c.path or "the model"
        if getattr(c.module, "_forward_hooks", None):
            for v in c.inputs + c.outputs:
                out.setdefault(v, f"{where} has a forward hook")
        if getattr(c.module, "_forward_pre_hooks", None):
            for v in c.inputs:
                out.setdefault(v, f"{where} has a forward pre-hook")
    return out


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


def _stored_training(ctx: TorchContext) -> str | None:
    storage = getattr(ctx.editor, "storage", None)
    if not getattr(storage, "mode_stored", True):  # a state_dict has no mode: the factory's says nothing
        return None
    flags = getattr(storage, "training", None) or {}
    if flags.get(id(ctx.model)) or any(flags.get(id(m)) for m in ctx.model.modules() if _bn_like(m)):
        return ("the model was stored in training mode; BatchNorms are folded using their running "
                "statistics: the result is an inference model")
    return None


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


def _neutral_bn(g: DataflowGraph, ev: OpEvent, neutralised: Any = ()) -> bool:
    """An inline batch_norm that is the identity: one this run's folds made so (every tensor it
    reads is in ``neutralised``, the ids :meth:`ModuleEditor.neutralise` filled -- in half
    precision the op may keep a scale, folded into the layer), so that ``optimize``'s repeated
    rounds do not fold it again; or one that returns its input bit for bit (weight 1, bias 0,
    mean 0 and ``running_var + eps`` rounding to 1). A BatchNorm with default statistics
    computes ``x / sqrt(1 + eps)``: not neutral."""
    import torch
    import torch.nn.functional as F

    a = batch_norm_args(ev)
    if not a or a.get("training"):
        return False
    vals, ids = {}, []
    for key in ("weight", "bias", "running_mean", "running_var"):
        r = a.get(key)
        if r is None:
            vals[key] = None
            continue
        if not isinstance(r, Ref) or g.value(r.value).tensor is None:
            return False
        ids.append(id(g.value(r.value).tensor))
        vals[key] = g.value(r.value).tensor.detach()
    var, mean = vals["running_var"], vals["running_mean"]
    if var is None or mean is None:
        return False
    if all(i in neutralised for i in ids):
        return True
    with torch.no_grad():
        if not bool((mean == 0).all()) or not bool(var.dim() == 1 and var.numel()):
            return False
        if vals["weight"] is not None and not bool((vals["weight"] == 1).all()):
            return False
        if vals["bias"] is not None and not bool((vals["bias"] == 0).all()):
            return False
        src = a.get("input")
        dtype = g.value(src.value).dtype if isinstance(src, Ref) else None
        dtype = dtype if dtype is not None and dtype.is_floating_point else var.dtype
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, var.numel(), 64, generator=gen, dtype=torch.float64)
        x = (x * torch.logspace(-3, 3, 64, dtype=torch.float64)).to(dtype)
        try:
            y = F.batch_norm(x, mean, var, vals["weight"], vals["bias"], False, 0.0, float(a.get("eps", 1e-5)))
        except Exception:
            return False
        return bool(torch.equal(y, x))


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
