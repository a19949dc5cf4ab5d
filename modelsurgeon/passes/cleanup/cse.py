"""cse: nodes of the same op, attributes and inputs → one (onnx_ir's
``CommonSubexpressionEliminationPass``: exporters repeat ``Shape``, ``Gather``, casts and whole
sub-expressions). Random ops and control flow are left; a graph output keeps its name, declared
type and shape."""

from __future__ import annotations

from typing import Any, Iterable

from ..base import Applied, Match, OnnxContext
from .base import CleanupPass

NON_DETERMINISTIC = {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial", "Bernoulli"}
TENSOR_LIMIT = 10  # elements of a tensor attribute (Constant nodes) compared; onnx_ir's default


def _key(node: Any) -> tuple | None:
    attrs = []
    for k, a in sorted(node.attributes.items()):
        if a.is_ref() or a.type.name in ("GRAPH", "GRAPHS"):
            return None
        v = a.value
        if a.type.name == "TENSOR":
            if v.size > TENSOR_LIMIT:
                return None
            arr = v.numpy()
            v = (arr.shape, str(arr.dtype), arr.tobytes())
        elif isinstance(v, (list, tuple)):
            v = tuple(v)
        attrs.append((k, v))
    return (node.domain, node.op_type, node.overload, len(node.outputs), tuple(id(i) for i in node.inputs), tuple(attrs))


def common(model) -> int:
    seen: set = set()
    n = 0
    for node in model.graph:
        if node.op_type in NON_DETERMINISTIC:
            continue
        k = _key(node)
        if k is None:
            continue
        n += k in seen
        seen.add(k)
    return n


class EliminateCommonSubexpressions(CleanupPass):
    name = "cse"
    after = ("dedup-constants",)

    def match(self, ctx: OnnxContext) -> Iterable[Match]:
        n = common(ctx.model)
        if n:
            yield Match(f"{n} repeated node{'s' if n > 1 else ''}")

    def rewrite(self, ctx: OnnxContext, m: Match) -> Applied:
        from onnx_ir.passes.common import CommonSubexpressionEliminationPass

        from ...capture.onnx import quiet_onnx_ir

        g = ctx.model.graph
        declared = [(v.name, v.type, v.shape) for v in g.outputs]
        before = len(g)
        with quiet_onnx_ir():
            CommonSubexpressionEliminationPass(size_limit=TENSOR_LIMIT)(ctx.model)
        for v, (name, type_, shape) in zip(g.outputs, declared):
            if v.name == name:
                if type_ is not None:
                    v.type = type_
                if shape is not None:
                    v.shape = shape
        ctx.editor._names = None
        return Applied(m.target, f"{before - len(g)} nodes merged into the ones they repeat")
