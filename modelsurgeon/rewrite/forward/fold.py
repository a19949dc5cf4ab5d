"""Parameter-only expressions of a program become constants; dead nodes go.

A node is constant when it reads nothing but the owner's registered parameters and buffers,
the program's constants and literals (never an argument, never a plain attribute a host may
change), is no random op and no in-place one, and no in-place op reaches it through a view.
Constants read by the data path are evaluated once, exactly as the forward computes them
(same ops, same dtype), and become the program's constants; what only they read is removed.
A constant much larger than what it is computed from (an ``expand``) is left computed.
"""

from __future__ import annotations

import builtins
from typing import Any

from .program import Program, free_name
from .spec import inplace, owner_path

RANDOM = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                    "rand_like", "randn_like", "randint_like", "bernoulli", "multinomial", "normal", "uniform_",
                    "normal_", "bernoulli_", "random_", "exponential_", "rrelu", "gumbel_softmax"})
VIEWS = frozenset({"getitem", "view", "reshape", "expand", "expand_as", "view_as", "squeeze", "unsqueeze",
                   "permute", "transpose", "flatten", "contiguous", "detach", "narrow", "select", "as_strided",
                   "t", "unflatten", "movedim", "unbind", "split", "chunk", "T", "mT", "data", "real", "imag"})
MAX_GROWTH = 4
"""A folded constant may be at most this many times larger than its inputs (or 1024 elements)."""


def _name(n: Any) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def hooked(module: Any) -> bool:
    return any(getattr(m, a, None) for m in module.modules()
               for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _mutated(prog: Program) -> set:
    """Nodes an in-place op may change: its target, and what shares memory with it by views."""
    out: set = set()
    stack = [n.args[0] for n in prog.graph.nodes if inplace(n) and hasattr(n.args[0], "op")]
    while stack:
        n = stack.pop()
        if n in out:
            continue
        out.add(n)
        if n.op in ("call_function", "call_method") and _name(n) in VIEWS and n.args and hasattr(n.args[0], "op"):
            stack.append(n.args[0])
        stack.extend(u for u in n.users if u.op in ("call_function", "call_method") and _name(u) in VIEWS)
    return out


def constness(prog: Program) -> dict:
    """node -> is it constant (see the module docstring)."""
    owned = {n for n, t in list(prog.owner.named_parameters(remove_duplicate=False))
             + list(prog.owner.named_buffers(remove_duplicate=False)) if t is not None}
    mutated = _mutated(prog)
    const: dict = {}
    for n in prog.graph.nodes:
        if n.op in ("placeholder", "output") or n in mutated:
            const[n] = False
        elif n.op == "get_attr":
            const[n] = True
        elif n.op == "call_function" and n.target is builtins.getattr and owner_path(n, prog.owner_node) is not None:
            const[n] = owner_path(n, prog.owner_node) in owned
        elif inplace(n) or _name(n) in RANDOM:
            const[n] = False
        else:
            inputs = [a for a in n.all_input_nodes if a is not prog.owner_node]
            if n.op == "call_method" and n.args and n.args[0] is prog.owner_node:
                try:
                    if hooked(prog.owner.get_submodule(n.target)):
                        const[n] = False
                        continue
                except AttributeError:
                    const[n] = False
                    continue
            elif n.op == "call_function" and n.target is builtins.getattr:
                const[n] = bool(inputs) and all(const.get(a, False) for a in inputs)
                continue
            const[n] = bool(inputs) and all(const.get(a, False) for a in inputs)
    return const


def fold(prog: Program) -> int:
    """Evaluate the constants the data path reads into :attr:`Program.constants`; returns how
    many computations were folded."""
    import torch

    const = constness(prog)
    env: dict = {}

    def value(n: Any) -> Any:
        if n in env:
            return env[n]
        import torch.fx as fx

        if n is prog.owner_node:
            return prog.owner
        args = fx.node.map_arg(n.args, value)
        kwargs = fx.node.map_arg(n.kwargs, value)
        if n.op == "get_attr":
            r = prog.constants[n.target]
        elif n.op == "call_function":
            r = n.target(*args, **kwargs)
        elif n.args and n.args[0] is prog.owner_node:
            r = prog.owner.get_submodule(n.target)(*args[1:], **kwargs)
        else:
            r = getattr(args[0], n.target)(*args[1:], **kwargs)
        env[n] = r
        return r

    folded = 0
    leaves = ("get_attr",)
    for n in list(prog.graph.nodes):
        if not const.get(n) or n.op in leaves or owner_path(n, prog.owner_node) is not None:
            continue
        if n.op == "call_function" and n.target is builtins.getattr:
            continue  # a tensor property: folded with what reads it
        if all(const.get(u, False) for u in n.users):
            continue
        with torch.no_grad():
            try:
                r = value(n)
            except Exception:
                continue
        if not isinstance(r, torch.Tensor):
            continue
        size = sum(int(value(a).numel()) for a in _leaves(n, const, prog) if isinstance(value(a), torch.Tensor))
        if r.numel() > max(1024, MAX_GROWTH * size):
            continue
        name = free_name(set(prog.constants) | {x.name for x in prog.graph.nodes}, "c_" + n.name)
        prog.constants[name] = r.detach().clone().contiguous()
        with prog.graph.inserting_after(prog._last_placeholder()):
            c = prog.graph.get_attr(name)
        n.replace_all_uses_with(c)
        for vid, (node, path) in list(prog.values.items()):
            if node is n and path == ():
                prog.values[vid] = (c, ())
        folded += 1
    dead_code(prog)
    return folded


def _leaves(n: Any, const: dict, prog: Program) -> list:
    out, stack, seen = [], [n], set()
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        if x.op == "get_attr" or owner_path(x, prog.owner_node) is not None:
            out.append(x)
        else:
            stack.extend(a for a in x.all_input_nodes if a is not prog.owner_node)
    return out


def dead_code(prog: Program) -> None:
    """Remove nodes nothing needs: kept are the output's inputs, in-place ops on something kept
    (or on an argument: the caller sees it), child calls whose module carries hooks, and what
    these read."""
    nodes = list(prog.graph.nodes)
    live: set = set()

    def keep(n: Any) -> None:
        stack = [n]
        while stack:
            x = stack.pop()
            if x in live:
                continue
            live.add(x)
            stack.extend(x.all_input_nodes)

    for n in nodes:
        if n.op in ("output", "placeholder"):
            keep(n)
        elif n.op == "call_method" and n.args and n.args[0] is prog.owner_node:
            try:
                if hooked(prog.owner.get_submodule(n.target)):
                    keep(n)
            except AttributeError:
                keep(n)
    changed = True
    while changed:
        changed = False
        for n in nodes:
            if n not in live and inplace(n) and hasattr(n.args[0], "op") and n.args[0] in live:
                keep(n)
                changed = True
    for n in reversed(nodes):
        if n not in live:
            prog.graph.erase_node(n)
    for vid, (node, _) in list(prog.values.items()):
        if node not in live:
            del prog.values[vid]
    for name in [k for k in prog.constants if not any(n.op == "get_attr" and n.target == k for n in prog.graph.nodes)]:
        del prog.constants[name]
