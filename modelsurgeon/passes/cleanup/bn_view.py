"""fold-bn-through-view: ``BatchNormalization(view(MatMul(a, W)))`` where the view flattens the
MatMul's leading axes to ``[M, C]`` and keeps its last axis ``C`` as the channel axis → the
scale folded into ``W``'s columns and the shift added before the view (LeViT's ``LinearNorm``:
``bn(linear(x).flatten(0, 1)).reshape_as(...)``); ``merge-reshapes`` then removes the
flatten-and-back. Only inference-mode BatchNorms; the MatMul's output and the view's must have
no other reader.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, bn_affine, const, default_domain, facts


def _sole(value: Any) -> Any:
    uses = list(value.uses())
    return uses[0][0] if len(uses) == 1 and not value.is_graph_output() else None


class FoldBnThroughView(CleanupPass):
    name = "fold-bn-through-view"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        p = facts(ctx)
        for bn in ctx.graph.nodes:
            if bn.op_type != "BatchNormalization" or not bn.inputs:
                continue
            view = bn.inputs[0].producer() if bn.inputs[0] is not None else None
            if view is None or view.op_type not in ("Flatten", "Reshape") or _sole(bn.inputs[0]) is not bn:
                continue
            mm = view.inputs[0].producer() if view.inputs[0] is not None else None
            if mm is None or mm.op_type != "MatMul" or not default_domain(ctx, mm) or _sole(mm.outputs[0]) is not view:
                continue
            w = const(ctx, mm.inputs[1])
            xs, ys = p.fact(bn.inputs[0]).shape, p.fact(mm.outputs[0]).shape
            if w is None or w.ndim != 2 or w.dtype.kind != "f" or xs is None \
                    or ys is None or len(xs) != 2 or not isinstance(xs[1], int) or not xs[1] == ys[-1] == w.shape[1]:
                continue
            affine = bn_affine(ctx, bn, xs[1])
            if affine is not None:
                yield NodeMatch(node_label(bn), node=bn, data={"view": view, "mm": mm, "w": w, "affine": affine})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        ed, bn, view, mm, w = ctx.editor, m.node, m.data["view"], m.data["mm"], m.data["w"]
        scale, shift = m.data["affine"]
        ed.write_tensor(mm, 1, (w.astype(np.float64) * scale[None, :]).astype(w.dtype), f"{mm.name or 'matmul'}_weight_bn")
        bias = ed.add_initializer(shift.astype(w.dtype), f"{bn.name or 'bn'}_shift")
        add = ed.add_node("Add", [mm.outputs[0], bias], mm, f"{bn.name or 'bn'}_add")
        ed.set_input(view, 0, add.outputs[0])
        ed.replace_value(bn.outputs[0], view.outputs[0])
        ed.remove_nodes([bn])
        return Applied(m.target, f"folded into {node_label(mm)}'s weight + an Add before the {view.op_type}",
                       {"channels": int(scale.size)})
