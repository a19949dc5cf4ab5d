"""Can a recorded module call be taken out of the model -- replaced by ``nn.Identity``, by the
children it keeps, or by a generated forward -- without changing what the model does?

Not when a hook on it (or on a removed sub-module) would be dropped with it, when it was called
with more than its one tensor (its map was found from that tensor alone, and the replacement
could not take the rest), or when a tensor it holds is read outside the call (the host's
forward reads it too, so it must stay).
"""

from __future__ import annotations

from typing import Any, Iterable

from ..capture.graph import DataflowGraph, ModuleCall
from ..report.codes import Refusal


def hook_kind(module: Any) -> str | None:
    """The kind of the first hook registered on ``module`` itself, or ``None``."""
    for attr, kind in (("_forward_hooks", "forward hook"), ("_forward_pre_hooks", "forward pre-hook"),
                       ("_backward_hooks", "backward hook"), ("_backward_pre_hooks", "backward pre-hook")):
        if getattr(module, attr, None):
            return kind
    return None


def call_obstacle(call: ModuleCall, kept: list) -> Refusal | None:
    """Why a module that would be removed (replaced by ``nn.Identity`` or its ``kept`` children)
    cannot be: a hook on it or on a removed sub-module would be dropped; arguments besides the
    one tensor were neither probed nor can the replacement take them."""
    keep = {id(m) for k in kept for m in k.modules()}
    for name, sub in call.module.named_modules():
        if id(sub) in keep:
            continue
        kind = hook_kind(sub)
        if kind is not None:
            where = call.path if not name else f"{call.path}.{name}" if call.path else name
            return Refusal("hook", f"{where} has a {kind}, which would be dropped with the module")
    if call.kwarg_names:
        return Refusal("call-arguments", f"{call.path} is called with keyword arguments ({', '.join(call.kwarg_names)}): "
                       "its map was found without them, and its replacement could not take them")
    if call.arg_count != 1:
        return Refusal("call-arguments", f"{call.path} is called with {call.arg_count} positional arguments: its map "
                       "was found from the tensor alone, and its replacement could not take the others")
    return None


def read_outside(g: DataflowGraph, tensors: Iterable[tuple[str, Any]], call: ModuleCall) -> tuple[str, int] | None:
    """``(name, event id)`` of the first of the named ``tensors`` an op outside ``call`` reads
    (outside its events ``[call.start, call.end)``), or ``None``."""
    for name, t in tensors:
        if t is None:
            continue
        for e in g.param_uses(t):
            if not (call.start <= e < call.end):
                return name, e
    return None
