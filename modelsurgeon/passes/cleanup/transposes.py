"""merge-transposes: ``Transpose(Transpose(x, p1), p2)`` → ``Transpose(x, p1∘p2)``, or ``x``
itself when the composition is the identity. Chains of any length, through intermediate
results with no other reader."""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, attr, can_bypass, default_domain, facts


def _perm(node: Any, rank: int | None) -> list[int] | None:
    perm = attr(node, "perm")
    if perm is not None:
        return list(perm)
    return list(reversed(range(rank))) if rank is not None else None


class MergeTransposes(CleanupPass):
    name = "merge-transposes"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:

        def is_t(n: Any) -> bool:
            return n is not None and n.op_type == "Transpose" and default_domain(ctx, n) and bool(n.inputs)

        for node in ctx.graph.nodes:
            if not is_t(node):
                continue
            out = node.outputs[0]
            readers = list(out.consumers())
            if not out.is_graph_output() and readers and all(is_t(r) for r in readers):
                continue
            chain = [node]
            while True:
                x = chain[0].inputs[0]
                prev = x.producer() if x is not None else None
                if not is_t(prev) or x.is_graph_output() or len(x.uses()) != 1:
                    break
                chain.insert(0, prev)
            if len(chain) < 2:
                continue
            src = chain[0].inputs[0]
            shape = facts(ctx).fact(src).shape if src is not None else None
            rank = len(shape) if shape is not None else None
            total = list(range(rank)) if rank is not None else None
            for n in chain:
                perm = _perm(n, rank)
                if perm is None or (total is not None and len(perm) != len(total)):
                    total = None
                    break
                total = [total[i] for i in perm] if total is not None else perm
            if total is None:
                continue
            if total == list(range(len(total))) and not can_bypass(node, src):
                continue
            yield NodeMatch(node_label(node), node=node, data={"chain": chain, "src": src, "perm": total})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        ed, chain, src, perm = ctx.editor, m.data["chain"], m.data["src"], m.data["perm"]
        last = chain[-1]
        if perm == list(range(len(perm))):
            ed.replace_value(last.outputs[0], src)
            ed.remove_nodes(reversed(chain))
            return Applied(m.target, f"{len(chain)} Transposes removed: they compose to the identity")
        new = ed.add_node("Transpose", [src], last, f"{last.name or 'transpose'}_merged", {"perm": perm})
        ed.replace_value(last.outputs[0], new.outputs[0])
        ed.remove_nodes(reversed(chain))
        return Applied(m.target, f"{len(chain)} Transposes → Transpose {perm}")
