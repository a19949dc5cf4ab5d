"""Which recorded ops are convolutions / linear layers whose weights can be rewritten."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..capture.graph import DataflowGraph, OpEvent, Ref

CONV_OPS = {
    "conv1d": ("conv", 1), "conv2d": ("conv", 2), "conv3d": ("conv", 3),
    "conv_transpose1d": ("conv_transpose", 1), "conv_transpose2d": ("conv_transpose", 2),
    "conv_transpose3d": ("conv_transpose", 3), "linear": ("linear", 0),
}


@dataclass
class ConvUnit:
    """A conv/linear op whose weight (and bias) are parameters that only it reads."""

    event: OpEvent
    kind: str  # "conv" | "conv_transpose" | "linear"
    module: Any  # owning module (its .weight is the weight), or None when called functionally
    path: str  # module path, or the weight's parameter name
    weight: Any
    bias: Any  # Parameter or None
    groups: int
    out_channels: int
    can_add_bias: bool

    def channel_axis(self, ndim: int) -> int:
        """Axis of the output channels in an output of ``ndim`` dimensions."""
        return ndim - 1 if self.kind == "linear" else 1

    def describe(self) -> str:
        return f"{type(self.module).__name__}" if self.module is not None else self.kind


def _arg(ev: OpEvent, index: int, name: str, default: Any = None) -> Any:
    return ev.arg(index, name, default)


def conv_unit(graph: DataflowGraph, ev: OpEvent) -> ConvUnit | str:
    """The rewritable conv unit behind ``ev``, or the reason it cannot be rewritten."""
    import torch

    kind, _ = CONV_OPS[ev.name]
    w_ref = _arg(ev, 1, "weight")
    b_ref = _arg(ev, 2, "bias")
    if not isinstance(w_ref, Ref):
        return "its weight is not a tensor argument"
    wv = graph.value(w_ref.value)
    if not wv.is_param:
        return "its forward computes the weight it convolves with (e.g. weight standardisation), so the stored weight is not the one applied"
    weight = wv.tensor
    owner = None
    path = wv.name or "?"
    for call in graph.enclosing_calls(ev):
        if getattr(call.module, "weight", None) is weight:
            owner = call.module
            path = call.path
            break
    if owner is not None and graph.call_count(owner) > 1:
        return f"{path} is called {graph.call_count(owner)} times (a shared module)"
    n_uses = len(graph.param_uses(weight))
    if n_uses != 1:
        return f"its weight {wv.name} is read {n_uses} times (shared with other layers)"
    bias = None
    if isinstance(b_ref, Ref):
        bv = graph.value(b_ref.value)
        if not bv.is_param:
            return "its forward computes the bias it adds"
        bias = bv.tensor
        if len(graph.param_uses(bias)) != 1:
            return f"its bias {bv.name} is read by other ops too"
    elif b_ref is not None:
        return "its bias is not a tensor"
    groups = 1
    if kind == "conv":
        groups = int(_arg(ev, 6, "groups", 1) or 1)
        out_channels = weight.shape[0]
    elif kind == "conv_transpose":
        groups = int(_arg(ev, 6, "groups", 1) or 1)
        out_channels = weight.shape[1] * groups
    else:
        out_channels = weight.shape[0]
    torch_classes = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    can_add = (bias is None and owner is not None and isinstance(owner, torch_classes)
               and getattr(owner, "bias", 0) is None)
    return ConvUnit(event=ev, kind=kind, module=owner, path=path, weight=weight, bias=bias,
                    groups=groups, out_channels=out_channels, can_add_bias=can_add)
