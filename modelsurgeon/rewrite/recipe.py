"""The structural edits a surgery made, as JSON, so a state_dict can rebuild its model.

A state_dict holds tensors only: after surgery its keys describe a structure the original
architecture factory no longer builds (a BatchNorm became ``nn.Identity``, a conv gained a
bias, a Focus became a strided conv). The recipe is the ordered list of those edits; replaying
it on a freshly built model gives the rewritten structure, into which the state_dict loads.

Edits are a closed set of data records -- nothing in a recipe is imported or executed beyond
``torch.nn`` classes named by it:

* ``{"op": "replace", "path": P, "module": SPEC}``
* ``{"op": "add_bias", "path": P}``
* ``{"op": "setattr", "path": P, "name": N, "value": JSON}``

A ``SPEC`` is ``{"from": PATH}`` (a module already in the tree, moved), or
``{"class": "Conv2d", "kwargs": {...}}`` for a ``torch.nn`` class, or
``{"class": "Sequential", "children": [SPEC, ...]}``, or a kind a pass registers with
:func:`register_kind` (built by modelsurgeon code from data only).
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


def apply(recipe: Recipe, root: Any) -> Any:
    """Replay the edits on a freshly built model (in place); returns the model."""
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
        else:
            raise ValueError(f"unknown recipe edit: {op!r}")
    return root


def _is_transposed(m: Any) -> bool:
    return bool(getattr(m, "transposed", False))
