"""focus-to-conv on PyTorch models, the pattern: a space-to-depth of factor r found in the recorded
graph (strided slices + concatenation, pixel_unshuffle, or a rearranging module probed with an
index tensor), as the phase (c, dy, dx) of every output channel.
Details: docs/architecture.md (*focus-to-conv, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...capture.graph import OUTPUT, VIEW_OPS, DataflowGraph, ModuleCall, OpEvent, Ref
from ...match import dims
from ...rewrite.space_to_depth import Phase, pixel_unshuffle_phases
from ...report.codes import Refusal
from ..base import Match, Skipped

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


def _fmt(pair: tuple) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}x{pair[1]}"
