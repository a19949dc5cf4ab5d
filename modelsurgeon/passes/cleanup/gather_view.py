"""gather-to-reshape: a ``Gather`` by the constant indices ``0, 1, …, n-1`` (in any shape) along
an axis of static size ``n`` picks every element in order, so it is a ``Reshape`` to its output
shape (the dynamo exporter's ``as_strided`` of a pooled ``[N, C, 1, 1]``: flatten, gather by
``arange(C)`` shaped ``[1, 1, 1, C]``), which ``merge-reshapes`` then merges with its neighbours.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, const, default_domain, facts, to_reshape
from .views import target_for


class GatherToReshape(CleanupPass):
    name = "gather-to-reshape"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        import numpy as np

        p = facts(ctx)
        for node in ctx.graph.nodes:
            if node.op_type != "Gather" or not default_domain(ctx, node) or len(node.inputs) != 2:
                continue
            shape, idx = p.fact(node.inputs[0]).shape, const(ctx, node.inputs[1])
            if shape is None or idx is None or idx.dtype.kind not in "iu" or not shape:
                continue
            axis = int(attr(node, "axis", 0))
            axis = axis + len(shape) if axis < 0 else axis
            n = shape[axis] if 0 <= axis < len(shape) else None
            if not isinstance(n, int) or idx.size != n or not np.array_equal(idx.reshape(-1), np.arange(n)):
                continue
            dst = tuple(shape[:axis]) + tuple(int(d) for d in idx.shape) + tuple(shape[axis + 1:])
            target = target_for(shape, dst)
            if target is not None:
                yield NodeMatch(node_label(node), node=node, data={"target": target})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        what = f"Gather of every index in order → Reshape {m.data['target']}"
        return to_reshape(ctx, m.node, m.data["target"], what, "gather")
