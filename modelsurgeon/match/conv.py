"""Which recorded ops are convolutions / linear layers whose weights can be rewritten."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.graph import DataflowGraph, OpEvent, Ref
from ..report.codes import Refusal

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
    # (can a bias be added, why not): the measurement behind it (:func:`reads_added_bias`) runs
    # only when a rewrite asks, i.e. must add a bias to this bias-free layer
    _bias_check: Any = field(default=None, repr=False, compare=False)

    @property
    def can_add_bias(self) -> bool:
        return self._bias_check is not None and self._bias_check()[0]

    @property
    def no_bias_reason(self) -> Refusal | None:
        """Why no bias can be added, when :attr:`can_add_bias` is false."""
        if self._bias_check is None:
            return None
        can, why = self._bias_check()
        return None if can else Refusal("no-bias", why)

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


def unwritable(graph: DataflowGraph, tensor: Any, name: str | None, owner: Any = None) -> Refusal | None:
    """Why a rewrite cannot write a new value into ``tensor`` (called ``name`` in the reason):
    another module than ``owner`` registers it too (a tied tensor, whether or not that module
    runs), or it is a non-persistent buffer (a state_dict would not carry the new value, so a
    model rebuilt from it gets the old one back); ``None`` when it can be written."""
    other = shared_with(graph, tensor, owner)
    if other is not None:
        return Refusal("tied-tensor", f"{name} is shared with {other} (tied)")
    np_name = non_persistent(graph, tensor)
    if np_name is not None:
        where = "" if np_name == name else f" ({np_name})"
        return Refusal("non-persistent-buffer", f"{name} is a non-persistent buffer{where}: a state_dict cannot carry its new value")
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


def conv_unit(graph: DataflowGraph, ev: OpEvent) -> ConvUnit | Refusal:
    """The rewritable conv unit behind ``ev``, or the reason it cannot be rewritten."""
    kind, _ = CONV_OPS[ev.name]
    w_ref = _arg(ev, 1, "weight")
    b_ref = _arg(ev, 2, "bias")
    if not isinstance(w_ref, Ref):
        return Refusal("computed-tensor", "its weight is not a tensor argument")
    wv = graph.value(w_ref.value)
    if not wv.is_param:
        return Refusal("computed-tensor", "its forward computes the weight it convolves with (e.g. weight standardisation), so the stored weight is not the one applied")
    weight = wv.tensor
    owner = None
    path = wv.name or "?"
    for call in graph.enclosing_calls(ev):
        if getattr(call.module, "weight", None) is weight:
            owner = call.module
            path = call.path
            break
    if owner is not None and graph.call_count(owner) > 1:
        return Refusal("shared-module", f"{path} is called {graph.call_count(owner)} times (a shared module)")
    n_uses = len(graph.param_uses(weight))
    if n_uses != 1:
        return Refusal("shared-module", f"its weight {wv.name} is read {n_uses} times (shared with other layers)")
    why = unwritable(graph, weight, "its weight", owner)
    if why is not None:
        return why
    bias = None
    if isinstance(b_ref, Ref):
        bv = graph.value(b_ref.value)
        if not bv.is_param:
            return Refusal("computed-tensor", "its forward computes the bias it adds")
        bias = bv.tensor
        if len(graph.param_uses(bias)) != 1:
            return Refusal("other-readers", f"its bias {bv.name} is read by other ops too")
        why = unwritable(graph, bias, "its bias", owner)
        if why is not None:
            return why
    elif b_ref is not None:
        return Refusal("computed-tensor", "its bias is not a tensor")
    groups = 1
    if kind == "conv":
        groups = int(_arg(ev, 6, "groups", 1) or 1)
        out_channels = weight.shape[0]
    elif kind == "conv_transpose":
        groups = int(_arg(ev, 6, "groups", 1) or 1)
        out_channels = weight.shape[1] * groups
    else:
        out_channels = weight.shape[0]
    check = None if bias is not None else _bias_check(graph, ev, owner, path)
    return ConvUnit(event=ev, kind=kind, module=owner, path=path, weight=weight, bias=bias,
                    groups=groups, out_channels=out_channels, _bias_check=check)


def _bias_check(graph: DataflowGraph, ev: OpEvent, owner: Any, path: str):
    """``() -> (can_add, why)`` for a bias-free layer: a bias can be added to a torch conv/linear
    module running its class's own forward, or overriding it with one measured to add a bias
    given to it (:func:`reads_added_bias`: run on the first call only, and kept per module on
    the graph, so the matchers asking again about the same layer in this recording -- fold-bn's
    walk, each absorber search -- do not run the layer again)."""
    import torch

    torch_classes = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    if owner is None or not isinstance(owner, torch_classes) or getattr(owner, "bias", 0) is not None:
        why = f"{path} has no bias and is no torch conv/linear module, so none can be added"
        return lambda: (False, why)
    if own_forward(owner):
        return lambda: (True, "")
    not_read = (f"{path} has no bias and {type(owner).__name__} overrides its torch class's forward, "
                "which does not add a bias given to it")

    def measured() -> tuple[bool, str]:
        key = ("reads_added_bias", id(owner))
        if key not in graph.memo:
            graph.memo[key] = reads_added_bias(owner, _input_shape(graph, ev), ev.name)
        return (True, "") if graph.memo[key] else (False, not_read)

    return measured
