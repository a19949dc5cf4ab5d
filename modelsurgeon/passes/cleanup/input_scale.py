"""fold-input-scale: a ``Mul`` by a constant scalar or per-channel scale whose every reader is a
``Conv`` (as its data input) is folded into those convs' weights: ``conv(x·s, W) = conv(x, W·s)``
with ``s`` over the input channels -- zero padding stays zero (NF-ResNet's ``act(x) * beta``
before each block's first conv). Left as it is when another node reads the scaled tensor, the
scale broadcasts ``x`` to a larger shape or type, or a weight is not a constant.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, const, default_domain, facts


def _channel_scale(c: Any, shape: tuple) -> Any:
    """The scale per input channel (a 1-D array, or a scalar array), or None."""
    if c.size == 1:
        return c.reshape(())
    if c.ndim > len(shape) or len(shape) < 2 or not isinstance(shape[1], int):
        return None
    full = (1,) * (len(shape) - c.ndim) + tuple(c.shape)
    if full[1] != shape[1] or any(d != 1 for i, d in enumerate(full) if i != 1):
        return None
    return c.reshape(-1)


class FoldInputScale(CleanupPass):
    name = "fold-input-scale"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        g, p = ctx.graph, facts(ctx)
        for node in g.nodes:
            if node.op_type != "Mul" or not default_domain(ctx, node) or len(node.inputs) != 2:
                continue
            y = node.outputs[0]
            uses = list(y.uses())
            if y.is_graph_output() or not uses or not all(
                    u[0].op_type == "Conv" and default_domain(ctx, u[0]) and u[1] == 0 and len(u[0].inputs) > 1
                    and const(ctx, u[0].inputs[1]) is not None for u in uses):
                continue
            for k in (1, 0):
                c, x = const(ctx, node.inputs[k]), node.inputs[1 - k]
                if c is None or x is None or g.is_const(x) or c.dtype.kind != "f" or x.dtype != y.dtype:
                    continue
                shape = p.fact(x).shape
                if shape is None or shape != p.fact(y).shape:
                    continue
                s = _channel_scale(c, shape)
                if s is not None:
                    yield NodeMatch(node_label(node), node=node, data={"x": x, "scale": s,
                                                                       "convs": list({id(u[0]): u[0] for u in uses}.values())})
                    break

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        ed, s = ctx.editor, np.asarray(m.data["scale"], np.float64)
        for conv in m.data["convs"]:
            w = const(ctx, conv.inputs[1])
            if s.ndim:  # input channel j of group gi is channel gi·(C/g) + j
                groups, cin = int(attr(conv, "group", 1)), w.shape[1]
                per_out = w.shape[0] // groups
                idx = (np.arange(w.shape[0])[:, None] // per_out) * cin + np.arange(cin)[None, :]
                factor = s[idx].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
            else:
                factor = s
            ed.write_tensor(conv, 1, (w.astype(np.float64) * factor).astype(w.dtype),
                            f"{conv.name or 'conv'}_weight_scaled")
            ed.set_input(conv, 0, m.data["x"])
        ed.remove_nodes([m.node])
        shown = float(s) if not s.ndim else f"{s.size} channels"
        return Applied(m.target, f"Mul by {shown} folded into {len(m.data['convs'])} Conv weight(s)",
                       {"convs": len(m.data["convs"])})
