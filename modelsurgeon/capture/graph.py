"""The dataflow graph of one recorded forward pass.

Three kinds of record, all plain data:

* :class:`Value` -- one version of one tensor: a graph input, a parameter or buffer, a constant
  attribute, or the output of an op. An in-place op produces a new version of the same tensor.
* :class:`OpEvent` -- one call of a torch function, tensor method or ``torch.nn.functional``
  function, in execution order, with its argument structure (tensors replaced by :class:`Ref`).
* :class:`ModuleCall` -- one call of an ``nn.Module``: its path, the values it received and
  returned, and the range of op events that ran inside it (nested calls included).

Consumers are counted at op level, so a value read by an op anywhere (inside any module, or
by the host forward's own code) counts; reaching a graph output counts as a use too.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

OUTPUT = -1
"""Pseudo event id for "returned by the model" in :meth:`DataflowGraph.uses`."""


@dataclass(frozen=True)
class Ref:
    """Placeholder for a tensor argument: the id of the value it carried."""

    value: int


@dataclass(eq=False)
class Value:
    id: int
    kind: str  # "input" | "param" | "buffer" | "attr" | "op" | "opaque"
    shape: tuple[int, ...] | None
    dtype: Any
    producer: int | None = None
    version_of: int | None = None
    const: bool = False
    name: str | None = None
    tensor: Any = None  # kept for constants only: parameters, buffers and small derived values

    @property
    def is_param(self) -> bool:
        return self.kind in ("param", "buffer")


@dataclass(eq=False)
class OpEvent:
    id: int
    name: str
    func: Any
    args: tuple
    kwargs: dict
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    scope: int
    inplace: bool = False

    def arg(self, index: int, keyword: str, default: Any = None) -> Any:
        """Positional-or-keyword argument lookup."""
        if keyword in self.kwargs:
            return self.kwargs[keyword]
        if index < len(self.args):
            return self.args[index]
        return default


@dataclass(eq=False)
class ModuleCall:
    id: int
    path: str
    module: Any
    parent: int | None
    inputs: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    start: int = 0  # first event id inside the call
    end: int = 0  # one past the last event id inside the call
    children: list[int] = field(default_factory=list)
    arg_count: int = 1  # positional arguments the module was called with (tensors or not)
    kwarg_names: tuple[str, ...] = ()  # keyword arguments it was called with

    @property
    def type_name(self) -> str:
        return type(self.module).__name__


class DataflowGraph:
    """Queries over one recorded execution. Built by :func:`modelsurgeon.capture.capture`."""

    def __init__(self) -> None:
        self.values: list[Value] = []
        self.events: list[OpEvent] = []
        self.calls: list[ModuleCall] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.output_structure: Any = None
        self.module_paths: dict[int, list[str]] = {}  # id(module) -> every path it has
        self.module_flops: dict[str, int] | None = None  # module path -> FLOPs, when counted
        self._uses: dict[int, list[int]] | None = None
        self._calls_by_module: dict[int, list[ModuleCall]] | None = None
        self._param_values: dict[int, int] = {}  # id(tensor) -> value id, for params/buffers
        self._holders: dict[int, list[tuple[str, str, Any]]] | None = None
        # what matchers measured on the recorded model (by key, e.g. one result per module),
        # valid as long as this recording is: a changed model is captured again
        self.memo: dict[Any, Any] = {}

    # -- construction helpers (used by the recorder) ---------------------------------------
    def _new_value(self, **kw: Any) -> Value:
        v = Value(id=len(self.values), **kw)
        self.values.append(v)
        return v

    def _invalidate(self) -> None:
        self._uses = None
        self._calls_by_module = None

    # -- queries ---------------------------------------------------------------------------
    def value(self, vid: int) -> Value:
        return self.values[vid]

    def event(self, eid: int) -> OpEvent:
        return self.events[eid]

    def call(self, cid: int) -> ModuleCall:
        return self.calls[cid]

    @property
    def root(self) -> ModuleCall:
        return self.calls[0]

    def uses(self, vid: int) -> list[int]:
        """Event ids that read value ``vid`` (one entry per use; :data:`OUTPUT` if returned)."""
        if self._uses is None:
            uses: dict[int, list[int]] = defaultdict(list)
            for ev in self.events:
                for i in dict.fromkeys(ev.inputs):
                    uses[i].append(ev.id)
            for o in self.outputs:
                uses[o].append(OUTPUT)
            self._uses = dict(uses)
        return self._uses.get(vid, [])

    def walk_uses(self, start: int, step: Callable[[int, int], Iterable[int]]) -> None:
        """Walk forward from value ``start``: ``step(v, u)`` is called for each use ``u`` (an
        event id, or :data:`OUTPUT`) of every value ``v`` reached, once per value, and returns
        the values to walk on to (none: the walk stops there)."""
        stack, seen = [start], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            for u in self.uses(v):
                stack.extend(step(v, u))

    def consumers(self, vid: int) -> list[OpEvent | None]:
        """Events reading ``vid``; ``None`` stands for the model's output."""
        return [None if e == OUTPUT else self.events[e] for e in self.uses(vid)]

    def producer(self, vid: int) -> OpEvent | None:
        p = self.values[vid].producer
        return None if p is None else self.events[p]

    def calls_of(self, module: Any) -> list[ModuleCall]:
        if self._calls_by_module is None:
            by: dict[int, list[ModuleCall]] = defaultdict(list)
            for c in self.calls:
                by[id(c.module)].append(c)
            self._calls_by_module = dict(by)
        return self._calls_by_module.get(id(module), [])

    def call_count(self, module: Any) -> int:
        return len(self.calls_of(module))

    def paths_of(self, module: Any) -> list[str]:
        return self.module_paths.get(id(module), [])

    def param_value(self, tensor: Any) -> Value | None:
        vid = self._param_values.get(id(tensor))
        return None if vid is None else self.values[vid]

    def events_in(self, call: ModuleCall, direct: bool = False) -> Iterator[OpEvent]:
        """Events that ran inside ``call``; with ``direct`` only those of its own forward."""
        for eid in range(call.start, call.end):
            ev = self.events[eid]
            if not direct or ev.scope == call.id:
                yield ev

    def enclosing_calls(self, ev: OpEvent) -> list[ModuleCall]:
        """Module calls around ``ev``, innermost first, the root last."""
        out = []
        cid: int | None = ev.scope
        while cid is not None:
            c = self.calls[cid]
            out.append(c)
            cid = c.parent
        return out

    def reads_variable(self, ev: OpEvent) -> bool:
        """Does ``ev`` read anything but constants (parameters, buffers, literals)?"""
        return any(not self.values[i].const for i in ev.inputs)

    def active_events(self, call: ModuleCall, direct: bool = False) -> list[OpEvent]:
        """Events in ``call`` that read a non-constant value (the data path, without the
        parameter-only computations a forward may do first)."""
        return [e for e in self.events_in(call, direct) if self.reads_variable(e)]

    def calls_starting_with(self, ev: OpEvent) -> list[ModuleCall]:
        """Calls whose data path starts at ``ev`` reading their sole tensor input, innermost
        first (parameter-only computations before ``ev`` are allowed)."""
        out = []
        for c in self.enclosing_calls(ev):
            if len(c.inputs) != 1 or c.inputs[0] not in ev.inputs:
                break
            if any(self.reads_variable(self.events[i]) for i in range(c.start, ev.id)):
                break
            out.append(c)
        return out

    def holders(self, tensor: Any) -> list[tuple[str, str, Any]]:
        """``(module path, attribute, module)`` for every module of the model that registers
        ``tensor`` as a parameter or buffer -- whether or not that module ran (a weight tied to a
        module only another method calls is found here, not in :meth:`param_uses`)."""
        if self._holders is None:
            by: dict[int, list[tuple[str, str, Any]]] = defaultdict(list)
            if self.calls:
                for path, mod in self.calls[0].module.named_modules(remove_duplicate=False):
                    for store in (mod._parameters, mod._buffers):
                        for name, t in store.items():
                            if t is not None:
                                by[id(t)].append((path, name, mod))
            self._holders = dict(by)
        return self._holders.get(id(tensor), [])

    def param_uses(self, tensor: Any) -> list[int]:
        """Events that read a parameter/buffer directly (not counting derived views)."""
        v = self.param_value(tensor)
        if v is None:
            return []
        ids: list[int] = []
        while v is not None:
            ids.extend(e for e in self.uses(v.id) if e != OUTPUT)
            # later in-place versions of the same tensor
            nxt = [w for w in self.values if w.version_of == v.id]
            v = nxt[0] if nxt else None
        return ids

    def const_root(self, vid: int) -> Value | None:
        """The parameter/buffer a constant value is a pure view/reshape of, if any."""
        seen = 0
        v = self.values[vid]
        while v is not None and seen < 32:
            seen += 1
            if v.is_param:
                return v
            ev = self.producer(v.id)
            if ev is None or ev.name not in VIEW_OPS or not ev.inputs:
                return None
            v = self.values[ev.inputs[0]]
        return None

    def op_count(self, *names: str) -> int:
        wanted = set(names)
        return sum(1 for ev in self.events if ev.name in wanted)


VIEW_OPS = frozenset(
    {
        "Tensor.view",
        "Tensor.reshape",
        "reshape",
        "Tensor.unsqueeze",
        "unsqueeze",
        "Tensor.squeeze",
        "squeeze",
        "Tensor.expand",
        "Tensor.expand_as",
        "Tensor.view_as",
        "Tensor.reshape_as",
        "Tensor.flatten",
        "flatten",
        "Tensor.__getitem__",
        "Tensor.contiguous",
        "Tensor.detach",
        "detach",
        "Tensor.data",
    }
)
"""Ops whose output is the same numbers as their first input, rearranged without arithmetic."""
