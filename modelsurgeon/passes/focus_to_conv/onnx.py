"""focus-to-conv on ONNX graphs.

Details: docs/architecture.md (*The ONNX back end*).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.onnx import EvaluationError, OnnxGraph, node_label, shape_of
from ...match.onnx import _attr, to_f64
from ...report.codes import Refusal
from ..base import Applied, Match, OnnxContext, Pass, Skipped

SHUFFLE = {"Gather", "Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze"}
MOVES = SHUFFLE | {"Slice", "Concat", "SpaceToDepth"}
TO_END = 2 ** 31 - 1
PROBE_SIZES = ((24, 48), (48, 72))  # divisible by 2, 3, 4, 6, 8, 12, 24; two sizes, never square


@dataclass
class FocusMatch(Match):
    conv: Any = None
    source: Any = None  # x
    nodes: list = field(default_factory=list)  # the space-to-depth subgraph
    phases: list = field(default_factory=list)
    r: int = 2


NOT_S2D = Refusal("not-a-pattern", "not a space-to-depth")
"""Marker of a measurement showing no sub-sampling at all (a reshuffle of channels)."""


UNEVALUABLE = "unevaluable"
"""The code of :func:`probe` getting no measurement: the reference evaluator cannot run the
subgraph at that shape."""


def _data_inputs(node: Any) -> list:
    if node.op_type == "Concat":
        return [v for v in node.inputs if v is not None]
    return [node.inputs[0]] if node.inputs else []


def region(g: OnnxGraph, s: Any) -> tuple[list, Any, bool] | Refusal | None:
    """The space-to-depth subgraph ending at ``s``, its one source tensor and whether it is
    a Reshape/Transpose reshuffle only (a space-to-depth only if measured so); ``None`` when
    there is no such subgraph, a reason when there is one that cannot be used."""
    nodes: dict[int, Any] = {}
    sources: dict[int, Any] = {}
    stack = [s]
    while stack:
        v = stack.pop()
        p = v.producer()
        if p is None or p.op_type not in MOVES or not g.is_default_domain(p) or g.is_const(v):
            sources[id(v)] = v
            continue
        if id(p) in nodes:
            continue
        nodes[id(p)] = p
        data = _data_inputs(p)
        for extra in p.inputs:
            if extra is not None and all(extra is not d for d in data) and not g.is_const(extra):
                return None  # computed indices / shapes: not a fixed data movement
        for d in data:
            q = d.producer()
            if p.op_type == "SpaceToDepth" or (p.op_type == "Slice" and (q is None or q.op_type != "Slice")):
                sources[id(d)] = d  # the tensor being split into phases
            else:
                stack.append(d)
    ops = [n.op_type for n in nodes.values()]
    explicit = "SpaceToDepth" in ops or (ops.count("Slice") >= 2 and any(_strided(g, n) for n in nodes.values()))
    reshuffle = not explicit and "Slice" not in ops and "Concat" not in ops and "Reshape" in ops and "Transpose" in ops
    if not explicit and not reshuffle:
        return None  # channel splits and the like: no sub-sampling, no space-to-depth
    if len(sources) != 1:
        if reshuffle:
            return None
        return Refusal("not-a-pattern", "the space-to-depth subgraph reads more than one tensor")
    order = {id(n): i for i, n in enumerate(g.graph)}
    members = sorted(nodes.values(), key=lambda n: order[id(n)])
    inside = {id(n) for n in members}
    for n in members:
        for o in n.outputs:
            if o is s:
                continue
            if o.is_graph_output() or any(id(c) not in inside for c in o.consumers()):
                return Refusal("other-readers", f"{node_label(n)}'s output is also read outside the space-to-depth")
    return members, next(iter(sources.values())), reshuffle


def _slice_params(g: OnnxGraph, node: Any):
    """(starts, ends, axes, steps) of a Slice as int lists, or None when not constant."""
    if g.opset < 10:
        starts, ends = list(_attr(node, "starts", [])), list(_attr(node, "ends", []))
        axes = list(_attr(node, "axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    arrays = []
    for i in range(1, 5):
        v = node.inputs[i] if len(node.inputs) > i else None
        if v is None:
            arrays.append(None)
            continue
        a = g.const_array(v)
        if a is None:
            return None
        arrays.append([int(x) for x in a.reshape(-1)])
    starts, ends, axes, steps = arrays
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return starts, ends, axes, steps


def _strided(g: OnnxGraph, node: Any) -> bool:
    if node.op_type != "Slice":
        return False
    params = _slice_params(g, node)
    return params is not None and any(step >= 2 for step in params[3])


def _size_independent(g: OnnxGraph, members: list, x: Any) -> Refusal | None:
    """Why the subgraph might act differently at other spatial sizes, or None."""
    for n in members:
        if n.op_type != "Slice":
            continue
        params = _slice_params(g, n)
        if params is None:
            return Refusal("computed-tensor", f"{node_label(n)} has computed parameters")
        for start, end, axis, step in zip(*params):
            axis = axis + 4 if axis < 0 else axis
            if axis in (2, 3) and not (0 <= start < step and end >= TO_END):
                return Refusal("size-dependent", f"{node_label(n)} slices [{start}:{end}:{step}] on a symbolic "
                               "spatial axis, which is not a space-to-depth at every input size")
    return None


def probe(g: OnnxGraph, members: list, x: Any, s: Any, shape: tuple[int, int, int, int]):
    """``(r, phases)`` measured on a labelled input of ``shape``, or a reason."""
    import numpy as np

    n, c, h, w = shape
    labels = np.arange(n * c * h * w, dtype=np.float64).reshape(shape)
    try:
        (out,) = g.run_nodes(members, {x: labels}, [s])
    except EvaluationError as e:
        return Refusal(UNEVALUABLE, f"the subgraph cannot be evaluated at size {h}x{w} ({e})")
    if out.ndim != 4 or out.shape[0] != n:
        return Refusal("not-a-pattern", f"its output has shape {list(out.shape)}, not a space-to-depth of {list(shape)}")
    _, c2, h2, w2 = out.shape
    if (h2, w2) == (h, w):
        return NOT_S2D
    if h2 == 0 or w2 == 0 or h % h2 or w % w2 or h // h2 != w // w2 or h // h2 < 2 or c2 != c * (h // h2) ** 2:
        return Refusal("not-a-pattern", f"its output has shape {list(out.shape)}, not a space-to-depth of {list(shape)}")
    r = h // h2
    first = out[0, :, 0, 0].astype(np.int64)
    ch, rem = first // (h * w), first % (h * w)
    dy, dx = rem // w, rem % w
    if (ch >= c).any() or (ch < 0).any():  # labels of another batch element
        return Refusal("not-a-pattern", "its output mixes batch elements")
    if (dy >= r).any() or (dx >= r).any() or len(set(zip(ch.tolist(), dy.tolist(), dx.tolist()))) != c2:
        return Refusal("not-a-pattern", "its channels are not the r x r phases of the input")
    rows = r * np.arange(h2)[None, :] + dy[:, None]
    cols = r * np.arange(w2)[None, :] + dx[:, None]
    expected = labels[:, ch[:, None, None], rows[:, :, None], cols[:, None, :]]
    if not np.array_equal(out, expected):
        return Refusal("not-a-pattern", "its output is not a space-to-depth of the input (measured)")
    return r, list(zip(ch.tolist(), dy.tolist(), dx.tolist()))


def _ints(node: Any, name: str, default: list) -> list:
    v = _attr(node, name, None)
    return list(v) if v is not None else list(default)


def conv_reason(g: OnnxGraph, conv: Any, channels: int) -> Refusal | None:
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    if w is None or not g.is_const(w):
        return Refusal("computed-tensor", "its weight is computed at run time")
    arr = g.const_array(w)
    if arr.ndim != 4:
        return Refusal("layer-settings", "it is not a 2-D convolution")
    if int(_attr(conv, "group", 1)) != 1:
        return Refusal("layer-settings", f"the conv is grouped (group={_attr(conv, 'group', 1)}): no single conv equals it")
    if any(d != 1 for d in _ints(conv, "dilations", [1, 1])):
        return Refusal("layer-settings", "the conv is dilated: no single conv equals it")
    pad = _attr(conv, "auto_pad", "NOTSET")
    pad = pad.decode() if isinstance(pad, bytes) else pad
    if pad not in ("NOTSET", "VALID"):
        return Refusal("layer-settings", f"auto_pad={pad}: its padding depends on the input size")
    if arr.shape[1] != channels:
        return Refusal("other-axis", f"the conv reads {arr.shape[1]} channels, the space-to-depth gives {channels}")
    return None


class FocusToConv(Pass):
    name = "focus-to-conv"
    backend = "onnx"

    def match(self, ctx: OnnxContext) -> Iterable[Match | Skipped]:
        g = ctx.graph
        for conv in g.nodes:
            if conv.op_type != "Conv" or not g.is_default_domain(conv) or not conv.inputs or conv.inputs[0] is None:
                continue
            s = conv.inputs[0]
            found = region(g, s)
            if found is None:
                continue
            label = node_label(conv)
            if isinstance(found, Refusal):
                yield Skipped(label, found)
                continue
            members, x, reshuffle = found
            result = None
            if reshuffle:  # a Reshape/Transpose reshuffle is a space-to-depth (reported) only if measured so
                result = self._measure(ctx, members, x, s, quiet=True)
                if result is None:
                    continue
            if s.is_graph_output() or any(c is not conv for c in s.consumers()):
                yield Skipped(label, f"the space-to-depth output is also read by {g.describe_readers(s)}",
                              code="other-readers")
                continue
            if result is None:  # the measurement runs the subgraph: only once the cheap check passed
                result = self._measure(ctx, members, x, s)
            if isinstance(result, Refusal):
                yield Skipped(label, result)
                continue
            r, phases = result
            why = conv_reason(g, conv, len(phases))
            if why:
                yield Skipped(label, why)
                continue
            yield FocusMatch(target=label, conv=conv, source=x, nodes=members, phases=phases, r=r)

    def _measure(self, ctx: OnnxContext, members: list, x: Any, s: Any, quiet: bool = False):
        """``(r, phases)``, or why not. ``quiet`` (a Reshape/Transpose reshuffle, which is a
        space-to-depth only if measured so): ``None`` unless the first measurement shows one."""
        g = ctx.graph
        decl = self._shape(ctx, x)
        if decl is None or len(decl) != 4:
            if quiet:
                return None
            return Refusal("input-size", "the rank of the tensor it splits is unknown" if decl is None
                           else "the tensor it splits is not 4-D")
        if not isinstance(decl[1], int):
            if quiet:
                return None
            return Refusal("input-size", "the channel count of the tensor it splits is symbolic")
        example = ctx.input_shapes.get(x.name) if x.is_graph_input() else None
        n = decl[0] if isinstance(decl[0], int) else (example[0] if example else 1)
        if isinstance(decl[2], int) and isinstance(decl[3], int):
            sizes = [(decl[2], decl[3])]
        else:
            why = _size_independent(g, members, x)
            if why:
                return None if quiet else why
            sizes = list(PROBE_SIZES)
            if example:
                sizes.insert(0, tuple(example[2:]))
        first = None
        for h, w in sizes:
            result = probe(g, members, x, s, (n, decl[1], h, w))
            if quiet and first is None and isinstance(result, Refusal):
                return None  # no sub-sampling (a channel shuffle), or not measurable: not recognised
            if result == NOT_S2D:
                result = Refusal("not-a-pattern", "its output is not sub-sampled: not a space-to-depth")
            if isinstance(result, Refusal):
                return result
            if first is not None and result != first:
                return Refusal("size-dependent", "its channel order depends on the input size")
            first = result
        if not isinstance(decl[0], int) and n < 2:  # a symbolic batch: no data may cross batch elements
            h, w = sizes[0]
            result = probe(g, members, x, s, (2, decl[1], h, w))
            if result != first and not (isinstance(result, Refusal) and result.code == UNEVALUABLE):
                return Refusal("not-a-pattern", "it moves data between batch elements (measured at batch 2)")
        return first

    @staticmethod
    def _shape(ctx: OnnxContext, x: Any) -> tuple | None:
        """The shape of ``x`` from the graph inputs' declared shapes (see the module docstring):
        a graph input's own declaration; otherwise the shape inference gives from the inputs,
        which replaces a possibly stale ``value_info``; failing that the ``value_info``, with H
        and W taken as symbolic when a graph input has a symbolic non-batch dimension."""
        decl = shape_of(x)
        if x.is_graph_input():
            return decl
        fresh = ctx.graph.propagated_shape(x)
        if fresh is not None:
            return fresh
        if decl is None or len(decl) != 4:
            return decl
        dynamic = any(not isinstance(d, int) for v in ctx.model.graph.inputs if not v.is_initializer()
                      for d in (shape_of(v) or (None, None))[1:])
        return (decl[0], decl[1], None, None) if dynamic else decl

    def rewrite(self, ctx: OnnxContext, m: FocusMatch) -> Applied:
        from ...rewrite.space_to_depth import merge_weight

        g, ed, conv, r = ctx.graph, ctx.editor, m.conv, m.r
        w_val = conv.inputs[1]
        w = g.const_array(w_val)
        kh, kw = w.shape[2:]
        k = _ints(conv, "kernel_shape", [kh, kw])
        st = _ints(conv, "strides", [1, 1])
        pads = [0, 0, 0, 0] if _attr(conv, "auto_pad", "NOTSET") in ("VALID", b"VALID") else _ints(conv, "pads", [0, 0, 0, 0])
        new_w = merge_weight(to_f64(w), m.phases, r).numpy()
        shared = len(w_val.uses()) > 1
        ed.write_tensor(conv, 1, new_w, w_val.name or f"{m.target}_weight", w.dtype)
        ed.set_input(conv, 0, m.source)
        ed.set_attr(conv, "kernel_shape", [r * k[0], r * k[1]])
        ed.set_attr(conv, "strides", [r * st[0], r * st[1]])
        ed.set_attr(conv, "pads", [r * p for p in pads])
        conv.attributes.pop("auto_pad", None)
        if "dilations" in conv.attributes:
            ed.set_attr(conv, "dilations", [1, 1])
        ed.remove_nodes(m.nodes)
        counts = Counter(n.op_type for n in m.nodes)
        what = " + ".join(f"{op}×{c}" if c > 1 else op for op, c in counts.items())
        detail = (f"{what} (r={r}) + Conv k{_fmt(k)} s{_fmt(st)} p{_fmt(pads)} → Conv k{_fmt([r * v for v in k])} "
                  f"s{_fmt([r * v for v in st])} p{_fmt([r * v for v in pads])} on {m.source.name}")
        if shared:
            detail += " (its weight is shared: written as a new initializer)"
        return Applied(m.target, detail, {
            "layer": m.target, "factor": r, "source": m.source.name,
            "removed": [node_label(n) for n in m.nodes],
            "kernel": [r * k[0], r * k[1]], "stride": [r * st[0], r * st[1]], "padding": [r * p for p in pads],
        })


def _fmt(values: list) -> str:
    """``3`` when every axis has the same value, else the full list ``[1,2]``."""
    values = [int(v) for v in values]
    return str(values[0]) if len(set(values)) == 1 else "[" + ",".join(map(str, values)) + "]"
