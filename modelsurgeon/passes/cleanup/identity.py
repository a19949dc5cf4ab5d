"""remove-identity: nodes that forward their input unchanged.

``Identity``; ``Dropout`` in inference (no ``training_mode`` input, or a constant false one; its
mask output unread); ``Concat`` / ``Sum`` / ``Max`` / ``Min`` / ``Mean`` of a single input.
Readers of the output read the input instead; a graph output keeps its name. Left: an output
that is a graph output fed directly by a graph input, output or initializer (an Identity is the
only way to write that), and nodes inside subgraphs.
"""

from __future__ import annotations

from typing import Iterable

from ...capture.onnx import node_label
from ...report.codes import Refusal
from ..base import Applied, OnnxContext, Skipped
from .base import CleanupPass, NodeMatch, bypass, can_bypass, const, default_domain, extra_outputs_unused

SINGLE_INPUT = {"Concat", "Sum", "Max", "Min", "Mean"}


class RemoveIdentity(CleanupPass):
    name = "remove-identity"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch | Skipped]:
        for node in ctx.graph.nodes:
            if not default_domain(ctx, node) or not node.inputs or len(node.outputs) < 1:
                continue
            op = node.op_type
            if op == "Identity" or (op in SINGLE_INPUT and len(node.inputs) == 1):
                pass
            elif op == "Dropout":
                why = _dropout_training(ctx, node)
                if why:
                    yield Skipped(node_label(node), why)
                    continue
            else:
                continue
            src = node.inputs[0]
            if src is None or not can_bypass(node, src):
                continue
            yield NodeMatch(node_label(node), node=node)

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        return bypass(ctx, m.node, m.node.inputs[0], f"{m.node.op_type} removed")


def _dropout_training(ctx: OnnxContext, node) -> Refusal | None:
    """Why this Dropout is not an identity, or None."""
    if not extra_outputs_unused(node):
        return Refusal("other-readers", "its mask output is read")
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        flag = const(ctx, node.inputs[2])
        if flag is None:
            return Refusal("computed-tensor", "its training_mode input is not a constant")
        if bool(flag.reshape(-1)[0]):
            return Refusal("training-mode", "it is in training mode (training_mode = true)")
    a = node.attributes.get("is_test")  # opset < 7
    if a is not None and not a.is_ref() and int(a.value) == 0 and ctx.graph.opset < 7:
        return Refusal("training-mode", "it is in training mode (is_test = 0)")
    return None
