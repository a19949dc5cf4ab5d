"""merge-reshapes: a chain of ``Reshape`` / ``Flatten`` / ``Squeeze`` / ``Unsqueeze`` → one
``Reshape`` (or nothing, when the chain ends at its input's shape).

Only the element order matters to such a chain, so its result is its first input reshaped to its
last output's shape. That shape is written as a constant: a static size as itself, a symbolic
size equal to the input's at the same position as ``0`` (copy), at most one other symbolic size
as ``-1`` (inferred). Chains whose intermediate results have other readers, or whose final shape
has two unrelated symbolic sizes, are left as they are.
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ..base import Applied, OnnxContext
from .base import CleanupPass, NodeMatch, default_domain, facts

VIEWS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}


def is_view(ctx: OnnxContext, node: Any) -> bool:
    return node is not None and node.op_type in VIEWS and default_domain(ctx, node) and bool(node.inputs)


def target_for(src: tuple, dst: tuple) -> list[int] | None:
    """A Reshape target taking a tensor of shape ``src`` to ``dst`` (see the module docstring)."""
    out, free = [], 0
    for i, d in enumerate(dst):
        if isinstance(d, int):
            if d == 0:
                return None  # an empty dimension: 0 would mean "copy"
            out.append(d)
        elif i < len(src) and src[i] == d:
            out.append(0)
        else:
            free += 1
            out.append(-1)
    return out if free <= 1 else None


class MergeReshapes(CleanupPass):
    name = "merge-reshapes"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch]:
        for node in ctx.graph.nodes:
            if not is_view(ctx, node):
                continue
            out = node.outputs[0]
            readers = list(out.consumers())
            if not out.is_graph_output() and readers and all(is_view(ctx, r) and r.inputs[0] is out for r in readers):
                continue  # not the end of a chain
            chain = [node]
            while True:
                x = chain[0].inputs[0]
                prev = x.producer() if x is not None else None
                if not is_view(ctx, prev) or x.is_graph_output() or len(x.uses()) != 1:
                    break
                chain.insert(0, prev)
            if len(chain) < 2:
                continue
            src = chain[0].inputs[0]
            p = facts(ctx)
            s, d = p.fact(src).shape, p.fact(out).shape
            if s is None or d is None or src is None:
                continue
            if s == d:
                yield NodeMatch(node_label(node), node=node, data={"chain": chain, "src": src, "target": None})
                continue
            target = target_for(s, d)
            if target is not None:
                yield NodeMatch(node_label(node), node=node, data={"chain": chain, "src": src, "target": target})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        import numpy as np

        ed, chain, src, target = ctx.editor, m.data["chain"], m.data["src"], m.data["target"]
        last = chain[-1]
        ops = " → ".join(n.op_type for n in chain)
        if target is None and src is not None and not (last.outputs[0].is_graph_output()
                                                         and (src.is_graph_input() or src.is_initializer()
                                                              or src.is_graph_output())):
            ed.replace_value(last.outputs[0], src)
            ed.remove_nodes(reversed(chain))
            return Applied(m.target, f"{ops} removed: it ends at its input's shape", {"removed": len(chain)})
        if target is None:
            target = [0] * len(facts(ctx).fact(src).shape)
        shape = ed.add_initializer(np.array(target, np.int64), f"{last.name or 'reshape'}_shape")
        new = ed.add_node("Reshape", [src, shape], last, f"{last.name or 'reshape'}_merged")
        ed.replace_value(last.outputs[0], new.outputs[0])
        ed.remove_nodes(reversed(chain))
        return Applied(m.target, f"{ops} → Reshape {target}", {"merged": len(chain)})
