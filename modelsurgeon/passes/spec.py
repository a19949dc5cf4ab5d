"""What the registry knows of a pass without importing it: :class:`PassSpec`, and the order
``optimize`` runs passes in, a stable topological sort of their declared ``before``/``after``."""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..options.base import NoOptions, Options


@dataclass(frozen=True)
class PassSpec:
    """A pass as registered. Implementations are ``"module:Class"`` strings, imported when the
    pass runs, so that the command line starts without torch or onnx."""

    name: str  # kebab-case, e.g. "fold-bn"
    summary: str  # one line: the command list in --help, the registry
    options: type = NoOptions  # an Options dataclass: the command's flags and the API's keywords
    torch: str | None = None  # "module:Class" of the PyTorch implementation
    onnx: str | None = None  # "module:Class" of the ONNX implementation
    exact: bool = True  # function-preserving: part of ``optimize``
    before: tuple[str, ...] = ()  # passes this one must run before (names; unknown ones ignored)
    after: tuple[str, ...] = ()  # passes this one must run after
    cli: str | None = ""  # command name ("" = the pass's name; None = no command of its own)
    group: str | None = None  # a name for several passes in optimize --passes / --skip ("cleanup")
    description: str = ""  # the command's --help text (default: the summary)
    example: str = ""  # a command line shown in --help (run as printed by the tests)
    origin: str = field(default="modelsurgeon", compare=False)  # who registered it (a plugin's entry point)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", str(self.name)):
            raise ValueError(f"pass name {self.name!r}: use lower-case words joined by '-' (e.g. 'fold-bn')")
        if self.torch is None and self.onnx is None:
            raise ValueError(f"pass {self.name}: give a torch or an onnx implementation ('module:Class')")
        for target in (self.torch, self.onnx):
            if target is not None and not re.fullmatch(r"[\w.]+:[\w.]+", target):
                raise ValueError(f"pass {self.name}: {target!r} is not 'module:Class'")
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise ValueError(f"pass {self.name}: options must be an Options dataclass")
        for key in ("before", "after"):
            value = getattr(self, key)
            object.__setattr__(self, key, (value,) if isinstance(value, str) else tuple(value))
        if self.cli == "":
            object.__setattr__(self, "cli", self.name)

    def implementation(self, backend: str) -> str | None:
        return self.torch if backend == "torch" else self.onnx

    @property
    def help(self) -> str:
        text = self.description or self.summary[:1].upper() + self.summary[1:] + "."
        if self.example:
            text += f"\n\nExample (after python examples/build.py): {self.example}"
        return text


class OrderError(ValueError):
    pass


def ordered(specs: Sequence[PassSpec], names: Iterable[str] | None = None) -> list[str]:
    """``names`` (default: every spec) sorted so that each declared ``before``/``after`` between
    them holds; among passes free to go either way, registration order (the order of ``specs``)
    decides. A cycle raises :class:`OrderError`."""
    index = {s.name: i for i, s in enumerate(specs)}
    by_name = {s.name: s for s in specs}
    chosen = list(index) if names is None else [n for n in dict.fromkeys(names)]
    inside = set(chosen)
    succ: dict[str, set[str]] = {n: set() for n in chosen}
    for n in chosen:
        spec = by_name.get(n)
        if spec is None:
            continue
        succ[n].update(b for b in spec.before if b in inside and b != n)
        for a in spec.after:
            if a in inside and a != n:
                succ[a].add(n)
    indegree = {n: 0 for n in chosen}
    for n in chosen:
        for m in succ[n]:
            indegree[m] += 1
    ready = [(index.get(n, len(index)), n) for n in chosen if indegree[n] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, n = heapq.heappop(ready)
        out.append(n)
        for m in succ[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                heapq.heappush(ready, (index.get(m, len(index)), m))
    if len(out) < len(chosen):
        raise OrderError(f"the declared order has a cycle: {_cycle([n for n in chosen if n not in out], succ)}")
    return out


def _cycle(stuck: list[str], succ: dict[str, set[str]]) -> str:
    """One cycle among the passes the sort could not place, as "a before b before a"."""
    on = set(stuck)
    while True:  # drop what is stuck only behind a cycle: a pass with nothing stuck after it
        ends = {n for n in on if not (succ[n] & on)}
        if not ends:
            break
        on -= ends
    path, n = [], min(on)
    while n not in path:
        path.append(n)
        n = min(succ[n] & on)
    return " before ".join(path[path.index(n):] + [n])
