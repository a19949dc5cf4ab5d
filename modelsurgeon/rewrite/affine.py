"""Fold a per-channel affine map into the weights of the conv/linear layer before it.

``y = s * conv(x) + t``  ==  ``conv'(x)`` with ``W' = W * s`` per output channel and
``b' = s * b + t``. All arithmetic in float64; results are rounded to the storage dtype.

Weights are scaled in place, a block of rows at a time (:func:`scale_output_channels_`), so a
1 GB checkpoint needs no second copy of its weights -- and, for a memory-mapped checkpoint,
only the pages written become private memory.
"""

from __future__ import annotations

from typing import Any, Callable

BLOCK_ELEMENTS = 1 << 22
"""Rows of a weight are processed in blocks of about this many elements (32 MB in float64)."""


def _row_scale(scale: Any, kind: str, groups: int, rows: slice, weight: Any) -> Any:
    """Per-row multiplier for ``weight[rows]``, broadcastable against it (float64)."""
    import torch

    trailing = [1] * (weight.dim() - 1)
    if kind in ("conv", "linear"):
        return scale[rows].view(-1, *trailing)
    if kind == "conv_transpose":  # (in, out/g, *k): output channel o = (i // (in/g)) * (out/g) + j
        cin_g, cout_g = weight.shape[0] // groups, weight.shape[1]
        group_of_row = torch.arange(rows.start, rows.stop) // cin_g
        return scale.view(groups, cout_g)[group_of_row].view(rows.stop - rows.start, cout_g, *trailing[1:])
    raise ValueError(f"unknown layer kind {kind!r}")


def scale_output_channels_(weight: Any, scale: Any, kind: str, groups: int = 1,
                           cast: Callable[[Any], Any] | None = None, workspace: Any = None) -> None:
    """Multiply ``weight`` by ``scale`` per output channel, in place, in float64 blocks.

    ``cast`` rounds a float64 block to what will be stored (default: the weight's dtype).
    ``workspace`` is a reusable float64 buffer (:func:`workspace`): with it the loop allocates
    nothing, which keeps the allocator from growing a heap it never returns.
    """
    import torch

    s = scale.to(torch.float64)
    rows = weight.shape[0]
    per_row = max(1, weight[0].numel()) if rows else 1
    step = max(1, BLOCK_ELEMENTS // per_row)
    with torch.no_grad():
        for r0 in range(0, rows, step):
            r = slice(r0, min(rows, r0 + step))
            rows_view = weight[r]
            n = rows_view.numel()
            if workspace is not None and workspace.numel() >= n:
                buf = workspace[:n].view(rows_view.shape)
            else:
                buf = torch.empty(rows_view.shape, dtype=torch.float64)
            buf.copy_(rows_view)  # exact widening
            buf.mul_(_row_scale(s, kind, groups, r, weight))  # float64 products
            rows_view.copy_(cast(buf) if cast is not None else buf)  # one rounding


def workspace() -> Any:
    """A float64 buffer of :data:`BLOCK_ELEMENTS`, for :func:`scale_output_channels_`."""
    import torch

    return torch.empty(BLOCK_ELEMENTS, dtype=torch.float64)


def scale_output_channels(weight: Any, scale: Any, kind: str, groups: int = 1) -> Any:
    """``weight`` scaled per output channel, as a new float64 tensor."""
    import torch

    w = weight.detach().to(torch.float64).clone()
    scale_output_channels_(w, scale, kind, groups)
    return w


def fold_bias(bias: Any, scale: Any, shift: Any) -> Any:
    """``s * b + t`` in float64 (``b`` = 0 when the layer has no bias)."""
    import torch

    s = scale.to(torch.float64)
    b = torch.zeros_like(s) if bias is None else bias.detach().to(torch.float64).reshape(-1)
    return s * b + shift.to(torch.float64)


def fold(weight: Any, bias: Any, scale: Any, shift: Any, kind: str, groups: int = 1) -> tuple[Any, Any]:
    """``(W', b')`` in float64 for ``scale * layer(x) + shift`` (new tensors)."""
    return scale_output_channels(weight, scale, kind, groups), fold_bias(bias, scale, shift)
