"""truncate on ONNX graphs: end the graph at named tensors.

``--at TENSOR`` (repeatable): those tensors become the graph outputs, in the order given (their
types and shapes from shape inference); every node they do not depend on is removed, and so
are graph inputs nothing reads any more. ``--list`` prints the candidate tensors (name,
producer op, shape) and writes nothing.

The model's function changes on purpose, so the pass is not part of ``optimize``. Parity:
the references are the ORIGINAL model's values of those tensors (the original is run with
them exposed as outputs, see :meth:`Truncate.prepare`), and each new output must equal its
reference like any other output.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable

from ...capture.onnx import OnnxGraph, format_shape, node_label, shape_of
from ...options.base import escape
from ..base import Applied, Match, OnnxContext, Pass, Skipped


@dataclass
class CutMatch(Match):
    values: list = field(default_factory=list)


def _activations(g: OnnxGraph) -> list:
    """(node, value) for every tensor computed at run time, in topological order."""
    out = []
    for n in g.nodes:
        for v in n.outputs:
            if v.name and not g.is_const(v):
                out.append((n, v))
    return out


class Truncate(Pass):
    name = "truncate"
    backend = "onnx"
    preserves_function = False

    def prepare(self, ctx: OnnxContext) -> list[str]:
        """Check ``--at`` against the graph; the tensors the references must include."""
        o = ctx.options
        if o.list_blocks:
            return []
        at = list(dict.fromkeys(o.at))
        if not at:
            o.fail("truncate on an ONNX model needs {at} (repeatable); {list_blocks} shows the candidates",
                   at=..., list_blocks=...)
        g = ctx.graph
        values = g.values_by_name()
        for name in at:
            v = values.get(name)
            if v is None:
                close = difflib.get_close_matches(name, [v.name for _, v in _activations(g)], n=3)
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                o.fail("{at}: no tensor of that name in the graph" + escape(hint) + "; {list_blocks} shows the "
                       "candidates", at=name, list_blocks=...)
            if v.is_graph_input():
                o.fail("{at} is a graph input, not a computed tensor", at=name)
            if g.is_const(v):
                o.fail("{at} is a constant (a weight), not a computed tensor", at=name)
        return at

    def match(self, ctx: OnnxContext) -> Iterable[Match | Skipped]:
        at = self.prepare(ctx)
        if ctx.options.list_blocks:  # an inspection: list the candidates, change nothing
            ctx.report_extra["tensors"] = self.listing(ctx)
            ctx.stop = "--list: candidate tensors listed, nothing rewritten"
            return
        values = ctx.graph.values_by_name()
        yield CutMatch(target=", ".join(at), values=[values[n] for n in at])

    def rewrite(self, ctx: OnnxContext, m: CutMatch) -> Applied:
        graph, ed = ctx.model.graph, ctx.editor
        old = [v.name for v in graph.outputs]
        nodes_before = len(graph)
        graph.outputs.clear()
        graph.outputs.extend(m.values)
        ed.cleanup()
        dropped = []
        for v in list(graph.inputs):
            if not v.is_initializer() and not v.uses() and not v.is_graph_output():
                graph.inputs.remove(v)
                dropped.append(v.name)
        removed = nodes_before - len(graph)
        new = [v.name for v in m.values]
        detail = f"outputs {', '.join(old)} → {', '.join(f'{v.name} {format_shape(shape_of(v))}' for v in m.values)}; " \
                 f"{removed} node{'s' if removed != 1 else ''} removed"
        if dropped:
            detail += f"; inputs no longer read: {', '.join(dropped)}"
        return Applied(m.target, detail, {"outputs": new, "previous_outputs": old, "removed_nodes": removed,
                                          "removed_inputs": dropped})

    def listing(self, ctx: OnnxContext) -> list[dict]:
        """Candidate tensors for ``--at``: every computed tensor, in topological order."""
        rows = []
        for i, (n, v) in enumerate(_activations(ctx.graph)):
            rows.append({"index": i, "name": v.name, "op": n.op_type, "node": node_label(n),
                         "shape": format_shape(shape_of(v)), "dtype": str(v.dtype.numpy()) if v.dtype is not None else "?",
                         "output": v.is_graph_output()})
        return rows
