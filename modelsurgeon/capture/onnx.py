"""The ONNX back end's graph: nothing to record -- an ONNX file *is* its dataflow graph.

Details: docs/architecture.md (*The ONNX back end*).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable

from ..errors import first_line

# Ops never evaluated at surgery time: random generators (a different draw each run) and
# quantisation (runtimes need the Q/DQ pattern and the small integer weights kept as they are).
NOT_EVALUATED = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
    "Multinomial", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
}
DEFAULT_DOMAINS = ("", "ai.onnx")
METADATA_READS = {"CastLike": 1, "Shape": 0, "Size": 0}
"""op -> the input it reads for its dtype (``CastLike``) or static shape only, not its values."""


class EvaluationError(Exception):
    """A constant subgraph could not be evaluated by the reference evaluator."""


def node_label(node: Any) -> str:
    """How a node is named in reports: its name, else its op and first output."""
    if node.name:
        return node.name
    out = node.outputs[0].name if node.outputs and node.outputs[0].name else "?"
    return f"{node.op_type}→{out}"


def shape_of(value: Any) -> tuple | None:
    """Declared / inferred shape: ints for static dims, the symbol (str or None) otherwise."""
    s = value.shape if value is not None else None
    if s is None:
        return None
    out = []
    for d in s.dims:
        out.append(d if isinstance(d, int) else getattr(d, "value", None))
    return tuple(out)


def static_shape(value: Any) -> tuple[int, ...] | None:
    s = shape_of(value)
    if s is None or not all(isinstance(d, int) for d in s):
        return None
    return s


def format_shape(shape: tuple | None) -> str:
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


class OnnxGraph:
    """Read-only queries on the main graph of an ``onnx_ir`` model."""

    def __init__(self, model: Any):
        self.model = model
        self.graph = model.graph
        self.opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))
        self.ir_version = int(model.ir_version or 0)
        self._const: dict[int, Any] = {}  # id(value) -> np.ndarray (evaluated / read constants)
        self._is_const: dict[int, bool] | None = None
        self._propagated: dict[str, tuple | None] | None = None

    # -- structure -----------------------------------------------------------------------------
    @property
    def nodes(self) -> list:
        return list(self.graph)

    def values_by_name(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for v in self.graph.inputs:
            if v.name:
                out[v.name] = v
        for name, v in self.graph.initializers.items():
            out[name] = v
        for n in self.graph:
            for o in n.outputs:
                if o.name:
                    out[o.name] = o
        return out

    @staticmethod
    def producer(value: Any) -> Any:
        return value.producer() if value is not None else None

    @staticmethod
    def readers(value: Any) -> list:
        """Nodes reading ``value`` (each once)."""
        return list(value.consumers())

    @staticmethod
    def reader_count(value: Any) -> int:
        """Readers of ``value``, a graph output counting as one."""
        return len(value.consumers()) + (1 if value.is_graph_output() else 0)

    def sole_reader(self, value: Any) -> Any:
        """The only node reading ``value`` (once, and not also a graph output), else ``None``."""
        if value.is_graph_output():
            return None
        uses = value.uses()
        if len(uses) != 1:
            return None
        return next(iter(uses)).node

    @staticmethod
    def is_default_domain(node: Any) -> bool:
        return node.domain in DEFAULT_DOMAINS

    def describe_readers(self, value: Any) -> str:
        names = [node_label(n) for n in self.readers(value)]
        if value.is_graph_output():
            names.append("a graph output")
        return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")

    def propagated_shape(self, value: Any) -> tuple | None:
        """The shape of ``value`` inferred from the graph inputs' declared shapes alone
        (:func:`propagated_shapes`, computed once per view), ``None`` where inference cannot
        reach it."""
        if self._propagated is None:
            self._propagated = propagated_shapes(self.model)
        return self._propagated.get(value.name) if value is not None and value.name else None

    # -- constants -----------------------------------------------------------------------------
    def is_weight(self, value: Any) -> bool:
        """An initializer the runtime cannot override."""
        if value is None or not value.is_initializer() or value.const_value is None:
            return False
        return not value.is_graph_input() or self.ir_version <= 3

    def evaluable(self, node: Any) -> bool:
        """Can this node be evaluated at surgery time if its inputs are constant?"""
        if not self.is_default_domain(node) or node.op_type in NOT_EVALUATED:
            return False
        for a in node.attributes.values():
            if a.is_ref() or a.type.name in ("GRAPH", "GRAPHS", "SPARSE_TENSOR", "SPARSE_TENSORS"):
                return False
        return True

    def is_const(self, value: Any) -> bool:
        """True when ``value`` depends on constants only (see the module docstring)."""
        if value is None:
            return True  # an omitted optional input
        if value.is_initializer():
            return self.is_weight(value)
        if value.is_graph_input():
            return False
        if self._is_const is None:
            self._is_const = self._constness()
        return self._is_const.get(id(value), False)

    def _constness(self) -> dict[int, bool]:
        """Constness of every node output, in one pass over the (topologically ordered) nodes."""
        known: dict[int, bool] = {}

        def const(v: Any) -> bool:
            if v is None:
                return True
            if v.is_initializer():
                return self.is_weight(v)
            return known.get(id(v), False)

        for n in self.graph:
            flag = self.evaluable(n) and all(const(v) or self.metadata_read(n, i) for i, v in enumerate(n.inputs))
            for o in n.outputs:
                known[id(o)] = flag
        return known

    def metadata_read(self, node: Any, index: int) -> bool:
        """Input ``index`` of ``node`` is read for what is known without running the model: the
        dtype ``CastLike`` takes from it, the static shape ``Shape`` / ``Size`` take from it."""
        if METADATA_READS.get(node.op_type) != index or not self.is_default_domain(node):
            return False
        v = node.inputs[index] if index < len(node.inputs) else None
        if v is None or v.dtype is None:
            return False
        return node.op_type == "CastLike" or self.known_shape(v) is not None

    def known_shape(self, value: Any) -> tuple[int, ...] | None:
        """A static shape of ``value`` that holds for every run: a graph input's declared shape,
        or one inferred from the graph inputs' declared shapes (never a possibly stale
        ``value_info``)."""
        s = shape_of(value) if value.is_graph_input() else self.propagated_shape(value)
        return s if s is not None and all(isinstance(d, int) for d in s) else None

    def _placeholder(self, value: Any) -> Any:
        """An array standing in for a value read only for its dtype or shape: zeros broadcast
        to its static shape (no memory), a scalar when only the dtype is read."""
        import numpy as np

        dt = value.dtype.numpy()
        return np.broadcast_to(np.zeros((), dtype=dt), self.known_shape(value) or ())

    def const_array(self, value: Any) -> Any:
        """The contents of a constant value as a numpy array (``None`` if not constant).

        Raises :class:`EvaluationError` when a constant subgraph cannot be evaluated.
        """
        if value is None or not self.is_const(value):
            return None
        key = id(value)
        if key in self._const:
            return self._const[key]
        if value.is_initializer():
            arr = value.const_value.numpy()
        else:
            node = value.producer()
            arr = None
            if node.op_type == "Constant" and "value" in node.attributes:
                arr = node.attributes["value"].as_tensor().numpy()
            if arr is None:
                self.evaluate([value])
                return self._const[key]
        self._const[key] = arr
        return arr

    def const_nodes(self, values: Iterable[Any]) -> list:
        """The nodes computing ``values`` from initializers, in topological order."""
        order: list = []
        seen: set[int] = set()
        for v in values:
            stack = [(v.producer(), False)] if v.producer() is not None else []
            while stack:
                n, done = stack.pop()
                if done:
                    order.append(n)
                    continue
                if id(n) in seen:
                    continue
                seen.add(id(n))
                stack.append((n, True))
                for k, i in enumerate(n.inputs):
                    if i is not None and i.producer() is not None and id(i.producer()) not in seen and \
                            not (self.metadata_read(n, k) and not self.is_const(i)):
                        stack.append((i.producer(), False))
        return order

    def evaluate(self, values: list) -> list:
        """Evaluate constant values with the reference evaluator (cached)."""
        todo = [v for v in values if id(v) not in self._const]
        if todo:
            for v, r in zip(todo, self.run_nodes(self.const_nodes(todo), {}, todo)):
                self._const[id(v)] = r
        return [self._const[id(v)] for v in values]

    def run_nodes(self, nodes: list, feeds: dict, outputs: list) -> list:
        """Run ``nodes`` (topologically ordered) with onnx's reference evaluator: ``feeds`` maps
        values to arrays; every other input not produced inside ``nodes`` must be a constant.
        Returns the arrays of ``outputs``. Raises :class:`EvaluationError`."""
        import numpy as np
        import onnx
        import onnx_ir as ir
        from onnx.reference import ReferenceEvaluator

        produced = {id(o) for n in nodes for o in n.outputs}
        fed = {id(v): (v, a) for v, a in feeds.items()}
        inits = {}
        for n in nodes:
            for k, i in enumerate(n.inputs):
                if i is None or id(i) in produced or id(i) in fed or i.name in inits:
                    continue
                arr = self.const_array(i) if i.producer() is not None else (
                    i.const_value.numpy() if self.is_weight(i) else None)
                if arr is None and self.metadata_read(n, k):
                    fed[id(i)] = (i, self._placeholder(i))  # a feed: never serialized
                    continue
                if arr is None:
                    raise EvaluationError(f"input {i.name} is neither fed nor constant")
                inits[i.name] = onnx.numpy_helper.from_array(np.asarray(arr), i.name)
        inputs = [onnx.helper.make_tensor_value_info(v.name, onnx.helper.np_dtype_to_tensor_dtype(np.asarray(a).dtype), None)
                  for v, a in fed.values()]
        graph = onnx.helper.make_graph([ir.serde.serialize_node(n) for n in nodes], "subgraph", inputs,
                                       [onnx.ValueInfoProto(name=v.name) for v in outputs], list(inits.values()))
        opsets = [onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()]
        model = onnx.helper.make_model(graph, opset_imports=opsets)
        try:
            results = ReferenceEvaluator(model).run(None, {v.name: a for v, a in fed.values()})
        except Exception as e:  # the evaluator's message, first line
            raise EvaluationError(first_line(e, 200, typed=True)) from e
        return [np.asarray(r) for r in results]


@contextmanager
def quiet_onnx_ir():
    """onnx_ir's own log lines (an invalid model's "cannot be found in any scope", a failed
    inference) kept off stderr: modelsurgeon reports problems itself, in one line."""
    import logging

    log = logging.getLogger("onnx_ir")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def infer_shapes(model: Any) -> bool:
    """Fill value shapes and types with onnx shape inference (in place, non-strict: unknown
    ops leave their outputs unknown). Works for models over 2 GB. False if it failed.

    The declared type and shape of a graph output are part of the model's interface and are
    kept as they are (inference would rename its symbolic dims, e.g. ``out_batch`` -> ``N``);
    only an output declared without them gets the inferred ones."""
    declared = [(v, v.type, v.shape) for v in model.graph.outputs]
    try:
        from onnx_ir.passes.common import ShapeInferencePass

        with quiet_onnx_ir():
            ShapeInferencePass(strict_mode=False)(model)
        return True
    except Exception:
        return False
    finally:
        _sequence_types(model)
        for v, type_, shape in declared:
            if type_ is not None:
                v.type = type_
            if shape is not None:
                v.shape = shape


SEQUENCE_OPS = {"SplitToSequence", "SequenceConstruct", "SequenceEmpty", "SequenceInsert", "SequenceErase"}


def _sequence_types(model: Any) -> None:
    """onnx_ir's inference merge gives a sequence value a *tensor* type (its element's), which
    onnxruntime then refuses: sequence producers' outputs get their sequence type back."""
    import onnx_ir as ir

    for node in model.graph:
        if node.op_type in SEQUENCE_OPS and node.domain in DEFAULT_DOMAINS:
            for o in node.outputs:
                if o.type is not None and not isinstance(o.type, ir.SequenceType):
                    o.type = ir.SequenceType(ir.TensorType(o.type.dtype))
                    o.shape = None


