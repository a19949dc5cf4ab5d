"""Backbone stages: chains of a container's children, each reading the previous one's output.

Details: docs/architecture.md (*truncate, in one paragraph*).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..capture.graph import DataflowGraph, ModuleCall
from .head import reaches, walk_call


@dataclass
class Block:
    index: int
    call: ModuleCall  # the call with parameters
    path: str
    out_shape: tuple | None
    params: int
    flops: int
    calls: list[ModuleCall] = field(default_factory=list)  # in order: call and its attached parameter-free calls

    def __post_init__(self) -> None:
        if not self.calls:
            self.calls = [self.call]

    @property
    def module(self) -> Any:
        return self.call.module

    @property
    def modules(self) -> list[Any]:
        return [c.module for c in self.calls]

    @property
    def out_call(self) -> ModuleCall:
        """The block's last call: its output is the block's output."""
        return self.calls[-1]

    @property
    def paths(self) -> list[str]:
        return [c.path for c in self.calls]

    @property
    def type_name(self) -> str:
        return type(self.call.module).__name__

    @property
    def out_channels(self) -> int | None:
        """Size of dimension 1 of the output (channels of NC... tensors, features of N x F)."""
        s = self.out_shape
        return s[1] if s is not None and len(s) >= 2 else (s[0] if s else None)

    def row(self) -> dict:
        return {"index": self.index, "path": self.path, "type": self.type_name,
                "with": [{"path": c.path, "type": type(c.module).__name__} for c in self.calls if c is not self.call],
                "out_shape": list(self.out_shape) if self.out_shape is not None else None,
                "out_channels": self.out_channels, "params": self.params, "flops": self.flops}


@dataclass
class Stage:
    path: str  # the container of the blocks ('' = the model itself)
    host: str  # path of the module whose forward calls the blocks ('' = the model)
    blocks: list[Block]
    flops: int
    share: float  # of the model's FLOPs (or parameters when no FLOPs are counted)
    measure: str  # "FLOPs" | "parameters" | "blocks"
    trimmed: list[str] = field(default_factory=list)  # trailing calls left to the head
    complete: bool = True  # the blocks are all the container's children that run before its head
    later: list[ModuleCall] = field(default_factory=list)  # the container's calls after the stage and its head calls
    slices: list[str] = field(default_factory=list)  # features[0:4], ... when called through slices
    children: int = 0  # how many of the container's children run

    @property
    def score(self) -> float:
        return len(self.blocks) * self.share

    @property
    def label(self) -> str:
        return self.path or "<model>"

    def describe(self) -> str:
        host = f"{self.host}.forward" if self.host else "the model's forward"
        how = (f"through slices of {self.label} ({', '.join(self.slices)}) by {host}" if self.slices
               else f"one after another by {host}")
        n = len(self.blocks)
        text = f"{self.label}: {n} block{'s' if n != 1 else ''} called {how}, each reading the previous one's output"
        if not self.complete:
            first, last = self.blocks[0].calls[0].path, self.blocks[-1].out_call.path
            text += (f" (the run {first} … {last}; {self.label}'s later children do not continue it, "
                     "so --stage cannot name it: use --after or the automatic choice)")
        if self.trimmed:
            text += f", head {', '.join(self.trimmed)} left out"
        return text + f", on the input→output path, carrying {self.share:.0%} of the model's {self.measure}"

    def summary(self) -> dict:
        return {"stage": self.path, "host": self.host, "blocks": len(self.blocks),
                "share": round(self.share, 4), "measure": self.measure, "score": round(self.score, 3),
                "complete": self.complete}


class StageError(ValueError):
    """``--stage PATH`` names no stage; the message says why."""



def _params(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _inside(host: str, container: str) -> bool:
    """Is ``host`` the container or one of its ancestors (a forward that may call its children)?"""
    return host == container or host == "" or container.startswith(host + ".")


def _live_values(g: DataflowGraph) -> set[int]:
    """Values the model's outputs depend on."""
    live: set[int] = set()
    stack = list(g.outputs)
    while stack:
        v = stack.pop()
        if v in live:
            continue
        live.add(v)
        p = g.values[v].producer
        if p is not None:
            stack.extend(g.events[p].inputs)
        prev = g.values[v].version_of
        if prev is not None:
            stack.append(prev)
    return live


# -- the container's calls ------------------------------------------------------------------


@dataclass
class _Entry:
    call: ModuleCall
    host: ModuleCall  # the call whose forward made it (a slice's caller for calls through a slice)
    slice: ModuleCall | None  # the unregistered slice Sequential it ran in
    problem: str  # why it cannot be a block ('' when it can)


def _slice_of(g: DataflowGraph, c: ModuleCall) -> str | None:
    """The container an unregistered ``nn.Sequential`` call is a slice of (``features[:4](x)``)."""
    import torch.nn as nn

    if c.parent is None or g.paths_of(c.module) or not isinstance(c.module, nn.Sequential):
        return None
    parents = set()
    kids = list(c.module.children())
    if not kids:
        return None
    for m in kids:
        ps = g.paths_of(m)
        if not ps:
            return None
        parents.add(_parent(ps[0]))
    return parents.pop() if len(parents) == 1 else None


