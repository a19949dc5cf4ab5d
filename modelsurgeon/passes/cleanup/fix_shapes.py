"""fix-input-shapes: symbolic input dimensions given a size with ``--input-shape`` become that
size in the written model, so that everything computed from them folds.

Only dimensions the user sized are fixed (a symbolic batch that defaulted to 1 for verification
stays symbolic), and not with ``optimize --keep-symbolic``. A graph output dimension carrying the
same ``dim_param`` name is fixed with it. Each input is reported with the dimensions fixed.
"""

from __future__ import annotations

from typing import Iterable

from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch


class FixInputShapes(CleanupPass):
    name = "fix-input-shapes"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        if ctx.options.keep_symbolic:
            return
        for v in ctx.model.graph.inputs:
            given = ctx.given_shapes.get(v.name)
            if v.is_initializer() or given is None or v.shape is None or len(v.shape.dims) != len(given):
                continue
            fixed = [(i, getattr(d, "value", None), int(given[i])) for i, d in enumerate(v.shape.dims)
                     if not isinstance(d, int)]
            if fixed:
                yield NodeMatch(v.name, data={"value": v, "fixed": fixed})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import onnx_ir as ir

        v, fixed = m.data["value"], m.data["fixed"]
        dims = list(v.shape.dims)
        names = {}
        for i, name, size in fixed:
            dims[i] = size
            if name:
                names[name] = size
        v.shape = ir.Shape(dims)
        for out in ctx.model.graph.outputs:  # the same named size in the declared outputs
            if out.shape is not None and any(getattr(d, "value", None) in names for d in out.shape.dims):
                out.shape = ir.Shape([names.get(getattr(d, "value", None), d) if not isinstance(d, int) else d
                                      for d in out.shape.dims])
        said = ", ".join(f"dim {i}{f' ({name})' if name else ''} → {size}" for i, name, size in fixed)
        return Applied(m.target, f"fixed {said}", {"fixed": [{"dim": i, "name": name, "size": size}
                                                             for i, name, size in fixed]})