def propagated_shapes(model: Any) -> dict[str, tuple | None]:
    """Shapes of the main graph's values inferred from the graph inputs' declared shapes
    alone -- the file's ``value_info`` and declared output shapes ignored, since they may be
    stale (a model exported at a fixed size whose inputs were made dynamic later). Values
    inference cannot reach (after custom ops) are missing. Empty if inference failed."""
    import onnx

    def infer(proto):
        del proto.graph.value_info[:]
        for o in proto.graph.output:
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)

    try:
        from onnx_ir.passes.common import _c_api_utils  # private: inside the try, like the inference

        with quiet_onnx_ir():
            proto = _c_api_utils.call_onnx_api(infer, model)
    except Exception:
        return {}
    out: dict[str, tuple | None] = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output):
        t = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if t is None or not t.HasField("shape"):
            continue
        out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
    return out


def subgraph_nodes(graph: Any) -> Iterable[tuple[Any, Any]]:
    """``(owner, node)`` for every node inside a subgraph (If / Loop / Scan bodies, at any
    depth) of ``graph``; ``owner`` is the main-graph node holding it."""
    for owner in graph:
        stack = list(_subgraphs(owner))
        while stack:
            sub = stack.pop()
            for n in sub:
                yield owner, n
                stack.extend(_subgraphs(n))


def _subgraphs(node: Any) -> list:
    out = []
    for a in node.attributes.values():
        if a.is_ref():
            continue
        name = a.type.name
        if name == "GRAPH":
            out.append(a.value)
        elif name == "GRAPHS":
            out.extend(a.value)
    return out
