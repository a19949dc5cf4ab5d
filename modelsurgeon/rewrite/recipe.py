"""The structural edits a surgery made, as JSON, so a state_dict can rebuild its model.

Details: docs/formats.md (*The recipe of a state_dict output*).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

RECIPE_VERSION = 1

_KINDS: dict[str, Callable[[dict, Any], Any]] = {}


def register_kind(name: str, builder: Callable[[dict, Any], Any]) -> None:
    """Register a module kind a pass creates that is no plain ``torch.nn`` class."""
    _KINDS[name] = builder


@dataclass
class Recipe:
    edits: list[dict] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return list(self.edits)

    @classmethod
    def from_json(cls, data: Any) -> "Recipe":
        if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
            raise ValueError("recipe must be a list of edit records")
        return cls(list(data))

    def __bool__(self) -> bool:
        return bool(self.edits)


# --------------------------------------------------------------------------------------------
# module paths


def get_module(root: Any, path: str) -> Any:
    if not path:
        return root
    mod = root
    for part in path.split("."):
        mod = mod._modules[part] if part in getattr(mod, "_modules", {}) else getattr(mod, part)
    return mod


def set_module(root: Any, path: str, new: Any) -> None:
    if not path:
        raise ValueError("cannot replace the root module")
    parent_path, _, name = path.rpartition(".")
    parent = get_module(root, parent_path)
    setattr(parent, name, new)


# --------------------------------------------------------------------------------------------
# specs


def _torch_nn_class(name: str) -> type:
    import torch

    cls = getattr(torch.nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"recipe names an unknown torch.nn class: {name!r}")
    return cls


_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode")


def torch_spec(module: Any) -> dict | None:
    """JSON spec rebuilding a fresh module of ``module``'s torch.nn class and configuration.

    ``None`` when the module is not a plain ``torch.nn`` class (or a configuration cannot be
    read back from its attributes).
    """
    import torch.nn as nn

    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:
        return None
    if isinstance(module, nn.Sequential):
        children = []
        for child in module.children():
            spec = torch_spec(child)
            if spec is None:
                return None
            children.append(spec)
        return {"class": "Sequential", "children": children}
    kwargs: dict[str, Any] = {}
    if isinstance(module, (nn.modules.conv._ConvNd,)):
        for a in _CONV_ARGS:
            v = getattr(module, a)
            kwargs[a] = list(v) if isinstance(v, tuple) else v
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            kwargs["output_padding"] = list(module.output_padding)
        kwargs["bias"] = module.bias is not None
        if isinstance(kwargs["padding"], str):
            pass
        return {"class": cls.__name__, "kwargs": kwargs}
    if isinstance(module, nn.Linear):
        return {"class": "Linear", "kwargs": {"in_features": module.in_features,
                                              "out_features": module.out_features,
                                              "bias": module.bias is not None}}
    # generic: constructor arguments that the instance keeps as attributes of the same name
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    for pname, p in params.items():
        if pname == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if pname in ("device", "dtype"):
            continue
        if hasattr(module, pname):
            v = getattr(module, pname)
            if isinstance(v, tuple):
                v = list(v)
            if v is None or isinstance(v, (bool, int, float, str, list)):
                kwargs[pname] = v
                continue
            return None
        if p.default is p.empty:
            return None
    return {"class": cls.__name__, "kwargs": kwargs}


def build(spec: dict, root: Any) -> Any:
    """Build the module a spec describes (``root`` is the model, for ``from`` specs)."""
    if "from" in spec:
        return get_module(root, spec["from"])
    if spec.get("kind") == "graph":  # a generated forward (plain data, checked when built)
        from .forward.spec import build as build_graph

        return build_graph(spec, None, {k: build(s, root) for k, s in spec.get("modules", {}).items()})
    if "kind" in spec:
        builder = _KINDS.get(spec["kind"])
        if builder is None:
            _load_kinds()
            builder = _KINDS.get(spec["kind"])
        if builder is None:
            raise ValueError(f"recipe names an unknown module kind: {spec['kind']!r}")
        return builder(spec, root)
    cls = _torch_nn_class(spec["class"])
    if spec["class"] == "Sequential":
        return cls(*(build(c, root) for c in spec.get("children", [])))
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()}
    return cls(**kwargs)


def _load_kinds() -> None:
    """Import the passes so that they register their module kinds."""
    from .. import passes

    passes.load_all()


def wrapper_prefix(model: Any) -> str:
    """``"module."`` for a ``DataParallel`` / ``DistributedDataParallel`` wrapper, else ``""``.

    A recipe in a file is relative to the wrapped model: a pickled ``DataParallel(net)``
    written as a state_dict is rebuilt from ``net``'s factory (its keys' ``module.`` prefix is
    matched on load), and replaying on a factory that returns the wrapper edits the model
    inside it."""
    import torch

    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return "module." if isinstance(model, wrappers) and "module" in model._modules else ""


def _move(path: str, old: str, new: str) -> str:
    """``path`` (relative to the module at prefix ``old``) relative to the one at ``new``."""
    full = old + path if path else old.rstrip(".")
    if new and not (full + ".").startswith(new):
        raise ValueError(f"recipe path {full!r} is outside {new.rstrip('.')!r}")
    return full[len(new):]


def _move_spec(spec: Any, old: str, new: str) -> Any:
    if isinstance(spec, list):
        return [_move_spec(s, old, new) for s in spec]
    if not isinstance(spec, dict):
        return spec
    out = {k: _move_spec(v, old, new) for k, v in spec.items()}
    if isinstance(spec.get("from"), str):
        out["from"] = _move(spec["from"], old, new)
    return out


def relocate(recipe: Recipe, old: str, new: str) -> Recipe:
    """The same edits with module paths relative to the module at prefix ``new`` instead of
    ``old`` (prefixes end with a dot: ``"module."``; ``""`` is the root)."""
    if old == new or not recipe:
        return recipe
    edits = []
    for e in recipe.edits:
        e = dict(e)
        if isinstance(e.get("path"), str):
            e["path"] = _move(e["path"], old, new)
        if "module" in e:
            e["module"] = _move_spec(e["module"], old, new)
        edits.append(e)
    return Recipe(edits)


def apply(recipe: Recipe, root: Any) -> Any:
    """Replay the edits on a freshly built model (in place); returns the model. On a
    ``DataParallel`` wrapper they apply to the model inside it (:func:`wrapper_prefix`)."""
    if wrapper_prefix(root):
        root.module = apply(recipe, root.module)
        return root
    if recipe and "module" not in getattr(root, "_modules", {}):
        try:  # written from a DataParallel by an older modelsurgeon: paths with its "module."
            recipe = relocate(recipe, "", "module.")
        except ValueError:
            pass
    return _apply(recipe, root)


def set_forward(module: Any, name: str, new: Any, remove: Any = (), bind: bool = False, add: dict | None = None) -> None:
    """Make the module ``new`` ``module``'s forward, in place: delete ``module``'s parameters,
    buffers and submodules named in ``remove`` (what its own forward used), register the
    modules of ``add``, register ``new`` as its submodule ``name`` and put it in the
    instance's ``__dict__`` as ``forward`` -- ``functools.partial(new, module)`` with ``bind``
    (a generated forward taking the module it serves first; a stdlib object that pickles and
    deep-copies with its two references).

    An instance attribute wins over the class's ``forward`` function and ``nn.Module.__call__``
    calls ``self.forward``, so the module keeps its class (a host dispatching on the class name
    still recognises it) and every attribute, while running ``new``. ``copy.deepcopy`` and
    pickling keep the identity of ``_modules[name]`` and ``__dict__["forward"]`` (both are
    references to one object in the instance's ``__dict__``), so nothing but torch and the
    module's own class is needed to load it, and a copy runs its copy of ``new``."""
    import torch

    if not isinstance(new, torch.nn.Module):
        raise ValueError(f"a forward must be a module, not {type(new).__name__}")
    if not (isinstance(name, str) and name.isidentifier() and not name.startswith("_")):
        raise ValueError(f"not a submodule name: {name!r}")
    for n in remove:
        if not any(n in d for d in (module._parameters, module._buffers, module._modules)):
            raise ValueError(f"{type(module).__name__} has no parameter, buffer or submodule {n!r}")
    for n in remove:
        delattr(module, n)  # nn.Module.__delattr__: a parameter, buffer or submodule
    for n, m in (add or {}).items():
        if not (isinstance(n, str) and n.isidentifier()) or not isinstance(m, torch.nn.Module):
            raise ValueError(f"not a submodule: {n!r}")
        setattr(module, n, m)
    setattr(module, name, new)
    new.training = module.training
    if bind:
        import functools

        from .forward.spec import check_owner_use

        why = check_owner_use(new, module)
        if why is not None:
            raise ValueError(f"the generated forward does not fit {type(module).__name__}: {why}")
        module.__dict__["forward"] = functools.partial(new, module)
    else:
        module.__dict__["forward"] = new


def _apply(recipe: Recipe, root: Any) -> Any:
    import torch

    for e in recipe.edits:
        op = e.get("op")
        path = e.get("path", "")
        if op == "replace":
            new = build(e["module"], root)
            if path == "":
                root = new
            else:
                set_module(root, path, new)
        elif op == "add_bias":
            m = get_module(root, path)
            out = m.weight.shape[1] * m.groups if _is_transposed(m) else m.weight.shape[0]
            m.bias = torch.nn.Parameter(torch.zeros(out, dtype=m.weight.dtype))
        elif op == "setattr":
            setattr(get_module(root, path), e["name"], e["value"])
        elif op == "set_forward":
            m = get_module(root, path)
            new = build(e["module"], root)  # before the removal: "from" specs read the old tree
            add = {k: build(s, root) for k, s in (e.get("add") or {}).items()}
            set_forward(m, e["name"], new, e.get("remove", []), bind=e.get("bind") == "owner", add=add)
        elif op == "use_forward":
            from .removal import use_forward

            use_forward(get_module(root, path), list(e.get("remove", [])), str(e.get("method", "")))
        else:
            raise ValueError(f"unknown recipe edit: {op!r}")
    return root


def _is_transposed(m: Any) -> bool:
    return bool(getattr(m, "transposed", False))
