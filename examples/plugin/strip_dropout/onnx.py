"""strip-dropout on ONNX graphs: ``Dropout`` nodes in inference mode removed, their readers
reading the input instead. Kept: a Dropout in training mode (or one whose mode is computed), one
whose mask output is read, and one between a graph input and a graph output (an Identity would
take its place: nothing gained)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from modelsurgeon.passes.base import Applied, Match, OnnxContext, Pass, Skipped
from modelsurgeon.report.codes import Refusal


@dataclass
class DropoutNode(Match):
    node: Any = None


class StripDropout(Pass):
    name = "strip-dropout"
    backend = "onnx"

    def match(self, ctx: OnnxContext) -> Iterable[Match | Skipped]:
        g = ctx.graph
        for node in g.nodes:
            if node.op_type != "Dropout" or not g.is_default_domain(node):
                continue
            label = node.name or node.outputs[0].name
            why = _obstacle(ctx, node)
            yield Skipped(label, why) if why else DropoutNode(target=label, node=node)

    def rewrite(self, ctx: OnnxContext, m: DropoutNode) -> Applied:
        node = m.node
        ctx.editor.replace_value(node.outputs[0], node.inputs[0])
        ctx.editor.remove_nodes([node])
        return Applied(m.target, "Dropout → removed (inference mode: an identity)", {"op": "Dropout"})


def _obstacle(ctx: OnnxContext, node: Any) -> Refusal | None:
    import numpy as np

    g = ctx.graph
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        mode = node.inputs[2]
        if not g.is_const(mode):
            return Refusal("computed-tensor", "its training_mode is computed at run time")
        if bool(np.asarray(g.const_array(mode)).any()):
            return Refusal("training-mode", "training_mode is true: it drops values")
    for extra in node.outputs[1:]:
        if extra.uses() or extra.is_graph_output():
            return Refusal("other-readers", "its mask output is read")
    src, out = node.inputs[0], node.outputs[0]
    if out.is_graph_output() and (src.is_graph_input() or src.is_graph_output() or src.is_initializer()):
        return Refusal("model-output", "it links a graph input to a graph output (an Identity would replace it)")
    return None
