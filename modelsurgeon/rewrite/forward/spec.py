"""A generated forward as plain data: an fx graph <-> JSON, and the GraphModule built from it.

A generated forward is a ``torch.fx`` graph whose first placeholder is the module it serves
(its *owner*; ``None`` for a module that stands alone): ``owner.conv(x)`` calls a child,
``owner.bn.weight`` reads a tensor, ``self.c_add`` reads one of the graph's own constants. The
same graph is written into a recipe as JSON (:func:`to_spec`) and rebuilt from it
(:func:`build`), so what a pass verified in memory is what a state_dict rebuild runs.

Nothing in a spec is imported or executed beyond what is listed here: functions are resolved
by name among ``operator`` arithmetic, ``getattr`` (tensor properties, or a path below the
owner), the functions torch dispatches on tensors (``torch.overrides``) and a few tensor
factories; methods are tensor methods; module calls and attribute reads on the owner are
resolved when the graph is bound to it (:func:`check_owner_use`).
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any

KIND = "graph"
VERSION = 1

OPERATORS = {name: getattr(operator, name) for name in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert",
    "getitem", "setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_", "xor", "lshift", "rshift", "not_")}
FACTORIES = ("zeros", "ones", "full", "empty", "arange", "eye", "linspace", "tensor", "scalar_tensor")
NAMESPACES = ("torch.nn.functional", "torch", "torch.linalg", "torch.special", "torch.fft")
TENSOR_PROPERTIES = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "H", "mH", "data", "real", "imag",
                               "is_cuda", "requires_grad", "layout", "itemsize"})
DENIED_METHODS = frozenset({
    "backward", "register_hook", "register_post_accumulate_grad_hook", "retain_grad", "share_memory_",
    "set_", "storage", "untyped_storage", "numpy", "tolist", "pin_memory", "record_stream", "apply_",
    "map_", "map2_", "data_ptr", "resize_", "resize_as_", "cuda", "to_dense", "requires_grad_"})
INPLACE_OPERATORS = frozenset({"setitem", "iadd", "isub", "imul", "itruediv", "ifloordiv"})


class NotDescribable(ValueError):
    """The graph holds something a spec cannot describe (a function, an object)."""


_allowed: set | None = None


def _overridable() -> set:
    global _allowed
    if _allowed is None:
        import torch

        found: set = set()
        for funcs in torch.overrides.get_overridable_functions().values():
            found.update(funcs)
        _allowed = found
    return _allowed


def _namespace(name: str) -> Any:
    import torch

    obj = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def function_name(fn: Any) -> str | None:
    """``operator.add``, ``torch.nn.functional.relu``, ``torch.sum``, ``builtins.getattr``...:
    the name a spec records ``fn`` by, or ``None`` when it may not be recorded."""
    for name, f in OPERATORS.items():
        if fn is f:
            return f"operator.{name}"
    if fn is builtins.getattr:
        return "builtins.getattr"
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str):
        return None
    for ns in NAMESPACES:
        if getattr(_namespace(ns), name, None) is fn and (fn in _overridable() or (ns == "torch" and name in FACTORIES)):
            return f"{ns}.{name}"
    return None


def resolve_function(name: str) -> Any:
    """The function a spec names (the inverse of :func:`function_name`); refuses any other."""
    mod, _, short = name.rpartition(".")
    if mod == "operator" and short in OPERATORS:
        return OPERATORS[short]
    if name == "builtins.getattr":
        return builtins.getattr
    if mod in NAMESPACES and not short.startswith("_"):
        fn = getattr(_namespace(mod), short, None)
        if fn is not None and (fn in _overridable() or (mod == "torch" and short in FACTORIES)):
            return fn
    raise ValueError(f"a generated forward may not call {name!r}")


def tensor_method(name: str) -> bool:
    """May a spec call tensor method ``name``?"""
    import torch

    if not isinstance(name, str) or name.startswith("_") or name in DENIED_METHODS:
        return False
    return getattr(torch.Tensor, name, None) in _overridable()


def inplace(node: Any) -> bool:
    """Does this node change its first argument in place?"""
    if node.op == "call_method":
        t = node.target
        return t.endswith("_") and not t.endswith("__") or "out" in node.kwargs
    if node.op == "call_function":
        name = function_name(node.target) or ""
        return name.startswith("operator.") and name[9:] in INPLACE_OPERATORS or "out" in node.kwargs
    return False


# --------------------------------------------------------------------------------------------
# literals


def encode(a: Any, names: dict) -> Any:
    """A node argument as JSON (nodes by name; tuples, slices, dtypes... tagged)."""
    import torch
    import torch.fx as fx

    if isinstance(a, fx.Node):
        return {"node": names[a]}
    if a is None or isinstance(a, (bool, str, int)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, list):
        return [encode(x, names) for x in a]
    if isinstance(a, tuple):  # torch.Size included
        return {"tuple": [encode(x, names) for x in a]}
    if isinstance(a, slice):
        return {"slice": [encode(a.start, names), encode(a.stop, names), encode(a.step, names)]}
    if a is Ellipsis:
        return {"ellipsis": True}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, dict) and all(isinstance(k, (str, int)) for k in a):
        return {"dict": [[k, encode(v, names)] for k, v in a.items()]}
    raise NotDescribable(f"a {type(a).__name__} argument")


def decode(a: Any, env: dict) -> Any:
    import torch

    if isinstance(a, list):
        return [decode(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "node":
        return env[v]
    if tag == "tuple":
        return tuple(decode(x, env) for x in v)
    if tag == "slice":
        return slice(*(decode(x, env) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        return float(v)
    if tag == "dict":
        return {k: decode(x, env) for k, x in v}
    if tag in ("dtype", "memory_format", "layout"):
        obj = getattr(torch, v, None)
        if not isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
            raise ValueError(f"not a torch {tag}: {v!r}")
        return obj
    if tag == "device":
        return torch.device(v)
    raise ValueError(f"unknown literal in a generated forward: {tag!r}")


# --------------------------------------------------------------------------------------------
# graph <-> spec


def owner_path(node: Any, owner: Any) -> str | None:
    """``"a.b"`` when ``node`` is ``getattr(getattr(owner, "a"), "b")``, else ``None``."""
    parts = []
    while node is not owner:
        if node.op != "call_function" or node.target is not builtins.getattr or len(node.args) != 2:
            return None
        parts.append(node.args[1])
        node = node.args[0]
        if not hasattr(node, "op"):
            return None
    return ".".join(reversed(parts))


def to_spec(graph: Any, constants: dict, modules: dict | None = None, owner: str | None = None,
            class_name: str = "GraphModule") -> dict:
    """The JSON description of ``graph`` (raises :class:`NotDescribable`). ``constants`` are the
    tensors ``get_attr`` nodes read (their shapes and dtypes are recorded, their values go to
    the state_dict), ``modules`` the specs of the graph's own submodules, ``owner`` the name of
    the placeholder that is the module served."""
    names: dict = {}
    nodes = []
    owner_node = next((n for n in graph.nodes if n.op == "placeholder" and n.target == owner), None)
    for n in graph.nodes:
        names[n] = n.name
        if n.op == "call_function" and n.target is builtins.getattr and owner_node is not None:
            path = owner_path(n, owner_node)
            if path is not None:
                nodes.append({"name": n.name, "op": "owner_attr", "target": path})
                continue
        entry: dict = {"name": n.name, "op": n.op}
        if n.op == "placeholder":
            entry["target"] = n.target
            if n.args:
                entry["default"] = encode(n.args[0], names)
        elif n.op == "call_function":
            fname = function_name(n.target)
            if fname is None:
                raise NotDescribable(f"a call of {getattr(n.target, '__qualname__', n.target)}")
            entry["target"] = fname
        elif n.op in ("call_method", "get_attr", "call_module"):
            entry["target"] = n.target
        if n.op != "placeholder":
            entry["args"] = encode(list(n.args), names)
            if n.kwargs:
                entry["kwargs"] = encode(dict(n.kwargs), names)
        nodes.append(entry)
    consts = {k: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for k, t in constants.items()}
    return {"kind": KIND, "version": VERSION, "class_name": class_name, "owner": owner, "nodes": nodes,
            "constants": consts, "modules": dict(modules or {})}


def graph_of(spec: dict) -> Any:
    """The fx graph a spec describes, every target checked (see the module docstring)."""
    import torch.fx as fx

    if spec.get("version", VERSION) > VERSION:
        raise ValueError(f"generated forward of a newer version ({spec.get('version')})")
    g = fx.Graph()
    env: dict = {}
    owner = spec.get("owner")
    consts, mods = set(spec.get("constants", {})), set(spec.get("modules", {}))
    for e in spec["nodes"]:
        op, name, target = e["op"], e["name"], e.get("target")
        args = tuple(decode(e.get("args", []), env))
        kwargs = decode(e["kwargs"], env) if "kwargs" in e else {}
        if op == "placeholder":
            node = g.placeholder(target, default_value=decode(e["default"], env)) if "default" in e else g.placeholder(target)
        elif op == "owner_attr":
            if owner is None or owner not in env:
                raise ValueError("a generated forward without an owner reads an owner attribute")
            node = env[owner]
            for part in target.split("."):
                if not part or part.startswith("__"):
                    raise ValueError(f"not an attribute path: {target!r}")
                node = g.call_function(builtins.getattr, (node, part))
        elif op == "get_attr":
            if target not in consts and target.split(".")[0] not in mods:
                raise ValueError(f"a generated forward reads an unknown attribute {target!r}")
            node = g.get_attr(target)
        elif op == "call_module":
            if target not in mods:
                raise ValueError(f"a generated forward calls an unknown module {target!r}")
            node = g.call_module(target, args, kwargs)
        elif op == "call_function":
            fn = resolve_function(target)
            if fn is builtins.getattr and not _getattr_allowed(args, env.get(owner)):
                raise ValueError(f"a generated forward reads an attribute it may not: {args[1:]!r}")
            node = g.call_function(fn, args, kwargs)
        elif op == "call_method":
            on_owner = owner is not None and args and args[0] is env.get(owner)
            if on_owner:
                if any(not (p.isidentifier() or p.isdigit()) or p.startswith("__") for p in target.split(".")):
                    raise ValueError(f"not a submodule path: {target!r}")
            elif not tensor_method(target):
                raise ValueError(f"a generated forward may not call the method {target!r}")
            node = g.call_method(target, args, kwargs)
        elif op == "output":
            node = g.output(args[0])
        else:
            raise ValueError(f"unknown node kind in a generated forward: {op!r}")
        env[name] = node
    return g


def _getattr_allowed(args: tuple, owner: Any) -> bool:
    if len(args) != 2 or not isinstance(args[1], str):
        return False
    return args[1] in TENSOR_PROPERTIES or (owner is not None and owner_path(args[0], owner) is not None
                                            and not args[1].startswith("__"))


def build(spec: dict, tensors: dict | None = None, modules: dict | None = None) -> Any:
    """The GraphModule a spec describes: its constants are ``tensors`` (zeros of the recorded
    shape and dtype when absent: a state_dict fills them), its own submodules ``modules``."""
    import torch
    import torch.fx as fx

    g = graph_of(spec)
    root: dict = {}
    for name, c in spec.get("constants", {}).items():
        t = (tensors or {}).get(name)
        root[name] = t if t is not None else torch.zeros(c["shape"], dtype=decode({"dtype": c["dtype"]}, {}))
    root.update(modules or {})
    gm = fx.GraphModule(root, g, class_name=spec.get("class_name") or "GraphModule")
    gm._graphmodule_cls_name = type(gm).__name__  # torch restores the class name from this on load
    for name in spec.get("constants", {}):
        if name in gm._buffers:
            continue
        value = getattr(gm, name)  # registered as a plain attribute: make it a buffer (state_dict)
        delattr(gm, name)
        gm.register_buffer(name, value)
    return gm


def check_owner_use(gm: Any, owner: Any) -> str | None:
    """Why ``gm`` cannot run as ``owner``'s forward: a module call or attribute read on the
    owner that does not resolve to a submodule / tensor of it. ``None`` when it can."""
    import torch

    ph = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
    if ph is None:
        return "it takes no arguments"
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.args and n.args[0] is ph:
            try:
                owner.get_submodule(n.target)
            except AttributeError:
                return f"{type(owner).__name__} has no submodule {n.target}"
        path = owner_path(n, ph) if n.op == "call_function" else None
        if path and not any(u.op == "call_function" and u.target is builtins.getattr for u in n.users):
            obj: Any = owner
            for part in path.split("."):
                obj = getattr(obj, part, None)
            if not isinstance(obj, (torch.Tensor, torch.nn.Module)):
                return f"{type(owner).__name__} has no tensor or submodule {path}"
    return None
