"""Edit a model's module tree and parameters in place, recording every structural edit.

All rewrites go through :class:`ModuleEditor`, which

* replaces a module at every path it is registered under (aliases included) and carries over
  the attributes the host forward may read on it (YOLO's ``i``, ``f``, ``type``, ``np``), or
  keeps a module and gives it another forward (:meth:`ModuleEditor.set_forward`);
* writes float64 results into existing parameters after rounding them to the dtype they will
  be saved in (so verification sees exactly the saved numbers);
* appends each structural edit to the checkpoint's :class:`~modelsurgeon.rewrite.recipe.Recipe`.
"""

from __future__ import annotations

from typing import Any

from .recipe import Recipe, get_module, set_module, torch_spec

_MODULE_INTERNALS = {
    "training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_pre_hooks",
    "_backward_hooks", "_is_full_backward_hook", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks", "_modules", "call_super_init", "dump_patches",
}
_PLAIN = (int, float, str, bool, type(None))


def carried_attributes(old: Any, new: Any) -> dict[str, Any]:
    """Plain attributes of ``old`` the host may read that ``new`` lacks (YOLO routing etc.).

    Configuration constants of torch classes (``eps``, ``stride``...) are not carried; what the
    model's code set on a torch module (YOLO's ``i``/``f``/``type``/``np`` on an
    ``nn.PixelUnshuffle`` or ``nn.Sequential`` layer) is, like on its own classes. An
    instance attribute of ``old`` that shadows a method of ``new``'s class is carried (YOLO's
    ``type`` string shadows ``nn.Module.type``, on the original layer as on its replacement);
    ``new``'s own attributes, submodules, parameters and properties are never overwritten.
    """
    import inspect

    import torch

    out: dict[str, Any] = {}
    constants = set(getattr(type(old), "__constants__", ()) or ())
    is_torch = type(old).__module__.startswith("torch.")
    own: set[str] | None = None  # attributes a torch class sets itself (its configuration)
    for k, v in vars(old).items():
        if k in _MODULE_INTERNALS or k.startswith("_") or k in constants or _has_own(new, k):
            continue
        static = inspect.getattr_static(type(new), k, None)
        if static is not None and (hasattr(static, "__set__") or not callable(static)):
            continue  # a property / descriptor, or a class-level setting of the new module
        if is_torch:
            if own is None:
                own = _torch_class_attributes(old)
            if k in own:
                continue
        if isinstance(v, _PLAIN) or (isinstance(v, (list, tuple)) and all(isinstance(i, _PLAIN) for i in v)):
            out[k] = v
    return out


def _torch_class_attributes(module: Any) -> set[str]:
    """The instance attributes a torch class sets itself, read off a fresh instance of the same
    configuration built on the meta device (no memory); everything when it cannot be rebuilt.

    What else a torch module carries was set by the model's code (YOLO sets ``i``, ``f``,
    ``type``, ``np`` on an ``nn.PixelUnshuffle`` layer as on its own classes)."""
    import torch

    from .recipe import build

    everything = set(vars(module))
    containers = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)
    spec = None if isinstance(module, containers) else torch_spec(module)
    if spec is None and not isinstance(module, containers):
        return everything
    try:
        with torch.device("meta"):
            fresh = type(module)() if spec is None else build(spec, None)  # a container: empty
    except Exception:
        return everything
    return set(vars(fresh)) if type(fresh) is type(module) else everything


def _has_own(module: Any, name: str) -> bool:
    return any(name in d for d in (vars(module), module._parameters, module._buffers, module._modules))


