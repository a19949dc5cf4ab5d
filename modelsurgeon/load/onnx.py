"""Read an ``.onnx`` file into an ``onnx_ir`` model (external data included).

* the protobuf is parsed without its external data; a file that is not an ONNX model is
  refused with one line;
* every tensor stored as external data must name a file inside the model's own directory
  (no absolute paths, no ``..``, no symlink leading out) that exists and is long enough --
  otherwise the file is refused before anything reads it;
* external tensors are then memory-mapped by onnx_ir, not copied (models over 2 GB);
* shapes are inferred (onnx shape inference, non-strict: custom ops just stay unknown).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadInput
from .checkpoint import Checkpoint


def _first_line(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _all_tensors(graph):
    """Every TensorProto of a GraphProto: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def check_external_data(proto, path: Path) -> bool:
    """Refuse external-data locations outside the model's directory; True if any tensor is external."""
    import onnx

    base = path.resolve().parent
    found = False
    sizes: dict[Path, int] = {}
    for t in _all_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        found = True
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if not loc:
            raise BadInput(f"{path.name}: tensor {t.name!r} is stored as external data without a location")
        if os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in Path(loc.replace("\\", "/")).parts:
            raise BadInput(f"{path.name}: tensor {t.name!r} points at external data {loc!r} outside the model's "
                           "directory; refused")
        target = (base / loc).resolve()
        if base not in target.parents:
            raise BadInput(f"{path.name}: tensor {t.name!r} points at external data {loc!r}, which resolves outside "
                           "the model's directory; refused")
        if target not in sizes:
            if not target.is_file():
                raise BadInput(f"{path.name}: external data file {loc!r} (tensor {t.name!r}) not found next to the model")
            sizes[target] = target.stat().st_size
        try:
            end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        except ValueError:
            raise BadInput(f"{path.name}: tensor {t.name!r} has a malformed external data offset/length")
        if end > sizes[target]:
            raise BadInput(f"{path.name}: external data file {loc!r} is too short for tensor {t.name!r} "
                           f"({sizes[target]} bytes, needs {end})")
    return found


def load_onnx(path: str | Path) -> Checkpoint:
    import onnx
    import onnx_ir as ir

    from ..capture.onnx import infer_shapes

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise BadInput(f"{path.name} is not a readable ONNX file: {_first_line(e)}")
    if not proto.HasField("graph") or proto.ir_version <= 0 or (not proto.graph.node and not proto.graph.output):
        raise BadInput(f"{path.name} is not an ONNX model (no graph in it)")
    external = check_external_data(proto, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise BadInput(f"{path.name}: cannot read the ONNX graph: {_first_line(e)}")
    del proto
    ir.external_data.set_base_dir(model.graph, path.resolve().parent)
    infer_shapes(model)
    ckpt = Checkpoint(path=path, format="onnx", container=model)
    ckpt.metadata = {"external_data": external}
    return ckpt
