"""fold-bn: an inline batch_norm made the identity -- whether one already is, and the running
variance that makes one as close to the identity as its storage dtype allows."""

from __future__ import annotations

from typing import Any

from ...capture.graph import DataflowGraph, OpEvent, Ref
from ...match.affine import batch_norm_args


def _neutral_bn(g: DataflowGraph, ev: OpEvent, neutralised: Any = ()) -> bool:
    """An inline batch_norm that is the identity: one this run's folds made so (every tensor it
    reads is in ``neutralised``, the ids :meth:`ModuleEditor.neutralise` filled -- in half
    precision the op may keep a scale, folded into the layer), so that ``optimize``'s repeated
    rounds do not fold it again; or one that returns its input bit for bit (weight 1, bias 0,
    mean 0 and ``running_var + eps`` rounding to 1). A BatchNorm with default statistics
    computes ``x / sqrt(1 + eps)``: not neutral."""
    import torch
    import torch.nn.functional as F

    a = batch_norm_args(ev)
    if not a or a.get("training"):
        return False
    vals, ids = {}, []
    for key in ("weight", "bias", "running_mean", "running_var"):
        r = a.get(key)
        if r is None:
            vals[key] = None
            continue
        if not isinstance(r, Ref) or g.value(r.value).tensor is None:
            return False
        ids.append(id(g.value(r.value).tensor))
        vals[key] = g.value(r.value).tensor.detach()
    var, mean = vals["running_var"], vals["running_mean"]
    if var is None or mean is None:
        return False
    if all(i in neutralised for i in ids):
        return True
    with torch.no_grad():
        if not bool((mean == 0).all()) or not bool(var.dim() == 1 and var.numel()):
            return False
        if vals["weight"] is not None and not bool((vals["weight"] == 1).all()):
            return False
        if vals["bias"] is not None and not bool((vals["bias"] == 0).all()):
            return False
        src = a.get("input")
        dtype = g.value(src.value).dtype if isinstance(src, Ref) else None
        dtype = dtype if dtype is not None and dtype.is_floating_point else var.dtype
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, var.numel(), 64, generator=gen, dtype=torch.float64)
        x = (x * torch.logspace(-3, 3, 64, dtype=torch.float64)).to(dtype)
        try:
            y = F.batch_norm(x, mean, var, vals["weight"], vals["bias"], False, 0.0, float(a.get("eps", 1e-5)))
        except Exception:
            return False
        return bool(torch.equal(y, x))


def _identity_var(compute: Any, stored: Any, eps: float) -> tuple[float, float]:
    """A positive running variance ``v``, exactly representable in the ``stored`` dtype, that
    makes ``1 / sqrt(v + eps)`` (evaluated in ``compute``) as close to 1 as it gets; returns
    ``(v, r)`` with ``r`` that remaining scale. With ``eps >= 1`` no positive ``v`` gives 1:
    ``v = 1`` then, and ``r`` is folded all the same."""
    import torch

    def scale(c):
        return float(torch.rsqrt(c.to(compute) + torch.tensor(eps, dtype=compute)))

    start = torch.tensor(1.0 - eps if eps < 1.0 else 1.0, dtype=torch.float64).to(stored)
    candidates = [start]
    for direction in (float("inf"), float("-inf")):
        c = start
        for _ in range(4):
            c = torch.nextafter(c, torch.tensor(direction, dtype=stored))
            candidates.append(c)
    positive = [c for c in candidates if float(c) > 0]
    best = min(positive, key=lambda c: abs(scale(c) - 1.0))
    return float(best), scale(best)
