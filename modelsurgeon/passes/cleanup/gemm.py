"""fuse-gemm: ``MatMul(A, B)`` + ``Add(C)`` → ``Gemm(A, B, C)``.

Exact when ``A`` is a matrix (rank 2), ``B`` a constant matrix, ``C`` a constant that broadcasts
to the product's shape without enlarging it ([N], [1, N], [M, N], a scalar) and of the same
type, and the product has no other reader. (A MatMul of higher rank -- a transformer's
``[B, T, C] @ [C, D]`` -- stays a MatMul: a Gemm would need Reshapes around it.)
"""

from __future__ import annotations

from typing import Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, const, default_domain, facts


class FuseGemm(CleanupPass):
    name = "fuse-gemm"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        g = ctx.graph
        if g.opset < 7:  # Gemm's C broadcast needed an attribute then
            return
        for node in g.nodes:
            if node.op_type != "MatMul" or not default_domain(ctx, node) or len(node.inputs) != 2:
                continue
            a, b = node.inputs
            y = node.outputs[0]
            add = g.sole_reader(y)
            if add is None or add.op_type != "Add" or not default_domain(ctx, add) or len(add.inputs) != 2:
                continue
            p = facts(ctx)  # computed once, on the first candidate
            sa, sy = p.fact(a).shape, p.fact(y).shape
            w = const(ctx, b)
            c_val = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
            c = const(ctx, c_val)
            if sa is None or len(sa) != 2 or w is None or w.ndim != 2 or c is None or sy is None or len(sy) != 2:
                continue
            if g.is_const(a) or c.dtype != w.dtype or c.ndim > 2 or not _fits(c.shape, sy):
                continue
            yield NodeMatch(node_label(node), node=node, data={"add": add, "c": c_val})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        ed, node, add = ctx.editor, m.node, m.data["add"]
        gemm = ed.add_node("Gemm", [node.inputs[0], node.inputs[1], m.data["c"]], add, f"{node.name or 'matmul'}_gemm")
        label = node_label(node)
        ed.replace_value(add.outputs[0], gemm.outputs[0])
        ed.remove_nodes([add, node])
        return Applied(label, f"MatMul + Add {node_label(add)} → Gemm")


def _fits(c_shape: tuple, y_shape: tuple) -> bool:
    """Does ``C`` broadcast (unidirectionally) to the product's shape?"""
    rank = len(y_shape)
    for i, d in enumerate(c_shape):
        target = y_shape[i - len(c_shape) + rank]
        if d != 1 and d != target:
            return False
    return True
