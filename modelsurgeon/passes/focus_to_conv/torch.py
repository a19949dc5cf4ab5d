"""focus-to-conv on PyTorch models.

Details: docs/architecture.md (*focus-to-conv, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import OUTPUT, VIEW_OPS, DataflowGraph, ModuleCall, OpEvent, Ref
from ...match import dims
from ...match.calls import call_obstacle, hook_kind
from ...match.conv import conv_unit
from ...rewrite.modules import carried_attributes
from ...rewrite.space_to_depth import Phase, merge_weight, pixel_unshuffle_phases
from ...report.codes import Refusal
from ..base import Applied, Match, Pass, Skipped, TorchContext

GETITEM = "Tensor.__getitem__"
CAT_OPS = frozenset({"cat", "concat", "concatenate"})
PIXEL_UNSHUFFLE = frozenset({"pixel_unshuffle"})
REARRANGE_OPS = VIEW_OPS | CAT_OPS | PIXEL_UNSHUFFLE | frozenset({
    "Tensor.permute", "permute", "Tensor.transpose", "transpose", "Tensor.unflatten", "unflatten",
    "stack", "Tensor.movedim", "movedim", "Tensor.narrow", "narrow", "Tensor.clone", "clone",
    "Tensor.chunk", "chunk", "Tensor.split", "split", "Tensor.unbind", "unbind", "Tensor.flip", "flip",
})
"""Ops that move numbers without arithmetic: a module made only of these may be probed."""

SLICE_END = 2**31 - 1
"""A slice stop at least this large means "to the end" (INT_MAX-style ends of exporters)."""

PROBE_MAX_NUMEL = 1 << 24
BENCH_MIN_TIME = 0.2  # seconds of timing per measurement (torch.utils.benchmark)


@dataclass
class SpaceToDepth:
    kind: str  # "slices" | "pixel_unshuffle" | "probe"
    source: int  # value id of the input x (N, C, H, W)
    result: int  # value id of the space-to-depth output (N, r*r*C, H/r, W/r)
    r: int
    phases: list[Phase]  # (c, dy, dx) of every output channel
    events: list[int]  # the events computing result from source
    host: str  # path of the module whose forward ran it ("" for the model's own forward)

    @property
    def layout(self) -> str:
        c0 = [p for p in self.phases if p[0] == 0]
        if self.phases[: len(c0)] == c0:
            return "channel-major"
        return "phase-major"

    @property
    def order(self) -> list[list[int]]:
        """The (dy, dx) phases of input channel 0 in the order they are concatenated."""
        return [[dy, dx] for c, dy, dx in self.phases if c == 0]


@dataclass
class StemMatch(Match):
    s2d: SpaceToDepth = None
    conv: Any = None  # the nn.Conv2d after the space-to-depth
    conv_path: str = ""
    stem: Any = None  # the module replaced (its data path: space-to-depth + chain)
    chain: list = field(default_factory=list)  # modules applied after the space-to-depth
    kernel: tuple = ()
    stride: tuple = ()
    padding: tuple = ()
    layer: bool = False  # the space-to-depth is a layer of its own (``stem``), the conv in another module


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
# space-to-depth recognition


def _slices(g: DataflowGraph, cat: OpEvent) -> SpaceToDepth | Skipped | None:
    """Strided slices of one tensor concatenated on channels; ``None`` if not such a candidate."""
    tensors = cat.arg(0, "tensors")
    if not isinstance(tensors, (list, tuple)) or len(tensors) < 2 or not all(isinstance(t, Ref) for t in tensors):
        return None
    if not cat.outputs:
        return None
    out = g.value(cat.outputs[0]).shape
    dim = cat.arg(1, "dim", 0)
    if out is None or len(out) != 4 or not isinstance(dim, int) or dim % 4 != 1:
        return None
    chains = [_slice_chain(g, t.value) for t in tensors]
    if sum(any(_step(ev) for ev in ch[1]) for ch in chains) < 2:
        return None  # not several strided slices: an ordinary concatenation
    host = g.call(cat.scope).path
    where = host or "<model>"
    # the source: the value nearest the cat that every slice chain starts from
    common = [v for v in chains[0][0] if all(v in ch[0] for ch in chains[1:])]
    if not common:
        return Skipped(where, "not every concatenated tensor is a strided slice of the same input", code="not-a-pattern")
    source = common[0]
    x = g.value(source).shape
    if x is None or len(x) != 4:
        return Skipped(where, "the sliced tensor is not 4-dimensional (N, C, H, W)", code="not-a-pattern")
    offsets, steps, events = [], set(), set()
    for values, evs in chains:
        k = values.index(source)
        (y0, ys), (x0, xs) = (0, 1), (0, 1)
        for ev in reversed(evs[:k]):  # from the source towards the cat
            index = _spatial_index(g, ev)
            if isinstance(index, Refusal):
                return Skipped(where, index)
            (a, b), (c, d) = index
            y0, ys, x0, xs = y0 + ys * a, ys * b, x0 + xs * c, xs * d
            events.add(ev.id)
        offsets.append((y0, x0))
        steps.add((ys, xs))
    if len(steps) != 1 or len({*next(iter(steps))}) != 1 or next(iter(steps))[0] < 2:
        return Skipped(where, f"slices with steps {', '.join(_fmt(st) for st in sorted(steps))}: not an r×r space-to-depth", code="not-a-pattern")
    r = next(iter(steps))[0]
    every = [(dy, dx) for dy in range(r) for dx in range(r)]
    if sorted(offsets) != every:
        return Skipped(where, f"the {len(offsets)} slices take phases {offsets}, not each of the {r}×{r} phases once", code="not-a-pattern")
    for eid in events:  # the slices (and intermediate slices) are read by the pattern only
        for o in g.event(eid).outputs:
            if any(u == OUTPUT or (u not in events and u != cat.id) for u in g.uses(o)):
                return Skipped(where, "a slice of the input is also read elsewhere", code="other-readers")
    phases = [(c, dy, dx) for dy, dx in offsets for c in range(x[1])]
    return SpaceToDepth("slices", source, cat.outputs[0], r, phases, sorted(events) + [cat.id], host)


def _slice_chain(g: DataflowGraph, vid: int) -> tuple[list[int], list[OpEvent]]:
    """Values from ``vid`` back through plain spatial slices, and the slicing events between."""
    values, events = [vid], []
    while len(values) < 16:
        p = g.producer(values[-1])
        if p is None or p.name != GETITEM or _spatial_index(g, p) is None:
            break
        events.append(p)
        values.append(p.args[0].value)
    return values, events


def _step(ev: OpEvent) -> bool:
    idx = ev.args[1] if len(ev.args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, slice) and isinstance(i.step, int) and i.step > 1 for i in items)


def _spatial_index(g: DataflowGraph, ev: OpEvent) -> tuple[tuple[int, int], tuple[int, int]] | Refusal | None:
    """``((start, step), (start, step))`` on the last two axes of a 4-d tensor if ``ev`` is
    ``x[..., a::b, c::d]`` (whole extent, full slices on the other axes); why not, when it is
    such a slice but with an explicit stop (``x[..., 0:64:2]``: the whole extent at this input
    size only) or a start counted from the end (``x[..., -63::2]``); else ``None``. The ends
    exporters and generated code write for "to the end" (``2**31 - 1``, ``2**63 - 1``) count as
    no stop."""
    if len(ev.args) < 2 or not isinstance(ev.args[0], Ref) or ev.kwargs:
        return None
    shape = g.value(ev.args[0].value).shape
    if shape is None or len(shape) != 4:
        return None
    idx = ev.args[1] if isinstance(ev.args[1], tuple) else (ev.args[1],)
    if not all(i is Ellipsis or isinstance(i, slice) for i in idx) or sum(i is Ellipsis for i in idx) > 1:
        return None
    explicit = [i for i in idx if i is not Ellipsis]
    if len(explicit) > 4:
        return None
    if Ellipsis in idx:
        pos = idx.index(Ellipsis)
        full = list(idx[:pos]) + [slice(None)] * (4 - len(explicit)) + list(idx[pos + 1:])
    else:
        full = explicit + [slice(None)] * (4 - len(explicit))
    out, bounded, from_end = [], None, None
    for axis, sl in enumerate(full):
        n = shape[axis]
        start, stop, step = sl.start, sl.stop, sl.step
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (start, stop, step)):
            return None
        step = 1 if step is None else step
        if start is not None and start < 0 and from_end is None:
            from_end = start  # counted from the end: another element at another size
        start = 0 if start is None else (start + n if start < 0 else start)
        if step < 1 or start < 0:
            return None
        if axis < 2 and (start != 0 or step != 1):
            return None
        if stop is not None and stop < SLICE_END and bounded is None:
            bounded = (stop, n)
        if axis >= 2:
            out.append((start, step))
    if bounded is not None:
        stop, n = bounded
        if 0 <= stop < n:
            return Refusal("not-a-pattern", f"the slice stops at {stop}, before the end of the axis ({n}): not a "
                           "space-to-depth of the whole input")
        return Refusal("size-dependent", f"the slice stops at {stop}: exact only at this input size")
    if from_end is not None:
        return Refusal("size-dependent", f"the slice starts at {from_end}, counted from the end: exact only at this input size")
    return out[0], out[1]


def _pixel_unshuffle(g: DataflowGraph, ev: OpEvent) -> SpaceToDepth | Skipped | None:
    src = ev.arg(0, "input")
    r = ev.arg(1, "downscale_factor")
    if not isinstance(src, Ref) or not isinstance(r, int) or not ev.outputs:
        return None
    host = g.call(ev.scope).path
    x = g.value(src.value).shape
    if x is None or len(x) != 4:
        return Skipped(host or "<model>", "pixel_unshuffle of a tensor that is not 4-dimensional (N, C, H, W)", code="not-a-pattern")
    if r < 2:
        return None
    return SpaceToDepth("pixel_unshuffle", src.value, ev.outputs[0], r, pixel_unshuffle_phases(x[1], r),
                        [ev.id], host)


def _probed(g: DataflowGraph, call: ModuleCall, claimed: set[int]) -> SpaceToDepth | Skipped | None:
    """A module that only rearranges (N, C, H, W) into (N, r*r*C, H/r, W/r): its channel order by
    probing it with an index tensor -- at the recorded shape, then at another batch size and at
    another, non-square height × width (the rewrite serves every size: a rearrangement that is
    this space-to-depth at the recorded shape only is skipped)."""
    import torch

    if call.parent is None or len(call.inputs) != 1 or len(call.outputs) != 1 or call.end == call.start:
        return None
    if any(e in claimed for e in range(call.start, call.end)):
        return None
    x, y = g.value(call.inputs[0]).shape, g.value(call.outputs[0]).shape
    if x is None or y is None or len(x) != 4 or len(y) != 4 or y[0] != x[0] or not y[2] or not y[3]:
        return None
    r = x[2] // y[2]
    if r < 2 or y[2] * r != x[2] or y[3] * r != x[3] or y[1] != x[1] * r * r:
        return None
    if any(e.name not in REARRANGE_OPS for e in g.active_events(call)):
        return None
    numel = x[0] * x[1] * x[2] * x[3]
    if numel > PROBE_MAX_NUMEL:
        return None
    probe = torch.arange(numel, dtype=torch.float64).reshape(x)
    try:
        with torch.no_grad():
            out = call.module(probe)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(y):
        return None
    phases = []
    n, h, w = x[1] * x[2] * x[3], x[2], x[3]
    for j in range(y[1]):
        k = int(out[0, j, 0, 0])
        c, dy, dx = k // (h * w), (k // w) % h, k % w
        if k >= n or dy >= r or dx >= r or not torch.equal(out[:, j], probe[:, c, dy::r, dx::r]):
            return None
        phases.append((c, dy, dx))
    if len(set(phases)) != len(phases):
        return None
    for shape in _other_probe_shapes(tuple(x), r):
        why = _rearranges_as(call.module, shape, phases, r)
        if why is not None:
            return Skipped(call.path, f"its rearrangement depends on the input size: at {dims(shape)} it {why}, "
                                      f"not the space-to-depth it is at {dims(x)}", code="size-dependent")
    return SpaceToDepth("probe", call.inputs[0], call.outputs[0], r, phases, list(range(call.start, call.end)),
                        call.path)


def _other_probe_shapes(x: tuple, r: int) -> list[tuple]:
    """Another batch size, and another height × width (still divisible by ``r``, not square);
    halved in height and width while a probe would be too large."""
    n, c, h, w = x
    out = []
    for n2, h2, w2 in ((n + 1, h, w), (n, h + r, w + 2 * r)):
        while n2 * c * h2 * w2 > PROBE_MAX_NUMEL and max(h2, w2) > r:
            h2, w2 = max(r, h2 // (2 * r) * r), max(r, w2 // (2 * r) * r)
        if n2 == n and h2 == w2:
            w2 += r
        out.append((n2, c, h2, w2))
    return out


def _rearranges_as(module: Any, shape: tuple, phases: list[Phase], r: int) -> str | None:
    """``None`` if ``module`` maps an index tensor of ``shape`` exactly as the space-to-depth
    ``phases`` does, else what it does instead."""
    import torch

    n, c, h, w = shape
    probe = torch.arange(n * c * h * w, dtype=torch.float64).reshape(shape)
    try:
        with torch.no_grad():
            out = module(probe)
    except Exception as e:
        return f"fails ({type(e).__name__})"
    expect = (n, len(phases), h // r, w // r)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expect:
        got = dims(tuple(out.shape)) if isinstance(out, torch.Tensor) else type(out).__name__
        return f"returns {got}"
    ref = torch.stack([probe[:, ci, dy::r, dx::r] for ci, dy, dx in phases], 1)
    if not torch.equal(out.to(torch.float64), ref):
        return "moves the elements differently"
    return None


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


def _fmt(pair: tuple) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"


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


# ----------------------------------------------------------------------------------------------
# --check-grad and --bench


class _Stop(Exception):
    pass


def _stem_input(ctx: TorchContext, m: StemMatch) -> Any:
    """The stem's input on the example inputs (the model runs until the stem is reached)."""
    import torch

    from ...capture.recorder import flatten_tensors

    g = ctx.graph
    if m.s2d.source in g.inputs:
        return flatten_tensors(ctx.inputs)[g.inputs.index(m.s2d.source)].detach()
    got: list = []

    def hook(_mod, args):
        got.append(flatten_tensors(args)[0].detach().clone())
        raise _Stop

    handle = m.stem.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            ctx.model(*ctx.inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def _grads(module: Any, x: Any, weight: Any, bias: Any) -> list:
    """Gradients of a fixed random projection of ``module(x)`` w.r.t. x, weight (and bias)."""
    import torch

    params = [p for p in (weight, bias) if p is not None]
    flags = [p.requires_grad for p in params]
    try:
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            for p in params:
                p.requires_grad_(True)
            out = module(xi)
            proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            loss = (out * proj.to(out.dtype)).sum()
            return [t.detach() for t in torch.autograd.grad(loss, [xi] + params)]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def map_gradient(grad: Any, s: SpaceToDepth) -> Any:
    """The original conv's weight gradient placed where the new conv's weight holds it."""
    return merge_weight(grad.double(), s.phases, s.r)


def _grad_check(m: StemMatch, replacement: Any, new: Any, x: Any, before: list) -> Any:
    from ...verify.compare import Tolerance, compare_arrays, summarise

    after = _grads(replacement, x, new.weight, new.bias)
    tol = Tolerance.default(x.dtype)
    name = f"grad {m.target}"
    diffs = [compare_arrays(f"{name} input", before[0].double().numpy(), after[0].double().numpy(), tol),
             compare_arrays(f"{name} weight", map_gradient(before[1], m.s2d).numpy(), after[1].double().numpy(), tol)]
    if len(before) > 2:
        diffs.append(compare_arrays(f"{name} bias", before[2].double().numpy(), after[2].double().numpy(), tol))
    return summarise([diffs], tol)


def _bench(module: Any, x: Any) -> float:
    """Median seconds of one forward of ``module`` on ``x`` (CPU, no grad)."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=1)
    with torch.no_grad():
        module(x)  # warm-up
        return timer.blocked_autorange(min_run_time=BENCH_MIN_TIME).median
