"""Edits on a module's forward, expressed on the recorded values, and the commit that turns
them into the module's generated forward.

A :class:`ForwardPlan` holds the proved program (parameter-only expressions already constants,
see :mod:`.fold`). Edits replace what a value's readers read -- another value, a constant, the
result of a new child call -- or remove / replace a child call. :meth:`ForwardPlan.commit`
drops what nothing reads any more, removes from the module the parameters, buffers and
tensor-holding children its forward used and no longer does (unless something outside its
forward reads or calls them), and attaches the generated forward through the editor, which
records it in the recipe.
"""

from __future__ import annotations

import builtins
import functools
from dataclasses import dataclass, field
from typing import Any

from ...capture.graph import DataflowGraph, ModuleCall
from .fold import dead_code, hooked
from .program import CANNOT_TAKE, EDIT, NOT_DESCRIBABLE, Program, Refused, free_name
from .spec import NotDescribable, build, owner_path, to_spec

FORWARD_NAME = "fused"
"""Submodule name of a generated forward in the module it serves (``fused_1``... when taken)."""


class EditError(ValueError):
    """An edit that cannot be made (the message says why)."""


@dataclass(frozen=True)
class NewValue:
    """The result of a child call an edit added (use it where a recorded value id goes)."""

    node: Any


@dataclass
class Committed:
    path: str  # where the generated forward is registered
    removed: list[str]  # what the module lost
    added: list[str]  # the children edits registered on it
    source: str  # "fx" | "recording" | "generated"
    ops_before: int  # computations in the module's own forward before (child calls included)
    ops_after: int
    code: str = ""


def generated_forward(module: Any) -> Any:
    """The GraphModule ``module`` runs as its forward through this mechanism (bound to it), else
    ``None``."""
    f = vars(module).get("forward")
    if isinstance(f, functools.partial) and f.args and f.args[0] is module and not f.keywords:
        if any(f.func is m for m in module._modules.values()):
            return f.func
    return None


def _ops(graph: Any) -> int:
    return sum(1 for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")
               and not (n.op == "call_function" and n.target is builtins.getattr))


def _top_names(prog: Program) -> set[str]:
    out = set()
    for n in prog.graph.nodes:
        if n.op == "call_method" and n.args and n.args[0] is prog.owner_node:
            out.add(n.target.split(".")[0])
        elif n.op == "call_function" and n.target is builtins.getattr and n.args[0] is prog.owner_node:
            out.add(n.args[1])
    return out


