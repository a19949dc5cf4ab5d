"""Shapes and small integer values of an ONNX graph, propagated symbolically in one walk.

Details: docs/architecture.md (*The ONNX back end*).
"""

from __future__ import annotations

from typing import Any

from .shape_rules import (  # noqa: F401  (Dim, Fact and the limits are this module's interface too)
    MAX_ARRAY_BYTES, MAX_ELEMENTS, Dim, Fact, _attr, _count, _dims, _elements, _from_array, _small,
)


class Propagation:
    """Facts for every value of a model's main graph (:func:`propagate`)."""

    def __init__(self, model: Any, evaluator: Any = None):
        self.model = model
        self.graph = model.graph
        self.opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
        self.facts: dict[int, Fact] = {}
        self.evaluator = evaluator  # an OnnxGraph (its run_nodes), for the generic case

    def fact(self, value: Any) -> Fact:
        if value is None:
            return Fact()
        f = self.facts.get(id(value))
        if f is None:
            f = Fact(shape=_dims(value.shape), dtype=int(value.dtype) if value.dtype is not None else None)
            self.facts[id(value)] = f
        return f

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> "Propagation":
        from .onnx import DEFAULT_DOMAINS

        g = self.graph
        self.static_inputs = all(v.shape is not None and v.shape.is_static() for v in g.inputs if not v.is_initializer())
        for v in g.inputs:
            if not v.is_initializer():
                self.facts[id(v)] = Fact(shape=_dims(v.shape), dtype=int(v.dtype) if v.dtype is not None else None)
        for v in g.initializers.values():
            if v.const_value is not None and not (v.is_graph_input() and int(self.model.ir_version or 0) > 3):
                if v.const_value.size * max(1, v.const_value.dtype.itemsize) <= MAX_ARRAY_BYTES:
                    try:
                        self.facts[id(v)] = _from_array(v.const_value.numpy())
                        continue
                    except Exception:
                        pass
                self.facts[id(v)] = Fact(shape=_dims(v.shape), dtype=int(v.dtype) if v.dtype is not None else None)
        for node in g:
            try:
                if node.domain in DEFAULT_DOMAINS and not _has_subgraph(node):
                    self._node(node)
                    continue
            except Exception:
                pass
            for o in node.outputs:  # what the model's own inference says
                self.facts[id(o)] = self._declared(o)
        return self

    def _declared(self, value: Any) -> Fact:
        """A value's shape as the model's inference / ``value_info`` gives it -- its static
        sizes trusted only when the graph inputs are static (``value_info`` written at one size
        goes stale when the inputs are later made dynamic)."""
        shape = _dims(value.shape)
        if shape is not None and not self.static_inputs:
            shape = tuple(d if isinstance(d, Dim) else Dim() for d in shape)
        return Fact(shape=shape, dtype=int(value.dtype) if value.dtype is not None else None)

    def _node(self, node: Any) -> None:
        ins = [self.fact(v) if v is not None else None for v in node.inputs]
        outs = _elements(node, ins)
        if outs is None and all(f is None or f.known for f in ins) and node.outputs:
            outs = self._evaluate(node, ins)
        if outs is not None:
            for o, f in zip(node.outputs, outs):
                self.facts[id(o)] = f
            if all(f.shape is not None for f in outs):
                return
        shapes = _shape_rule(node, ins)
        if shapes is None:
            shapes = self._infer(node, ins)
            if node.op_type == "Resize" and shapes and shapes[0][0] is not None:
                shapes[0] = (_resize_fix(ins, shapes[0][0]), shapes[0][1])
        for i, o in enumerate(node.outputs):
            f = outs[i] if outs is not None and i < len(outs) else Fact()
            if f.shape is None and shapes is not None and i < len(shapes):
                f.shape, f.dtype = shapes[i][0], shapes[i][1] if shapes[i][1] is not None else f.dtype
            if f.shape is None:
                f.shape = self._declared(o).shape
            if f.dtype is None and o.dtype is not None:
                f.dtype = int(o.dtype)
            self.facts[id(o)] = f

    def _evaluate(self, node: Any, ins: list) -> list[Fact] | None:
        """A node whose inputs are all known, run by the reference evaluator."""
        from .onnx import NOT_EVALUATED

        if self.evaluator is None or node.op_type in NOT_EVALUATED:
            return None
        if sum(int(f.array.nbytes) for f in ins if f is not None) > MAX_ARRAY_BYTES:
            return None
        if not self.evaluator.evaluable(node):
            return None
        feeds = {v: f.array for v, f in zip(node.inputs, ins) if v is not None}
        try:
            arrays = self.evaluator.run_nodes([node], feeds, list(node.outputs))
        except Exception:
            return None
        if any(a.nbytes > MAX_ARRAY_BYTES for a in arrays):
            return None
        return [_from_array(a) for a in arrays]

    def _infer(self, node: Any, ins: list) -> list | None:
        """Output (shape, dtype) pairs from onnx's inference of this one node."""
        import onnx
        import onnx_ir as ir
        from onnx import shape_inference

        names: dict[str, Dim] = {}
        types, data = {}, {}
        for v, f in zip(node.inputs, ins):
            if v is None:
                continue
            if not v.name or f is None or f.dtype is None:
                return None
            shape = None
            if f.shape is not None:
                shape = []
                for d in f.shape:
                    if isinstance(d, Dim):
                        names[d.name] = d
                        shape.append(d.name)
                    else:
                        shape.append(d)
            types[v.name] = onnx.helper.make_tensor_type_proto(f.dtype, shape)
            if f.known and f.array.size <= MAX_ELEMENTS * 16:
                data[v.name] = onnx.numpy_helper.from_array(f.array, v.name)
        try:
            schema = onnx.defs.get_schema(node.op_type, self.opset, "")
            proto = ir.serde.serialize_node(node)
            out = shape_inference.infer_node_outputs(schema, proto, types, data, opset_imports=[
                onnx.helper.make_opsetid("", self.opset)])
        except Exception:
            return None
        result = []
        for o in node.outputs:
            t = out.get(o.name) if o.name else None
            if t is None or not t.HasField("tensor_type"):
                result.append((None, None))
                continue
            tt = t.tensor_type
            shape = None
            if tt.HasField("shape"):
                shape = tuple(d.dim_value if d.HasField("dim_value") else names.get(d.dim_param) or Dim(d.dim_param or None)
                              for d in tt.shape.dim)
            result.append((shape, tt.elem_type or None))
        return result


