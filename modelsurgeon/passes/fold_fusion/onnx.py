"""fold-fusion on ONNX graphs.

Details: docs/architecture.md (*The ONNX back end*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.onnx import EvaluationError, OnnxGraph, node_label
from ...match.onnx import LINEAR
from ..base import Applied, Match, OnnxContext, Pass, Skipped
from ..fold_bn.onnx import FoldMatch, apply_fold, find_folds

def _numeric(arr: Any) -> bool:
    return arr is not None and getattr(arr, "dtype", None) is not None and arr.dtype.kind in "biufc"


MAX_GROWTH_BYTES = 1 << 20
"""A constant result may exceed what it is computed from by at most this many bytes."""


@dataclass
class EvalMatch(Match):
    nodes: list = field(default_factory=list)
    values: list = field(default_factory=list)  # (ir.Value, np.ndarray)


def _components(g: OnnxGraph) -> list[list]:
    """Connected groups of evaluable nodes computed from constants only (Constant nodes aside)."""
    members = [n for n in g.nodes
               if n.op_type != "Constant" and n.outputs and g.evaluable(n) and all(g.is_const(o) for o in n.outputs)]
    ids = {id(n): i for i, n in enumerate(members)}
    parent = list(range(len(members)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for n in members:
        for v in n.inputs:
            p = v.producer() if v is not None else None
            if p is not None and id(p) in ids:
                parent[find(ids[id(n)])] = find(ids[id(p)])
    groups: dict[int, list] = {}
    for n in members:
        groups.setdefault(find(ids[id(n)]), []).append(n)
    return list(groups.values())


def _leaf_bytes(g: OnnxGraph, nodes: list) -> int:
    inside = {id(n) for n in nodes}
    total, seen = 0, set()
    for n in nodes:
        for v in n.inputs:
            if v is None or id(v) in seen or (v.producer() is not None and id(v.producer()) in inside):
                continue
            seen.add(id(v))
            try:
                arr = g.const_array(v)
            except EvaluationError:
                continue
            total += int(arr.nbytes) if arr is not None else 0
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


class FoldFusion(Pass):
    name = "fold-fusion"
    backend = "onnx"

    def match(self, ctx: OnnxContext) -> Iterable[Match | Skipped]:
        g = ctx.graph
        evaluated: set[int] = set()
        for nodes in _components(g):
            inside = {id(n) for n in nodes}
            boundary = [o for n in nodes for o in n.outputs
                        if o.is_graph_output() or any(id(c) not in inside for c in o.consumers())]
            if not boundary:
                continue
            target = ", ".join(v.name for v in boundary[:3]) + (", ..." if len(boundary) > 3 else "")
            if any(v.is_graph_output() for v in boundary):
                yield Skipped(target, "a constant graph output: left as computed", code="model-output")
                continue
            try:
                arrays = g.evaluate(boundary)
            except EvaluationError as e:
                yield Skipped(target, f"the constant subgraph cannot be evaluated ({e})", code="unevaluable")
                continue
            if not all(_numeric(a) for a in arrays):
                yield Skipped(target, "a non-numeric (string) constant: left as computed", code="non-numeric")
                continue
            out_bytes, in_bytes = sum(int(a.nbytes) for a in arrays), _leaf_bytes(g, nodes)
            if out_bytes > in_bytes + MAX_GROWTH_BYTES:
                yield Skipped(target, f"evaluating it would store {_mb(out_bytes)} computed from {_mb(in_bytes)}", code="too-large")
                continue
            evaluated.update(id(n) for n in nodes)
            yield EvalMatch(target=target, nodes=nodes, values=list(zip(boundary, arrays)))
        lift = [n for n in g.nodes if n.op_type == "Constant" and g.evaluable(n) and len(n.outputs) == 1
                and not n.outputs[0].is_graph_output() and any(id(c) not in evaluated for c in n.outputs[0].consumers())]
        if lift:
            try:
                values = [(n.outputs[0], g.const_array(n.outputs[0])) for n in lift]
            except EvaluationError as e:
                yield Skipped("Constant nodes", f"cannot be read ({e})", code="unevaluable")
            else:
                values = [(v, a) for v, a in values if _numeric(a)]  # string Constants stay nodes
                lift = [v.producer() for v, _ in values]
                if lift:
                    yield EvalMatch(target=f"{len(lift)} Constant node{'s' if len(lift) > 1 else ''}", nodes=lift,
                                    values=values)
        yield from find_folds(ctx, allow_bn=False)
        for node in g.nodes:
            if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2:
                continue
            for i, v in enumerate(node.inputs):
                p = v.producer() if v is not None else None
                other = node.inputs[1 - i]
                if (p is not None and p.op_type in LINEAR and g.reader_count(v) > 1 and g.is_const(other)
                        and not g.is_const(v) and (node.op_type == "Mul" or i == 0)):
                    yield Skipped(node_label(node), f"the {p.op_type} output it scales has {g.reader_count(v)} readers "
                                                    f"({g.describe_readers(v)}): kept as one {node.op_type} by a constant", code="other-readers")
                    break

    def rewrite(self, ctx: OnnxContext, m: Match) -> Applied:
        if isinstance(m, FoldMatch):
            return apply_fold(ctx, m)
        ed = ctx.editor
        labels = [node_label(n) for n in m.nodes]
        made, names = [], []
        for v, arr in m.values:
            names.append(v.name)
            made.append(f"{v.name} {list(arr.shape)}")
            ed.replace_with_constant(v, arr)
        ed.remove_nodes(m.nodes)
        ops = [n.op_type for n in m.nodes]
        if set(ops) == {"Constant"}:
            return Applied(m.target, f"{len(ops)} Constant node{'s' if len(ops) > 1 else ''} made initializers "
                                     f"(same names): {', '.join(made[:4])}{', ...' if len(made) > 4 else ''}",
                           {"lifted": names})
        return Applied(m.target, f"evaluated {len(ops)} constant node{'s' if len(ops) > 1 else ''} "
                                 f"({', '.join(ops[:8])}{', ...' if len(ops) > 8 else ''}) → initializer "
                                 + ", ".join(made),
                       {"evaluated": labels, "initializers": names})
