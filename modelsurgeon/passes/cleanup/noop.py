"""remove-noops: ops that return their input unchanged, given their constant operands and the
shapes.

``Cast`` to the input's own type; ``Reshape`` / ``Flatten`` / ``Squeeze`` / ``Unsqueeze`` /
``Expand`` / ``Split`` (one output) / ``Where`` / ``ReduceMean`` / ``ReduceSum`` / ``ReduceMax`` /
``ReduceMin`` / ``ReduceProd`` (over sizes of 1, kept) whose output has the input's shape
(symbolic sizes compared as provably equal, :mod:`modelsurgeon.capture.onnx_shapes`); ``Pad`` by
zeros; ``Slice`` keeping every element; ``Transpose`` by the identity permutation; ``Add`` /
``Sub`` of zeros and ``Mul`` / ``Div`` / ``Pow`` by ones that do not broadcast the other operand to a
larger shape or another type. Readers read the input instead.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, bypass, can_bypass, const, default_domain, extra_outputs_unused, facts

INT_MAX_LIKE = 2 ** 31 - 1
SAME_SHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand", "Split",
              "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"}  # reductions: over sizes of 1
NEUTRAL = {"Add": (0, (0, 1)), "Sub": (0, (1,)), "Mul": (1, (0, 1)), "Div": (1, (1,)), "Pow": (1, (1,))}  # neutral, where


class RemoveNoOps(CleanupPass):
    name = "remove-noops"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        for node in ctx.graph.nodes:
            if not default_domain(ctx, node) or not node.inputs or not node.outputs:
                continue
            found = _noop(ctx, node)
            if found is None:
                continue
            src, why = found
            if src is not None and can_bypass(node, src) and extra_outputs_unused(node):
                yield NodeMatch(node_label(node), node=node, data={"src": src, "why": why})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        return bypass(ctx, m.node, m.data["src"], f"{m.node.op_type} removed: {m.data['why']}")


def _same_shape(p: Any, a: Any, b: Any) -> bool:
    sa, sb = p.fact(a).shape, p.fact(b).shape
    return sa is not None and sb is not None and sa == sb


def _same_type(a: Any, b: Any) -> bool:
    return a.dtype is not None and a.dtype == b.dtype


def _noop(ctx: OnnxContext, node: Any) -> tuple[Any, str] | None:
    """(the input the output equals, why) or None."""
    op, x, out = node.op_type, node.inputs[0], node.outputs[0]
    if x is None:
        return None
    if op == "Cast":
        return (x, "cast to its own type") if x.dtype is not None and int(x.dtype) == int(attr(node, "to", -1)) else None
    p = facts(ctx)
    if op in SAME_SHAPE:
        if op == "Split" and len(node.outputs) != 1:
            return None
        return (x, "output shape = input shape") if _same_shape(p, x, out) else None
    if op == "Transpose":
        perm = attr(node, "perm")
        shape = p.fact(x).shape
        if perm is not None:
            return (x, "identity permutation") if list(perm) == list(range(len(perm))) else None
        return (x, "rank ≤ 1") if shape is not None and len(shape) <= 1 else None
    if op == "Pad":
        pads = attr(node, "pads") if len(node.inputs) < 2 else const(ctx, node.inputs[1])
        if pads is not None and not any(int(v) for v in (pads.reshape(-1).tolist() if hasattr(pads, "reshape") else pads)):
            return x, "zero padding"
        return None
    if op == "Slice":
        return (x, "keeps every element") if _full_slice(ctx, node, p) else None
    if op == "Where" and len(node.inputs) == 3:
        cond = const(ctx, x)
        if cond is None or cond.size == 0 or not (cond.all() or not cond.any()):
            return None
        src = node.inputs[1] if cond.all() else node.inputs[2]
        return (src, "constant condition") if src is not None and _same_shape(p, src, out) and _same_type(src, out) else None
    if op in NEUTRAL and len(node.inputs) == 2:
        neutral, positions = NEUTRAL[op]
        for k in positions:
            c = const(ctx, node.inputs[k])
            other = node.inputs[1 - k]
            if c is None or other is None or ctx.graph.is_const(other) or c.dtype.kind not in "biuf":
                continue
            if (c == neutral).all() and _same_shape(p, other, out) and _same_type(other, out):
                return other, f"{'+' if op in ('Add', 'Sub') else '×'} {neutral}"
    return None


def _full_slice(ctx: OnnxContext, node: Any, p: Any) -> bool:
    """Does this Slice keep every element of its input?"""
    shape = p.fact(node.inputs[0]).shape
    if shape is None:
        return False
    if len(node.inputs) >= 3:
        parts = [const(ctx, v) if v is not None else None for v in node.inputs[1:5]]
        if parts[0] is None or parts[1] is None or any(v is not None and parts[i] is None
                                                       for i, v in enumerate(node.inputs[1:5])):
            return False
        starts, ends = parts[0].reshape(-1).tolist(), parts[1].reshape(-1).tolist()
        axes = parts[2].reshape(-1).tolist() if len(parts) > 2 and parts[2] is not None else list(range(len(starts)))
        steps = parts[3].reshape(-1).tolist() if len(parts) > 3 and parts[3] is not None else [1] * len(starts)
    else:
        starts, ends = list(attr(node, "starts", [])), list(attr(node, "ends", []))
        axes = list(attr(node, "axes", range(len(starts))))
        steps = [1] * len(starts)
    rank = len(shape)
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a + rank if a < 0 else a
        if st != 1 or not 0 <= a < rank:
            return False
        dim = shape[a]
        if isinstance(dim, int):
            s = max(0, s + dim) if s < 0 else s
            e = e + dim if e < 0 else e
            if s != 0 or e < dim:
                return False
        elif s != 0 or e < INT_MAX_LIKE:
            return False
    return True
