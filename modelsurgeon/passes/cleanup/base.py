"""What the clean-up rewrites share: their pass class, shape facts, constant reads, bypassing,
a node turned into a Reshape, a BatchNormalization read as fold-bn reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ...capture.onnx import EvaluationError, node_label
from ..base import Applied, Match, OnnxContext, Pass


class CleanupPass(Pass):
    """An ONNX-only pass of the generic clean-up (its spec and declared order:
    :mod:`modelsurgeon.passes.cleanup`)."""

    backend = "onnx"


class IrPass(CleanupPass):
    """A clean-up done by one of onnx_ir's own passes: ``count(model)`` finds how many
    instances there are (one match for all of them), ``run(model)`` applies the onnx_ir pass,
    ``size(model)`` measures what it removed."""

    what: ClassVar[str] = ""  # "repeated node"

    def count(self, model: Any) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def run(self, model: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def size(self, model: Any) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def match(self, ctx: OnnxContext):
        n = self.count(ctx.model)
        if n:
            yield Match(f"{n} {self.what}{'s' if n > 1 else ''}")

    def rewrite(self, ctx: OnnxContext, m: Match) -> Applied:
        from ...capture.onnx import quiet_onnx_ir

        before = self.size(ctx.model)
        with quiet_onnx_ir():
            self.run(ctx.model)
        ctx.editor._names = None  # names the editor had seen may be gone
        return Applied(m.target, f"{before - self.size(ctx.model)} merged into the ones they repeat")


@dataclass
class NodeMatch(Match):
    node: Any = None
    data: dict = field(default_factory=dict)


def facts(ctx: OnnxContext):
    """Shapes and small values of the graph as it stands (computed once per pass run)."""
    from ...capture.onnx_shapes import propagate

    g = ctx.graph
    if getattr(g, "_facts", None) is None:
        g._facts = propagate(ctx.model, g)
    return g._facts


def const(ctx: OnnxContext, value: Any):
    """The array of a constant value (initializer, Constant node, constant subgraph), else None."""
    g = ctx.graph
    if value is None or not g.is_const(value):
        return None
    try:
        return g.const_array(value)
    except EvaluationError:
        return None


def attr(node: Any, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None or a.is_ref() else a.value


def default_domain(ctx: OnnxContext, node: Any) -> bool:
    return ctx.graph.is_default_domain(node)


def can_bypass(node: Any, src: Any) -> bool:
    """Can ``node``'s output be replaced by ``src`` without adding a node? Not when the output is
    a graph output and ``src`` is a graph input, output or initializer (an Identity would stay)."""
    out = node.outputs[0]
    if src is None:
        return False
    return not (out.is_graph_output() and (src.is_graph_input() or src.is_graph_output() or src.is_initializer()))


def bypass(ctx: OnnxContext, node: Any, src: Any, what: str) -> Applied:
    """Remove ``node``: its readers read ``src`` instead."""
    label = node_label(node)
    ctx.editor.replace_value(node.outputs[0], src)
    ctx.editor.remove_nodes([node])
    return Applied(label, what, {"op": node.op_type})


def extra_outputs_unused(node: Any) -> bool:
    return all(not o.uses() and not o.is_graph_output() for o in node.outputs[1:])


def to_reshape(ctx: OnnxContext, node: Any, target: Any, what: str, base: str) -> Applied:
    """Replace ``node`` by a Reshape of its first input to the constant shape ``target``."""
    import numpy as np

    ed = ctx.editor
    base = node.name or base
    shape = ed.add_initializer(np.array(target, np.int64), f"{base}_shape")
    new = ed.add_node("Reshape", [node.inputs[0], shape], node, f"{base}_reshape")
    ed.replace_value(node.outputs[0], new.outputs[0])
    ed.remove_nodes([node])
    return Applied(node_label(node), what)


def bn_affine(ctx: OnnxContext, bn: Any, channels: Any) -> tuple[Any, Any] | None:
    """``(scale, shift)`` (float64 numpy) of an inference BatchNormalization over ``channels``
    with a single output, read by fold-bn's own rule (``match/onnx.py: batch_norm_affine``);
    ``None`` when it is none."""
    from ...match.affine import ChannelAffine
    from ...match.onnx import batch_norm_affine

    if bn.op_type != "BatchNormalization" or not default_domain(ctx, bn) or len(bn.outputs) != 1 \
            or not isinstance(channels, int):
        return None
    aff = batch_norm_affine(ctx.graph, bn, channels)
    if not isinstance(aff, ChannelAffine):
        return None
    return aff.scale.numpy(), aff.shift.numpy()
