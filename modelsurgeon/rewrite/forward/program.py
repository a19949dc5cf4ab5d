"""The program a module's forward runs, as an fx graph in generated-forward form, and which node
computes each value of the recording.

The graph's first placeholder is the module itself (the *owner*): its children are called as
``owner.child(...)`` and its tensors read as ``owner.path.to.tensor``, so the generated forward
keeps using the module's own children and parameters; tensors the graph itself holds (folded
constants) are ``get_attr`` nodes of :attr:`Program.constants`.
"""

from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Any

from ...capture.graph import DataflowGraph, ModuleCall
from ...report.codes import Refusal


Refused = Refusal
"""Why a module's forward cannot be regenerated: a :class:`~modelsurgeon.report.codes.Refusal`
whose ``code`` is one of the constants below."""


UNTRACEABLE = "untraceable"  # torch.fx cannot trace it (only ever combined with a recording reason)
DATA_DEPENDENT = "data-dependent"  # it turns tensor values into Python values (a branch on data)
NOT_REPRODUCED = "not-reproduced"  # the generated forward does not give what the module gave
NOT_CHECKABLE = "not-checkable"  # the model runs at no other input size to check it at
NOT_DESCRIBABLE = "not-describable"  # it calls something a generated forward cannot record
OUTSIDE = "outside"  # it reads tensors or calls modules that are not its own
CANNOT_TAKE = "cannot-take-forward"  # an instance forward would not be what runs, or not survive
SHARED = "shared"  # called more than once
EDIT = "edit"  # an edit a caller asked for cannot be made


@dataclass
class Program:
    owner: Any
    graph: Any  # torch.fx.Graph
    owner_node: Any
    constants: dict = field(default_factory=dict)  # name -> tensor (get_attr targets)
    values: dict = field(default_factory=dict)  # recorded value id -> (node, access path in its result)
    source: str = ""  # "fx" | "recording" | "generated"

    def node(self, vid: int) -> Any:
        """The node whose result is value ``vid`` (an element of a tuple result gets its own
        ``getitem`` node), or ``None`` when the program does not compute it."""
        hit = self.values.get(vid)
        if hit is None:
            return None
        node, path = hit
        for key in path:
            existing = next((u for u in node.users if u.op == "call_function" and u.target is operator.getitem
                             and u.args[1] == key), None)
            if existing is None:  # right after its producer (placeholders stay first)
                with self.graph.inserting_after(node if node.op != "placeholder" else self._last_placeholder()):
                    existing = self.graph.call_function(operator.getitem, (node, key))
            node = existing
        self.values[vid] = (node, ())
        return node

    def attr(self, path: str, after: Any = None) -> Any:
        """A node reading ``owner.<path>`` (inserted after the owner placeholder)."""
        node = self.owner_node
        with self.graph.inserting_after(after if after is not None else self._last_placeholder()):
            for part in path.split("."):
                node = self.graph.call_function(builtins.getattr, (node, part))
        return node

    def _last_placeholder(self) -> Any:
        """The last placeholder, or the last of the constants right after the placeholders
        (where new leaves go, in the order they are added)."""
        nodes = list(self.graph.nodes)
        i = max(k for k, n in enumerate(nodes) if n.op == "placeholder")
        while i + 1 < len(nodes) and nodes[i + 1].op == "get_attr":
            i += 1
        return nodes[i]


def steps(g: DataflowGraph, call: ModuleCall) -> list[tuple[str, Any]]:
    """What ``call``'s own forward did, in order: ``("ev", OpEvent)`` for its own ops and
    ``("call", ModuleCall)`` for each call of a module it made."""
    kids = sorted((g.call(c) for c in call.children), key=lambda c: (c.start, c.id))
    out: list = []
    k, eid = 0, call.start
    while True:
        if k < len(kids) and (kids[k].start <= eid or eid >= call.end):
            out.append(("call", kids[k]))
            eid = max(eid, kids[k].end)
            k += 1
            continue
        if eid >= call.end:
            break
        ev = g.event(eid)
        if ev.scope == call.id:
            out.append(("ev", ev))
        eid += 1
    return out


def tensor_paths(obj: Any, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
    """``(access path, tensor)`` for every tensor in a (nested) result, in flattening order."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)]
    out: list = []
    if isinstance(obj, (list, tuple)):
        for i, o in enumerate(obj):
            out += tensor_paths(o, prefix + (i,))
    elif isinstance(obj, dict):
        for k, o in obj.items():
            out += tensor_paths(o, prefix + (k,))
    return out


def owned_tensors(owner: Any) -> dict[int, str]:
    """``id(tensor) -> path`` of the parameters and buffers registered under ``owner``."""
    out: dict[int, str] = {}
    for name, t in list(owner.named_parameters(remove_duplicate=False)) + list(owner.named_buffers(remove_duplicate=False)):
        if t is not None:
            out.setdefault(id(t), name)
    return out


def child_path(owner: Any, module: Any) -> str | None:
    for name, m in owner.named_modules(remove_duplicate=False):
        if m is module and name:
            return name
    return None


def free_name(taken: set, base: str) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def forward_of(owner: Any) -> Any:
    """What ``owner`` runs as its forward: an instance attribute, else its class's method."""
    return vars(owner).get("forward") or owner.forward
