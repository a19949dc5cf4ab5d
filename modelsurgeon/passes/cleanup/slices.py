"""merge-slices: ``Slice(Slice(x))`` on different axes → one ``Slice`` (the exporters' ``x[:, a:b,
c:d]`` written one axis at a time). Exact: slices of distinct axes commute and combine. Both
need constant starts / ends / axes / steps (opset ≥ 10 inputs) and a known input rank; the inner
one must have no other reader.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, const, default_domain, facts


def _params(ctx: OnnxContext, node: Any) -> list[list[int]] | None:
    """[starts, ends, axes, steps] of a Slice with constant inputs, axes non-negative, else None."""
    if node is None or node.op_type != "Slice" or not default_domain(ctx, node) or len(node.inputs) < 3:
        return None
    shape = facts(ctx).fact(node.inputs[0]).shape
    if shape is None:
        return None
    arrays = [const(ctx, v) if v is not None else None for v in list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))]
    if arrays[0] is None or arrays[1] is None or any(a is None and v is not None for a, v in zip(arrays, node.inputs[1:5])):
        return None
    starts, ends = arrays[0].reshape(-1).tolist(), arrays[1].reshape(-1).tolist()
    axes = arrays[2].reshape(-1).tolist() if arrays[2] is not None else list(range(len(starts)))
    steps = arrays[3].reshape(-1).tolist() if arrays[3] is not None else [1] * len(starts)
    rank = len(shape)
    axes = [a + rank if a < 0 else a for a in axes]
    if not all(0 <= a < rank for a in axes) or len(set(axes)) != len(axes):
        return None
    return [starts, ends, axes, steps]


class MergeSlices(CleanupPass):
    name = "merge-slices"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        for node in ctx.graph.nodes:
            outer = _params(ctx, node)
            if outer is None:
                continue
            readers = list(node.outputs[0].consumers())
            if len(readers) == 1 and not node.outputs[0].is_graph_output() and _params(ctx, readers[0]) is not None:
                continue  # the end of the chain merges it
            chain, merged = [node], outer
            while True:
                x = chain[0].inputs[0]
                prev = x.producer() if x is not None else None
                p = _params(ctx, prev)
                if p is None or x.is_graph_output() or len(x.uses()) != 1 or set(p[2]) & set(merged[2]):
                    break
                chain.insert(0, prev)
                merged = [a + b for a, b in zip(p, merged)]
            if len(chain) > 1:
                yield NodeMatch(node_label(node), node=node, data={"chain": chain, "params": merged})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        ed, chain = ctx.editor, m.data["chain"]
        last, base = chain[-1], chain[-1].name or "slice"
        inputs = [chain[0].inputs[0]] + [ed.add_initializer(np.array(v, np.int64), f"{base}_{what}")
                                         for v, what in zip(m.data["params"], ("starts", "ends", "axes", "steps"))]
        new = ed.add_node("Slice", inputs, last, f"{base}_merged")
        ed.replace_value(last.outputs[0], new.outputs[0])
        ed.remove_nodes(reversed(chain))
        return Applied(m.target, f"{len(chain)} Slices → one on axes {m.data['params'][2]}", {"merged": len(chain)})
