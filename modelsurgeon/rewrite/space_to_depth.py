"""Space-to-depth followed by a conv equals one strided conv: the weight maths.

A space-to-depth of factor ``r`` turns ``x`` of shape ``(N, C, H, W)`` into ``r*r*C`` channels of
size ``(H/r, W/r)``; channel ``j`` holds phase ``(dy, dx)`` of input channel ``c``:
``s2d[j][u, v] = x[c, r*u + dy, r*v + dx]``. Implementations order the channels differently:

* YOLOv5 ``Focus``: ``cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]])``
  -- phase-major, ``j = p * C + c`` with phases (dy, dx) = (0,0), (1,0), (0,1), (1,1);
* ``nn.PixelUnshuffle`` / ``F.pixel_unshuffle``: channel-major, ``j = c * r*r + dy * r + dx``;
* ONNX ``SpaceToDepth``: phase-major, ``j = (dy * r + dx) * C + c``.

A conv ``(k, stride s, padding p)`` on ``s2d`` equals a conv on ``x`` with kernel ``r*k``, stride
``r*s`` and zero padding ``r*p``, whose weight is ``W'[o, c, r*ky + dy, r*kx + dx] = W[o, j, ky, kx]``
(exact when ``H`` and ``W`` are multiples of ``r``, groups == 1, dilation == 1). The map is linear,
so the same function maps gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

Phase = tuple[int, int, int]  # (input channel c, dy, dx)


def focus_phases(channels: int, order: Sequence[tuple[int, int]] = ((0, 0), (1, 0), (0, 1), (1, 1))) -> list[Phase]:
    """Phase-major layout: ``order[p]`` is the (dy, dx) of the p-th concatenated slice."""
    return [(c, dy, dx) for dy, dx in order for c in range(channels)]


def pixel_unshuffle_phases(channels: int, r: int) -> list[Phase]:
    return [(c, dy, dx) for c in range(channels) for dy in range(r) for dx in range(r)]


def onnx_space_to_depth_phases(channels: int, r: int) -> list[Phase]:
    return [(c, dy, dx) for dy in range(r) for dx in range(r) for c in range(channels)]


def merge_weight(weight: Any, phases: Sequence[Phase], r: int) -> Any:
    """``(Cout, r*r*C, kh, kw)`` weight of the conv after space-to-depth -> ``(Cout, C, r*kh, r*kw)``.

    ``phases[j]`` is the (c, dy, dx) source of channel ``j``; every (c, dy, dx) must occur once.
    """
    import torch

    cout, cin_s2d, kh, kw = weight.shape
    if len(phases) != cin_s2d:
        raise ValueError(f"{len(phases)} phases for {cin_s2d} channels")
    if len(set(phases)) != len(phases):
        raise ValueError("a phase occurs twice")
    channels = cin_s2d // (r * r)
    if sorted(phases) != sorted((c, dy, dx) for c in range(channels) for dy in range(r) for dx in range(r)):
        raise ValueError("phases do not cover every (channel, dy, dx) exactly once")
    out = torch.zeros((cout, channels, r * kh, r * kw), dtype=weight.dtype)
    for j, (c, dy, dx) in enumerate(phases):
        out[:, c, dy::r, dx::r] = weight[:, j]
    return out
