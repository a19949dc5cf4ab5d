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
    no_bias_reason: str = ""  # why no bias can be added, when ``can_add_bias`` is false

    def channel_axis(self, ndim: int) -> int:
        """Axis of the output channels in an output of ``ndim`` dimensions."""
        return output_channel_axis(self.event.name, ndim)

    def describe(self) -> str:
        return f"{type(self.module).__name__}" if self.module is not None else self.kind


def output_channel_axis(op: str, ndim: int) -> int:
    """Axis of the output channels of conv/linear op ``op`` in an output of ``ndim`` dimensions:
    the last for ``linear``; for an N-d conv the one before its N spatial axes (1 for a batched
    input, 0 for an unbatched ``(C, L)`` / ``(C, H, W)`` one)."""
    kind, spatial = CONV_OPS[op]
    return ndim - 1 if kind == "linear" else ndim - spatial - 1


def shared_with(graph: DataflowGraph, tensor: Any, owner: Any = None) -> str | None:
    """Path of another module that registers ``tensor`` too (a tied weight), whether or not that
    module ran; ``None`` when only ``owner`` (or one module) holds it."""
    mods: dict[int, str] = {}
    for path, _name, mod in graph.holders(tensor):
        mods.setdefault(id(mod), path or "the model's root")
    if len(mods) < 2:
        return None
    keep = id(owner) if owner is not None and id(owner) in mods else next(iter(mods))
    return next(p for k, p in mods.items() if k != keep)


def non_persistent(graph: DataflowGraph, tensor: Any) -> str | None:
    """The name of ``tensor`` if some module registers it as a non-persistent buffer: a new value
    written into it is not in a state_dict, so a rebuilt model would get the old one back."""
    for path, name, mod in graph.holders(tensor):
        if name in getattr(mod, "_non_persistent_buffers_set", ()):
            return f"{path}.{name}" if path else name
    return None


def own_forward(module: Any) -> bool:
    """Does ``module`` run its torch class's own forward (so a bias added to it is read)?"""
    import torch

    base = next((c for c in type(module).__mro__
                 if c.__module__.startswith("torch.nn.") and issubclass(c, torch.nn.Module)), None)
    if base is None or base is torch.nn.Module:
        return False
    cls = type(module)
    return all(getattr(cls, name, None) is getattr(base, name, None) for name in ("forward", "_conv_forward"))


def _input_shape(graph: DataflowGraph, ev: OpEvent) -> tuple | None:
    x = _arg(ev, 0, "input")
    return tuple(graph.value(x.value).shape) if isinstance(x, Ref) and graph.value(x.value).shape else None


def reads_added_bias(module: Any, in_shape: tuple | None, op: str) -> bool:
    """Does a bias-free conv/linear whose class overrides the torch forward (timm's
    ``Conv2dSame`` pads, then calls ``F.conv2d(x, self.weight, self.bias, ...)``) add a bias
    given to it? Measured: the module is run on a random input of the recorded shape with and
    without a temporary bias of distinct per-channel values, and the difference must be
    exactly that bias, broadcast over the output channel axis."""
    import torch

    if in_shape is None or getattr(module, "bias", 0) is not None:
        return False
    out_ch = module.weight.shape[1] * module.groups if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) \
        else module.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(in_shape, generator=g, dtype=torch.float64).to(module.weight.dtype)
    bias = torch.arange(1, out_ch + 1, dtype=module.weight.dtype) / out_ch
    try:
        with torch.no_grad():
            y0 = module(x)
            module.bias = torch.nn.Parameter(bias, requires_grad=False)
            y1 = module(x)
    except Exception:
        return False
    finally:
        module.bias = None
    if not isinstance(y0, torch.Tensor) or not isinstance(y1, torch.Tensor) or y0.shape != y1.shape or y0.dim() < 1:
        return False
    axis = output_channel_axis(op, y0.dim())
    if y0.shape[axis] != out_ch:
        return False
    view = [1] * y0.dim()
    view[axis] = out_ch
    diff = (y1.double() - y0.double()) - bias.double().view(view)
    tol = 64 * torch.finfo(y0.dtype).eps * (1 + float(y0.abs().max()))
    return bool(diff.abs().max() <= tol)


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
    other = shared_with(graph, weight, owner)
    if other is not None:
        return f"its weight is shared with {other} (tied)"
    np_name = non_persistent(graph, weight)
    if np_name is not None:
        return f"its weight {np_name} is a non-persistent buffer: a state_dict cannot carry its new value"
    bias = None
    if isinstance(b_ref, Ref):
        bv = graph.value(b_ref.value)
        if not bv.is_param:
            return "its forward computes the bias it adds"
        bias = bv.tensor
        if len(graph.param_uses(bias)) != 1:
            return f"its bias {bv.name} is read by other ops too"
        other = shared_with(graph, bias, owner)
        if other is not None:
            return f"its bias is shared with {other} (tied)"
        np_name = non_persistent(graph, bias)
        if np_name is not None:
            return f"its bias {np_name} is a non-persistent buffer: a state_dict cannot carry its new value"
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
    can_add, why = False, ""
    if bias is None:
        if owner is None or not isinstance(owner, torch_classes) or getattr(owner, "bias", 0) is not None:
            why = f"{path} has no bias and is no torch conv/linear module, so none can be added"
        elif not own_forward(owner) and not reads_added_bias(owner, _input_shape(graph, ev), ev.name):
            why = (f"{path} has no bias and {type(owner).__name__} overrides its torch class's forward, "
                   "which does not add a bias given to it")
        else:
            can_add = True
    return ConvUnit(event=ev, kind=kind, module=owner, path=path, weight=weight, bias=bias,
                    groups=groups, out_channels=out_channels, can_add_bias=can_add, no_bias_reason=why)
