"""reparam on ONNX graphs: each multi-branch block (:mod:`modelsurgeon.match.branches_onnx`:
Conv → BatchNormalization / Mul / Add branches, identities, average pooling, summed by Add /
Sum, per-channel affine nodes after the sum) becomes one ``Conv`` of the branches' input,
merged in float64 (:mod:`modelsurgeon.rewrite.kernels`) and stored in the first branch
conv's weight dtype; the branch nodes become dead and go with the clean-up."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any, Iterable

from ...capture.onnx import node_label
from ...match.branches_onnx import OnnxBlock, find_blocks
from ...rewrite import kernels as K
from ..base import Applied, Match, OnnxContext, Pass, Skipped
from .torch import MERGE_CODES, MERGE_REASONS, _num


@dataclass
class OnnxReparam(Match):
    block: OnnxBlock = None
    conv: K.ConvMap = None


def _flops(ctx: OnnxContext, convs: list[tuple[Any, tuple]]) -> int | None:
    """``2 · output elements · weight elements per output`` summed (batch of one)."""
    total = 0
    for out, w in convs:
        s = ctx.graph.propagated_shape(out) or (tuple(out.shape) if out.shape is not None else None)
        if s is None or not all(isinstance(d, int) for d in s[1:]):
            return None
        total += 2 * prod(s[1:]) * prod(w[1:])
    return total


class Reparam(Pass):
    name = "reparam"
    backend = "onnx"

    def match(self, ctx: OnnxContext) -> Iterable[Match | Skipped]:
        for b in find_blocks(ctx.graph):
            if b.problem is not None:
                yield Skipped(b.target, b.problem.reason, code=b.problem.code)
                continue
            try:
                m = K.merge(b.maps)
            except ValueError as e:
                yield Skipped(b.target, MERGE_REASONS.get(str(e), str(e)), code=MERGE_CODES.get(str(e), "layer-settings"))
                continue
            for st in b.post:
                m = K.then_affine(m, *st.map)
            yield OnnxReparam(target=b.target, block=b, conv=m)

    def rewrite(self, ctx: OnnxContext, m: OnnxReparam) -> Applied:
        b, c, ed, g = m.block, m.conv, ctx.editor, ctx.graph
        convs = [s.event for stages in b.branches for s in stages if s.kind == "conv"]
        dtype = g.const_array(convs[0].inputs[1]).dtype
        before = _flops(ctx, [(n.outputs[0], tuple(g.const_array(n.inputs[1]).shape)) for n in convs])
        params = sum(int(v.const_value.size) for stages in b.branches for s in stages for v in s.event.inputs[1:]
                     if v is not None and v.const_value is not None) + \
            sum(int(v.const_value.size) for s in b.post for v in s.event.inputs[1:] if v is not None and v.const_value is not None)
        base = node_label(convs[0]).replace("/", "_").strip("_") or "reparam"
        w = ed.add_initializer(c.weight.numpy(), f"{base}_reparam_weight", dtype=dtype)
        bias = ed.add_initializer(c.bias.numpy(), f"{base}_reparam_bias", dtype=dtype)
        node = ed.add_node("Conv", [b.source, w, bias], b.final.producer(), f"{base}_reparam", {
            "kernel_shape": list(c.kernel), "strides": list(c.stride), "dilations": list(c.dilation),
            "pads": [c.padding[0], c.padding[1], c.padding[0], c.padding[1]], "group": c.groups})
        after = _flops(ctx, [(b.final, tuple(c.weight.shape))])
        ed.replace_value(b.final, node.outputs[0])
        branches = b.describe()
        k = "×".join(map(str, c.kernel))
        figures = (f"; FLOPs {_num(before)} → {_num(after)}" if before is not None and after is not None else "")
        detail = (f"{len(branches)} branches ({', '.join(branches)}"
                  + (f"; then {', '.join(node_label(s.event) for s in b.post)}" if b.post else "")
                  + f") → Conv {node.name} {k}" + (f"/g{c.groups}" if c.groups > 1 else "")
                  + figures + f", params {_num(params)} → {_num(int(c.weight.numel() + c.bias.numel()))}")
        return Applied(m.target, detail, {
            "kind": "reparam", "conv": node.name, "branches": branches, "kernel": list(c.kernel),
            "stride": list(c.stride), "padding": list(c.padding), "dilation": list(c.dilation), "groups": c.groups,
            "flops": [before, after], "params": [params, int(c.weight.numel() + c.bias.numel())],
        })
