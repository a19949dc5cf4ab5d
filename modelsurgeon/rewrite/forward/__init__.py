"""Rewrite inside a forward: give a module a generated forward, keeping the module.

Details: docs/architecture.md (*Generated forwards*).
"""

from __future__ import annotations

from typing import Any

from ...capture.graph import DataflowGraph, ModuleCall
from .fold import fold
from .observe import OTHER_SIZES, observe, same, variants
from .plan import FORWARD_NAME, Committed, EditError, ForwardPlan, NewValue, _ops, _top_names, can_take_forward, generated_forward
from .program import (CANNOT_TAKE, DATA_DEPENDENT, EDIT, NOT_CHECKABLE, NOT_DESCRIBABLE, NOT_REPRODUCED, OUTSIDE,
                      SHARED, UNTRACEABLE, Program, Refused)
from .spec import KIND, NotDescribable, build, to_spec

__all__ = [
    "open_forwards", "ForwardPlan", "NewValue", "Committed", "EditError", "Refused", "generated_forward",
    "can_take_forward", "FORWARD_NAME", "KIND", "build", "CANNOT_TAKE", "DATA_DEPENDENT", "EDIT", "NOT_CHECKABLE",
    "NOT_DESCRIBABLE", "NOT_REPRODUCED", "OUTSIDE", "SHARED", "UNTRACEABLE",
]


def _resolve(g: DataflowGraph, call: ModuleCall) -> tuple | Refused:
    """``(owner, program call, generated module or None, owner path)`` for a recorded call."""
    m = call.module
    parent = g.call(call.parent) if call.parent is not None else None
    if parent is not None and generated_forward(parent.module) is m:
        return parent.module, call, m, parent.path
    gm = generated_forward(m)
    if gm is not None:
        inner = [g.call(c) for c in call.children if g.call(c).module is gm]
        if len(inner) != 1:
            return Refused(NOT_REPRODUCED, "its generated forward was not recorded")
        return m, inner[0], gm, call.path
    why = can_take_forward(m)
    return why if why is not None else (m, call, None, call.path)


def _program(owner: Any, g: DataflowGraph, pcall: ModuleCall, gm: Any, seen: Any) -> Program | Refused:
    from .replay import replayed
    from .trace import align, generated, traced

    if gm is not None:
        return align(generated(owner, gm), g, pcall, seen)
    p = traced(owner)
    fx_reason = p if isinstance(p, Refused) else None
    if fx_reason is None:
        p = align(p, g, pcall, seen)
        if isinstance(p, Program):
            try:
                to_spec(p.graph, p.constants, owner=p.owner_node.target)
                return p
            except NotDescribable as e:
                fx_reason = Refused(NOT_DESCRIBABLE, f"its traced forward holds {e}")
        else:
            fx_reason = p
    r = replayed(owner, g, pcall, seen)
    if isinstance(r, Refused):
        return Refused(r.code, f"{r} (and {fx_reason})" if fx_reason else str(r))
    return r


def open_forwards(g: DataflowGraph, calls: list[ModuleCall], model: Any, inputs: list) -> dict[int, ForwardPlan | Refused]:
    """A :class:`ForwardPlan` (or the reason there is none) for each recorded call, by call id.
    Runs the model once at the recorded size and up to a few times at other sizes (stopping
    when every watched call is over); changes nothing."""
    from .trace import run

    out: dict[int, ForwardPlan | Refused] = {}
    todo: dict[int, tuple] = {}
    for call in calls:
        r = _resolve(g, call)
        if isinstance(r, Refused):
            out[call.id] = r
            continue
        owner, pcall, gm, path = r
        n = g.call_count(pcall.module)
        if n != 1:
            out[call.id] = Refused(SHARED, f"it is called {n} times")
            continue
        todo[call.id] = r
    if not todo:
        return out
    owners = [r[0] for r in todo.values()]
    counts = {id(o): 1 for o in owners}
    try:
        kids = {id(r[0]): [g.call(c).module for c in r[1].children] for r in todo.values()}
        seen = observe(model, inputs, owners, counts, children=kids)
    except Exception as e:
        for cid in todo:
            out[cid] = Refused(NOT_REPRODUCED, f"the model fails when run again ({type(e).__name__})")
        return out
    plans: dict[int, ForwardPlan] = {}
    for cid, (owner, pcall, gm, path) in todo.items():
        calls_seen = seen.get(id(owner), [])
        if len(calls_seen) != 1:
            out[cid] = Refused(NOT_REPRODUCED, "it is called differently when the model runs again")
            continue
        prog = _program(owner, g, pcall, gm, calls_seen[0])
        if isinstance(prog, Refused):
            out[cid] = prog
            continue
        replaces = next((k for k, m in owner._modules.items() if m is gm), None) if gm is not None else None
        plan = ForwardPlan(prog, g, pcall, path, used_before=_top_names(prog), ops_before=_ops(prog.graph),
                           replaces=replaces)
        plan.folded = fold(prog)
        plans[cid] = plan
    checked = {cid: 0 for cid in plans}
    for variant in variants(inputs):
        pending = {cid: p for cid, p in plans.items() if checked[cid] < OTHER_SIZES and cid not in out}
        if not pending:
            break
        by_owner = {id(p.owner): cid for cid, p in pending.items()}
        verdict: dict[int, list[bool]] = {cid: [] for cid in pending}

        def check(module: Any, seen: Any) -> None:
            p = pending[by_owner[id(module)]]
            try:
                verdict[by_owner[id(module)]].append(same(run(p.prog, p.prog.constants, seen), seen.output))
            except Exception:
                verdict[by_owner[id(module)]].append(False)

        try:
            observe(model, variant, [p.owner for p in pending.values()], {id(p.owner): 1 for p in pending.values()},
                    on_call=check)
        except Exception:
            continue  # the model does not run at that size: try the next
        shape = " and ".join("x".join(map(str, t.shape)) for t in variant if hasattr(t, "shape"))
        for cid, p in pending.items():
            if len(verdict[cid]) != 1:
                continue  # not called once at that size (a branch of the host): no evidence either way
            if verdict[cid][0]:
                checked[cid] += 1
            else:
                out[cid] = Refused(NOT_REPRODUCED, f"its {'traced' if p.source != 'recording' else 'recorded'} forward "
                                                   f"gives other results at input {shape}: it depends on the input size")
    for cid, p in plans.items():
        if cid in out:
            continue
        if p.source == "recording" and checked[cid] < OTHER_SIZES:
            out[cid] = Refused(NOT_CHECKABLE, f"its recorded forward could be checked at {checked[cid]} other input "
                                              f"size{'s' if checked[cid] != 1 else ''} only (the model runs at no "
                                              "other)")
            continue
        out[cid] = p
    return out
