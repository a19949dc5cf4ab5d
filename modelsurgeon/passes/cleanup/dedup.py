"""dedup-constants: initializers with the same type, shape and contents → one (onnx_ir's
``DeduplicateInitializersPass``), so that nodes computing the same thing from copies of a
constant become common subexpressions. Initializers that are graph inputs or outputs stay."""

from __future__ import annotations

from .base import IrPass

SIZE_LIMIT = 1 << 16  # elements: larger tensors are compared by no one (hashing them costs a read)


def duplicates(model) -> int:
    seen, dup = set(), 0
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or v.is_graph_input() or v.is_graph_output() or t.size > SIZE_LIMIT:
            continue
        try:
            key = (t.dtype, tuple(t.shape), t.tobytes())
        except Exception:
            continue
        dup += key in seen
        seen.add(key)
    return dup


class DedupConstants(IrPass):
    name = "dedup-constants"
    what = "duplicate initializer"

    count = staticmethod(duplicates)

    def run(self, model) -> None:
        from onnx_ir.passes.common import DeduplicateInitializersPass

        DeduplicateInitializersPass(size_limit=SIZE_LIMIT)(model)

    def size(self, model) -> int:
        return len(model.graph.initializers)