class ModuleEditor:
    def __init__(self, root: Any, storage: Any, recipe: Recipe | None = None):
        self.root = root
        self.storage = storage
        self.recipe = recipe if recipe is not None else Recipe()
        self._storage_count: dict[int, int] | None = None
        self._workspace = None  # float64 buffer reused by every in-place weight scaling
        self.neutralised: set[int] = set()  # id() of the tensors neutralise() filled (this run)
        # what the edits touched, as they were found: modules replaced or given another forward
        # or a bias, tensors written (``--verify-at`` checks they all feed the verified modules)
        self.changed_modules: list[Any] = []
        self.changed_tensors: list[Any] = []
        self.placeholders: list[Any] = []  # nn.Identity modules standing for removed ones (remove())

    # -- paths -------------------------------------------------------------------------------
    def paths_of(self, module: Any) -> list[str]:
        return [p for p, m in self.root.named_modules(remove_duplicate=False) if m is module]

    def path_of(self, module: Any) -> str | None:
        paths = self.paths_of(module)
        return paths[0] if paths else None

    # -- structure ---------------------------------------------------------------------------
    def replace(self, old: Any, new: Any, spec: dict | None = None) -> list[str]:
        """Put ``new`` wherever ``old`` is registered. ``spec`` describes ``new`` for the recipe;
        by default it is derived (a module already in the tree is recorded as a move)."""
        paths = self.paths_of(old)
        if not paths:
            raise ValueError(f"{type(old).__name__} is not in the model")
        if "" in paths:
            raise ValueError("cannot replace the model's root module")
        if spec is None:
            spec = self.spec_for(new)
        self.changed_modules.append(old)
        carried = carried_attributes(old, new)
        for k, v in carried.items():
            setattr(new, k, v)
        if self.storage is not None and hasattr(self.storage, "inherit"):
            self.storage.inherit(old, new)
        for path in paths:
            set_module(self.root, path, new)
            self.recipe.edits.append({"op": "replace", "path": path, "module": spec})
        for k, v in carried.items():
            self.recipe.edits.append({"op": "setattr", "path": paths[0], "name": k, "value": _jsonable(v)})
        return paths

    def remove(self, module: Any) -> list[str]:
        """Remove a module the pass folded away: an ``nn.Identity`` placeholder takes its place
        while the passes run; at the end :func:`~modelsurgeon.rewrite.removal.finish_removals`
        removes it the way the host's deploy path does (the class's fused forward), or keeps it."""
        import torch

        placeholder = torch.nn.Identity()
        paths = self.replace(module, placeholder)
        self.placeholders.append(placeholder)
        return paths

    def use_forward(self, module: Any, attrs: list[str], method: str) -> None:
        """Delete placeholder submodules ``attrs`` of ``module`` and make its class's fused forward
        ``method`` its forward (:func:`~modelsurgeon.rewrite.removal.use_forward`; recipe
        ``use_forward``)."""
        from .removal import use_forward

        paths = self.paths_of(module)
        if not paths:
            raise ValueError(f"{type(module).__name__} is not in the model")
        use_forward(module, attrs, method)
        self.changed_modules.append(module)
        self.recipe.edits.append({"op": "use_forward", "path": paths[0], "remove": list(attrs), "method": method})

    def set_forward(self, module: Any, new: Any, spec: dict, name: str, remove: list[str], bind: bool = False,
                    add: dict | None = None) -> str:
        """Make ``new`` ``module``'s forward, in place (:func:`~modelsurgeon.rewrite.recipe.set_forward`):
        ``module`` keeps its class and attributes, loses its parameters, buffers and submodules
        named in ``remove``, gains the modules of ``add`` (name -> ``(module, spec)``) and
        ``new`` as its submodule ``name`` (called with ``module`` first when ``bind``);
        ``spec`` describes ``new`` for the recipe (read before the change: its ``from`` specs
        are paths of the tree as it was). Returns the path of ``new``."""
        from .recipe import set_forward

        paths = self.paths_of(module)
        if not paths:
            raise ValueError(f"{type(module).__name__} is not in the model")
        if self.storage is not None and hasattr(self.storage, "inherit"):
            self.storage.inherit(module, new)
            for m, _spec in (add or {}).values():
                self.storage.inherit(module, m)
        self.changed_modules.append(module)
        set_forward(module, name, new, remove, bind=bind, add={k: m for k, (m, _s) in (add or {}).items()})
        # one edit: every alias of the module is the same object, on replay as here
        edit = {"op": "set_forward", "path": paths[0], "name": name, "remove": list(remove), "module": spec}
        if bind:
            edit["bind"] = "owner"
        if add:
            edit["add"] = {k: s for k, (_m, s) in add.items()}
        self.recipe.edits.append(edit)
        self._storage_count = None  # tensors left the model
        return f"{paths[0]}.{name}" if paths[0] else name

    def set_attribute(self, module: Any, name: str, value: Any) -> None:
        """Set a plain attribute (a flag such as ``inference_mode``) on ``module``, in the recipe."""
        setattr(module, name, value)
        self.changed_modules.append(module)
        self.recipe.edits.append({"op": "setattr", "path": self.paths_of(module)[0], "name": name,
                                  "value": _jsonable(value)})

    def spec_for(self, new: Any) -> dict | None:
        """Recipe spec for a module: a move when it is already in the tree, else torch.nn."""
        import torch

        moved = self.path_of(new)
        if moved is not None:
            return {"from": moved}
        if isinstance(new, torch.nn.Sequential):
            children = [self.spec_for(c) for c in new.children()]
            if all(c is not None for c in children):
                return {"class": "Sequential", "children": children}
        return torch_spec(new)

    # -- parameters --------------------------------------------------------------------------
    def set_param(self, param: Any, value64: Any, module: Any = None) -> None:
        """Write a float64 result into ``param`` (same object), rounded to its storage dtype."""
        import torch

        self.changed_tensors.append(param)
        with torch.no_grad():
            dt = self.storage.storage_dtype(param, module) if self.storage is not None else param.dtype
            param.data = value64.to(dt).to(param.dtype).reshape(param.shape).contiguous()

    def scale_weight(self, param: Any, scale64: Any, kind: str, groups: int = 1, module: Any = None) -> None:
        """Scale a conv/linear weight per output channel, in place (no second copy of it).

        When the parameter's storage is shared with another tensor (tied weights), a new tensor
        is written instead so the other reader is not changed."""
        import torch

        from .affine import scale_output_channels, scale_output_channels_, workspace

        self.changed_tensors.append(param)
        dt = self.storage.storage_dtype(param, module) if self.storage is not None else param.dtype

        cast = None if dt == param.dtype else (lambda block: block.to(dt))  # round to what is saved

        if self._shares_storage(param):
            self.set_param(param, scale_output_channels(param.data, scale64, kind, groups), module)
        else:
            if self._workspace is None:
                self._workspace = workspace()
            scale_output_channels_(param.data, scale64, kind, groups, cast, self._workspace)

    def _shares_storage(self, tensor: Any) -> bool:
        if self._storage_count is None:
            counts: dict[int, int] = {}
            for t in list(self.root.parameters()) + [b for b in self.root.buffers() if b is not None]:
                if t.numel():
                    key = t.untyped_storage().data_ptr()
                    counts[key] = counts.get(key, 0) + 1
            self._storage_count = counts
        return not tensor.data.is_contiguous() or self._storage_count.get(tensor.untyped_storage().data_ptr(), 0) > 1

    def add_bias(self, module: Any, value64: Any) -> Any:
        """Give a bias-free torch conv/linear module a bias parameter."""
        import torch

        dt = self.storage.storage_dtype(module.weight, module) if self.storage is not None else module.weight.dtype
        self.changed_modules.append(module)
        module.bias = torch.nn.Parameter(value64.to(dt).to(module.weight.dtype).contiguous(),
                                         requires_grad=module.weight.requires_grad)
        for path in self.paths_of(module):
            self.recipe.edits.append({"op": "add_bias", "path": path})
        return module.bias

    def neutralise(self, param: Any, fill: float) -> None:
        """Make an inline per-channel op the identity by filling its parameter with 1 or 0."""
        import torch

        self.changed_tensors.append(param)
        with torch.no_grad():
            param.data = torch.full_like(param.data, fill)
        self.neutralised.add(id(param))


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(i) for i in v]
    if isinstance(v, list):
        return [_jsonable(i) for i in v]
    return v
