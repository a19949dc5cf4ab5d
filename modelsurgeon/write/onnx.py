"""Write an edited ONNX model: one ``.onnx`` file, or ``.onnx`` + ``.onnx.data`` external data.

The IR keeps what the input had -- opset imports, IR version, graph input/output names,
producer, model and graph metadata, doc strings; shapes are re-inferred before writing
(:func:`modelsurgeon.capture.onnx.infer_shapes`). Tensors go to an external data file named
after the output when they would not fit a protobuf (2 GB) or when the input kept its weights
as external data; otherwise everything is inline. The files are first written to a temporary
directory next to the target, checked (ONNX checker, then parity in onnxruntime by the
caller), and only then moved into place (:func:`modelsurgeon.write.atomic.atomic_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import first_line

PROTO_LIMIT = 2 ** 31
EXTERNAL_THRESHOLD = PROTO_LIMIT - 2 ** 27
"""Total tensor bytes above which the output keeps its tensors as external data."""
EXTERNAL_MIN_TENSOR = 1024
"""Tensors smaller than this stay inline even in external-data outputs."""


def nbytes(tensor: Any) -> int:
    """Bytes of an IR tensor's data; string tensors (no fixed bit width) by their contents."""
    try:
        return int(tensor.nbytes)
    except (TypeError, ValueError):
        try:
            return int(sum(len(x) for x in tensor.numpy().reshape(-1)))
        except Exception:
            return 0


def tensor_bytes(model: Any) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += nbytes(v.const_value)
    for n in model.graph:
        if n.op_type == "Constant" and "value" in n.attributes:
            total += nbytes(n.attributes["value"].as_tensor())
    return total


def wants_external(model: Any, input_had_external: bool) -> bool:
    return input_had_external or tensor_bytes(model) > EXTERNAL_THRESHOLD


def write(model: Any, directory: Path, name: str, external: bool) -> Path:
    """Serialize ``model`` to ``directory/name`` (+ ``name.data`` when ``external``)."""
    import onnx_ir as ir

    target = Path(directory) / name
    if external:
        # tensors kept inline are copied first: onnx_ir would load and close their maps itself
        load_external(model, max_bytes=EXTERNAL_MIN_TENSOR)
        ir.save(model, str(target), external_data=f"{name}.data", size_threshold_bytes=EXTERNAL_MIN_TENSOR)
    else:
        load_external(model)
        target.write_bytes(ir.to_proto(model).SerializeToString())
    return target


def load_external(model: Any, max_bytes: int | None = None) -> int:
    """Copy the model's external initializers (those of at most ``max_bytes``, or all) into
    memory, in place; returns how many.

    The input's memory maps are never closed here: arrays the passes read from them (the
    constants a graph evaluated, a weight a matcher looked at) may still be alive, and closing
    a map under a live array raises ``BufferError``. The maps go away with the last array
    reading them; on an ``--in-place`` write the data file is replaced by a new one, so a map
    of the old one never sees the new bytes."""
    import numpy as np
    import onnx_ir as ir

    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if not isinstance(t, ir.ExternalTensor) or (max_bytes is not None and t.nbytes > max_bytes):
                continue
            value.const_value = ir.Tensor(np.array(t.numpy(), copy=True), name=t.name, dtype=t.dtype,
                                          doc_string=t.doc_string, metadata_props=dict(t.metadata_props))
            count += 1
    return count


def check(path: Path | bytes) -> str | None:
    """The ONNX checker's complaint about the file at ``path`` (or a serialized model), or ``None``."""
    import onnx

    try:
        onnx.checker.check_model(path if isinstance(path, bytes) else str(path))
    except Exception as e:
        return first_line(e)
    return None
