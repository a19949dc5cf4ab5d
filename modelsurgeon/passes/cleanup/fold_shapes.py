"""fold-shapes: what exporters compute from shapes, made constant where the shapes allow.

With the shape facts of :mod:`modelsurgeon.capture.onnx_shapes`:

* a value computed at run time whose every element is known (``Shape`` of a static tensor, the
  TF "SAME" padding arithmetic, a ``Range`` grid over a static size) becomes an initializer --
  only at the frontier, where a reader still computes on activations; the sub-graph behind it
  is then dead;
* a ``Reshape`` target known element by element but partly symbolic (``x.view(x.size(0), -1)``
  with a symbolic batch) becomes a constant: a symbolic element equal to the input's size at
  the same position is written ``0`` (copy), one other symbolic element ``-1`` (inferred) --
  exact at every size;
* an ``Expand`` target likewise, a symbolic element equal to the input's aligned size written 1.

Symbolic sizes are never replaced by numbers: a ``Shape`` of a tensor with a symbolic
dimension stays, unless only static dimensions of it are used.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ...capture.onnx_shapes import Dim, MAX_ARRAY_BYTES
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, default_domain, facts


class FoldShapes(CleanupPass):
    name = "fold-shapes"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        g, p = ctx.graph, facts(ctx)
        for node in g.nodes:
            if not default_domain(ctx, node):
                continue
            for out in node.outputs:
                arr = _frontier(ctx, p, out)
                if arr is not None:
                    yield NodeMatch(out.name or node_label(node), node=node,
                                    data={"kind": "value", "value": out, "array": arr})
            if node.op_type in ("Reshape", "Expand") and len(node.inputs) == 2 and node.inputs[1] is not None:
                target = node.inputs[1]
                if g.is_const(target) or p.fact(target).known:
                    continue
                enc = _encode(node, p)
                if enc is not None:
                    yield NodeMatch(node_label(node), node=node, data={"kind": node.op_type, "target": enc})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        ed = ctx.editor
        if m.data["kind"] == "value":
            v, arr = m.data["value"], m.data["array"]
            shown = arr.reshape(-1).tolist()[:8]
            ed.replace_with_constant(v, arr)
            return Applied(m.target, f"computed from shapes: {shown}{' ...' if arr.size > 8 else ''}",
                           {"shape": list(arr.shape)})
        node, target = m.node, m.data["target"]
        const = ed.add_initializer(np.array(target, np.int64), f"{node.name or node.op_type}_shape")
        ed.set_input(node, 1, const)
        if node.op_type == "Reshape" and 0 in target and int(attr(node, "allowzero", 0)):
            ed.set_attr(node, "allowzero", 0)  # the zeros written here copy the input's sizes
        return Applied(m.target, f"{node.op_type} target {target}", {"target": target})


def _frontier(ctx: OnnxContext, p: Any, out: Any):
    """The array to write for ``out`` if it is fully known, computed at run time, and read by a
    node that still computes on activations (or by a subgraph / other domain)."""
    g = ctx.graph
    f = p.fact(out)
    if not f.known or out.is_graph_output() or g.is_const(out) or not out.uses():
        return None
    if f.array.nbytes > MAX_ARRAY_BYTES or f.array.dtype.kind not in "biuf":
        return None
    for reader in out.consumers():
        if not default_domain(ctx, reader) or not all(p.fact(o).known for o in reader.outputs):
            return f.array.astype(out.dtype.numpy()) if out.dtype is not None else f.array
    return None


def _encode(node: Any, p: Any) -> list[int] | None:
    """A constant target for a Reshape / Expand whose target elements are known but partly
    symbolic (see the module docstring), or None."""
    src, tgt = p.fact(node.inputs[0]), p.fact(node.inputs[1])
    if tgt.elems is None or src.shape is None or tgt.shape is None or len(tgt.shape) != 1:
        return None
    out: list[int] = []
    if node.op_type == "Reshape":
        # allowzero=1 (the dynamo exporter's): 0 would be a literal size; without literal zeros in
        # the target, the node can drop it and 0 mean "copy" again
        allowzero = int(attr(node, "allowzero", 0)) and any(isinstance(e, int) and e == 0 for e in tgt.elems)
        free = [i for i, e in enumerate(tgt.elems) if not isinstance(e, int) or isinstance(e, bool)]
        if any(isinstance(e, int) and e == -1 for e in tgt.elems):
            free.append(-1)
        for i, e in enumerate(tgt.elems):
            if isinstance(e, Dim) and not allowzero and i < len(src.shape) and src.shape[i] == e:
                out.append(0)
                free.remove(i)
            elif isinstance(e, int) and not isinstance(e, bool):
                out.append(int(e))
            else:
                out.append(-1)
        return out if len(free) <= 1 else None
    rank = len(tgt.elems)
    for i, e in enumerate(tgt.elems):
        j = i - rank + len(src.shape)
        if isinstance(e, int) and not isinstance(e, bool):
            out.append(int(e))
        elif isinstance(e, Dim) and j >= 0 and src.shape[j] == e:
            out.append(1)
        else:
            return None
    return out
