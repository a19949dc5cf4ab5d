"""What a head is made of: ops that pass a feature map's channels through to a classifier.

Shared by the stage finder (:mod:`modelsurgeon.match.stage`: the trailing calls of a container
that belong to the head, not to the stage) and by truncate's head repair
(:mod:`modelsurgeon.passes.truncate.cut`: the walk from the stage's output to the layers to
rebuild), so that both draw the line between stage and head in the same place.

A *shape-only* op passes the channel count through without depending on it, per sample:
activations, dropout, pooling, flatten, ``view(n, -1)``, reductions over non-batch axes,
squeeze, fixed-position indexing. A *classifier* is the first torch Linear/Conv layer such ops
lead to.
"""

from __future__ import annotations

from typing import Any

from ..capture.graph import DataflowGraph, ModuleCall, OpEvent, Ref
from .conv import CONV_OPS

ELEMENTWISE = frozenset({
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "silu_", "gelu", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_",
    "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "mish",
    "softplus", "dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "dropout3d", "contiguous", "clone", "detach", "float", "to",
})
DROPOUTS = frozenset({"dropout", "dropout_", "feature_dropout", "alpha_dropout", "feature_alpha_dropout",
                      "dropout1d", "dropout2d", "dropout3d"})
NEUTRAL = frozenset({"contiguous", "clone", "detach", "float", "to"})
POOLS = frozenset({
    f"{kind}_pool{d}d{suffix}" for kind in ("avg", "max", "adaptive_avg", "adaptive_max")
    for d in (1, 2, 3) for suffix in ("", "_with_indices")
})
REDUCTIONS = frozenset({"mean", "amax", "amin", "sum", "max", "logsumexp"})
RESHAPES = frozenset({"view", "reshape"})
GATHERING = POOLS | REDUCTIONS | RESHAPES | DROPOUTS | {"flatten", "squeeze", "__getitem__"}
"""Shape-only ops that mark the way into a classifier (not activations: a feature block ends
with those too)."""


def short_name(ev: OpEvent) -> str:
    return ev.name[7:] if ev.name.startswith("Tensor.") else ev.name


def shape_only(g: DataflowGraph, ev: OpEvent, v: int) -> bool:
    """Does ``ev`` pass the channel count of value ``v`` through without depending on it (per sample)?"""
    name = short_name(ev)
    if not ev.args or ev.args[0] != Ref(v):
        return False
    if any(i != v and not g.value(i).const for i in ev.inputs):
        return False
    if not ev.outputs:
        return False
    s_in = g.value(v).shape
    s_out = g.value(ev.outputs[0]).shape
    if s_in is None or s_out is None:
        return False
    if name in ELEMENTWISE:
        return s_in == s_out
    if name in POOLS:
        return len(s_out) == len(s_in) and s_out[:2] == s_in[:2]
    if name == "flatten":
        return len(s_out) >= 1 and s_out[0] == s_in[0] and len(s_in) >= 2
    if name in RESHAPES:
        sizes = _ints(ev.args[1:]) + _ints(list(ev.kwargs.values()))
        return len(s_out) == 2 and s_out[0] == s_in[0] and -1 in sizes
    if name in REDUCTIONS:  # per-sample reductions (spatial pooling, token means...)
        dims = ev.arg(1, "dim")
        if dims is None or isinstance(dims, Ref):
            return False
        dims = [dims] if isinstance(dims, int) else list(dims)
        nd = len(s_in)
        norm = {d % nd for d in dims if isinstance(d, int)}
        return len(norm) == len(dims) and nd >= 2 and 0 not in norm and s_out[:1] == s_in[:1]
    if name == "squeeze":
        return len(s_out) >= 2 and s_out[:2] == s_in[:2]
    if name == "__getitem__":  # x[:, 0] (a class token), x[..., 0, 0]: fixed positions, all channels
        idx = ev.args[1] if len(ev.args) > 1 else None
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = slice(None, None, None)
        return (len(idx) >= 1 and (idx[0] == full or idx[0] is Ellipsis)
                and all(i == full or i is Ellipsis or (isinstance(i, int) and not isinstance(i, bool)) for i in idx)
                and s_out[:1] == s_in[:1])
    return False


def _ints(obj: Any) -> list[int]:
    out: list[int] = []
    if isinstance(obj, bool):
        return out
    if isinstance(obj, int):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out.extend(_ints(o))
    return out


def layer_of(g: DataflowGraph, ev: OpEvent) -> ModuleCall | None:
    """The innermost module call owning the weight of conv/linear op ``ev`` (``None`` when the
    weight is no module's own ``weight`` parameter)."""
    w = ev.arg(1, "weight")
    weight = g.value(w.value).tensor if isinstance(w, Ref) else None
    if weight is None:
        return None
    for call in g.enclosing_calls(ev):
        if call.parent is not None and getattr(call.module, "weight", None) is weight:
            return call
    return None


def is_classifier_layer(module: Any, gathered: bool) -> bool:
    """A torch Linear, or a 1x1 conv (groups 1) reached through pooling/flatten/dropout
    (``gathered``): the layer a head's shape-only ops lead to."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return gathered and module.groups == 1 and all(k == 1 for k in module.kernel_size)
    return False


def walk_call(g: DataflowGraph, call: ModuleCall, v: int, gathered: bool) -> tuple[str, bool]:
    """Follow value ``v`` (the call's input) through the data path of ``call``.

    Returns ``(kind, gathered)``: kind ``"shape-only"`` when every op of the call on the data
    path is shape-only and the call returns what they compute, ``"classifier"`` when the ops
    are shape-only up to exactly one classifier layer (:func:`is_classifier_layer`) and
    shape-only after it, ``""`` otherwise. ``gathered`` says whether a pooling / flatten /
    dropout op was crossed before the classifier (or anywhere, for shape-only calls).
    """
    if call.inputs[:1] != (v,) or len(call.outputs) != 1:
        return "", gathered
    cur = v
    classifier = None
    for ev in g.events_in(call):
        if not g.reads_variable(ev):
            continue  # parameter-only computations
        if classifier is not None and classifier.start <= ev.id < classifier.end:
            continue  # inside the classifier layer (its own conv/linear and bias ops)
        if cur not in ev.inputs or any(i != cur and not g.value(i).const for i in ev.inputs):
            return "", gathered
        if ev.name in CONV_OPS and classifier is None:
            owner = layer_of(g, ev)
            if owner is None or not is_classifier_layer(owner.module, gathered) or owner.inputs[:1] != (cur,):
                return "", gathered
            classifier = owner
            if len(owner.outputs) != 1:
                return "", gathered
            cur = owner.outputs[0]
            continue
        if not shape_only(g, ev, cur):
            return "", gathered
        if short_name(ev) in GATHERING:
            gathered = True
        cur = ev.outputs[0]
    if cur != call.outputs[0]:
        return "", gathered
    return ("classifier" if classifier is not None else "shape-only"), gathered


def reaches(g: DataflowGraph, src: int, dst: int, limit: int = 256) -> tuple[bool, bool]:
    """Is value ``dst`` computed from ``src`` by shape-only ops alone (``src == dst`` included)?
    Returns ``(reached, gathered)``: gathered when a pooling / flatten / dropout op is on the way."""
    stack = [(src, False)]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        cur, gathered = stack.pop()
        if cur == dst:
            return True, gathered
        if cur in seen:
            continue
        seen.add(cur)
        for u in g.uses(cur):
            if u < 0:
                continue
            ev = g.event(u)
            if ev.outputs and shape_only(g, ev, cur):
                stack.append((ev.outputs[0], gathered or short_name(ev) in GATHERING))
    return False, False
