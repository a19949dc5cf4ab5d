"""Reshapes that keep a value's channel axis, so a per-channel map after them is one before.

LeViT's ``LinearNorm`` runs ``bn(linear(x).flatten(0, 1)).reshape_as(x)``: the linear's output
``(B, N, C)`` becomes ``(B*N, C)`` for a ``BatchNorm1d`` and back. Merging or splitting only the
dims before the channel axis (the dims after it unchanged) moves no element to another channel,
so fold-bn walks through such a reshape with the channel axis at its new place.
"""

from __future__ import annotations

import math

from ..capture.graph import DataflowGraph, OpEvent, Ref

RESHAPES = frozenset({
    "Tensor.view", "Tensor.reshape", "reshape", "Tensor.flatten", "flatten", "Tensor.unflatten",
    "unflatten", "Tensor.reshape_as", "Tensor.view_as", "Tensor.contiguous",
})


def channel_axis_after(g: DataflowGraph, ev: OpEvent, vid: int, axis: int) -> int | None:
    """The channel axis of ``ev``'s output when ``ev`` reshapes value ``vid`` (channel axis
    ``axis``) by merging or splitting the dims before that axis only; ``None`` otherwise."""
    if ev.name not in RESHAPES or not ev.args or ev.args[0] != Ref(vid) or len(ev.outputs) != 1:
        return None
    return moved_channel_axis(g.value(vid).shape, g.value(ev.outputs[0]).shape, axis)


def moved_channel_axis(src, out, axis: int) -> int | None:
    """Where channel axis ``axis`` of shape ``src`` is in shape ``out`` after a reshape that
    merges or splits only the dims before it; ``None`` for any other reshape (also the ONNX
    back end's rule, for Flatten / Reshape)."""
    if not src or not out or not -len(src) <= axis < len(src):
        return None
    a = axis % len(src)
    tail = tuple(src[a + 1:])
    b = len(out) - len(tail) - 1
    if b < 0 or out[b] != src[a] or tuple(out[b + 1:]) != tail:
        return None
    return b if math.prod(src[:a]) == math.prod(out[:b]) else None


SHAPE_READS = {"Tensor.reshape_as": 1, "Tensor.view_as": 1, "Tensor.expand_as": 1, "Tensor.type_as": 1,
               "zeros_like": 0, "ones_like": 0, "empty_like": 0}
"""op -> the argument it reads for its shape or dtype only (``y.reshape_as(x)`` reads ``x``'s shape)."""


def shape_only_use(g: DataflowGraph, eid: int, vid: int) -> bool:
    """Does event ``eid`` read value ``vid`` for its shape or dtype only? (A fold changes the
    values of a layer's output, never its shape: such a reader does not stop the fold.)"""
    ev = g.event(eid)
    pos = SHAPE_READS.get(ev.name)
    if pos is None or pos >= len(ev.args) or ev.args[pos] != Ref(vid):
        return False
    return all(a != Ref(vid) for i, a in enumerate(ev.args) if i != pos) and Ref(vid) not in ev.kwargs.values()
