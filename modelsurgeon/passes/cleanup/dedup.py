"""dedup-constants: initializers with the same type, shape and contents → one (onnx_ir's
``DeduplicateInitializersPass``), so that nodes computing the same thing from copies of a
constant become common subexpressions. Initializers that are graph inputs or outputs stay."""

from __future__ import annotations

from typing import Iterable

from ..base import Applied, Match, OnnxContext
from .base import CleanupPass

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


class DedupConstants(CleanupPass):
    name = "dedup-constants"
    before = ("cse",)
    after = ("fold-fusion",)

    def match(self, ctx: OnnxContext) -> Iterable[Match]:
        n = duplicates(ctx.model)
        if n:
            yield Match(f"{n} duplicate initializer{'s' if n > 1 else ''}")

    def rewrite(self, ctx: OnnxContext, m: Match) -> Applied:
        from onnx_ir.passes.common import DeduplicateInitializersPass

        from ...capture.onnx import quiet_onnx_ir

        before = len(ctx.model.graph.initializers)
        with quiet_onnx_ir():
            DeduplicateInitializersPass(size_limit=SIZE_LIMIT)(ctx.model)
        ctx.editor._names = None
        return Applied(m.target, f"{before - len(ctx.model.graph.initializers)} initializers merged into their copies")
