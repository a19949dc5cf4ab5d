"""A module's forward from ``torch.fx`` tracing of the module alone (every child a leaf), or the
graph of a forward generated earlier; proved to be the recorded program by aligning it with the
recording.

Alignment runs the graph once on the arguments the model passed (seen again at the recorded
size) under a fresh recorder, node by node: its own ops and its child calls must be the
recorded ones, in the same order, with the same literal arguments and the same dataflow, and
its output must be the module's, bit for bit. That also tells which node computes each
recorded value, so edits expressed on the recording land on the right nodes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.fx as fx

from ...errors import first_line
from ...capture.graph import DataflowGraph, ModuleCall, Ref
from .observe import Seen, clone, same
from .program import NOT_REPRODUCED, UNTRACEABLE, Program, Refused, free_name, steps, tensor_paths
from .spec import inplace


def traced(owner: Any) -> Program | Refused:
    """The owner's class forward traced by torch.fx, children as leaves (not yet aligned)."""
    import torch.fx as fx

    if "forward" in vars(owner):
        return Refused(UNTRACEABLE, "its forward is an instance attribute")

    class Leaves(fx.Tracer):
        def is_leaf_module(self, m: Any, qualname: str) -> bool:
            return True

    before = dict(vars(owner))
    lists = {k: (list(v) if isinstance(v, list) else dict(v)) for k, v in before.items() if isinstance(v, (list, dict))
             and not k.startswith("_")}
    try:
        g0 = Leaves().trace(owner)
    except Exception as e:
        return Refused(UNTRACEABLE, f"torch.fx cannot trace it ({first_line(e, 160, typed=True)})")
    finally:
        added = {k: v for k, v in vars(owner).items() if k not in before}
        changed = [k for k in before if vars(owner).get(k, before[k]) is not before[k]]
        changed += [k for k, v in lists.items() if (list(before[k]) if isinstance(v, list) else dict(before[k])) != v]
        for k in added:
            delattr(owner, k)
        for k in changed:
            if k in lists:
                before[k].clear()
                (before[k].extend if isinstance(before[k], list) else before[k].update)(lists[k])
            owner.__dict__[k] = before[k]
    if changed:
        return Refused(UNTRACEABLE, f"tracing it changed its attribute {changed[0]}")
    if any(n.op == "placeholder" and str(n.target).startswith("**") for n in g0.nodes):
        return Refused(UNTRACEABLE, "its forward takes **kwargs")
    g = fx.Graph()
    taken = {n.target.lstrip("*") for n in g0.nodes if n.op == "placeholder"} | {n.name for n in g0.nodes}
    owner_node = g.placeholder(free_name(taken, "m"))
    prog = Program(owner, g, owner_node, source="fx")
    env: dict = {}
    for n in g0.nodes:
        if n.op == "get_attr":
            if n.target in added:
                name = free_name(set(prog.constants), "c_" + n.target.strip("_"))
                prog.constants[name] = added[n.target]
                env[n] = g.get_attr(name)
            else:
                env[n] = _chain(g, owner_node, n.target)
        elif n.op == "call_module":
            env[n] = g.call_method(n.target, (owner_node,) + tuple(_map(n.args, env)), _map(n.kwargs, env))
        else:
            env[n] = g.node_copy(n, lambda x: env[x])
    return prog


def generated(owner: Any, gm: Any) -> Program:
    """The graph of a forward generated earlier (``gm`` runs as ``owner``'s forward)."""
    import torch.fx as fx

    g = fx.Graph()
    env: dict = {}
    out = g.graph_copy(gm.graph, env)
    g.output(out)
    owner_node = next(n for n in g.nodes if n.op == "placeholder")
    prog = Program(owner, g, owner_node, source="generated")
    for n in g.nodes:
        if n.op == "get_attr":
            prog.constants[n.target] = getattr(gm, n.target)
    return prog


def _chain(g: Any, node: Any, path: str) -> Any:
    import builtins

    for part in path.split("."):
        node = g.call_function(builtins.getattr, (node, part))
    return node


def _map(a: Any, env: dict) -> Any:
    import torch.fx as fx

    return fx.node.map_arg(a, lambda x: env[x])


# --------------------------------------------------------------------------------------------
# alignment with the recording


def positional(owner: Any, prog: Program, seen: Seen) -> list | None:
    """The arguments of the program's placeholders (after the owner) for a call ``seen``."""
    try:
        sig = inspect.signature(vars(owner).get("forward") or owner.forward)
        bound = sig.bind(*seen.args, **seen.kwargs)
    except (TypeError, ValueError):
        return None
    out = []
    for n in prog.graph.nodes:
        if n.op != "placeholder" or n is prog.owner_node:
            continue
        name = n.target.lstrip("*")
        if n.target.startswith("*"):
            out.extend(bound.arguments.get(name, ()))
        elif name in bound.arguments:
            out.append(bound.arguments[name])
        elif n.args:
            out.append(n.args[0])
        else:
            return None
    return out