@dataclass
class ForwardPlan:
    prog: Program
    graph: DataflowGraph
    call: ModuleCall  # the recorded call whose ops the program runs
    path: str  # the owner's module path
    used_before: set = field(default_factory=set)
    ops_before: int = 0
    replaces: str | None = None  # the owner's child holding the forward generated earlier
    folded: int = 0
    _added: dict = field(default_factory=dict)  # name -> module registered on the owner at commit
    _dropped: set = field(default_factory=set)  # children removed by remove_child

    @property
    def owner(self) -> Any:
        return self.prog.owner

    @property
    def source(self) -> str:
        return self.prog.source

    # -- edits -------------------------------------------------------------------------------
    def node(self, vid: int | NewValue) -> Any:
        if isinstance(vid, NewValue):
            return vid.node
        n = self.prog.node(vid)
        if n is None:
            raise EditError(f"the generated forward does not compute value {vid}")
        return n

    def _versioned(self, vid: int | NewValue) -> bool:
        """Is the tensor of ``vid`` changed in place later (then its node holds other numbers
        for later readers, and an in-place op reads that node)?"""
        if isinstance(vid, NewValue):
            return False
        return any(w.version_of == vid for w in self.graph.values)

    def substitute(self, vid: int, by: int | NewValue) -> None:
        """Readers of value ``vid`` read ``by`` instead (a recorded value or a :class:`NewValue`).

        A value changed in place later (``x = x + y; relu_(x)``, an ``inplace=True`` activation)
        can be replaced by a new value nothing reads yet: the in-place op then changes the new
        tensor, which no other reader sees."""
        fresh = isinstance(by, NewValue) and not by.node.users
        if (self._versioned(vid) and not fresh) or self._versioned(by):
            raise EditError("the value is changed in place in the forward")
        n, b = self.node(vid), self.node(by)
        if n is b:
            return
        order = {x: i for i, x in enumerate(self.prog.graph.nodes)}
        if any(order[u] <= order[b] for u in n.users):
            raise EditError("the replacement is computed after the value's readers")
        n.replace_all_uses_with(b)
        for k, (node, path) in list(self.prog.values.items()):
            if node is n and path == ():
                self.prog.values[k] = (b, ())

    def set_constant(self, vid: int, tensor: Any) -> None:
        """Readers of value ``vid`` read the constant ``tensor`` instead."""
        import torch

        if self._versioned(vid):
            raise EditError("the value is changed in place in the forward")
        n = self.node(vid)
        name = free_name(set(self.prog.constants) | {x.name for x in self.prog.graph.nodes}, "c_" + n.name)
        self.prog.constants[name] = torch.as_tensor(tensor).detach().clone().contiguous()
        with self.prog.graph.inserting_after(self.prog._last_placeholder()):
            c = self.prog.graph.get_attr(name)
        n.replace_all_uses_with(c)
        self.prog.values = {k: ((c, ()) if v == (n, ()) else v) for k, v in self.prog.values.items()}

    def add_module(self, module: Any, name: str) -> str:
        """Register ``module`` on the owner at commit, as ``name`` (or the next free name)."""
        taken = set(vars(self.owner)) | set(self.owner._modules) | set(dir(type(self.owner))) | set(self._added)
        taken -= {self.replaces or ""}
        name = free_name(taken, name)
        self._added[name] = module
        return name

    def call_module(self, module: Any, inputs: list, name: str) -> NewValue:
        """A new call ``module(*inputs)`` (registered on the owner as ``name``); returns its result."""
        name = self.add_module(module, name)
        nodes = [self.node(i) for i in inputs]
        order = {x: i for i, x in enumerate(self.prog.graph.nodes)}
        after = max(nodes, key=lambda x: order[x]) if nodes else self.prog._last_placeholder()
        with self.prog.graph.inserting_after(after):
            node = self.prog.graph.call_method(name, (self.prog.owner_node, *nodes))
        return NewValue(node)

    def _call_node(self, call: ModuleCall) -> Any:
        if len(call.outputs) != 1:
            raise EditError(f"{call.path} returns {len(call.outputs)} tensors")
        n = self.node(call.outputs[0])
        if not (n.op == "call_method" and n.args and n.args[0] is self.prog.owner_node):
            raise EditError(f"{call.path} is not called by the forward itself")
        return n

    def remove_call(self, call: ModuleCall) -> None:
        """The child call ``call`` goes: its readers read its one tensor argument instead."""
        n = self._call_node(call)
        if len(call.inputs) != 1 or len(n.args) != 2:
            raise EditError(f"{call.path} is called with more than one argument")
        self.substitute(call.outputs[0], call.inputs[0])

    def remove_child(self, name: str) -> None:
        """The owner's child ``name`` goes, attribute and all: each call of it is replaced by its
        one argument -- for a child the caller knows computes the identity, such as the
        ``nn.Identity`` a fold leaves where a BatchNorm was (a host's ``fuse()`` then finds no
        ``bn``). Refused when the forward uses the child otherwise."""
        g, owner = self.prog.graph, self.prog.owner_node
        calls = [n for n in g.nodes if n.op == "call_method" and n.args and n.args[0] is owner and n.target == name]
        for n in calls:
            if len(n.args) != 2 or n.kwargs:
                raise EditError(f"{name} is called with more than one argument")
        for n in calls:
            n.replace_all_uses_with(n.args[1])
            self.prog.values = {k: ((n.args[1], ()) if v == (n, ()) else v) for k, v in self.prog.values.items()}
            g.erase_node(n)
        if name in _top_names(self.prog):
            raise EditError(f"the forward uses {name} otherwise than by calling it")
        self._dropped.add(name)

    def replace_call(self, call: ModuleCall, module: Any, name: str | None = None) -> str:
        """Call ``module`` (registered on the owner) where ``call``'s module was called, with
        the same arguments; returns its name on the owner."""
        n = self._call_node(call)
        name = self.add_module(module, name or n.target.replace(".", "_") + "_new")
        n.target = name
        return name

    # -- commit ------------------------------------------------------------------------------
    def removable(self) -> list[str] | Refused:
        """What the owner loses: its parameters, buffers and tensor-holding children the forward
        used before and no longer does, that nothing outside the forward reads or calls."""
        owner, g, call = self.owner, self.graph, self.call
        after = _top_names(self.prog)
        out = []
        for name in sorted(self.used_before - after):
            obj = owner._parameters.get(name, owner._buffers.get(name, owner._modules.get(name)))
            if obj is None or name in self._added:
                continue
            if hasattr(obj, "modules"):
                tensors = list(obj.parameters()) + [b for b in obj.buffers() if b is not None]
                if not tensors:
                    continue  # nothing in the state_dict: the child stays, unused
                if hooked(obj):
                    return Refused(EDIT, f"{self.path}.{name} has a hook and would no longer be called")
                if any(not (call.start <= c.start and c.end <= call.end) for m in obj.modules() for c in g.calls_of(m)):
                    continue
            else:
                tensors = [obj]
            if any(not (call.start <= e < call.end) for t in tensors for e in g.param_uses(t)):
                continue
            out.append(name)
        if self.replaces:
            out.append(self.replaces)
        for name in sorted(self._dropped - set(out)):
            if name in _top_names(self.prog):
                return Refused(EDIT, f"the forward still uses {name}")
            out.append(name)
        return out

    def check(self) -> Refused | None:
        """Why :meth:`commit` would refuse the edits made so far (nothing is changed)."""
        dead_code(self.prog)
        remove = self.removable()
        if isinstance(remove, Refused):
            return remove
        try:
            to_spec(self.prog.graph, self.prog.constants, owner=self.prog.owner_node.target)
        except NotDescribable as e:
            return Refused(NOT_DESCRIBABLE, f"the generated forward would hold {e}")
        return None

    def commit(self, editor: Any, name: str = FORWARD_NAME) -> Committed | Refused:
        """Attach the edited program as the owner's forward (through ``editor``: recipe,
        storage dtypes); the plan cannot be used afterwards."""
        import torch

        dead_code(self.prog)
        remove = self.removable()
        if isinstance(remove, Refused):
            return remove
        owner = self.owner
        store = editor.storage.default_dtype if getattr(editor, "storage", None) is not None else None
        constants = {}
        for k, t in self.prog.constants.items():
            if store is not None and t.is_floating_point() and store != t.dtype:
                t = t.to(store).to(t.dtype)  # what will be saved is what is verified
            constants[k] = t
        taken = (set(vars(owner)) | set(owner._parameters) | set(owner._buffers) | set(owner._modules)
                 | set(dir(type(owner))) | set(self._added)) - set(remove)
        name = free_name(taken, name)
        try:
            spec = to_spec(self.prog.graph, constants, owner=self.prog.owner_node.target)
        except NotDescribable as e:
            return Refused(NOT_DESCRIBABLE, f"the generated forward would hold {e}")
        gm = build(spec, constants)
        added = {n: (m, editor.spec_for(m)) for n, m in self._added.items()}
        where = editor.set_forward(owner, gm, spec, name, remove, bind=True, add=added)
        return Committed(where, list(remove), list(self._added), self.source, self.ops_before, _ops(gm.graph), gm.code)


def can_take_forward(module: Any) -> Refused | None:
    """Why an instance ``forward`` on ``module`` would not be what runs, or not survive pickling
    and ``copy.deepcopy``: a GraphModule (it rebuilds itself from its code), a ScriptModule, a
    class with its own ``__call__`` or pickling."""
    import torch

    if isinstance(module, (torch.fx.GraphModule, torch.jit.ScriptModule)):
        return Refused(CANNOT_TAKE, f"it is a {type(module).__name__}")
    cls = type(module)
    for n in ("__call__", "__getstate__", "__reduce__", "__reduce_ex__", "__deepcopy__", "__copy__"):
        if getattr(cls, n, None) is not getattr(torch.nn.Module, n, None):
            return Refused(CANNOT_TAKE, f"its class defines its own {n}")
    f = vars(module).get("forward")
    if f is not None and generated_forward(module) is None:
        return Refused(CANNOT_TAKE, "it already runs another forward set on the instance")
    return None
