"""split-sequences: ``SplitToSequence`` read only by ``SequenceAt`` at constant positions → one
``Split`` (the dynamo exporter writes ``torch.chunk`` / ``split`` so).

The pieces' sizes must be known: a ``split`` input (a constant, or a scalar chunk size along a
static axis). ``keepdims = 0`` without ``split`` (pieces squeezed) is left as it is.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, const, default_domain, facts


class SplitSequences(CleanupPass):
    name = "split-sequences"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        g = ctx.graph
        if g.opset < 11:
            return
        for node in g.nodes:
            if node.op_type != "SplitToSequence" or not default_domain(ctx, node) or not node.inputs:
                continue
            seq = node.outputs[0]
            readers = list(seq.consumers())
            if seq.is_graph_output() or not readers or any(r.op_type != "SequenceAt" or r.inputs[0] is not seq
                                                           for r in readers):
                continue
            sizes = _sizes(ctx, node, facts(ctx))
            if sizes is None:
                continue
            picks = []
            for r in readers:
                i = const(ctx, r.inputs[1]) if len(r.inputs) > 1 else None
                if i is None or i.size != 1:
                    break
                i = int(i.reshape(-1)[0])
                i = i + len(sizes) if i < 0 else i
                if not 0 <= i < len(sizes):
                    break
                picks.append((r, i))
            else:
                yield NodeMatch(node_label(node), node=node, data={"sizes": sizes, "picks": picks})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np
        import onnx_ir as ir

        node, ed, sizes = m.node, ctx.editor, m.data["sizes"]
        axis = int(attr(node, "axis", 0))
        name = ed.unique_name(f"{node.name or 'split'}_split")
        if ctx.graph.opset >= 13:
            split_sizes = ed.add_initializer(np.array(sizes, np.int64), f"{name}_sizes")
            new = ir.Node("", "Split", [node.inputs[0], split_sizes], [ir.AttrInt64("axis", axis)],
                          num_outputs=len(sizes), name=name)
        else:
            new = ir.Node("", "Split", [node.inputs[0]], [ir.AttrInt64("axis", axis), ir.AttrInt64s("split", sizes)],
                          num_outputs=len(sizes), name=name)
        for k, o in enumerate(new.outputs):
            o.name = ed.unique_name(f"{name}_output_{k}")
        ctx.model.graph.insert_after(node, new)
        for r, i in m.data["picks"]:
            ed.replace_value(r.outputs[0], new.outputs[i])
        label = node_label(node)
        ed.remove_nodes([r for r, _ in m.data["picks"]] + [node])
        return Applied(label, f"SplitToSequence + {len(m.data['picks'])} SequenceAt → Split {sizes}")


def _sizes(ctx: OnnxContext, node: Any, p: Any) -> list[int] | None:
    shape = p.fact(node.inputs[0]).shape
    axis = int(attr(node, "axis", 0))
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    dim = shape[axis]
    split = node.inputs[1] if len(node.inputs) > 1 else None
    if split is None:
        return [1] * dim if isinstance(dim, int) and int(attr(node, "keepdims", 1)) == 1 else None
    s = const(ctx, split)
    if s is None:
        s = p.fact(split).array
    if s is None:
        return None
    if s.ndim == 1:
        return [int(v) for v in s]
    if not isinstance(dim, int) or int(s) <= 0:
        return None
    step = int(s)
    return [min(step, dim - k) for k in range(0, dim, step)]
