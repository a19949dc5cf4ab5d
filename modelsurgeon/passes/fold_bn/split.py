"""fold-bn through a concatenation: one BatchNorm after ``torch.cat`` of conv outputs along the
channel axis (timm's ``MixedConv2d``: convs of different kernel sizes on channel splits) is
split, each channel slice folded into the conv producing it. Exact when every conv's output
is read by the concatenation only (so its channels land contiguous in it, and nothing else
sees the folded values).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...capture.graph import OUTPUT, DataflowGraph, OpEvent, Ref
from ...match.affine import ChannelAffine
from ...match.conv import CONV_OPS, ConvUnit, conv_unit, output_channel_axis
from ...match.reshape import shape_only_use
from ...report.codes import Refusal
from ..base import Applied, Match, TorchContext

CONCAT = {"cat", "concat", "concatenate"}


@dataclass
class SplitMatch(Match):
    units: list[ConvUnit] = field(default_factory=list)
    steps: list = field(default_factory=list)  # the one norm step, as fold-bn's walk finds it


def _readers(g: DataflowGraph, vid: int) -> list:
    return [u for u in g.uses(vid) if u == OUTPUT or not shape_only_use(g, u, vid)]


class SplitMatcher:
    """The split half of :class:`FoldBN` (uses its ``_step``)."""

    def _split_fold(self, g: DataflowGraph, ev: OpEvent, hooked: dict[int, str]) -> SplitMatch | Refusal | None:
        src = ev.args[0] if ev.args else None
        if not isinstance(src, Ref):
            return None
        cat = g.producer(src.value)
        if cat is None or cat.name not in CONCAT or len(cat.outputs) != 1 or not cat.args:
            return None
        parts = cat.args[0]
        out = g.value(cat.outputs[0]).shape
        dim = cat.arg(1, "dim", 0)
        if not isinstance(parts, (list, tuple)) or not out or not isinstance(dim, int) or dim % len(out) != 1:
            return None
        units = []
        for p in parts:
            prod = g.producer(p.value) if isinstance(p, Ref) else None
            if prod is None or prod.name not in CONV_OPS or output_channel_axis(prod.name, len(out)) != 1:
                return None
            if _readers(g, p.value) != [cat.id] or sum(1 for a in parts if a == p) != 1:
                return Refusal("other-readers", f"the output of the {prod.name} in {g.call(prod.scope).path or 'the model'} "
                               "it concatenates has other readers, so the layer cannot be changed")
            units.append(conv_unit(g, prod))
        if _readers(g, cat.outputs[0]) != [ev.id]:
            return None
        step = self._step(g, ev, cat.outputs[0], 1)
        if step is None:
            return None
        if isinstance(step, tuple):
            return step[1]
        if step.removal.kind == "neutralise":
            return None  # an inline batch_norm: left to the usual reason
        seen = next((hooked[v] for v in [p.value for p in parts] + [cat.outputs[0]] if v in hooked), None)
        if seen is not None:
            return Refusal("hook", f"{seen}, which would see folded values")
        for u in units:
            if isinstance(u, Refusal):
                return u.reworded(f"a layer before it cannot be rewritten: {u}")
            if u.bias is None and not u.can_add_bias:
                return u.no_bias_reason
        if sum(u.out_channels for u in units) != step.affine.channels:
            return None
        return SplitMatch(target=" + ".join(u.path for u in units), units=units, steps=[step])


def rewrite_split(ctx: TorchContext, m: SplitMatch, fold_into: Any, remove_steps: Any) -> Applied:
    aff, start, added = m.steps[0].affine, 0, []
    for u in m.units:
        part = ChannelAffine(aff.scale[start:start + u.out_channels], aff.shift[start:start + u.out_channels])
        start += u.out_channels
        if fold_into(ctx.editor, u, part):
            added.append(u.path)
    remove_steps(ctx.editor, m.steps)
    step = m.steps[0]
    return Applied(m.target, " + ".join(u.describe() for u in m.units) + f" ← {step.label} (split)", {
        "layer": " + ".join(u.path for u in m.units),
        "folded": [{"path": step.path, "what": step.label, "source": step.source, "direction": "split"}],
        "bias_added": added,
    })