class Interpreter(fx.Interpreter):
    """``torch.fx.Interpreter`` that calls the owner's children by dotted path (``pwconv.0``)."""

    def call_method(self, target: Any, args: Any, kwargs: Any) -> Any:
        obj, *rest = args
        for part in target.split(".")[:-1]:
            obj = getattr(obj, part)
        return getattr(obj, target.rsplit(".", 1)[-1])(*rest, **kwargs)


def holder(constants: dict) -> Any:
    """A module holding the program's constants, for an interpreter to read them from."""
    import torch

    h = torch.nn.Module()
    for k, t in constants.items():
        h.register_buffer(k, t)
    return h


def run(prog: Program, constants: dict, seen: Seen) -> Any:
    """Run the program on a copy of the arguments of call ``seen``."""
    import torch
    import torch.fx as fx

    args = positional(prog.owner, prog, Seen(clone(seen.args), clone(seen.kwargs)))
    if args is None:
        raise TypeError("the recorded arguments do not fit its forward's signature")
    with torch.no_grad():
        return Interpreter(holder(constants), graph=prog.graph).run(prog.owner, *args)


def align(prog: Program, g: DataflowGraph, call: ModuleCall, seen: Seen) -> Program | Refused:
    """Map the recording's values of ``call`` onto the program's nodes, or why it is not the
    recorded program."""
    import torch
    import torch.fx as fx

    from ...capture.recorder import Recorder

    args = positional(prog.owner, prog, Seen(clone(seen.args), clone(seen.kwargs)))
    if args is None:
        return Refused(NOT_REPRODUCED, "the recorded arguments do not fit its forward's signature")
    found: dict[int, tuple] = {}

    class Track(Interpreter):
        def run_node(self, n: Any) -> Any:
            r = super().run_node(n)
            for path, t in tensor_paths(r):
                vid = rec._lookup(t)
                if vid is not None and (vid not in found or (path == () and found[vid][1] != ())):
                    found[vid] = (n, path)
            if inplace(n) and isinstance(n.args[0], fx.Node):
                t = self.env.get(n.args[0])
                vid = rec._lookup(t) if isinstance(t, torch.Tensor) else None
                if vid is not None and vid not in found:
                    found[vid] = (n.args[0], ())
            return r

    class Runner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.owner = prog.owner

        def forward(self, *a: Any) -> Any:
            return Track(holder(prog.constants), graph=prog.graph).run(prog.owner, *a)

    runner = Runner()
    try:
        with torch.no_grad(), Recorder(runner) as rec:
            out = runner(*args)
    except Exception as e:
        return Refused(NOT_REPRODUCED, f"its graph fails on the recorded arguments ({first_line(e, 160, typed=True)})")
    if not same(out, seen.output):
        return Refused(NOT_REPRODUCED, "its graph does not give the recorded output")
    pairs = _pairs(g, call, rec.graph, rec.graph.root)
    if isinstance(pairs, Refused):
        return pairs
    prog.values = {o: found[r] for o, r in pairs.items() if r in found}
    return prog


def _pairs(og: DataflowGraph, oc: ModuleCall, rg: DataflowGraph, rc: ModuleCall) -> dict[int, int] | Refused:
    """Recorded value -> replayed value, when both runs did the same thing."""
    fwd: dict[int, int] = {}
    bwd: dict[int, int] = {}

    def pair(o: int, r: int) -> bool:
        if fwd.setdefault(o, r) != r or bwd.setdefault(r, o) != o:
            return False
        return True

    def match(a: Any, b: Any) -> bool:
        if isinstance(a, Ref) or isinstance(b, Ref):
            return isinstance(a, Ref) and isinstance(b, Ref) and pair(a.value, b.value)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(match(x, y) for x, y in zip(a, b))
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(match(a[k], b[k]) for k in a)
        try:
            return type(a) is type(b) and bool(a == b)
        except Exception:
            return False

    if len(oc.inputs) != len(rc.inputs) or not all(pair(o, r) for o, r in zip(oc.inputs, rc.inputs)):
        return Refused(NOT_REPRODUCED, "its graph takes its arguments differently")
    a, b = steps(og, oc), steps(rg, rc)
    if len(a) != len(b):
        return Refused(NOT_REPRODUCED, f"its graph runs {len(b)} ops and calls where the module ran {len(a)}")
    for (ka, x), (kb, y) in zip(a, b):
        if ka != kb:
            return Refused(NOT_REPRODUCED, "its graph runs its ops and calls in another order")
        if ka == "ev":
            ok = x.name == y.name and x.inplace == y.inplace and match(x.args, y.args) and match(x.kwargs, y.kwargs)
            where = x.name
        else:
            ok = x.module is y.module and len(x.inputs) == len(y.inputs) and all(
                pair(o, r) for o, r in zip(x.inputs, y.inputs))
            where = x.path
        if not ok or len(x.outputs) != len(y.outputs) or not all(pair(o, r) for o, r in zip(x.outputs, y.outputs)):
            return Refused(NOT_REPRODUCED, f"its graph differs from the recorded forward at {where}")
    return fwd
