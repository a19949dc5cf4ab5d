"""Building an ONNX graph from another format's layers (Darknet, Caffe), in ``onnx_ir``.

:class:`GraphBuilder` hands out unique names, makes initializers from numpy arrays without
copying them, and records which layer each node belongs to (``owner``): the writers that put
a rewritten graph back into the source format map nodes to layers by that record, so a node a
pass added (and no layer owns) is noticed.
"""

from __future__ import annotations

from typing import Any, Sequence

OPSET = 17
"""Opset of graphs read from Darknet / Caffe files (the project's default)."""


class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.owner: dict[str, Any] = {}  # node name -> layer key
        self._names: set[str] = set()  # value names
        self._node_names: set[str] = set()

    @staticmethod
    def _unique(base: str, taken: set[str]) -> str:
        name, i = base, 1
        while name in taken:
            name = f"{base}_{i}"
            i += 1
        taken.add(name)
        return name

    def unique(self, base: str) -> str:
        """A value name not used yet, ``base`` when free."""
        return self._unique(base, self._names)

    def reserve(self, name: str) -> None:
        self._names.add(name)

    def input(self, name: str, shape: Sequence[int]) -> Any:
        import onnx_ir as ir

        v = ir.Value(name=self.unique(name), shape=ir.Shape(list(shape)), type=ir.TensorType(ir.DataType.FLOAT))
        self.inputs.append(v)
        return v

    def const(self, array: Any, name: str) -> Any:
        """An initializer holding ``array`` (float arrays stored as float32, ints as int64)."""
        import numpy as np
        import onnx_ir as ir

        arr = np.asarray(array)
        arr = arr.astype(np.int64 if arr.dtype.kind in "iub" else np.float32, copy=False)
        arr = np.require(arr, requirements="C")
        name = self.unique(name)
        tensor = ir.Tensor(arr, name=name)
        v = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.initializers.append(v)
        return v

    def op(self, op_type: str, inputs: Sequence[Any], name: str, owner: Any, attrs: dict | None = None,
           out: str | None = None, outputs: int = 1) -> Any:
        """Add a node; returns its output value (a list when ``outputs`` > 1). ``out`` names
        the (first) output; by default it is named like the node."""
        import onnx_ir as ir

        node_name = self._unique(name, self._node_names)
        attributes = ir.convenience.convert_attributes(attrs or {})
        node = ir.Node("", op_type, list(inputs), attributes, num_outputs=outputs, name=node_name)
        for i, o in enumerate(node.outputs):
            o.name = self.unique((out or node_name) + (f":{i}" if i else ""))
        self.nodes.append(node)
        self.owner[node_name] = owner
        return list(node.outputs) if outputs > 1 else node.outputs[0]

    def output(self, value: Any, doc: str | None = None) -> None:
        if doc:
            value.doc_string = doc
        if value not in self.outputs:
            self.outputs.append(value)

    def build(self, name: str, doc: str) -> Any:
        import onnx_ir as ir

        from .._version import __version__

        graph = ir.Graph(self.inputs, self.outputs, nodes=self.nodes, initializers=self.initializers,
                         opset_imports={"": OPSET}, name=name)
        return ir.Model(graph, ir_version=8, producer_name="modelsurgeon", producer_version=__version__,
                        doc_string=doc)
