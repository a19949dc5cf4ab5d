"""fuse-pad: a ``Pad`` folded into the ``Conv`` / ``AveragePool`` that reads it.

Exact when the Pad adds zeros (``constant`` mode, value 0) on spatial axes only, by
non-negative amounts, and every reader is a Conv (no ``auto_pad``) or an AveragePool (no
``auto_pad``, no ``ceil_mode``, counting padded zeros: ``count_include_pad`` = 1, or no padding
of its own) reading it as its data input: their ``pads`` grow by the Pad's. This is how TF
"SAME" padding (asymmetric) ends up a plain Conv once its amounts are constant. Not folded,
with the reason: reflect/edge padding, a non-zero value, negative (cropping) or batch/channel
pads, other readers (MaxPool pads with -inf, not zeros).
"""

from __future__ import annotations

from typing import Any, Iterable

from ...capture.onnx import node_label
from ...report.codes import Refusal
from ..base import Applied, OnnxContext, Skipped
from .base import CleanupPass, NodeMatch, attr, const, default_domain, facts

READERS = {"Conv", "AveragePool"}


class FusePad(CleanupPass):
    name = "fuse-pad"

    def match(self, ctx: OnnxContext) -> Iterable[NodeMatch | Skipped]:
        for node in ctx.graph.nodes:
            if node.op_type != "Pad" or not default_domain(ctx, node):
                continue
            readers = list(node.outputs[0].consumers())
            if not readers or node.outputs[0].is_graph_output() or not any(r.op_type in READERS for r in readers):
                continue
            found = _pads(ctx, node)
            if isinstance(found, Refusal):
                yield Skipped(node_label(node), found)
                continue
            why = next((w for w in (_reader_problem(r, node.outputs[0]) for r in readers) if w), None)
            if why:
                yield Skipped(node_label(node), why)
                continue
            yield NodeMatch(node_label(node), node=node, data={"pads": found, "readers": readers})

    def rewrite(self, ctx: OnnxContext, m: NodeMatch) -> Applied:
        node, (begin, end) = m.node, m.data["pads"]
        src = node.inputs[0]
        for r in m.data["readers"]:
            k = len(begin)
            own = list(attr(r, "pads", [0] * 2 * k))
            ctx.editor.set_attr(r, "pads", [own[i] + begin[i] for i in range(k)] + [own[k + i] + end[i] for i in range(k)])
            if r.op_type == "AveragePool":
                ctx.editor.set_attr(r, "count_include_pad", 1)
            r.replace_input_with(0, src)
        label = node_label(node)
        ctx.editor.remove_nodes([node])
        names = ", ".join(node_label(r) for r in m.data["readers"])
        return Applied(label, f"Pad {begin}+{end} folded into {names}", {"into": [node_label(r) for r in m.data["readers"]]})


def _pads(ctx: OnnxContext, node: Any) -> tuple[list[int], list[int]] | Refusal:
    """(spatial begins, spatial ends) of a zero Pad, or why it cannot be folded."""
    import numpy as np

    mode = attr(node, "mode", "constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return Refusal("layer-settings", f"{mode} padding is not zeros")
    if len(node.inputs) >= 2:
        pads = const(ctx, node.inputs[1])
        if pads is None:
            return Refusal("computed-tensor", "its pads are computed at run time")
        pads = [int(v) for v in pads.reshape(-1)]
        value = const(ctx, node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(1)
        if value is None:
            return Refusal("computed-tensor", "its padding value is computed at run time")
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            return Refusal("layer-settings", "it pads selected axes (axes input)")
    else:
        pads, value = [int(v) for v in attr(node, "pads", [])], np.array(attr(node, "value", 0.0))
    if np.any(np.asarray(value, dtype=np.float64) != 0):
        return Refusal("layer-settings", f"it pads with {np.asarray(value).reshape(-1)[0]!r}, not zero")
    rank = len(pads) // 2
    shape = facts(ctx).fact(node.inputs[0]).shape
    if rank < 3 or (shape is not None and len(shape) != rank):
        return Refusal("layer-settings", "not a padding of an N×C×spatial tensor")
    begin, end = pads[:rank], pads[rank:]
    if begin[0] or begin[1] or end[0] or end[1]:
        return Refusal("other-axis", "it pads the batch or channel axis")
    if any(v < 0 for v in pads):
        return Refusal("layer-settings", "it crops (negative pads)")
    return begin[2:], end[2:]


def _reader_problem(reader: Any, value: Any) -> Refusal | None:
    label = f"{reader.op_type} {node_label(reader)}"
    if reader.op_type not in READERS or reader.domain not in ("", "ai.onnx"):
        return Refusal("other-readers", f"it is also read by {label}, which cannot take its padding")
    if not reader.inputs or reader.inputs[0] is not value or any(v is value for v in reader.inputs[1:]):
        return Refusal("other-readers", f"{label} reads it as a weight")
    auto = attr(reader, "auto_pad", "NOTSET")
    if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", ""):
        return Refusal("layer-settings", f"{label} uses auto_pad")
    if reader.op_type == "AveragePool":
        if int(attr(reader, "ceil_mode", 0)):
            return Refusal("layer-settings", f"{label} uses ceil_mode")
        if not int(attr(reader, "count_include_pad", 0)) and any(attr(reader, "pads", [0])):
            return Refusal("layer-settings", f"{label} pads itself and leaves its padding out of the average")
    return None
