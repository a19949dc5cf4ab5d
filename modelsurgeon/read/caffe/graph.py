"""A Caffe net as an ONNX graph (opset 17), one group of nodes per layer.

Names: each blob's *last* value keeps the blob's name (so the net's outputs and inputs are
named as in the prototxt); an earlier value of a blob that in-place layers rewrite (``conv1``
before its in-place ``BatchNorm``, ``Scale``, ``ReLU``) is named after the layer that wrote
it. A layer's nodes are named after the layer (``conv1``, ``conv1/mul``), its weights
``<layer>.<blob>``. Shapes are static, from the net's input shapes (or ``--input-shape``).

Semantics (Caffe's layer sources): BatchNorm divides its stored mean and variance by the
moving-average factor ``blobs[2]`` (a factor 0 gives 0) and normalises with ``eps``; it
becomes ``BatchNormalization`` with unit scale and zero bias. Scale / Bias multiply / add a
blob (or a second bottom) broadcast from ``axis`` over ``num_axes`` axes. Eltwise SUM
applies its coefficients; Pooling follows ``geometry.py``; InnerProduct flattens from
``axis``. Layer kinds live in ``layers.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import BadInput
from ..graph_builder import GraphBuilder


class CaffeGraph:
    def __init__(self, net: Any, blobs: dict, input_shapes: dict[str, list[int]]):
        self.net = net  # prototxt.CaffeNet
        self.model_blobs = blobs  # layer name -> [BlobProto]
        self.input_shapes = input_shapes  # input blob -> shape
        self.b = GraphBuilder()
        self.values: dict[str, Any] = {}  # blob -> current value
        self.shapes: dict[int, list[int]] = {}  # id(value) -> static shape
        self.arrays: dict[str, list] = {}  # layer name -> blobs as read (for the writers)
        self.version_of: dict[str, tuple] = {}  # value name -> blob version: (layer, top) or ("input", blob)
        self.bottom_versions: dict[int, list[tuple]] = {}  # layer -> the versions its bottoms read
        self._last_write: dict[str, tuple[int, int]] = {}

    # -- plumbing ----------------------------------------------------------------------------
    def shape(self, v: Any) -> list[int]:
        return self.shapes[id(v)]

    def set_shape(self, v: Any, shape: list[int]) -> Any:
        self.shapes[id(v)] = [int(d) for d in shape]
        return v

    def op(self, layer: Any, op: str, inputs: list, step: str, shape: list[int], **attrs: Any) -> Any:
        name = layer.name if not step else f"{layer.name}/{step}"
        out = f"{name}/output" if name in self._last_write else name  # a blob's own name is for its last value
        v = self.b.op(op, inputs, name, layer.index, attrs, out=out)
        return self.set_shape(v, shape)

    def const(self, layer: Any, array: Any, what: str) -> Any:
        v = self.b.const(array, f"{layer.name}.{what}")
        return self.set_shape(v, list(np.shape(array)))

    def weights(self, layer: Any, expected: list[tuple | None]) -> list:
        """The layer's blobs from the .caffemodel, as float32 arrays of the expected shapes."""
        from .prototxt import blob_array

        where = f"{self.net.name}: {layer.where()}"
        blobs = self.model_blobs.get(layer.name)
        if blobs is None:
            raise BadInput(f"{where}: the .caffemodel has no weights for it", code="weights-mismatch")
        if len(blobs) != len(expected):
            raise BadInput(f"{where}: the .caffemodel has {len(blobs)} blobs for it, {len(expected)} expected",
                           code="weights-mismatch")
        arrays = [blob_array(b, e, where, k) for k, (b, e) in enumerate(zip(blobs, expected))]
        self.arrays[layer.name] = arrays
        return arrays

    # -- the net -------------------------------------------------------------------------------
    def build(self) -> tuple[Any, dict]:
        from .layers import HANDLERS

        b = self.b
        net = self.net
        for k, layer in enumerate(net.layers):
            for t, top in enumerate(layer.param.top):
                self._last_write[top] = (k, t)
        for name, shape in self.input_shapes.items():
            v = b.input(name, shape)
            self.set_shape(v, shape)
            self.values[name] = v
            self.version_of[v.name] = ("input", name)
        for blob in self._last_write:
            b.reserve(blob)
        consumed_after: dict[str, bool] = {}
        produced_order: list[str] = []
        final_names: set[str] = set(self.input_shapes)
        for k, layer in enumerate(net.layers):
            where = f"{net.name}: {layer.where()}"
            bottoms = []
            for bname in layer.param.bottom:
                if bname not in self.values:
                    raise BadInput(f"{where}: bottom {bname!r} is not produced by any earlier layer or input")
                bottoms.append(self.values[bname])
                consumed_after[bname] = True
            self.bottom_versions[k] = [self.version_of[v.name] for v in bottoms]
            tops = HANDLERS[layer.type](self, layer, bottoms, where)
            if len(tops) != len(layer.param.top):
                raise BadInput(f"{where}: produces {len(tops)} outputs, the prototxt names {len(layer.param.top)} tops")
            for t, (top, v) in enumerate(zip(layer.param.top, tops)):
                final = self._last_write[top] == (k, t)
                owned = v.producer() is not None and self._owned(v, layer)
                if final and (owned or (v.producer() is not None and v.name not in final_names)):
                    v.name = top  # a blob's last value carries the blob's name
                    final_names.add(top)
                if owned or v.name not in self.version_of:
                    self.version_of[v.name] = (k, t)
                self.values[top] = v
                consumed_after[top] = False
                if top not in produced_order:
                    produced_order.append(top)
        for blob in produced_order:
            if not consumed_after[blob]:
                b.output(self.values[blob])
        if not b.outputs:
            raise BadInput(f"{net.name}: every blob is read by a later layer: the net has no output")
        model = b.build(net.name, "read from a Caffe .prototxt + .caffemodel by modelsurgeon")
        return model, b.owner

    def _owned(self, v: Any, layer: Any) -> bool:
        """Is ``v`` made by this layer's nodes (not passed through from a bottom)?"""
        return self.b.owner.get(v.producer().name) == layer.index
