"""The round loop, once for both back ends: run the passes in order; with ``repeat`` (optimize)
run the list again until a round changes nothing, at most :data:`MAX_ROUNDS` times. Each back
end supplies a fresh context per pass (PyTorch re-captures after a change, ONNX cleans up and
re-infers shapes) and takes back what a pass left in it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .base import Applied, Pass, PassContext, PassReport, run_pass

MAX_ROUNDS = 8
"""Rounds ``optimize`` runs at most; reached, the report warns that the model still changed."""


@dataclass
class Rounds:
    """What the loop did: rounds run, every rewrite per pass (for ``Pass.verify``), the last
    context of each pass, and the inspection that stopped the run, if one did."""

    count: int = 0
    applied: dict[str, list[Applied]] = field(default_factory=dict)
    contexts: dict[str, PassContext] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # passes that rewrote something
    stopped: str | None = None
    exhausted: bool = False  # MAX_ROUNDS reached while the last round still changed the model

    def warning(self) -> str | None:
        if not self.exhausted:
            return None
        return (f"the passes still changed the model after {self.count} rounds (the limit): the result is verified, "
                "but running optimize on it again may rewrite more")


def run_rounds(passes: Sequence[Pass], reports: dict[str, PassReport], *, context: Callable[[Pass], PassContext],
               taken: Callable[[Pass, PassContext, PassReport], None] | None = None,
               changed: Callable[[Pass, PassContext], None] | None = None, repeat: bool = False,
               dry_run: bool = False, slot: str | None = None) -> Rounds:
    """Run ``passes`` in rounds. ``context(p)``: a fresh context for ``p`` on the model as it
    stands; ``taken(p, ctx, report)``: after each pass, take back its warnings, checks, report
    sections; ``changed(p, ctx)``: after a pass rewrote something (re-capture, clean up, check
    parity). Each pass's report adds up over rounds in ``reports``."""
    out = Rounds(applied={p.name: [] for p in passes})
    for round_ in range(MAX_ROUNDS):
        out.count = round_ + 1
        any_change = False
        for p in passes:
            ctx = context(p)
            pr = run_pass(p, ctx, dry_run=dry_run)
            reports[p.name].add_round(pr, first_round=round_ == 0, slot=slot)
            out.contexts[p.name] = ctx
            if taken is not None:
                taken(p, ctx, pr)
            if ctx.stop:  # an inspection answered (truncate --list): end the run here
                out.stopped = ctx.stop
                return out
            if pr.changed and not dry_run:
                out.applied[p.name].extend(pr.applied)
                out.changed.add(p.name)
                any_change = True
                if changed is not None:
                    changed(p, ctx)
        if not (repeat and any_change):
            return out
    out.exhausted = True
    return out


def own_verification(passes: Sequence[Pass], rounds: Rounds, tolerance: Any) -> list:
    """The ParityReports of the passes that check their own result (``Pass.verify``)."""
    results = []
    for p in passes:
        ctx = rounds.contexts.get(p.name)
        if ctx is None:
            continue
        result = p.verify(ctx, rounds.applied.get(p.name, []), tolerance)
        if result is not None:
            results.append((p, ctx, result))
    return results
