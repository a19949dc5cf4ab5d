"""A module's forward rebuilt from its recorded execution: its own ops, in order, with the
literal arguments they were called with, and its calls of its children.

Built node by node while running it on the arguments the model passed at the recorded size
(so each op's result structure is known, and the output is checked as it is built). What
such a replay cannot reproduce is refused: a tensor turned into a Python value
(``Tensor.item``, ``bool(t)``, iteration: a branch on data), tensors read from outside
(another module's parameters, values computed before the call that were not passed in), calls
of modules that are not its own, functions a spec cannot name. Literals computed from shapes
are baked in: the plan checks the result at other input and batch sizes.
"""

from __future__ import annotations

import builtins
import inspect
import operator
from typing import Any

from ...capture.graph import DataflowGraph, ModuleCall, Ref
from .observe import Seen, Slot, clone, same, skeleton
from .program import (DATA_DEPENDENT, NOT_DESCRIBABLE, NOT_REPRODUCED, OUTSIDE, Program, Refused, child_path,
                      forward_of, free_name, owned_tensors, steps, tensor_paths)
from .spec import TENSOR_PROPERTIES, function_name, tensor_method

DUNDERS = {"__getitem__": "getitem", "__setitem__": "setitem", "__add__": "add", "__sub__": "sub",
           "__mul__": "mul", "__truediv__": "truediv", "__floordiv__": "floordiv", "__mod__": "mod",
           "__pow__": "pow", "__matmul__": "matmul", "__neg__": "neg", "__pos__": "pos", "__abs__": "abs",
           "__invert__": "invert", "__eq__": "eq", "__ne__": "ne", "__lt__": "lt", "__le__": "le",
           "__gt__": "gt", "__ge__": "ge", "__and__": "and_", "__or__": "or_", "__xor__": "xor",
           "__lshift__": "lshift", "__rshift__": "rshift", "__iadd__": "iadd", "__isub__": "isub",
           "__imul__": "imul", "__itruediv__": "itruediv", "__ifloordiv__": "ifloordiv"}
REFLECTED = {"__radd__": "add", "__rsub__": "sub", "__rmul__": "mul", "__rtruediv__": "truediv",
             "__rfloordiv__": "floordiv", "__rmod__": "mod", "__rpow__": "pow", "__rmatmul__": "matmul",
             "__rand__": "and_", "__ror__": "or_", "__rxor__": "xor"}
_JSON_DEFAULTS = (int, float, str, bool, type(None))


class _Stop(Exception):
    def __init__(self, refused: Refused):
        super().__init__(str(refused))
        self.refused = refused


def signature_spec(module: Any, n_args: int, keywords: tuple = ()) -> tuple[list[dict], str | None] | Refused:
    """Positional parameters of ``module``'s forward for a call with ``n_args`` positional
    arguments and ``keywords``: ``([{"name", "default"?}], varargs_name)``, or why they cannot
    be mirrored."""
    try:
        sig = inspect.signature(forward_of(module))
    except (TypeError, ValueError):
        return Refused(NOT_DESCRIBABLE, "its forward's signature cannot be read")
    params: list[dict] = []
    varargs = None
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            d: dict = {"name": p.name}
            if p.default is not p.empty:
                if not isinstance(p.default, _JSON_DEFAULTS):
                    if len(params) >= n_args:
                        return Refused(NOT_DESCRIBABLE, f"its forward's argument {p.name} has a default that cannot be recorded")
                else:
                    d["default"] = p.default
            params.append(d)
        elif p.kind == p.VAR_POSITIONAL:
            varargs = p.name
        elif p.kind == p.KEYWORD_ONLY and p.default is p.empty:
            return Refused(NOT_DESCRIBABLE, f"its forward takes the keyword-only argument {p.name}")
    if n_args > len(params) and varargs is None:
        return Refused(NOT_DESCRIBABLE, "it is called with more arguments than its forward declares")
    names = [p["name"] for p in params]
    for k in keywords:
        if k not in names[n_args:]:
            return Refused(NOT_DESCRIBABLE, f"it is called with the keyword argument {k}, which the replacement cannot take")
    return params, varargs


def replayed(owner: Any, g: DataflowGraph, call: ModuleCall, seen: Seen) -> Program | Refused:
    try:
        return _Replay(owner, g, call, seen).build()
    except _Stop as s:
        return s.refused


