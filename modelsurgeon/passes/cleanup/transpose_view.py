"""transpose-to-reshape: a ``Transpose`` that only moves dimensions of size 1 keeps the element
order, so it is a ``Reshape`` to its output shape (which ``merge-reshapes`` then merges with
the views around it: ConvNeXt's ``LayerNorm2d`` on a pooled ``[N, C, 1, 1]`` before the
flatten). Symbolic sizes count as larger than 1; the target is written as ``merge-reshapes``
writes its own (``0`` copies a symbolic size kept in place).
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, default_domain, facts, to_reshape
from .views import target_for


class TransposeToReshape(CleanupPass):
    name = "transpose-to-reshape"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        for node in ctx.graph.nodes:
            if node.op_type != "Transpose" or not default_domain(ctx, node) or not node.inputs:
                continue
            perm = attr(node, "perm")
            shape = facts(ctx).fact(node.inputs[0]).shape
            if perm is None or shape is None or len(perm) != len(shape) or list(perm) == list(range(len(perm))):
                continue
            moved = [i for i in perm if shape[i] != 1]
            if moved != sorted(moved):
                continue
            target = target_for(shape, tuple(shape[i] for i in perm))
            if target is not None:
                yield NodeMatch(node_label(node), node=node, data={"target": target, "perm": list(perm)})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        what = f"Transpose {m.data['perm']} moves only sizes of 1 → Reshape {m.data['target']}"
        return to_reshape(ctx, m.node, m.data["target"], what, "transpose")
