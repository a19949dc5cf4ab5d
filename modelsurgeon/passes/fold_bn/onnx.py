"""fold-bn on ONNX graphs.

Details: docs/architecture.md (*The ONNX back end*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ...capture.onnx import node_label, subgraph_nodes
from ...match.onnx import LINEAR, LinearUnit, Step, walk, linear_unit, _bn_training
from ...rewrite.onnx import fold_affine
from ...report.codes import Refusal
from ..base import Applied, Match, OnnxContext, Pass, Skipped


@dataclass
class FoldMatch(Match):
    unit: LinearUnit = None
    steps: list[Step] = field(default_factory=list)


def trivial(unit: LinearUnit, steps: list[Step]) -> bool:
    """A MatMul followed by its one bias Add: folding would change nothing."""
    return unit.kind == "matmul" and len(steps) == 1 and steps[0].node.op_type == "Add"


def find_folds(ctx: OnnxContext, allow_bn: bool, reasons: dict | None = None) -> Iterable[FoldMatch]:
    """Matches for every linear layer followed by foldable affine steps. ``reasons`` collects
    ``id(node) -> (node, reason)`` for affine candidates that cannot be folded."""
    g = ctx.graph
    for node in g.nodes:
        if node.op_type not in LINEAR or not g.is_default_domain(node):
            continue
        unit = linear_unit(g, node)
        if isinstance(unit, Refusal):
            if reasons is not None:
                r = g.sole_reader(node.outputs[0])
                if r is not None and r.op_type == "BatchNormalization":
                    reasons[id(r)] = (r, unit.reworded(
                        f"the {node.op_type} {node_label(node)} before it cannot be rewritten: {unit}"))
            continue
        w = walk(g, unit, allow_bn)
        if w.stop is not None and reasons is not None:
            reasons[id(w.stop[0])] = w.stop
        if not w.steps or trivial(unit, w.steps):
            continue
        yield FoldMatch(target=unit.label, unit=unit, steps=w.steps)


def apply_fold(ctx: OnnxContext, m: FoldMatch) -> Applied:
    data = fold_affine(ctx.editor, m.unit, m.steps)
    detail = f"{m.unit.describe()} ← " + " → ".join(s.label for s in m.steps)
    if data["weight_shared"]:
        detail += " (its weight is shared: written as a new initializer, the other readers keep theirs)"
    return Applied(m.unit.label, detail, {
        "layer": m.unit.label,
        "folded": [{"path": node_label(s.node), "what": s.label, "source": s.source} for s in m.steps],
        "bias_added": data["bias_added"],
        "weight_duplicated": data["weight_shared"],
    })


class FoldBN(Pass):
    name = "fold-bn"
    backend = "onnx"

    def match(self, ctx: OnnxContext) -> Iterable[Match | Skipped]:
        reasons: dict = {}
        handled: set[int] = set()
        for m in find_folds(ctx, allow_bn=True, reasons=reasons):
            handled.update(id(s.node) for s in m.steps)
            yield m
        g = ctx.graph
        for node in g.nodes:
            if node.op_type == "BatchNormalization" and id(node) not in handled:
                hit = reasons.get(id(node))
                yield Skipped(node_label(node), hit[1] if hit else _unfolded_reason(ctx, node))
        for owner, node in subgraph_nodes(g.graph):
            if node.op_type == "BatchNormalization" and g.is_default_domain(node):
                where = f"{owner.op_type} {owner.name}" if owner.name else node_label(owner)
                yield Skipped(node_label(node), f"inside a subgraph ({where}): not rewritten", code="subgraph")

    def rewrite(self, ctx: OnnxContext, m: FoldMatch) -> Applied:
        return apply_fold(ctx, m)


def _unfolded_reason(ctx: OnnxContext, node) -> Refusal:
    g = ctx.graph
    if _bn_training(g, node):
        return Refusal("training-mode", "it normalises with batch statistics (training_mode=1)")
    src = node.inputs[0] if node.inputs else None
    if src is None:
        return Refusal("not-foldable", "it has no input")
    p = src.producer()
    if p is None:
        return Refusal("not-foldable", "its input is a graph input, not a layer output")
    return Refusal("not-foldable", f"its input comes from {p.op_type} {node_label(p)}, not from a Conv, ConvTranspose, Gemm or MatMul")