def propagate(model: Any, evaluator: Any = None) -> Propagation:
    """Facts (shape, elements, array) for every value of ``model``'s main graph."""
    return Propagation(model, evaluator).run()


def _has_subgraph(node: Any) -> bool:
    return any(not a.is_ref() and a.type.name in ("GRAPH", "GRAPHS") for a in node.attributes.values())


# -- shape rules -------------------------------------------------------------------------------

def _shape_rule(node: Any, ins: list) -> list | None:
    """Output shapes resolved here rather than by onnx: Reshape and Expand with targets that are
    known element by element (partly symbolic)."""
    if node.op_type == "Reshape" and len(ins) == 2 and ins[0] is not None and _small(ins[1]):
        shape = reshape_result(ins[0].shape, ins[1].elems, int(_attr(node, "allowzero", 0)))
        return [(shape, ins[0].dtype)] if shape is not None else None
    if node.op_type == "Expand" and len(ins) == 2 and ins[0] is not None and _small(ins[1]) and ins[0].shape is not None:
        shape = expand_result(ins[0].shape, ins[1].elems)
        return [(shape, ins[0].dtype)] if shape is not None else None
    return None


def reshape_result(src: tuple | None, target: tuple, allowzero: int = 0) -> tuple | None:
    out: list = []
    infer = None
    for i, t in enumerate(target):
        if t is None:
            out.append(Dim())
        elif isinstance(t, Dim):
            out.append(t)
        elif t == 0 and not allowzero:
            if src is None or i >= len(src):
                return None
            out.append(src[i])
        elif t == -1:
            infer = i
            out.append(None)
        else:
            out.append(int(t))
    if infer is not None:
        out[infer] = _quotient(src, [d for j, d in enumerate(out) if j != infer])
    return tuple(out)


def _quotient(src: tuple | None, known: list) -> Any:
    """The size Reshape infers for -1: the element count of ``src`` over that of ``known``,
    symbolic sizes present in both cancelling out; a fresh Dim when it does not divide out."""
    if src is None:
        return Dim()
    num, den = list(src), list(known)
    for d in list(den):
        if isinstance(d, Dim):
            if d not in num:
                return Dim()
            num.remove(d)
            den.remove(d)
    if any(isinstance(d, Dim) for d in num):
        rest = [d for d in num if isinstance(d, Dim)]
        if len(rest) == 1 and _count(tuple(d for d in num if isinstance(d, int))) == _count(tuple(den)):
            return rest[0]
        return Dim()
    total, part = _count(tuple(num)), _count(tuple(den))
    return total // part if part and total % part == 0 else Dim()


def expand_result(src: tuple, target: tuple) -> tuple | None:
    rank = max(len(src), len(target))
    out = []
    for i in range(rank):
        a = src[i - rank + len(src)] if i - rank + len(src) >= 0 else 1
        b = target[i - rank + len(target)] if i - rank + len(target) >= 0 else 1
        if b is None:
            out.append(a if isinstance(a, int) and a > 1 else Dim())
        elif b == 1 or a == b:
            out.append(a)
        elif a == 1:
            out.append(b)
        elif isinstance(a, int) and isinstance(b, int):
            return None  # not broadcastable: the model fails here at run time
        else:
            out.append(b if isinstance(b, int) else a if isinstance(a, int) else Dim())
    return tuple(out)


def _resize_fix(ins: list, inferred: tuple) -> tuple:
    """onnx loses a symbolic size through Resize even where it is kept (scale 1, or a ``sizes``
    element read from a shape): put those back."""
    src = ins[0].shape if ins and ins[0] is not None else None
    if src is None or len(src) != len(inferred):
        return inferred
    out = list(inferred)
    sizes = ins[3] if len(ins) > 3 else None
    scales = ins[2] if len(ins) > 2 else (ins[1] if len(ins) == 2 else None)
    for i, d in enumerate(out):
        if not (isinstance(d, Dim) and d.anonymous):
            continue
        if _small(sizes) and len(sizes.elems) == len(src) and sizes.elems[i] is not None:
            out[i] = sizes.elems[i]
        elif scales is not None and scales.known and scales.array.size == len(src) and float(scales.array.reshape(-1)[i]) == 1.0:
            out[i] = src[i]
    return tuple(out)
