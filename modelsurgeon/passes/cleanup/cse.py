"""cse: nodes of the same op, attributes and inputs → one (onnx_ir's
``CommonSubexpressionEliminationPass``: exporters repeat ``Shape``, ``Gather``, casts and whole
sub-expressions). Random ops and control flow are left; a graph output keeps its name, declared
type and shape."""

from __future__ import annotations

from typing import Any

from .base import IrPass

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


class EliminateCommonSubexpressions(IrPass):
    name = "cse"
    what = "repeated node"

    count = staticmethod(common)

    def run(self, model) -> None:
        from onnx_ir.passes.common import CommonSubexpressionEliminationPass

        g = model.graph
        declared = [(v.name, v.type, v.shape) for v in g.outputs]
        CommonSubexpressionEliminationPass(size_limit=TENSOR_LIMIT)(model)
        for v, (name, type_, shape) in zip(g.outputs, declared):  # a graph output keeps its declared type
            if v.name == name:
                if type_ is not None:
                    v.type = type_
                if shape is not None:
                    v.shape = shape

    def size(self, model) -> int:
        return len(model.graph)