def _slice_name(g: DataflowGraph, c: ModuleCall, container: str) -> str:
    names = [g.paths_of(m)[0].rpartition(".")[2] for m in c.module.children()]
    base = container or "<model>"
    if all(n.isdigit() for n in names):
        idx = [int(n) for n in names]
        if idx == list(range(idx[0], idx[-1] + 1)):
            return f"{base}[{idx[0]}:{idx[-1] + 1}]"
    return f"{base}[{names[0]} … {names[-1]}]"


def _containers(g: DataflowGraph) -> dict[str, list[_Entry]]:
    """Every container's child calls in execution order, with what keeps each from being a block."""
    slices = {c.id: s for c in g.calls if (s := _slice_of(g, c)) is not None}
    groups: dict[str, list[_Entry]] = defaultdict(list)
    for c in g.calls:
        if c.parent is None or not g.paths_of(c.module):
            continue  # the model itself; a module created in forward (a slice) is looked through
        container = _parent(c.path)
        caller = g.call(c.parent)
        sl = None
        if caller.id in slices:
            sl, caller = caller, g.call(caller.parent)
        problem = ""
        if sl is not None and slices[sl.id] != container:
            problem = f"is called through a slice of {slices[sl.id] or '<model>'}"
        elif not g.paths_of(caller.module) and caller.parent is not None:
            problem = f"is called by a module created in forward ({type(caller.module).__name__})"
        elif not _inside(caller.path, container):
            problem = f"is called from {caller.path} ({caller.type_name}), outside {container or '<model>'}"
        elif g.call_count(c.module) != 1:
            problem = f"is called {g.call_count(c.module)} times"
        elif len(c.outputs) != 1:
            problem = f"returns {len(c.outputs)} tensors"
        elif not c.inputs:
            problem = "takes no tensor input"
        groups[container].append(_Entry(c, caller, sl, problem))
    return groups


def _link(g: DataflowGraph, prev: ModuleCall, c: ModuleCall) -> str:
    """'' when ``c`` continues a chain after ``prev``, else why not."""
    if c.inputs[0] != prev.outputs[0]:
        return f"does not take {prev.path}'s output as its first input"
    if c.module is prev.module:
        return "is the same module as the block before"
    if not all(g.value(v).const for v in c.inputs[1:]):
        return "reads other tensors besides the previous block's output"
    return ""


def _fed(g: DataflowGraph, calls: list[ModuleCall], k: int) -> tuple[bool, bool]:
    """Is call ``k`` fed by call ``k - 1`` (directly or through shape-only ops)? (the first always is)"""
    if k == 0:
        return True, False
    prev, c = calls[k - 1], calls[k]
    if len(prev.outputs) != 1 or not c.inputs:
        return False, False
    return reaches(g, prev.outputs[0], c.inputs[0])


def head_start(g: DataflowGraph, calls: list[ModuleCall]) -> int:
    """Where the head begins among a container's trailing calls (``len(calls)`` when it has none).

    The head: trailing parameter-free calls, each fed by the one before; before them, optionally
    a classifier (a Linear, or a 1x1 conv reached through pooling/flatten/dropout, as a module of
    its own or a container of shape-only ops around one) fed through shape-only parameter-free
    calls."""
    i = len(calls)
    while i > 0 and _params(calls[i - 1].module) == 0 and _fed(g, calls, i - 1)[0]:
        i -= 1
    if i == 0:
        return 0
    c = i - 1  # a classifier candidate, after shape-only parameter-free calls
    j = c
    while j > 0 and _params(calls[j - 1].module) == 0:
        j -= 1
    for start in range(j, c + 1):  # the longest head that qualifies
        fed, gathered = _fed(g, calls, start)
        if not fed:
            continue
        ok = True
        for k in range(start, c + 1):
            if k > start:
                fed, through = _fed(g, calls, k)
                if not fed:
                    ok = False
                    break
                gathered = gathered or through
            kind, gathered = walk_call(g, calls[k], calls[k].inputs[0], gathered) if calls[k].inputs else ("", gathered)
            if kind != ("classifier" if k == c else "shape-only"):
                ok = False
                break
        if ok:
            return start
    return i


def _group_blocks(run: list[ModuleCall], flops: dict[str, int], g: DataflowGraph) -> list[Block]:
    groups: list[list[ModuleCall]] = []
    mains: list[ModuleCall] = []
    pending: list[ModuleCall] = []
    for c in run:
        if _params(c.module) > 0:
            groups.append(pending + [c])
            mains.append(c)
            pending = []
        elif groups:
            groups[-1].append(c)
        else:
            pending.append(c)
    blocks = []
    for i, (main, calls) in enumerate(zip(mains, groups)):
        blocks.append(Block(i, main, main.path, g.value(calls[-1].outputs[0]).shape, _params(main.module),
                            sum(flops.get(c.path, 0) for c in calls), calls))
    return blocks


