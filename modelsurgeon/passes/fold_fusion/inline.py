"""fold-fusion's inline weighted sums: weights multiplied in a host's own forward.

The host's forward is regenerated (:mod:`modelsurgeon.rewrite.forward`) when it can be: each
weight that moves into the layer producing its input (:mod:`modelsurgeon.match.absorb`) takes
its multiply with it, a multiply by exactly 1 goes, and a weight computed from parameters
(``relu(w) / (sum(relu(w)) + eps)``, softmax, sigmoid) is evaluated once into a constant, so
only the multiplies whose input has other readers stay. When the forward cannot be
regenerated (a branch on data, a shared host...), a weight that is a plain parameter (or a view
of one) read only by weights that move is folded and the parameter set to 1 -- the multiply
stays, by exactly 1 -- and a computed weight is reported with both reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import DataflowGraph
from ...match.absorb import describe_use, find_absorber
from ...match.conv import unwritable
from ...match.fusion import SIZE_DEPENDENT
from ...report.codes import Refusal
from ...match.inline_sum import InlineTerm, computation, const_operand, exact_scale, inline_terms, view_leaves
from ...rewrite import forward
from ..base import Applied, Match, Skipped, TorchContext


@dataclass
class InlineFusion(Match):
    """Weights that are a parameter: folded, the parameter set to 1."""

    terms: list[InlineTerm] = field(default_factory=list)
    params: list = field(default_factory=list)  # Values set to 1


@dataclass
class ForwardFusion(Match):
    """The sums of one host whose forward is regenerated."""

    plan: Any = None
    terms: list[InlineTerm] = field(default_factory=list)  # every term of the host


def _fmt(vec: Any) -> str:
    if vec.numel() == 1 or bool((vec == vec[0]).all()):
        return f"{float(vec[0]):.4g}"
    return f"per-channel[{vec.numel()}] {float(vec.min()):.3g}…{float(vec.max()):.3g}"


def _values(vec: Any) -> Any:
    if vec.numel() == 1 or bool((vec == vec[0]).all()):
        return float(vec[0])
    return [float(x) for x in vec]


def _gain(t: InlineTerm) -> bool:
    return t.one or t.absorber is not None or t.param is None


def _generated(g: DataflowGraph, h: int) -> bool:
    """Is call ``h`` a forward generated earlier (the bound GraphModule of its parent)?"""
    c = g.call(h)
    return c.parent is not None and forward.generated_forward(g.call(c.parent).module) is c.module


def inline_matches(ctx: TorchContext, replaced: set[int], refused: dict[int, Refusal],
                   reported: set[int]) -> Iterable[Match | Skipped]:
    g: DataflowGraph = ctx.graph
    inside = set()
    for cid in replaced:
        c = g.call(cid)
        inside.update(range(c.start, c.end))
    terms = inline_terms(g, inside)
    if not terms:
        return
    # a module that probing showed to be a weighted sum at the recorded size only: its
    # weights do not move as inline ones either (the sum would be wrong at other sizes)
    size_dependent = [(g.call(cid), why) for cid, why in refused.items() if why.code == SIZE_DEPENDENT]
    frozen: set[int] = set()  # hosts whose weights stay where they are
    for t in terms:
        for c, why in size_dependent:
            if c.start <= t.event.id < c.end:
                t.reason = f"{c.path} is a weighted sum at the recorded input size only ({why})"
                t.code = SIZE_DEPENDENT
                frozen.add(t.event.scope)
                break
        if t.reason is None and not t.one:
            operand = const_operand(g, t.event)
            t.param = g.const_root(operand) if operand is not None else None
            if t.param is None:  # computed in the model's dtype: the weight it stands for, in float64
                t.scale = exact_scale(g, t)
            a = find_absorber(g, t.value, t.scale, {t.event.id})
            if isinstance(a, Refusal):
                t.reason, t.code, t.absorber = a.reason, a.code, None
            else:
                t.absorber = a
    hosts: dict[int, list[InlineTerm]] = {}
    for t in terms:
        hosts.setdefault(t.event.scope, []).append(t)
    wanted = [g.call(h) for h, ts in hosts.items() if h not in frozen and any(_gain(t) for t in ts)]
    plans = forward.open_forwards(g, wanted, ctx.model, ctx.inputs) if wanted else {}
    rest: list[InlineTerm] = []
    refusals: dict[int, Refusal] = {}
    for h, ts in hosts.items():
        plan = plans.get(h)
        if isinstance(plan, forward.ForwardPlan):
            m = _forward_match(plan, ts)
            if isinstance(m, ForwardFusion):
                reported.add(h)
                yield m
                continue
            plan = m
        if plan is None and _generated(g, h):  # generated earlier, nothing new to move: nothing to say
            reported.add(h)
            continue
        if plan is not None:
            refusals[h] = plan
        rest += [t for t in ts if not t.one]
    yield from _fallback(g, rest, refused, reported, refusals)


def _forward_match(plan: Any, ts: list[InlineTerm]) -> ForwardFusion | Refusal:
    for t in ts:
        if not (t.one or t.absorber is not None):
            continue
        try:
            plan.substitute(t.event.outputs[0], t.value)
        except forward.EditError as e:
            t.absorber, t.reason, t.code = None, f"its multiply cannot be removed ({e})", "edit"
    if not any(t.one or t.absorber is not None for t in ts) and not plan.folded:
        return Refusal("edit", "nothing in it would change")
    why = plan.check()
    if why is not None:
        return why
    roots = {t.root for t in ts}
    host = ts[0].host or "the model"
    target = ts[0].target if len(roots) == 1 else f"{host}: {len(roots)} weighted sums"
    return ForwardFusion(target=target, plan=plan, terms=ts)


def _fallback(g: DataflowGraph, live: list[InlineTerm], refused: dict[int, Refusal], reported: set[int],
              refusals: dict[int, Refusal]) -> Iterable[Match | Skipped]:
    by_event = {t.event.id: t for t in live}
    for t in live:
        if t.param is None and t.code != SIZE_DEPENDENT:
            host = t.host or "the model"
            why = refusals.get(t.event.scope)
            t.absorber, t.code = None, "inline"
            t.reason = (
                f"its weight is computed inline in {host}.forward ({computation(g, const_operand(g, t.event))})"
                + (f" and that forward cannot be regenerated: {why}" if why else
                   "; without editing that code the multiply stays"))
    # a parameter is set to 1 only if every read of it is a weight that moves (or is 1)
    by_param: dict[int, list[InlineTerm]] = {}
    for t in live:
        if t.param is not None:
            by_param.setdefault(t.param.id, []).append(t)
    for pid, ts in by_param.items():
        pv = g.value(pid)
        problem = None
        if any(w.version_of == pid for w in g.values):
            problem = Refusal("not-foldable", f"{pv.name} is modified in the forward")
        why = None if problem else unwritable(g, pv.tensor, pv.name)
        if why is not None:
            problem = why.reworded(f"it cannot be set to 1: {why}")
        for e in view_leaves(g, pid):
            if problem:
                break
            u = by_event.get(e)
            if u is None:
                problem = Refusal("other-readers", f"{pv.name} is also read by {describe_use(g, e)}")
            elif not u.one and u.absorber is None:
                problem = Refusal(u.code or "not-foldable", f"{pv.name} also weighs {u.desc}, whose weight cannot move ({u.reason})")
        if problem:
            for t in ts:
                if t.reason is None:
                    t.reason, t.code, t.absorber = problem.reason, problem.code, None
    # one match per group of sums linked by a shared parameter
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for t in live:
        if t.param is not None:
            parent[find(t.root)] = find(-1 - t.param.id)
    groups: dict[int, list[InlineTerm]] = {}
    for t in live:
        groups.setdefault(find(t.root), []).append(t)
    for ts in groups.values():
        ok = [t for t in ts if t.absorber is not None]
        reported.update(g.event(t.root).scope for t in ts)
        for t in ts:
            if t.absorber is None:
                note = refused.get(g.event(t.root).scope)
                why = t.reason + (f"; the module as a whole is not rewritten either ({note})"
                                  if note and note.reason not in t.reason else "")
                yield Skipped(t.target, f"{t.desc} ×{_fmt(t.scale)}: {why}", code=t.code or "not-foldable")
        if ok:
            params = list({id(t.param): t.param for t in ok}.values())
            yield InlineFusion(target=ok[0].target, terms=ok, params=params)


def rewrite_inline(ctx: TorchContext, m: InlineFusion) -> Applied:
    ed = ctx.editor
    for t in m.terms:
        t.absorber.apply(ed, t.scale)
    for p in m.params:
        ed.neutralise(p.tensor, 1.0)
    parts = [f"{t.desc} ×{_fmt(t.scale)} → {t.absorber.describe()}" for t in m.terms]
    names = ", ".join(p.name for p in m.params)
    detail = "; ".join(parts) + f"; {names} set to 1 (its forward cannot be regenerated)"
    return Applied(m.target, detail, {
        "kind": "inline",
        "inputs": [{"input": t.desc, "weight": _values(t.scale), "absorbed_by": t.absorber.path,
                    "conv": t.absorber.conv, "through": t.absorber.through} for t in m.terms],
        "neutralised": [p.name for p in m.params],
    })


def rewrite_forward(ctx: TorchContext, m: ForwardFusion) -> Applied | Skipped:
    ed = ctx.editor
    moved = [t for t in m.terms if t.absorber is not None]
    for t in moved:
        t.absorber.apply(ed, t.scale)
    c = m.plan.commit(ed)
    if isinstance(c, Refusal):  # pragma: no cover - plan.check() ran in match
        raise RuntimeError(f"the generated forward could not be attached: {c}")
    kept = [t for t in m.terms if not t.one and t.absorber is None]
    parts = [f"{len(moved)} of {len(m.terms)} weights moved"
             + (": " + ", ".join(f"{t.desc} ×{_fmt(t.scale)} → {t.absorber.describe()}" for t in moved) if moved else "")]
    if kept:
        parts.append("multiply kept: " + ", ".join(f"{t.desc} ×{_fmt(t.scale)} ({t.reason})" for t in kept))
    if m.plan.folded:
        parts.append(f"{m.plan.folded} weight computation{'s' if m.plan.folded != 1 else ''} evaluated once")
    parts.append(f"forward → generated ({c.source}) {c.path}, {c.ops_before} → {c.ops_after} ops"
                 + (f"; removed {', '.join(c.removed)}" if c.removed else ""))
    return Applied(m.target, "; ".join(parts), {
        "kind": "forward",
        "source": c.source,
        "forward": c.path,
        "ops": [c.ops_before, c.ops_after],
        "removed": c.removed,
        "inputs": [{"input": t.desc, "weight": _values(t.scale),
                    "absorbed_by": t.absorber.path if t.absorber is not None else None,
                    "conv": t.absorber.conv if t.absorber is not None else None,
                    "through": t.absorber.through if t.absorber is not None else [],
                    "kept": not t.one and t.absorber is None,
                    **({"reason": t.reason, "code": t.code} if not t.one and t.absorber is None else {})}
                   for t in m.terms],
    })
