"""Read an ``.onnx`` file into an ``onnx_ir`` model (external data included).

* the protobuf is parsed without its external data; a file that is not an ONNX model is
  refused with one line;
* every tensor stored as external data must name a file inside the model's own directory
  (no absolute paths, no ``..``, no symlink leading out) that exists and is long enough --
  otherwise the file is refused before anything reads it;
* external tensors are then memory-mapped by onnx_ir, not copied (models over 2 GB);
* a file that is not valid ONNX (a node reading a tensor nothing produces, a tensor produced
  twice) or that is a PyTorch checkpoint renamed ``.onnx`` is refused with one line saying so;
* sparse initializers are densified (as onnxruntime does), since the IR has no place for them;
* shapes are inferred (onnx shape inference, non-strict: custom ops just stay unknown);
* onnx_ir's own log lines are kept off stderr.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import BadInput, first_line
from .checkpoint import Checkpoint


def _subgraphs(attr) -> list:
    """The GraphProtos an attribute holds (an ``If`` branch, a ``Loop`` / ``Scan`` body)."""
    return ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)


def _all_tensors(graph):
    """Every TensorProto of a GraphProto: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in _subgraphs(attr):
                yield from _all_tensors(sub)


def _torch_magic(path: Path) -> bool:
    """Does the file start like a PyTorch checkpoint (zip archive or pickle)?"""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _node_label(node) -> str:
    return f"node {node.name!r}" if node.name else f"a {node.op_type} node"


def graph_problem(graph, outer: frozenset = frozenset()) -> str | None:
    """What makes a GraphProto invalid as a dataflow graph, or ``None``: a tensor produced
    twice (or by a node and as an input / initializer), a node input or graph output that no
    node, input or initializer (of this graph or an enclosing one) produces. Nodes may be in
    any order (sorting is the writer's job)."""
    declared = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    declared |= {t.values.name for t in graph.sparse_initializer}
    produced: dict[str, object] = {}
    for n in graph.node:
        for o in n.output:
            if not o:
                continue
            if o in produced:
                return f"tensor {o!r} is produced twice (by {_node_label(produced[o])} and {_node_label(n)})"
            if o in declared:
                return f"{_node_label(n)} writes {o!r}, which is already a graph input or initializer"
            produced[o] = n
    scope = outer | declared | set(produced)
    for n in graph.node:
        for i in n.input:
            if i and i not in scope:
                return f"{_node_label(n)} reads {i!r}, which no node, input or initializer produces"
        for attr in n.attribute:
            for sub in _subgraphs(attr):
                why = graph_problem(sub, frozenset(scope))
                if why:
                    return why
    for o in graph.output:
        if o.name and o.name not in scope:
            return f"graph output {o.name!r} is not produced by any node, input or initializer"
    return None


DENSE_LIMIT = 1 << 30
"""Largest dense tensor (bytes) a sparse initializer may expand to."""


def densify_sparse(graph, path: Path) -> int:
    """Turn the sparse initializers of ``graph`` (subgraphs included) into dense ones of the
    same name, as onnxruntime does when it loads them; returns how many."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    count = 0
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                count += densify_sparse(sub, path)
    for sp in graph.sparse_initializer:
        name = sp.values.name
        if onnx.TensorProto.EXTERNAL in (sp.values.data_location, sp.indices.data_location):
            raise BadInput(f"{path.name}: sparse initializer {name!r} is stored as external data: not supported")
        try:
            values = numpy_helper.to_array(sp.values).reshape(-1)
            indices = numpy_helper.to_array(sp.indices).astype(np.int64)
            dims = [int(d) for d in sp.dims]
            size = int(np.prod(dims)) if dims else 1
            if size * values.dtype.itemsize > DENSE_LIMIT:
                raise BadInput(f"{path.name}: sparse initializer {name!r} would take "
                               f"{size * values.dtype.itemsize / 2**30:.1f} GB as a dense tensor: not supported")
            dense = np.zeros(size, dtype=values.dtype)
            if indices.ndim == 2:  # [NNZ, rank] coordinates
                flat = np.ravel_multi_index(tuple(indices.T), dims) if dims else np.zeros(len(indices), np.int64)
            else:  # linearised indices
                flat = indices.reshape(-1)
            dense[flat] = values
        except BadInput:
            raise
        except Exception as e:
            raise BadInput(f"{path.name}: sparse initializer {name!r} cannot be read: {first_line(e)}")
        graph.initializer.append(numpy_helper.from_array(dense.reshape(dims), name))
        count += 1
    del graph.sparse_initializer[:]
    return count


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


def _deepest_message(e: BaseException) -> str:
    """The first line of the innermost cause: onnx_ir wraps what is wrong ("Output 'c' is
    redeclared...") in "Error calling _deserialize_graph with: g"."""
    while e.__cause__ is not None and e.__cause__ is not e:
        e = e.__cause__
    return first_line(e)


def load_onnx(path: str | Path) -> Checkpoint:
    import onnx
    import onnx_ir as ir

    from ..capture.onnx import infer_shapes, quiet_onnx_ir

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        if _torch_magic(path):
            raise BadInput(f"{path.name} looks like a PyTorch checkpoint (zip/pickle), not ONNX")
        raise BadInput(f"{path.name} is not a readable ONNX file: {first_line(e)}")
    if not proto.HasField("graph") or proto.ir_version <= 0 or (not proto.graph.node and not proto.graph.output):
        if _torch_magic(path):
            raise BadInput(f"{path.name} looks like a PyTorch checkpoint (zip/pickle), not ONNX")
        raise BadInput(f"{path.name} is not an ONNX model (no graph in it)")
    why = graph_problem(proto.graph)
    if why:
        raise BadInput(f"{path.name}: the graph is not valid: {why}")
    external = check_external_data(proto, path)
    densified = densify_sparse(proto.graph, path)
    try:
        with quiet_onnx_ir():
            model = ir.serde.deserialize_model(proto)
    except Exception as e:
        raise BadInput(f"{path.name}: the graph is not valid: {_deepest_message(e)}")
    del proto
    ir.external_data.set_base_dir(model.graph, path.resolve().parent)
    infer_shapes(model)
    ckpt = Checkpoint(path=path, format="onnx", container=model)
    ckpt.metadata = {"external_data": external}
    if densified:
        ckpt.metadata["sparse_initializers"] = densified
    return ckpt