@dataclass
class _Analysis:
    container: str
    entries: list[_Entry]
    tail: int  # index of the first head call
    runs: list[tuple[int, int]]  # [start, end) into entries, each a maximal chain of the body
    breaks: dict[int, str]  # entry index -> why it does not continue the run before it


def _analyse(g: DataflowGraph, container: str, entries: list[_Entry]) -> _Analysis:
    calls = [e.call for e in entries]
    tail = head_start(g, calls)
    runs: list[tuple[int, int]] = []
    breaks: dict[int, str] = {}
    start = None
    for k in range(tail):
        e = entries[k]
        if e.problem:
            breaks[k] = e.problem
            if start is not None:
                runs.append((start, k))
            start = None
            continue
        if start is not None:
            why = _link(g, calls[k - 1], calls[k])
            if not why:
                continue
            breaks[k] = why
            runs.append((start, k))
        start = k
    if start is not None:
        runs.append((start, tail))
    return _Analysis(container, entries, tail, runs, breaks)


def _stage(g: DataflowGraph, a: _Analysis, span: tuple[int, int], flops: dict[str, int],
           total_flops: int, total_params: int) -> Stage | None:
    s, e = span
    calls = [x.call for x in a.entries]
    final = e == a.tail
    if final:
        run, head = calls[s:e], calls[e:]
    else:  # a run in the middle of the container keeps its own head (trailing parameter-free calls...)
        h = s + head_start(g, calls[s:e])
        run, head = calls[s:h], calls[h:e]
    blocks = _group_blocks(run, flops, g)
    if not blocks:
        return None
    fl = sum(b.flops for b in blocks)
    if total_flops > 0:
        share, measure = fl / total_flops, "FLOPs"
    elif total_params > 0:
        share, measure = sum(b.params for b in blocks) / total_params, "parameters"
    else:
        share, measure = 1.0, "blocks"
    first = a.entries[s]
    slices = []
    for x in a.entries[s:e]:
        if x.slice is not None:
            name = _slice_name(g, x.slice, a.container)
            if name not in slices:
                slices.append(name)
    later = [] if final else calls[e:]
    return Stage(a.container, first.host.path, blocks, fl, share, measure, [c.path for c in head],
                 complete=(s == 0 and final), later=later, slices=slices, children=len(calls))


def _on_path(st: Stage, live: set[int]) -> bool:
    """Is the stage on the input→output path (some block's output reaches a model output; the
    last blocks of a backbone whose features are tapped earlier may be dead)?"""
    return any(b.out_call.outputs[0] in live for b in st.blocks)


def find_stages(g: DataflowGraph, model: Any, flops: dict[str, int], total_flops: int) -> list[Stage]:
    """Every candidate stage (two blocks or more, output on the input→output path), best first."""
    live = _live_values(g)
    total_params = _params(model)
    stages: list[Stage] = []
    for container, entries in _containers(g).items():
        a = _analyse(g, container, entries)
        for span in a.runs:
            st = _stage(g, a, span, flops, total_flops, total_params)
            if st is None or len(st.blocks) < 2 or not _on_path(st, live):
                continue
            stages.append(st)
    stages.sort(key=lambda s: (-s.score, -len(s.blocks), s.path.count(".")))
    return stages


def stage_at(g: DataflowGraph, model: Any, flops: dict[str, int], total_flops: int, path: str) -> Stage:
    """The stage made of all the children of the container at ``path`` that run (before its
    head), as one chain; :class:`StageError` says why not."""
    label = path or "<model>"
    entries = _containers(g).get(path, [])
    generic = "its blocks are not called one after another on the input→output path, each reading the previous one's output"
    if not entries:
        raise StageError(f"{generic}: none of its children is called as a module")
    a = _analyse(g, path, entries)
    calls = [x.call for x in entries]
    if a.tail == 0:
        heads = calls[0].path if len(calls) == 1 else f"{calls[0].path} … {calls[-1].path}"
        raise StageError(f"its children ({heads}) are the head -- pooling, flatten, dropout, activations and "
                         "the Linear/Conv layer they lead to -- not backbone blocks, so there is nothing to cut")
    if a.runs != [(0, a.tail)]:
        k = min(a.breaks) if a.breaks else 0
        c = calls[k]
        raise StageError(f"{generic}: {c.path} ({c.type_name}) {a.breaks.get(k, 'breaks the chain')}, so {label} "
                         "is not one chain of blocks that can be cut at its end")
    st = _stage(g, a, (0, a.tail), flops, total_flops, _params(model))
    if st is None:
        raise StageError(f"{generic}: none of its children has parameters")
    if not _on_path(st, _live_values(g)):
        raise StageError(f"{generic}: no block's output reaches the model's output")
    return st
