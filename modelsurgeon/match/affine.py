"""Recognise per-channel affine maps ``y = a[c] * x + b[c]`` at inference, whatever their class.

Three sources, from most to least explicit:

* a ``batch_norm`` op in inference mode: ``a = gamma / sqrt(var + eps)``,
  ``b = beta - mean * a``, computed in float64 from the op's own arguments -- so the eps,
  affine flag and statistics are those the model really uses;
* an elementwise ``mul``/``add``/``sub``/``div`` whose other operand is a constant (a parameter,
  buffer or parameter-only expression) broadcasting along the channel axis only;
* any module, probed numerically: run it (in float64 when it allows) on zeros and ones to read
  ``b`` and ``a``, check both are constant along every axis but the channel axis, then confirm
  on fresh random inputs. This is how custom ``Scale`` layers, frozen BN without the BN base
  class, Caffe BatchNorm with a moving-average factor and the like are recognised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..capture.graph import DataflowGraph, OpEvent, Ref
from ..report.codes import Refusal

MUL = {"mul", "multiply", "Tensor.mul", "Tensor.__mul__", "Tensor.__rmul__", "Tensor.mul_",
       "Tensor.__imul__", "Tensor.multiply"}
ADD = {"add", "Tensor.add", "Tensor.__add__", "Tensor.__radd__", "Tensor.add_", "Tensor.__iadd__"}
SUB = {"sub", "subtract", "Tensor.sub", "Tensor.__sub__", "Tensor.sub_", "Tensor.__isub__",
       "Tensor.subtract"}
RSUB = {"rsub", "Tensor.__rsub__"}
DIV = {"div", "true_divide", "divide", "Tensor.div", "Tensor.__truediv__", "Tensor.div_",
       "Tensor.__itruediv__", "Tensor.true_divide", "Tensor.divide"}
ELEMENTWISE = MUL | ADD | SUB | RSUB | DIV
BATCH_NORM = {"batch_norm"}

PROBE_MAX_EVENTS = 256


@dataclass
class ChannelAffine:
    """``y = scale[c] * x + shift[c]`` along one axis, in float64."""

    scale: Any
    shift: Any

    def then(self, other: "ChannelAffine") -> "ChannelAffine":
        """The composition ``other(self(x))``."""
        return ChannelAffine(other.scale * self.scale, other.scale * self.shift + other.shift)

    @property
    def channels(self) -> int:
        return int(self.scale.numel())

    def is_finite(self) -> bool:
        import torch

        return bool(torch.isfinite(self.scale).all() and torch.isfinite(self.shift).all())


def is_bn_like(mod: Any) -> bool:
    """A BatchNorm class, or any module holding running statistics (frozen BN such as
    torchvision's ``FrozenBatchNorm2d``, BN+activation classes)."""
    import torch

    if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
        return True
    return any(mod._buffers.get(k) is not None or mod._parameters.get(k) is not None
               for k in ("running_mean", "running_var"))


def batch_norm_args(ev: OpEvent) -> dict:
    """Arguments of a recorded ``F.batch_norm`` / ``torch.batch_norm`` call, by name."""
    import torch
    import torch.nn.functional as F

    if ev.func is F.batch_norm:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    elif ev.func is torch.batch_norm:
        names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
        defaults = {}
    else:  # some other callable named batch_norm
        return {}
    out = dict(defaults)
    for i, n in enumerate(names):
        if i < len(ev.args):
            out[n] = ev.args[i]
    out.update({k: v for k, v in ev.kwargs.items() if k in names})
    return out


def batch_norm_affine(graph: DataflowGraph, ev: OpEvent) -> ChannelAffine | Refusal:
    """Exact affine of an inference-mode batch_norm op, or why it has none."""
    import torch

    a = batch_norm_args(ev)
    if not a:
        return Refusal("layer-settings", "unrecognised batch_norm signature")
    if a.get("training"):
        return Refusal("training-mode", "it normalises with batch statistics (training mode or no running statistics)")

    def tensor(key: str):
        r = a.get(key)
        if r is None:
            return None
        if not isinstance(r, Ref):
            return "bad"
        v = graph.value(r.value)
        if not v.const or v.tensor is None:
            return "bad"
        return v.tensor.detach().to(torch.float64).reshape(-1)

    mean, var, w, b = (tensor(k) for k in ("running_mean", "running_var", "weight", "bias"))
    if mean is None or var is None or "bad" in (mean, var, w, b):  # noqa: PLR1714
        return Refusal("computed-tensor", "its statistics are not constant tensors")
    eps = float(a.get("eps", 1e-5))
    denom = var + eps
    if bool((denom <= 0).any()):
        return Refusal("not-affine", "running_var + eps is not positive")
    scale = torch.rsqrt(denom)
    if w is not None:
        scale = scale * w
    shift = -mean * scale
    if b is not None:
        shift = shift + b
    return ChannelAffine(scale, shift)


def _per_channel(c: Any, x_shape: tuple[int, ...], axis: int):
    """``c`` as a float64 vector over the channel axis, if it broadcasts only along it."""
    import torch

    if not -len(x_shape) <= axis < len(x_shape):
        return None  # a 1-D vector (a detector's box coordinates) has no channel axis here
    channels = x_shape[axis]
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return torch.full((channels,), float(c), dtype=torch.float64)
    if not isinstance(c, torch.Tensor) or c.dim() > len(x_shape):
        return None
    offset = len(x_shape) - c.dim()
    for j, size in enumerate(c.shape):
        if j + offset == axis:
            if size not in (1, channels):
                return None
        elif size != 1:
            return None
    vec = c.detach().to(torch.float64).reshape(-1)  # every other axis has size 1
    return vec.expand(channels).clone() if vec.numel() == 1 else vec.clone()


def elementwise_affine(graph: DataflowGraph, ev: OpEvent, x_vid: int, axis: int):
    """``(ChannelAffine, const_operand)`` for ``x (op) const``; ``None`` when ``ev`` is not one."""
    import torch

    if ev.name not in ELEMENTWISE or len(ev.args) < 2:
        return None
    a0, a1 = ev.args[0], ev.args[1]
    x_first = isinstance(a0, Ref) and a0.value == x_vid
    x_second = isinstance(a1, Ref) and a1.value == x_vid
    if x_first == x_second:
        return None
    other = a1 if x_first else a0
    if isinstance(other, Ref):
        ov = graph.value(other.value)
        if not ov.const or ov.tensor is None:
            return None
        const = ov.tensor
    elif isinstance(other, (int, float)) and not isinstance(other, bool):
        const = other
    else:
        return None
    xv = graph.value(x_vid)
    if not ev.outputs or graph.value(ev.outputs[0]).shape != xv.shape or xv.shape is None:
        return None
    if not (xv.dtype is not None and xv.dtype.is_floating_point):
        return None
    c = _per_channel(const, xv.shape, axis)
    if c is None:
        return None
    alpha = ev.kwargs.get("alpha", ev.args[2] if len(ev.args) > 2 else 1)
    if not isinstance(alpha, (int, float)):
        return None
    one = torch.ones_like(c)
    zero = torch.zeros_like(c)
    name = ev.name
    if name in MUL:
        aff = ChannelAffine(c, zero)
    elif name in ADD:
        aff = ChannelAffine(one, c * alpha) if x_first or name in ("Tensor.__radd__",) else ChannelAffine(one * alpha, c)
    elif name in SUB:
        aff = ChannelAffine(one, -c * alpha) if x_first else ChannelAffine(-one * alpha, c)
    elif name in RSUB:  # rsub(x, c) == c - alpha * x
        aff = ChannelAffine(-one * alpha, c) if x_first else ChannelAffine(one, -c * alpha)
    elif name in DIV:
        if not x_first or ev.kwargs.get("rounding_mode") is not None or bool((c == 0).any()):
            return None
        aff = ChannelAffine(1.0 / c, zero)
    else:  # pragma: no cover
        return None
    return aff, other


# --------------------------------------------------------------------------------------------
# numeric probing of arbitrary modules


def probe_module(module: Any, shape: tuple[int, ...], axis: int, seed: int = 0) -> ChannelAffine | Refusal:
    """Is ``module`` a per-channel affine map along ``axis`` for inputs of ``shape``?

    Probed on a batch of at least 2 (axis 0 is the batch unless it is the channel axis), and
    every sample must give what it gives alone: a norm using batch statistics is constant on a
    batch of one, so a capture at batch 1 would otherwise read it as a zero scale. A scale that
    is exactly 0 in some channel is accepted only once those channels are seen constant on
    inputs where every other axis has at least 2 entries."""
    import torch

    shape = tuple(shape)
    if axis != 0 and len(shape) >= 2 and shape[0] < 2:
        shape = (2,) + shape[1:]
    dtype = None
    try:
        aff = _probe(module, shape, axis, torch.float64, seed)
    except _NotAffine as e:
        return _norm_like(e)
    except Exception:
        dtype = next((t.dtype for t in list(module.parameters()) + list(module.buffers())
                      if t.is_floating_point()), torch.float32)
        try:
            aff = _probe(module, shape, axis, dtype, seed, cast=False)
        except _NotAffine as e:
            return _norm_like(e)
        except Exception as e:
            return Refusal("not-affine", f"probing it failed ({type(e).__name__})")
    if bool((aff.scale == 0).any()):
        return _confirm_zero_scale(module, shape, axis, aff, dtype, seed)
    return aff


def _confirm_zero_scale(module: Any, shape: tuple, axis: int, aff: ChannelAffine, dtype, seed: int):
    """``aff`` if the channels it scales by exactly 0 are constant at a size where no axis but the
    channel axis has a single entry (normalising over an axis of one gives 0 whatever the
    input); otherwise why the probe cannot tell."""
    import torch

    why = Refusal(NORM_LIKE, "its scale is exactly 0 in some channels, which probing cannot tell from a "
                  "normalisation over an axis of size 1 (e.g. batch statistics)")
    if axis == 0:
        return why.reworded(f"{why} of an unbatched input")
    wide = tuple(n if i == axis or n >= 2 else 2 for i, n in enumerate(shape))
    if wide == shape:
        return aff  # the random inputs at ``shape`` already showed those channels constant
    try:
        again = _probe(module, wide, axis, torch.float64 if dtype is None else dtype, seed + 1,
                       cast=dtype is None)
    except Exception:
        return why
    tol = 1e-9 if dtype is None else 1e-5
    same = (again.scale - aff.scale).abs().max() <= tol and (again.shift - aff.shift).abs().max() <= tol * max(
        1.0, float(aff.shift.abs().max()))
    return aff if bool(same) else why


class _NotAffine(Exception):
    pass


NORM_LIKE = "norm-like"
"""The code of a module that looks like a per-channel map on constant inputs but is not one
exactly: it uses batch statistics, or scales by exactly 0 where that cannot be confirmed. Worth
reporting (a custom norm), unlike ``not-affine`` (an activation)."""


def _norm_like(e: _NotAffine) -> Refusal:
    return Refusal(NORM_LIKE if getattr(e, "norm_like", False) else "not-affine", str(e))


def _batch_statistics() -> _NotAffine:
    e = _NotAffine("a sample gives another output alone than in a batch (batch statistics)")
    e.norm_like = True
    return e


def _probe(module: Any, shape, axis: int, dtype, seed: int, cast: bool = True) -> ChannelAffine:
    import torch

    restore = _cast_module(module, dtype) if cast else None
    try:
        with torch.no_grad():
            tol = 1e-9 if dtype == torch.float64 else 1e-5
            y0 = _single_tensor(module(torch.zeros(shape, dtype=dtype)), shape)
            y1 = _single_tensor(module(torch.ones(shape, dtype=dtype)), shape)
            b_full = y0.to(torch.float64)
            a_full = y1.to(torch.float64) - b_full
            a = _constant_along(a_full, axis, tol, "scale")
            b = _constant_along(b_full, axis, tol, "shift")
            g = torch.Generator().manual_seed(seed)
            # random inputs at growing amplitudes: a module that is only affine over a range
            # (an activation saturated by a large BN shift looks linear near 0) is caught by
            # inputs sweeping far past that range
            big = min(1e6, float(torch.finfo(dtype).max) ** 0.25)
            for trial, (amplitude, offset) in enumerate(((3.0, 0.5), (3.0, -0.5), (big ** 0.5, 0.0), (big, 0.0))):
                x = (torch.randn(shape, generator=g, dtype=torch.float64) * amplitude + offset).to(dtype)
                y = _single_tensor(module(x), shape).to(torch.float64)
                view = [1] * len(shape)
                view[axis] = -1
                pred = a.view(view) * x.to(torch.float64) + b.view(view)
                scale = max(1.0, float(y.abs().max()))
                if trial == 0 and shape[0] > 1 and axis != 0 and bool(torch.isfinite(y).all()):
                    # each sample alone gives what it gave in the batch (no batch statistics,
                    # no behaviour that depends on the batch size)
                    y1 = _single_tensor(module(x[:1]), (1,) + tuple(shape[1:])).to(torch.float64)
                    if not bool(torch.isfinite(y1).all()) or float((y1 - y[:1]).abs().max()) > tol * 10 * scale:
                        raise _batch_statistics()
                if not bool(torch.isfinite(y).all()) or float((y - pred).abs().max()) > tol * 10 * scale:
                    raise _NotAffine("it is not an affine map of its input")
            return ChannelAffine(a, b)
    finally:
        if restore is not None:
            restore()


def _single_tensor(y: Any, shape) -> Any:
    import torch

    if not isinstance(y, torch.Tensor):
        raise _NotAffine("it does not return a single tensor")
    if tuple(y.shape) != tuple(shape):
        raise _NotAffine("its output shape differs from its input shape")
    return y


def _constant_along(full: Any, axis: int, tol: float, what: str) -> Any:
    import torch

    per = full.movedim(axis, 0).reshape(full.shape[axis], -1)
    ref = per[:, :1]
    spread = float((per - ref).abs().max()) if per.numel() else 0.0
    if not bool(torch.isfinite(per).all()):
        raise _NotAffine(f"its {what} is not finite")
    if spread > tol * 10 * max(1.0, float(ref.abs().max())):
        raise _NotAffine(f"its {what} varies within a channel (not per-channel)")
    return ref[:, 0].clone()


def _cast_module(module: Any, dtype) -> Any:
    """Temporarily cast a module's floating tensors (in place); returns the undo function."""
    import torch

    saved = []
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.is_floating_point() and t.dtype != dtype:
                    saved.append((t, t.data))
                    t.data = t.data.to(dtype)

    def undo():
        with torch.no_grad():
            for t, data in saved:
                t.data = data

    return undo
