"""Caffe models in: ``.prototxt`` + ``.caffemodel`` read into an ONNX graph.

``read_caffe(caffemodel, prototxt)`` returns a :class:`CaffeSource`: the ``onnx_ir`` model
(``.model``) and what a writer needs to put a rewritten graph back into Caffe files (the net
as parsed, the blobs as read, which node and which blob version belongs to which layer).
``load_caffe`` wraps it in a :class:`~modelsurgeon.read.checkpoint.Checkpoint` for the
pipeline, which runs it through the ONNX back end.

    schema.py     the caffe.proto subset, as protobuf messages built at run time
    prototxt.py   text and binary parsing, TEST-phase filtering, layer lines, blob shapes
    geometry.py   Caffe's parameter rules and output sizes (conv, pooling, reshape...)
    layers.py     one function per layer type
    graph.py      the ONNX graph, blob versions and names
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...errors import BadInput
from ..darknet import companion


@dataclass
class CaffeSource:
    net: Any  # prototxt.CaffeNet
    model: Any  # onnx_ir.Model
    owner: dict  # node name -> layer index
    version_of: dict  # value name -> blob version
    bottom_versions: dict  # layer index -> versions of its bottoms
    arrays: dict  # layer name -> blobs as read
    input_shapes: dict
    prototxt_path: Path | None = None
    caffemodel_path: Path | None = None
    onnx_bytes: bytes = field(default=b"", repr=False)


def _net_inputs(net: Any, given: Sequence[str], name: str) -> dict[str, list[int]]:
    """Input blobs and their shapes: ``input`` + ``input_shape`` / ``input_dim``, ``Input``
    layers; ``--input-shape`` (once per input, in that order) replaces them."""
    from ...verify.inputs import parse_shape

    p = net.net
    shapes: dict[str, list[int] | None] = {}
    for i, blob in enumerate(p.input):
        if p.input_shape:
            shape = [int(d) for d in p.input_shape[i].dim] if i < len(p.input_shape) else None
        elif p.input_dim:
            shape = [int(d) for d in p.input_dim[4 * i:4 * i + 4]] if len(p.input_dim) >= 4 * i + 4 else None
        else:
            shape = None
        shapes[blob] = shape
    for layer in net.layers:
        if layer.type == "Input":
            dims = list(layer.param.input_param.shape)
            for k, top in enumerate(layer.param.top):
                d = dims[k] if k < len(dims) else (dims[0] if len(dims) == 1 else None)
                shapes[top] = [int(x) for x in d.dim] if d is not None else None
    if not shapes:
        raise BadInput(f"{name}: no input (neither input: nor an Input layer)")
    if given:
        if len(given) != len(shapes):
            raise BadInput(f"the net has {len(shapes)} input{'s' if len(shapes) > 1 else ''} "
                           f"({', '.join(shapes)}): pass --input-shape once per input, in that order")
        return {blob: list(parse_shape(s)) for blob, s in zip(shapes, given)}
    missing = [b for b, s in shapes.items() if not s or any(d < 1 for d in s)]
    if missing:
        raise BadInput(f"{name}: input {missing[0]!r} has no shape in the prototxt: pass --input-shape")
    return {b: s for b, s in shapes.items() if s}


def read_caffe(caffemodel: str | Path, prototxt: str | Path | None = None,
               input_shapes: Sequence[str] = ()) -> CaffeSource:
    """Read ``caffemodel`` with its ``.prototxt`` (``prototxt``, or the one beside it) into ONNX."""
    import onnx_ir as ir

    from ...capture.onnx import infer_shapes
    from .graph import CaffeGraph
    from .layers import HANDLERS
    from .prototxt import read_caffemodel, read_prototxt

    caffemodel = Path(caffemodel)
    proto_path = companion(caffemodel, prototxt, ".prototxt", "--prototxt")
    net = read_prototxt(proto_path, set(HANDLERS))
    shapes = _net_inputs(net, input_shapes, proto_path.name)
    blobs = read_caffemodel(caffemodel)
    g = CaffeGraph(net, blobs, shapes)
    model, owner = g.build()
    infer_shapes(model)
    src = CaffeSource(net=net, model=model, owner=owner, version_of=g.version_of,
                      bottom_versions=g.bottom_versions, arrays=g.arrays, input_shapes=shapes,
                      prototxt_path=proto_path, caffemodel_path=caffemodel)
    src.onnx_bytes = ir.to_proto(model).SerializeToString()
    return src


def load_caffe(path: str | Path, prototxt: str | Path | None = None, input_shapes: Sequence[str] = ()) -> Any:
    from ..checkpoint import Checkpoint

    src = read_caffe(path, prototxt, input_shapes)
    ckpt = Checkpoint(path=Path(path), format="caffe", container=src.model, source=src)
    ckpt.notes.append(f"read with {src.prototxt_path.name}: {len(src.net.layers)} layers for the TEST phase")
    return ckpt