class _Replay:
    def __init__(self, owner: Any, g: DataflowGraph, call: ModuleCall, seen: Seen):
        import torch.fx as fx

        self.owner, self.g, self.call, self.seen = owner, g, call, seen
        self.owned = owned_tensors(owner)
        self.graph = fx.Graph()
        self.env: dict = {}  # node -> its value on the recorded arguments

    def build(self) -> Program:
        import torch

        seen, call = self.seen, self.call
        if [t for _, t in tensor_paths(seen.kwargs)]:
            raise _Stop(Refused(NOT_DESCRIBABLE, "it is called with tensors as keyword arguments"))
        sig = signature_spec(self.owner, len(seen.args), tuple(seen.kwargs))
        if isinstance(sig, Refused):
            raise _Stop(sig)
        params, varargs = sig
        taken = {p["name"] for p in params} | {varargs or ""}
        owner_node = self.graph.placeholder(free_name(taken, "m"))
        self.prog = prog = Program(self.owner, self.graph, owner_node, source="recording")
        self.env[owner_node] = self.owner
        args = clone(seen.args)
        nodes = []
        for i, p in enumerate(params):
            node = self.graph.placeholder(p["name"], default_value=p["default"]) if "default" in p else \
                self.graph.placeholder(p["name"])
            self.env[node] = args[i] if i < len(args) else seen.kwargs.get(p["name"], p.get("default"))
            nodes.append(node)
        if varargs:
            var = self.graph.placeholder("*" + varargs)
            self.env[var] = list(args[len(params):])
        slots: list = []
        for i, a in enumerate(args):
            base = nodes[i] if i < len(params) else self.graph.call_function(operator.getitem, (var, i - len(params)))
            self.env.setdefault(base, a)
            slots += [(base, path) for path, _ in tensor_paths(a)]
        if len(slots) != len(call.inputs):
            raise _Stop(Refused(NOT_REPRODUCED, "its arguments changed between two runs"))
        for (base, path), vid in zip(slots, call.inputs):
            prog.values.setdefault(vid, (base, path))
        kids = iter(seen.children)
        with torch.no_grad():
            for kind, x in steps(self.g, call):
                self._event(x) if kind == "ev" else self._child(x, next(kids, None))
            counter = [0]
            out_sk = skeleton(seen.output, counter)
            if counter[0] != len(call.outputs):
                raise _Stop(Refused(NOT_DESCRIBABLE, f"it returns a {type(seen.output).__name__} object"))
            out = _fill(out_sk, lambda k: self._read(call.outputs[k]))
            self.graph.output(out)
            if not same(_fill(out, self._value), seen.output):
                raise _Stop(Refused(NOT_REPRODUCED, "replaying its recorded ops does not give its output"))
        return prog

    # -- values ------------------------------------------------------------------------------
    def _value(self, node: Any) -> Any:
        if node not in self.env:  # a getitem node the program added for a tuple element
            self.env[node] = operator.getitem(self._value(node.args[0]), node.args[1])
        return self.env[node]

    def _read(self, vid: int) -> Any:
        prog = self.prog
        node = prog.node(vid)
        if node is not None:
            return node
        v = self.g.value(vid)
        if v.is_param and id(v.tensor) in self.owned:
            node = prog.attr(self.owned[id(v.tensor)])
            self.env[node] = v.tensor
        elif v.is_param:
            raise _Stop(Refused(OUTSIDE, f"it reads {v.name}, a tensor of another module"))
        elif v.kind == "attr" and v.const and v.tensor is not None:
            name = free_name(set(prog.constants), "c_attr")
            prog.constants[name] = v.tensor.detach().clone()
            with self.graph.inserting_after(prog._last_placeholder()):
                node = self.graph.get_attr(name)
            self.env[node] = prog.constants[name]
        else:
            raise _Stop(Refused(OUTSIDE, "it reads a tensor computed outside its forward that is not one of "
                                         "its arguments"))
        prog.values[vid] = (node, ())
        return node

    def _args(self, a: Any) -> Any:
        if isinstance(a, Ref):
            return self._read(a.value)
        if isinstance(a, tuple) and not hasattr(a, "_fields"):
            return tuple(self._args(x) for x in a)
        if isinstance(a, list):
            return [self._args(x) for x in a]
        if isinstance(a, dict):
            return {k: self._args(x) for k, x in a.items()}
        return a

    def _run(self, node: Any) -> Any:
        import torch.fx as fx

        args = fx.node.map_arg(node.args, self._value)
        kwargs = fx.node.map_arg(node.kwargs, self._value)
        if node.op == "call_function":
            r = node.target(*args, **kwargs)
        elif args and args[0] is self.owner:
            r = self.owner.get_submodule(node.target)(*args[1:], **kwargs)
        else:
            r = getattr(args[0], node.target)(*args[1:], **kwargs)
        self.env[node] = r
        return r

    # -- steps -------------------------------------------------------------------------------
    def _event(self, ev: Any) -> None:
        if not ev.outputs:
            raise _Stop(Refused(DATA_DEPENDENT, f"its forward turns a tensor into a Python value ({ev.name}): "
                                                "a branch on data, which a generated forward cannot reproduce"))
        if "out" in ev.kwargs:
            raise _Stop(Refused(NOT_DESCRIBABLE, f"its forward calls {ev.name} with out="))
        args, kwargs = self._args(tuple(ev.args)), self._args(dict(ev.kwargs))
        name = ev.name
        m = name[7:] if name.startswith("Tensor.") else None
        g = self.graph
        if m in REFLECTED:
            node = g.call_function(getattr(operator, REFLECTED[m]), (args[1], args[0]) + args[2:], kwargs)
        elif m in DUNDERS:
            node = g.call_function(getattr(operator, DUNDERS[m]), args, kwargs)
        elif m is not None and getattr(ev.func, "__name__", "") == "__get__":
            if m not in TENSOR_PROPERTIES:
                raise _Stop(Refused(NOT_DESCRIBABLE, f"its forward reads Tensor.{m}"))
            node = g.call_function(builtins.getattr, (args[0], m))
        elif m is not None:
            if not tensor_method(m):
                raise _Stop(Refused(NOT_DESCRIBABLE, f"its forward calls {name}, which a generated forward cannot record"))
            node = g.call_method(m, args, kwargs)
        else:
            if function_name(ev.func) is None:
                raise _Stop(Refused(NOT_DESCRIBABLE, f"its forward calls {name}, which a generated forward cannot record"))
            node = g.call_function(ev.func, args, kwargs)
        r = self._run(node)
        paths = tensor_paths(r)
        if ev.inplace:
            base = node if paths and paths[0][0] == () else (args[0] if hasattr(args[0], "op") else None)
            for vid in ev.outputs:
                if base is None:
                    raise _Stop(Refused(NOT_DESCRIBABLE, f"its forward changes a tensor in place with {name}"))
                self.prog.values[vid] = (base, ())
            return
        if len(paths) != len(ev.outputs):
            raise _Stop(Refused(NOT_REPRODUCED, f"{name} gives other results when replayed"))
        for (path, _), vid in zip(paths, ev.outputs):
            self.prog.values.setdefault(vid, (node, path))

    def _child(self, c: ModuleCall, seen_call: Any) -> None:
        if c.module is self.owner:
            raise _Stop(Refused(OUTSIDE, "it calls itself"))
        path = child_path(self.owner, c.module)
        if path is None:
            raise _Stop(Refused(OUTSIDE, f"it calls {c.path or 'a module'}, which is not its own submodule"))
        if seen_call is None or seen_call[0] is not c.module:
            raise _Stop(Refused(NOT_REPRODUCED, "its calls of its children changed between two runs"))
        _mod, args_sk, kwargs_sk, _out = seen_call
        n_pos = _slots(args_sk)
        if _slots(kwargs_sk) or n_pos != len(c.inputs):
            raise _Stop(Refused(NOT_DESCRIBABLE, f"it calls {path} with tensors as keyword arguments"))
        args = _fill(args_sk, lambda k: self._read(c.inputs[k]))
        kwargs = _fill(kwargs_sk, lambda k: None)
        node = self.graph.call_method(path, (self.prog.owner_node,) + tuple(args), kwargs)
        r = self._run(node)
        paths = tensor_paths(r)
        if len(paths) != len(c.outputs):
            raise _Stop(Refused(NOT_REPRODUCED, f"{path} gives other results when called again"))
        for (p, _), vid in zip(paths, c.outputs):
            self.prog.values.setdefault(vid, (node, p))


def _slots(sk: Any) -> int:
    if isinstance(sk, Slot):
        return 1
    if isinstance(sk, (list, tuple)):
        return sum(_slots(x) for x in sk)
    if isinstance(sk, dict):
        return sum(_slots(x) for x in sk.values())
    return 0


def _fill(sk: Any, f: Any) -> Any:
    import torch.fx as fx

    if isinstance(sk, Slot):
        return f(sk.index)
    if isinstance(sk, fx.Node):
        return f(sk)
    if isinstance(sk, tuple) and not hasattr(sk, "_fields"):
        return tuple(_fill(x, f) for x in sk)
    if isinstance(sk, list):
        return [_fill(x, f) for x in sk]
    if isinstance(sk, dict):
        return {k: _fill(x, f) for k, x in sk.items()}
    if isinstance(sk, tuple):  # a named tuple: its class would have to be called
        raise _Stop(Refused(NOT_DESCRIBABLE, f"it returns or passes a {type(sk).__name__}"))
    return sk
