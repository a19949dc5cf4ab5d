"""merge-concats: a ``Concat`` read only by another ``Concat`` on the same axis is spliced into
it -- ``Concat(a, Concat(b, c), d)`` → ``Concat(a, b, c, d)`` (Inception's branches that
concatenate two convs and are concatenated again). Exact: the same elements in the same order.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, default_domain, facts


def _axis(ctx: OnnxContext, node: Any) -> int | None:
    """The Concat's axis, made non-negative when the rank is known."""
    if node is None or node.op_type != "Concat" or not default_domain(ctx, node):
        return None
    axis = attr(node, "axis")
    if axis is None:
        return None
    shape = facts(ctx).fact(node.outputs[0]).shape
    if axis < 0:
        return axis + len(shape) if shape is not None else None
    return axis


def _inner(ctx: OnnxContext, value: Any, axis: int) -> Any:
    """The Concat producing ``value`` if it can be spliced into a reader on ``axis``."""
    node = value.producer() if value is not None else None
    if node is None or _axis(ctx, node) != axis or value.is_graph_output() or len(value.uses()) != 1:
        return None
    return node


def _flatten(ctx: OnnxContext, node: Any, axis: int, inner: list) -> list:
    """``node``'s inputs with every spliceable inner Concat replaced by its own inputs."""
    out: list = []
    for v in node.inputs:
        sub = _inner(ctx, v, axis)
        if sub is None:
            out.append(v)
        else:
            inner.append(sub)
            out.extend(_flatten(ctx, sub, axis, inner))
    return out


class MergeConcats(CleanupPass):
    name = "merge-concats"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        for node in ctx.graph.nodes:
            axis = _axis(ctx, node)
            if axis is None:
                continue
            readers = list(node.outputs[0].consumers())
            outer = _axis(ctx, readers[0]) if len(readers) == 1 else None
            if outer is not None and _inner(ctx, node.outputs[0], outer) is not None:
                continue  # spliced into its reader: the outermost Concat's match covers it
            inner: list = []
            inputs = _flatten(ctx, node, axis, inner)
            if inner:
                yield NodeMatch(node_label(node), node=node, data={"inputs": inputs, "inner": inner, "axis": axis})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        ed, node = ctx.editor, m.node
        new = ed.add_node("Concat", list(m.data["inputs"]), node, f"{node.name or 'concat'}_merged",
                          {"axis": m.data["axis"]})
        ed.replace_value(node.outputs[0], new.outputs[0])
        ed.remove_nodes([node, *m.data["inner"]])
        return Applied(m.target, f"{len(m.data['inner'])} inner Concat(s) spliced in: "
                       f"{len(m.data['inputs'])} inputs on axis {m.data['axis']}", {"merged": len(m.data["inner"])})
