"""resize-scales: a ``Resize`` to ``sizes`` computed at run time (``F.interpolate(x,
size=skip.shape[-2:])``) → a ``Resize`` by constant ``scales``, when the sizes are known (a
symbolic size only where it is the input's own) and each ratio is exact.

onnxruntime resizes to ``sizes`` with the ratio ``size / input`` in float32 and to ``scales``
with ``floor(input × scale)`` as the size: the two agree when that floor gives the size back,
which is checked for every axis. Left alone: ``axes`` or a ``keep_aspect_ratio_policy`` other
than ``stretch``, and ratios that do not round-trip.
"""

from __future__ import annotations

from typing import Iterable

from ...capture.onnx import node_label
from ...capture.onnx_shapes import Dim
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, default_domain, facts


class ResizeScales(CleanupPass):
    name = "resize-scales"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        g = ctx.graph
        if g.opset < 11:
            return
        for node in g.nodes:
            if node.op_type != "Resize" or not default_domain(ctx, node) or len(node.inputs) < 4:
                continue
            sizes = node.inputs[3]
            if sizes is None or g.is_const(sizes) or attr(node, "axes") is not None:
                continue
            policy = attr(node, "keep_aspect_ratio_policy", "stretch")
            if (policy.decode() if isinstance(policy, bytes) else policy) != "stretch":
                continue
            p = facts(ctx)
            scales = _scales(p.fact(node.inputs[0]).shape, p.fact(sizes).elems)
            if scales is not None:
                yield NodeMatch(node_label(node), node=node, data={"scales": scales})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        node, ed = m.node, ctx.editor
        scales = ed.add_initializer(np.array(m.data["scales"], np.float32), f"{node.name or 'resize'}_scales")
        ed.set_input(node, 2, scales)
        node.replace_input_with(3, None)
        node.resize_inputs(3)
        return Applied(m.target, f"sizes computed at run time → scales {m.data['scales']}")


def _scales(src: tuple | None, sizes: tuple | None) -> list[float] | None:
    import numpy as np

    if src is None or sizes is None or len(src) != len(sizes):
        return None
    out = []
    for d, s in zip(src, sizes):
        if isinstance(s, Dim) and s == d:
            out.append(1.0)
        elif isinstance(s, int) and not isinstance(s, bool) and isinstance(d, int) and d > 0 and s > 0:
            scale = np.float32(s) / np.float32(d)
            if int(np.floor(np.float32(d) * scale)) != s:
                return None
            out.append(float(scale))
        else:
            return None
    return out
