"""Fold a per-channel affine map into the weights of the conv/linear layer before it.

``y = s * conv(x) + t``  ==  ``conv'(x)`` with ``W' = W * s`` per output channel and
``b' = s * b + t``. All arithmetic in float64; the caller rounds to the storage dtype.
"""

from __future__ import annotations

from typing import Any


def scale_output_channels(weight: Any, scale: Any, kind: str, groups: int = 1) -> Any:
    """``weight`` (any dtype) scaled per output channel, as float64.

    Layouts: conv ``(out, in/g, *k)``; linear ``(out, in)``; transposed conv
    ``(in, out/g, *k)`` where output channel ``o = (i // (in/g)) * (out/g) + j``.
    """
    import torch

    w = weight.detach().to(torch.float64)
    s = scale.to(torch.float64)
    if kind in ("conv", "linear"):
        return w * s.view(-1, *([1] * (w.dim() - 1)))
    if kind == "conv_transpose":
        cin, cout_g = w.shape[0], w.shape[1]
        k = w.shape[2:]
        wg = w.reshape(groups, cin // groups, cout_g, *k)
        sg = s.view(groups, 1, cout_g, *([1] * len(k)))
        return (wg * sg).reshape(w.shape)
    raise ValueError(f"unknown layer kind {kind!r}")


def fold(weight: Any, bias: Any, scale: Any, shift: Any, kind: str, groups: int = 1) -> tuple[Any, Any]:
    """``(W', b')`` in float64 for ``scale * layer(x) + shift``."""
    import torch

    w = scale_output_channels(weight, scale, kind, groups)
    b = torch.zeros_like(scale, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    return w, scale.to(torch.float64) * b + shift.to(torch.float64)
