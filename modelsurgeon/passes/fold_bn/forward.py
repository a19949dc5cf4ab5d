"""fold-bn, the other direction: a BatchNorm module *before* a conv / linear layer (LeViT's
``NormLinear`` head: BatchNorm1d -> Linear; BN -> 1x1 conv) folded into that layer.

``conv(s * x + t)`` == ``conv'(x)`` with ``W'[o, j] = W[o, j] * s[c(o, j)]`` (``c`` the input
channel weight column ``j`` of output ``o`` reads, groups respected) and ``b' = b + W . t``:
exact when no zero padding would have to be shifted too (a linear; a conv with padding 0, or a
zero shift). Float64 maths, rounded to the storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...capture.graph import OUTPUT, DataflowGraph, OpEvent, Ref
from ...match.affine import BATCH_NORM, ChannelAffine, batch_norm_affine, is_bn_like
from ...match.calls import call_obstacle, read_outside
from ...match.conv import CONV_OPS, ConvUnit, conv_unit
from ...match.host import statistics_reader
from ...match.reshape import channel_axis_after, shape_only_use
from ...report.codes import Refusal
from ..base import Applied, Match, TorchContext

DROPOUTS = {"dropout", "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"}
"""Inference-mode dropouts: the identity, crossed between the norm and the layer."""


@dataclass
class ForwardMatch(Match):
    unit: ConvUnit = None
    affine: ChannelAffine = None
    module: Any = None  # the norm module, removed
    path: str = ""
    bn_event: int = -1


def _readers(g: DataflowGraph, vid: int) -> list:
    return [u for u in g.uses(vid) if u == OUTPUT or not shape_only_use(g, u, vid)]


def _padded(ev: OpEvent) -> bool:
    pad = ev.arg(4, "padding", 0)
    if isinstance(pad, str):
        return pad != "valid"
    return any(int(p) != 0 for p in (pad if isinstance(pad, (tuple, list)) else (pad,)))


def forward_fold(g: DataflowGraph, ev: OpEvent, hooked: dict[int, str], host_code: bool = True
                 ) -> ForwardMatch | Refusal | None:
    """The fold of batch_norm ``ev`` into the conv / linear reading its output, the refusal of
    one that is the pattern but cannot be folded, or ``None`` when ``ev`` is not the pattern."""
    if ev.name not in BATCH_NORM or len(ev.outputs) != 1:
        return None
    call = next((c for c in g.calls_starting_with(ev) if c.parent is not None and is_bn_like(c.module)
                 and g.active_events(c) == [ev] and c.outputs == (ev.outputs[0],)), None)
    if call is None:
        return None
    cur, axis = ev.outputs[0], 1
    while True:  # cross inference dropouts and reshapes keeping the channel axis
        uses = _readers(g, cur)
        if len(uses) != 1 or uses[0] == OUTPUT:
            return None
        nxt = g.event(uses[0])
        if nxt.name in CONV_OPS:
            break
        training = nxt.kwargs.get("training", nxt.kwargs.get("train", nxt.args[2] if len(nxt.args) > 2 else True))
        if nxt.name in DROPOUTS and training is False and len(nxt.outputs) == 1:
            cur = nxt.outputs[0]
            continue
        moved = channel_axis_after(g, nxt, cur, axis)
        if moved is None:
            return None
        cur, axis = nxt.outputs[0], moved
    kind, spatial = CONV_OPS[nxt.name]
    if not nxt.args or nxt.args[0] != Ref(cur) or kind == "conv_transpose":
        return None
    ndim = len(g.value(cur).shape or ())
    if axis != (ndim - 1 if kind == "linear" else ndim - spatial - 1):
        return Refusal("other-axis", f"it normalises another axis than the input channels of the {nxt.name} after it")
    aff = batch_norm_affine(g, ev)
    if isinstance(aff, Refusal):
        return aff
    why = call_obstacle(call, [])
    if why is not None:
        return why
    if g.call_count(call.module) > 1:
        return Refusal("shared-module", f"{call.path} is called {g.call_count(call.module)} times (a shared module)")
    found = read_outside(g, list(call.module.named_parameters()) + list(call.module.named_buffers()), call)
    if found is not None:
        return Refusal("read-outside", f"{call.path}.{found[0]} is also read outside {call.path}")
    reader = statistics_reader(g.root.module, call.path) if call.path and host_code else None
    if reader is not None:
        return Refusal("host-reads", f"the host's {reader} reads its running statistics: left to it")
    seen = next((hooked[v] for v in [ev.outputs[0], cur] if v in hooked), None)
    if seen is not None:
        return Refusal("hook", f"{seen}, which would see folded values")
    if kind == "conv" and _padded(nxt) and bool((aff.shift != 0).any()):
        return Refusal("padding", f"the {nxt.name} after it pads with zeros, which its shift would have to reach")
    unit = conv_unit(g, nxt)
    if isinstance(unit, Refusal):
        return unit.reworded(f"the layer after it cannot be rewritten: {unit}")
    if unit.bias is None and not unit.can_add_bias:
        return unit.no_bias_reason
    return ForwardMatch(target=unit.path, unit=unit, affine=aff, module=call.module, path=call.path, bn_event=ev.id)


def input_scaled(weight: Any, scale: Any, shift: Any, groups: int, kind: str) -> tuple[Any, Any]:
    """``(W * s per input channel, W . t)`` in float64 for a conv / linear weight ``(out, in/g, *k)``."""
    import torch

    w = weight.detach().to(torch.float64)
    cout, cin_g = w.shape[0], w.shape[1]
    g = groups if kind == "conv" else 1
    cols = (torch.arange(cout) // (cout // g) * cin_g).unsqueeze(1) + torch.arange(cin_g)  # (out, in/g)
    view = (cout, cin_g) + (1,) * (w.dim() - 2)
    s, t = scale.to(torch.float64)[cols].view(view), shift.to(torch.float64)[cols].view(view)
    return w * s, (w * t).reshape(cout, -1).sum(1)


def rewrite_forward(ctx: TorchContext, m: ForwardMatch) -> Applied:
    unit, ed = m.unit, ctx.editor
    # read the layer's tensors now: a fold into its output may have rewritten them in this run
    bias = getattr(unit.module, "bias", None) if unit.module is not None else unit.bias
    w, wt = input_scaled(unit.weight, m.affine.scale, m.affine.shift, unit.groups, unit.kind)
    b = wt if bias is None else bias.detach().to(wt.dtype).reshape(-1) + wt
    ed.set_param(unit.weight, w, unit.module)
    if bias is None:
        ed.add_bias(unit.module, b)
    else:
        ed.set_param(bias, b, unit.module)
    ed.remove(m.module)
    label = f"{type(m.module).__name__} {m.path}"
    return Applied(unit.path, f"{label} → {unit.describe()}", {
        "layer": unit.path,
        "folded": [{"path": m.path, "what": label, "source": "batch_norm", "direction": "forward"}],
        "bias_added": bias is None,
    })
