"""Multi-branch blocks in a recorded forward: branches reading one tensor, summed before any
non-linearity (RepVGG, MobileOne, RepConv, ACNet, RepGhost, DBB...).

A *sum* is a tree of tensor additions (``a + b``, ``out += c``, ``0 + x``). Walking back from
each summand through linear ops -- 2-D convs, inference BatchNorm, constant per-channel
multiplies and adds, average pooling, padding (:mod:`.branch_stages`) -- gives its chain; the source is the
latest tensor every chain reaches. Each branch becomes a :class:`~modelsurgeon.rewrite.kernels.
ConvMap` (identity: a delta kernel). A per-channel affine reading the sum (QARepVGG's
BatchNorm after it) joins it. What keeps a found block from being merged is said with a stable
code (``Problem``); a sum whose summands reach no common tensor linearly (a residual
connection) is no candidate and not reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from .affine import ADD
from ..report.codes import Refusal
from .branch_stages import Problem, Stage, branch_map, stage
from .calls import hook_kind


@dataclass
class Branch:
    leaf: int  # the summed value
    stages: list[Stage] = field(default_factory=list)  # from the source outward
    map: Any = None  # ConvMap of the whole branch

    @property
    def convs(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "conv"]

    def describe(self, g: DataflowGraph, base: str = "") -> str:
        if not self.stages:
            return "identity"
        parts = []
        for s in self.stages:
            name = where(g, s.event, base)
            if s.kind == "conv":
                k = s.map.kernel
                parts.append(f"{name} {k[0]}×{k[1]}" + (f"/g{s.map.groups}" if s.map.groups > 1 else ""))
            elif s.kind != "pad":
                parts.append(name)
        return "→".join(parts) if self.convs else "identity" + (f"→{parts[-1]}" if parts else "")


@dataclass
class BlockSum:
    source: int  # the tensor every branch reads
    root: OpEvent  # the last addition
    final: int  # the value the merged conv replaces (the sum, or the affine after it)
    owner: ModuleCall  # the smallest call holding the whole block
    branches: list[Branch]
    post: list[Stage] = field(default_factory=list)  # affine maps after the sum
    events: set = field(default_factory=set)  # every op the merge replaces
    problem: Problem | None = None


def where(g: DataflowGraph, ev: OpEvent, base: str = "") -> str:
    """The module running ``ev``, named from ``base`` (the block), else the op."""
    path = g.call(ev.scope).path
    if base and path.startswith(base + "."):
        return path[len(base) + 1:]
    return path if path and path != base and not base else ev.name


def _chain(g: DataflowGraph, v: int, floor: int) -> tuple[list[int], list[Stage], OpEvent | None]:
    """Values from ``v`` back through linear ops (``path[i+1]`` is what ``stages[i]`` read),
    and the op it stopped at."""
    path, stages = [v], []
    while True:
        ev = g.producer(v)
        if ev is None or ev.id < floor:
            return path, stages, None
        st = stage(g, ev, v)
        if st is None:
            return path, stages, ev
        stages.append(st)
        v = st.source
        path.append(v)


def _summands(g: DataflowGraph, ev: OpEvent, out: list[int], adds: list[OpEvent]) -> None:
    adds.append(ev)
    for a in ev.args[:2]:
        if not isinstance(a, Ref):
            continue
        p = g.producer(a.value)
        if p is not None and _is_sum(g, p) and g.uses(a.value) == [ev.id]:
            _summands(g, p, out, adds)
        else:
            out.append(a.value)


def _is_sum(g: DataflowGraph, ev: OpEvent) -> bool:
    if ev.name not in ADD or ev.arg(2, "alpha", 1) != 1 or len(ev.args) < 2:
        return False
    refs = [a for a in ev.args[:2] if isinstance(a, Ref) and not g.value(a.value).const]
    others = [a for a in ev.args[:2] if not isinstance(a, Ref)]
    return len(refs) == 2 or (len(refs) == 1 and others == [0])


def _depends(g: DataflowGraph, v: int, target: int, floor: int) -> bool:
    stack, seen = [v], set()
    while stack:
        x = stack.pop()
        if x == target:
            return True
        if x in seen:
            continue
        seen.add(x)
        ev = g.producer(x)
        if ev is not None and ev.id >= floor:
            stack.extend(ev.inputs)
    return False


def find_sums(g: DataflowGraph) -> list[BlockSum]:
    """Every multi-branch block of the recording (those with a problem included)."""
    out = []
    for ev in g.events:
        if not _is_sum(g, ev):
            continue
        o = ev.outputs[0]
        users = g.uses(o)
        if len(users) == 1 and users[0] != OUTPUT and _is_sum(g, g.event(users[0])):
            continue  # not the last addition
        leaves, adds = [], []
        _summands(g, ev, leaves, adds)
        if len(leaves) >= 2:
            b = _block(g, ev, leaves, adds)
            if b is not None:
                out.append(b)
    return out


def _block(g: DataflowGraph, root: OpEvent, leaves: list[int], adds: list[OpEvent]) -> BlockSum | None:
    chains = [_chain(g, v, 0) for v in leaves]
    sets = [set(p) for p, _, _ in chains]
    counts: dict[int, int] = {}
    for st in sets:
        for x in st:
            counts[x] = counts.get(x, 0) + 1
    best = max(counts.values())
    if best < 2:
        return None
    src = max(x for x, n in counts.items() if n == best)  # the latest tensor most chains reach
    floor = g.producer(src).id if g.producer(src) is not None else 0
    branches, problem = [], None
    for leaf, (path, stages, stop) in zip(leaves, chains):
        if src not in path:
            if _depends(g, leaf, src, floor):
                what = stop.name if stop is not None else "an op"
                problem = problem or Refusal("nonlinear-branch", f"a branch applies {what} (not linear) to the input")
                continue
            return None  # a residual connection from elsewhere: no candidate
        branches.append(Branch(leaf, list(reversed(stages[:path.index(src)]))))
    if not any(b.convs for b in branches):
        return None
    events = {a.id for a in adds} | {s.event.id for b in branches for s in b.stages}
    owner = _owner(g, root, events)
    post, final = [], root.outputs[0]
    while True:
        users = g.uses(final)
        if len(users) != 1 or users[0] == OUTPUT or not (owner.start <= users[0] < owner.end):
            break
        st = stage(g, g.event(users[0]), g.event(users[0]).outputs[0])
        if st is None or st.kind != "affine" or st.source != final or st.problem is not None:
            break
        post.append(st)
        events.add(st.event.id)
        final = st.event.outputs[0]
    block = BlockSum(src, root, final, owner, branches, post, events, problem)
    if block.problem is None:
        block.problem = _check(g, block)
    return block


def _owner(g: DataflowGraph, root: OpEvent, events: set) -> ModuleCall:
    lo, hi = min(events), max(events)
    for c in g.enclosing_calls(root):
        if c.start <= lo and hi < c.end:
            return c
    return g.root


def _check(g: DataflowGraph, b: BlockSum) -> Problem | None:
    """Why the found block cannot become one conv; sets each branch's ``map`` otherwise."""
    for br in b.branches:
        for s in br.stages:
            if s.problem is not None:
                return s.problem
    # every intermediate value read by its chain only; modules in the branches called once, hook-free
    for br in b.branches:
        vals = [br.leaf] + [s.source for s in br.stages[1:]] if br.stages else []
        for v in vals:
            if len(g.uses(v)) != 1:
                return Refusal("other-readers", f"a value inside branch {br.describe(g)} is read outside it")
    for eid in b.events:
        for c in g.enclosing_calls(g.event(eid)):
            if c.id == b.owner.id:
                break
            kind = hook_kind(c.module)
            if kind is not None:
                return Refusal("hook", f"{c.path} has a {kind}, which would no longer run")
            if g.call_count(c.module) > 1:
                return Refusal("shared-module", f"{c.path} is called {g.call_count(c.module)} times")
    channels = g.value(b.source).shape
    if channels is None or len(channels) != 4:
        return Refusal("not-2d", "the branches do not read a 4-D tensor")
    for br in b.branches:
        for s in br.convs:
            w = s.event.arg(1, "weight")
            if g.value(w.value).is_param and len(g.param_uses(g.value(w.value).tensor)) > 1:
                return Refusal("shared-module", f"the weight of {where(g, s.event)} is read by other ops too")
    conv_groups = set()
    for br in b.branches:
        m = branch_map(br.stages, channels[1])
        if isinstance(m, Problem):
            return m
        br.map = m
        conv_groups.update(s.map.groups for s in br.convs)
    if len(conv_groups) > 1:
        return Refusal("groups-mismatch", f"the branches' convs have different groups ({sorted(conv_groups)})")
    return None
