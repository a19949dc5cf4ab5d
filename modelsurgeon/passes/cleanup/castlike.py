"""castlike-to-cast: ``CastLike(x, like)`` where the type of ``like`` is known → ``Cast(x, to)``.

The dynamo exporter writes zero biases as ``Expand(CastLike(0, activation), Shape(weight))``: the
activation only lends its type, but its presence makes the bias look computed at run time. As a
``Cast`` of a constant it is folded like any constant.
"""

from __future__ import annotations

from typing import Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, default_domain


class CastLikeToCast(CleanupPass):
    name = "castlike-to-cast"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        for node in ctx.graph.nodes:
            if node.op_type != "CastLike" or not default_domain(ctx, node) or len(node.inputs) != 2:
                continue
            like = node.inputs[1]
            if like is None or like.dtype is None or node.inputs[0] is None:
                continue
            yield NodeMatch(node_label(node), node=node, data={"to": int(like.dtype)})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        node, ed = m.node, ctx.editor
        attrs = {"to": m.data["to"]}
        saturate = attr(node, "saturate")
        if saturate is not None and ctx.graph.opset >= 19:
            attrs["saturate"] = int(saturate)
        cast = ed.add_node("Cast", [node.inputs[0]], node, f"{node.name or 'castlike'}_cast", attrs)
        import onnx_ir as ir

        label = node_label(node)
        ed.replace_value(node.outputs[0], cast.outputs[0])
        ed.remove_nodes([node])
        return Applied(label, f"CastLike → Cast to {ir.DataType(m.data['to']).name}")
