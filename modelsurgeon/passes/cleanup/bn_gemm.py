"""fold-bn-into-gemm: an inference ``BatchNormalization`` of a ``[M, C]`` tensor read only by
``Gemm`` nodes (as their ``A``, constant ``B``) is folded into them: ``(x·s + t)·B = x·(s⊙B) +
t·B`` -- the scale into ``B``'s rows over ``C``, ``t·B`` into the bias (LeViT's ``NormLinear``
heads: BatchNorm1d, then Linear).
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, bn_affine, const, default_domain, facts


def _reads_as_a(ctx: OnnxContext, use: tuple) -> bool:
    node, index = use
    return (node.op_type == "Gemm" and default_domain(ctx, node) and index == 0 and not int(attr(node, "transA", 0))
            and len(node.inputs) > 1 and node.inputs[0] is not node.inputs[1] and const(ctx, node.inputs[1]) is not None
            and (len(node.inputs) < 3 or node.inputs[2] is None or const(ctx, node.inputs[2]) is not None)
            and (float(attr(node, "beta", 1.0)) != 0.0 or len(node.inputs) < 3 or node.inputs[2] is None))


class FoldBnIntoGemm(CleanupPass):
    name = "fold-bn-into-gemm"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        p = facts(ctx)
        for bn in ctx.graph.nodes:
            if bn.op_type != "BatchNormalization" or not bn.inputs or bn.inputs[0] is None:
                continue
            y, shape = bn.outputs[0], p.fact(bn.inputs[0]).shape
            uses = list(y.uses())
            if y.is_graph_output() or not uses or shape is None or len(shape) != 2 \
                    or not all(_reads_as_a(ctx, u) for u in uses):
                continue
            affine = bn_affine(ctx, bn, shape[1])
            if affine is not None:
                yield NodeMatch(node_label(bn), node=bn, data={"gemms": list({id(u[0]): u[0] for u in uses}.values()),
                                                               "affine": affine})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        ed, bn = ctx.editor, m.node
        scale, shift = m.data["affine"]
        for gemm in m.data["gemms"]:
            b = const(ctx, gemm.inputs[1])
            trans_b = int(attr(gemm, "transB", 0))
            bm = b.astype(np.float64).T if trans_b else b.astype(np.float64)  # [C, O]
            alpha, beta_ = float(attr(gemm, "alpha", 1.0)), float(attr(gemm, "beta", 1.0))
            has_c = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
            c_old = np.asarray(const(ctx, gemm.inputs[2]), np.float64) if has_c else np.zeros(())
            if not has_c:
                beta_ = 1.0
                ed.set_attr(gemm, "beta", 1.0)
            c_new = c_old + (alpha / beta_) * (shift @ bm)
            scaled = bm * scale[:, None]
            ed.write_tensor(gemm, 1, (scaled.T if trans_b else scaled).astype(b.dtype), f"{gemm.name or 'gemm'}_b_bn")
            ed.write_tensor(gemm, 2, c_new.astype(b.dtype), f"{gemm.name or 'gemm'}_c_bn")
            ed.set_input(gemm, 0, bn.inputs[0])
        ed.remove_nodes([bn])
        return Applied(m.target, f"folded into {len(m.data['gemms'])} Gemm(s)", {"channels": int(scale.size)})
