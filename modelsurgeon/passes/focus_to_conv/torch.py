"""focus-to-conv on PyTorch models.

Details: docs/architecture.md (*focus-to-conv, in one paragraph*).
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from ...match.calls import call_obstacle, hook_kind
from ...match.conv import conv_unit
from ...rewrite.modules import carried_attributes
from ...rewrite.space_to_depth import merge_weight
from ...report.codes import Refusal
from ..base import Applied, Match, Pass, Skipped, TorchContext
from .measure import _bench, _grad_check, _grads, _stem_input
from .pattern import CAT_OPS, PIXEL_UNSHUFFLE, SpaceToDepth, StemMatch, _fmt, _pixel_unshuffle, _probed, _slices


class FocusToConv(Pass):
    name = "focus-to-conv"

    # -- matching ------------------------------------------------------------------------------
    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        g: DataflowGraph = ctx.graph
        claimed: set[int] = set()
        found: list[SpaceToDepth | Skipped] = []
        for ev in g.events:
            if ev.name in CAT_OPS:
                r = _slices(g, ev)
            elif ev.name in PIXEL_UNSHUFFLE:
                r = _pixel_unshuffle(g, ev)
            else:
                continue
            if r is None:
                continue
            claimed.add(ev.id)
            if isinstance(r, SpaceToDepth):
                claimed.update(r.events)
            found.append(r)
        for call in reversed(g.calls):  # innermost first
            r = _probed(g, call, claimed)
            if r is not None:
                claimed.update(range(call.start, call.end))
                found.append(r)
        for r in found:
            yield r if isinstance(r, Skipped) else self._stem(g, r)

    def _stem(self, g: DataflowGraph, s: SpaceToDepth) -> StemMatch | Skipped:
        import torch

        where = s.host or "<model>"
        uses = g.uses(s.result)
        if OUTPUT in uses:
            return Skipped(where, "the space-to-depth output is a model output", code="model-output")
        if len(uses) != 1:
            return Skipped(where, f"the space-to-depth output has {len(uses)} readers, not just a conv", code="other-readers")
        conv_ev = g.event(uses[0])
        if conv_ev.name != "conv2d" or conv_ev.arg(0, "input") != Ref(s.result):
            return Skipped(where, _not_a_conv(g, conv_ev))
        unit = conv_unit(g, conv_ev)
        if isinstance(unit, Refusal):
            return Skipped(where, unit.reworded(f"the conv after it cannot be rewritten: {unit}"))
        conv = unit.module
        if not isinstance(conv, torch.nn.Conv2d) or type(conv).forward is not torch.nn.Conv2d.forward:
            return Skipped(where, f"the conv after it ({unit.path}) is not a plain torch nn.Conv2d module", code="layer-settings")
        groups = int(conv_ev.arg(6, "groups", 1) or 1)
        if groups != 1:
            return Skipped(where, f"{unit.path} has groups={groups} (only groups=1 maps to one strided conv)", code="layer-settings")
        dilation = _pair(conv_ev.arg(5, "dilation", 1))
        if dilation != (1, 1):
            return Skipped(where, f"{unit.path} has dilation {_fmt(dilation)} (only dilation 1 maps to one strided conv)", code="layer-settings")
        if conv.padding_mode != "zeros":
            return Skipped(where, f"{unit.path} pads with '{conv.padding_mode}', not zeros", code="layer-settings")
        kernel = tuple(conv.weight.shape[2:])
        stride = _pair(conv_ev.arg(3, "stride", 1))
        padding = _padding(conv_ev.arg(4, "padding", 0), kernel, stride)
        if isinstance(padding, Refusal):
            return Skipped(where, padding.reworded(f"{unit.path}: {padding}"))
        x = g.value(s.source).shape
        if x[2] % s.r or x[3] % s.r:
            return Skipped(where, f"the input height/width {x[2]}x{x[3]} is not divisible by {s.r}", code="input-size")
        stem = None
        for call in g.enclosing_calls(g.event(s.events[-1])):
            chain = _stem_chain(g, call, s, conv_ev)
            if chain is not None:
                stem = call
                break
        if stem is None or stem.parent is None:
            # no module to replace as a whole: the space-to-depth may still be a layer of its own
            # (nn.PixelUnshuffle, a Contract / SPD-Conv layer) the host's forward hands to the conv
            layer = _s2d_layer(g, s)
            if layer is not None:
                return self._layer(g, s, layer, conv, unit.path, kernel, stride, padding)
        if stem is None:
            return Skipped(where, f"the space-to-depth is written inline in {_forward_of(s.host)}, which does "
                                  "other work too: it cannot be removed without editing the model's source", code="inline")
        if stem.parent is None:
            return Skipped("<model>", "the space-to-depth stem is the model's whole forward, and the root module "
                                      "cannot be replaced in place", code="inline")
        if g.call_count(stem.module) != 1:
            return Skipped(stem.path, f"{stem.path} is called {g.call_count(stem.module)} times (a shared module)", code="shared-module")
        first = chain[0]
        if g.call_count(first) != 1:
            return Skipped(stem.path, f"{g.paths_of(first)[0]} is called {g.call_count(first)} times (a shared module)", code="shared-module")
        why = call_obstacle(stem, chain) or _hook_obstacle(g, s, conv, unit.path)
        if why is not None:
            return Skipped(stem.path, why)
        return StemMatch(target=stem.path, s2d=s, conv=conv, conv_path=unit.path, stem=stem.module, chain=chain,
                         kernel=kernel, stride=stride, padding=padding)

    def _layer(self, g: DataflowGraph, s: SpaceToDepth, layer: ModuleCall, conv: Any, conv_path: str,
               kernel: tuple, stride: tuple, padding: tuple) -> StemMatch | Skipped:
        """The space-to-depth is a layer of its own (its module's data path is exactly it) whose
        output's one reader is the conv, in another module the host's forward calls: the layer
        becomes ``nn.Identity`` and the conv the merged strided conv."""
        n = g.call_count(layer.module)
        if n != 1:
            return Skipped(layer.path, f"{layer.path} is called {n} times (a shared module)", code="shared-module")
        why = call_obstacle(layer, []) or _hook_obstacle(g, s, conv, conv_path)
        if why is not None:
            return Skipped(layer.path, why)
        return StemMatch(target=layer.path, s2d=s, conv=conv, conv_path=conv_path, stem=layer.module, chain=[],
                         kernel=kernel, stride=stride, padding=padding, layer=True)

    # -- rewriting -----------------------------------------------------------------------------
    def rewrite(self, ctx: TorchContext, m: StemMatch) -> Applied:
        import torch

        ed, s, old = ctx.editor, m.s2d, m.conv
        check_grad, bench = ctx.options.check_grad, ctx.options.bench
        x = _stem_input(ctx, m) if (check_grad or bench) else None
        # what --check-grad / --bench run: the stem, or the space-to-depth layer and the conv
        before = torch.nn.Sequential(m.stem, old) if m.layer and (check_grad or bench) else m.stem
        grads_before = _grads(before, x, old.weight, old.bias) if check_grad else None
        t_before = _bench(before, x) if bench else None

        r = s.r
        kernel = (r * m.kernel[0], r * m.kernel[1])
        stride = (r * m.stride[0], r * m.stride[1])
        padding = (r * m.padding[0], r * m.padding[1])
        new = torch.nn.Conv2d(len(s.phases) // (r * r), old.out_channels, kernel, stride, padding,
                              bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        new.weight.requires_grad_(old.weight.requires_grad)
        if new.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        weight = merge_weight(old.weight.detach().double(), s.phases, r)
        bias = old.bias.detach().double() if old.bias is not None else None
        ed.replace(old, new)
        ed.set_param(new.weight, weight, new)
        if bias is not None:
            ed.set_param(new.bias, bias, new)
        if m.layer:  # the space-to-depth layer passes its input on; the conv is merged in place
            replacement = torch.nn.Identity()
        else:
            chain = [new if c is old else c for c in m.chain]
            replacement = chain[0] if len(chain) == 1 else torch.nn.Sequential(*chain)
        carried = sorted(carried_attributes(m.stem, replacement))
        ed.replace(m.stem, replacement)

        if m.layer:
            detail = (f"{type(m.stem).__name__} ({_s2d_layer_desc(s)}) → Identity; {m.conv_path} "
                      f"Conv2d({_ksp(m.kernel, m.stride, m.padding)}) → Conv2d({_ksp(kernel, stride, padding)})")
        else:
            old_desc = f"{type(m.stem).__name__}({_s2d_desc(s)}{_ksp(m.kernel, m.stride, m.padding)})"
            new_desc = f"Conv2d({_ksp(kernel, stride, padding)})"
            if replacement is not new:
                new_desc += f" in {type(replacement).__name__}"
            detail = f"{old_desc} → {new_desc}"
        data = {
            "stem": m.target, "conv": m.conv_path, "space_to_depth": s.kind, "r": r,
            "layout": s.layout, "phase_order": s.order,
            "old": {"kernel": list(m.kernel), "stride": list(m.stride), "padding": list(m.padding)},
            "new": {"kernel": list(kernel), "stride": list(stride), "padding": list(padding)},
            "replaced_by": type(replacement).__name__, "carried": carried, "separate_layers": m.layer,
        }
        if check_grad:
            check = _grad_check(m, new if m.layer else replacement, new, x, grads_before)
            ctx.checks.append(check)
            data["grad_check"] = {"passed": check.passed, "max_rel": check.max_rel,
                                  "outputs": [o.to_json() for o in check.outputs]}
            detail += "; gradients " + ("equal" if check.passed else "DIFFER")
        if bench:
            t_after = _bench(new if m.layer else replacement, x)
            data["bench"] = {"before_ms": t_before * 1e3, "after_ms": t_after * 1e3,
                             "speedup": t_before / t_after if t_after > 0 else None,
                             "input": list(x.shape), "threads": 1}
            detail += f"; stem CPU {t_before * 1e3:.3g} → {t_after * 1e3:.3g} ms"
        return Applied(m.target, detail, data)


# ----------------------------------------------------------------------------------------------
# the stem: what gets replaced


def _stem_chain(g: DataflowGraph, call: ModuleCall, s: SpaceToDepth, conv_ev: OpEvent) -> list | None:
    """The modules ``call`` applies after the space-to-depth, if its whole data path is the
    space-to-depth then a chain of child modules, the first of which holds the conv."""
    if call.inputs != (s.source,) or len(call.outputs) != 1:
        return None
    s2d = set(s.events)
    children = [g.call(c) for c in call.children]
    spans = []
    if all(g.event(e).scope == call.id for e in s2d):
        rest = children
    else:  # the space-to-depth is the first child (nn.PixelUnshuffle, a SpaceToDepth module...)
        if not children:
            return None
        c1 = children[0]
        if c1.inputs != (s.source,) or c1.outputs != (s.result,):
            return None
        if not all(c1.start <= e < c1.end for e in s2d) or {e.id for e in g.active_events(c1)} - s2d:
            return None
        spans.append(c1)
        rest = children[1:]
    if not rest or not (rest[0].start <= conv_ev.id < rest[0].end):
        return None
    cur = s.result
    for ch in rest:
        if ch.inputs != (cur,) or len(ch.outputs) != 1:
            return None
        cur = ch.outputs[0]
    if call.outputs != (cur,):
        return None
    spans += rest
    for e in g.active_events(call):
        if e.id not in s2d and not any(c.start <= e.id < c.end for c in spans):
            return None
    return [c.module for c in rest]


def _s2d_layer(g: DataflowGraph, s: SpaceToDepth) -> ModuleCall | None:
    """The outermost module call (not the root) whose whole data path is the space-to-depth --
    from its input to its output, nothing else -- or ``None``."""
    s2d = set(s.events)
    found = None
    for call in g.enclosing_calls(g.event(s.events[-1])):
        if call.parent is None:
            break
        if not all(call.start <= e < call.end for e in s2d):
            continue  # an inner call (a Concat layer...) holding part of it
        if call.inputs != (s.source,) or call.outputs != (s.result,):
            break
        if any(e.id not in s2d for e in g.active_events(call)):
            break
        found = call
    return found


def _not_a_conv(g: DataflowGraph, ev: OpEvent) -> Refusal:
    import torch

    for call in g.enclosing_calls(ev):
        m = call.module
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode != "zeros":
            return Refusal("layer-settings", f"{call.path} pads with '{m.padding_mode}', not zeros")
    where = g.call(ev.scope).path
    return Refusal("not-a-pattern", f"its output feeds {ev.name}{f' in {where}' if where else ''}, not a convolution")


def _hook_obstacle(g: DataflowGraph, s: SpaceToDepth, conv: Any, conv_path: str) -> Refusal | None:
    """Why a hook forbids the rewrite besides those on removed modules
    (:func:`~modelsurgeon.match.calls.call_obstacle`): one on the conv, which the merged conv
    replaces, would be dropped; one on a module reading the space-to-depth output (the block
    holding the conv) would see the space-to-depth's input in its place."""
    kind = hook_kind(conv)
    if kind is not None:
        return Refusal("hook", f"{conv_path} has a {kind}, which would be dropped with the module")
    for c in g.calls:
        kind = hook_kind(c.module) if s.result in c.inputs else None
        if kind is not None:
            return Refusal("hook", f"{c.path or 'the model'} has a {kind}, which would see the input of the "
                           "space-to-depth in place of its output")
    return None


def _forward_of(host: str) -> str:
    return f"{host}.forward" if host else "the model's forward"


# ----------------------------------------------------------------------------------------------
# conv arguments and descriptions


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    return v if len(v) == 2 else (v[0], v[0])


def _padding(p: Any, kernel: tuple, stride: tuple) -> tuple[int, int] | Refusal:
    if p == "valid":
        return (0, 0)
    if p == "same":
        if any(k % 2 == 0 for k in kernel):
            return Refusal("layer-settings", "padding='same' with an even kernel pads asymmetrically")
        return (kernel[0] // 2, kernel[1] // 2)
    if isinstance(p, str):
        return Refusal("layer-settings", f"padding={p!r} is not understood")
    return _pair(p)


def _ksp(k: tuple, s: tuple, p: tuple) -> str:
    return f"k{_fmt(k)} s{_fmt(s)} p{_fmt(p)}"


def _s2d_layer_desc(s: SpaceToDepth) -> str:
    what = {"slices": f"{s.r}×{s.r} slices", "pixel_unshuffle": f"pixel_unshuffle {s.r}",
            "probe": f"space-to-depth {s.r}, probed"}
    return what[s.kind]


def _s2d_desc(s: SpaceToDepth) -> str:
    if s.kind == "slices":
        return "" if s.r == 2 else f"{s.r}×{s.r} slices, "
    if s.kind == "pixel_unshuffle":
        return f"pixel_unshuffle {s.r}, "
    return f"space-to-depth {s.r} (probed), "
