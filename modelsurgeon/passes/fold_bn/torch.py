"""fold-bn on PyTorch models.

Details: docs/architecture.md (*fold-bn, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ...capture.graph import DataflowGraph, OpEvent, Ref
from ...match.affine import BATCH_NORM, ChannelAffine, batch_norm_args
from ...match.conv import CONV_OPS, ConvUnit, conv_unit, output_channel_axis
from ...rewrite.affine import fold_bias
from ...report.codes import Refusal
from ..base import Applied, Match, Pass, Skipped, TorchContext
from .forward import ForwardMatch, forward_fold, rewrite_forward
from .split import SplitMatch, SplitMatcher, rewrite_split
from .steps import Step, StepMatcher, _bn_events, _bn_like, _identity_var, _input_reason


@dataclass
class FoldMatch(Match):
    unit: ConvUnit = None
    steps: list[Step] = field(default_factory=list)
class FoldBN(SplitMatcher, StepMatcher, Pass):
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
        # an .onnx output runs no host code: a norm its own fuse() reads is folded here too
        self._host_code = ctx.host_code
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
                split = self._split_fold(g, ev, hooked)  # a norm after a concatenation of convs
                if isinstance(split, SplitMatch):
                    yield split
                    continue
                fwd = forward_fold(g, ev, hooked, self._host_code)  # a norm before a layer: folded into it
                if isinstance(fwd, ForwardMatch):
                    yield fwd
                    continue
                fwd = fwd or split
                yield Skipped(_target(g, ev), fwd or self._pending.get(ev.id) or self._unfolded_reason(g, ev))

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

    # -- rewriting -----------------------------------------------------------------------------
    def rewrite(self, ctx: TorchContext, m: FoldMatch) -> Applied:
        import torch

        if isinstance(m, ForwardMatch):
            return rewrite_forward(ctx, m)
        if isinstance(m, SplitMatch):
            return rewrite_split(ctx, m, fold_into, remove_steps)
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
        bias_added = fold_into(ed, unit, total)
        remove_steps(ed, m.steps)
        for tensor, v in variances:
            ed.neutralise(tensor, v)
        detail = f"{unit.describe()} ← " + " → ".join(s.label for s in m.steps)
        return Applied(unit.path, detail, {
            "layer": unit.path,
            "folded": [{"path": s.path, "what": s.label, "source": s.source} for s in m.steps],
            "bias_added": bias_added,
        })


def fold_into(ed, unit: ConvUnit, total: ChannelAffine) -> bool:
    """``total`` after ``unit``'s output folded into its weight and bias; whether a bias was added."""
    # a fold into the layer's input (forward.py) may have given it a bias in this run
    bias = unit.bias if unit.bias is not None or unit.module is None else getattr(unit.module, "bias", None)
    b = fold_bias(bias, total.scale, total.shift)
    ed.scale_weight(unit.weight, total.scale, unit.kind, unit.groups, unit.module)
    if bias is None:
        ed.add_bias(unit.module, b)
    else:
        ed.set_param(bias, b, unit.module)
    return bias is None


def remove_steps(ed, steps: list[Step]) -> None:
    """Each folded step's module removed (or replaced by the children it keeps), or its inline
    parameters made the identity (a running variance apart: set by the caller)."""
    import torch

    for s in steps:
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


@dataclass
class _SkippedSteps(Skipped):
    """A chain found but not folded; keeps its steps so the modules count as reported."""

    steps: list = field(default_factory=list, repr=False)


def _target(g: DataflowGraph, ev: OpEvent) -> str:
    return g.call(ev.scope).path or f"{ev.name} in the model's forward"


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


def _stored_training(ctx: TorchContext) -> str | None:
    storage = getattr(ctx.editor, "storage", None)
    if not getattr(storage, "mode_stored", True):  # a state_dict has no mode: the factory's says nothing
        return None
    flags = getattr(storage, "training", None) or {}
    if flags.get(id(ctx.model)) or any(flags.get(id(m)) for m in ctx.model.modules() if _bn_like(m)):
        return ("the model was stored in training mode; BatchNorms are folded using their running "
                "statistics: the result is an inference model")
    return None
