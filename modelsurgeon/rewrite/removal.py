"""Removing a folded module the way the host's own deploy path does.

Details: docs/architecture.md (the rewrite stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Holder:
    """A module holding placeholders, and what the check found."""

    module: Any
    attrs: list[str]
    candidates: list[str]
    disproved: set[str] = field(default_factory=set)
    calls: int = 0


def generated_forward(editor: Any, module: Any, attrs: list[str]) -> bool:
    """Give ``module`` a generated forward that does without ``attrs`` (the placeholders) and
    computes the same, through :meth:`ModuleEditor.set_forward` (recipe ``set_forward``); True
    if it did. The hook for rewriting a forward; no generator is registered yet."""
    for make in FORWARD_GENERATORS:
        if make(editor, module, attrs):
            return True
    return False


FORWARD_GENERATORS: list[Callable[[Any, Any, list[str]], bool]] = []
"""Functions ``(editor, module, attrs) -> bool`` tried in turn by :func:`generated_forward`."""


def holders(root: Any, placeholders: list) -> list[Holder]:
    """The modules holding each placeholder still in the model (one parent, one attribute;
    a placeholder registered twice stays)."""
    from ..match.host import fused_forwards

    found: dict[int, Holder] = {}
    ids = {id(p) for p in placeholders}
    seen: dict[int, int] = {}
    for parent in root.modules():
        for name, child in parent._modules.items():
            if child is not None and id(child) in ids:
                seen[id(child)] = seen.get(id(child), 0) + 1
    for parent in root.modules():
        for name, child in list(parent._modules.items()):
            if child is None or id(child) not in ids or seen[id(child)] != 1:
                continue
            h = found.get(id(parent))
            if h is None:
                h = found[id(parent)] = Holder(parent, [], fused_forwards(type(parent)))
            h.attrs.append(name)
    return list(found.values())


def finish_removals(root: Any, editor: Any, inputs: list, same: Callable[[Any, Any], bool]) -> list[str]:
    """Remove the editor's placeholders the host's way (module docstring); returns report notes.
    ``same(a, b)`` decides whether two outputs are the same (the run's tolerance)."""
    import torch

    todo = [h for h in holders(root, editor.placeholders) if "forward" not in vars(h.module)]
    checked = [h for h in todo if h.candidates]
    handles = [h.module.register_forward_hook(_checker(h, same), with_kwargs=True) for h in checked]
    try:
        with torch.no_grad():
            root(*inputs)
    except Exception as e:  # the check run failed: nothing is switched
        for h in checked:
            h.disproved.update(h.candidates)
        note = [f"placeholders kept as nn.Identity: checking the fused forwards failed ({type(e).__name__})"]
    else:
        note = []
    finally:
        for handle in handles:
            handle.remove()
    switched = kept = 0
    for h in todo:
        method = next((c for c in h.candidates if c not in h.disproved), None) if h.calls else None
        if method is not None:
            editor.use_forward(h.module, h.attrs, method)
            switched += 1
        elif generated_forward(editor, h.module, h.attrs):
            switched += 1
        else:
            kept += 1
    if switched:
        note.append(f"{switched} module{'s' if switched != 1 else ''} left as the host's fuse() leaves them: the "
                    "folded norm deleted, the class's fused forward (e.g. forward_fuse) in use")
    return note


def _checker(h: Holder, same: Callable[[Any, Any], bool]) -> Callable:
    def hook(module, args, kwargs, output):
        h.calls += 1
        hidden = {a: module._modules.pop(a) for a in h.attrs}
        try:
            for name in h.candidates:
                if name in h.disproved:
                    continue
                try:
                    got = getattr(type(module), name)(module, *args, **kwargs)
                except Exception:
                    h.disproved.add(name)
                    continue
                if not same(output, got):
                    h.disproved.add(name)
        finally:
            module._modules.update(hidden)

    return hook


def use_forward(module: Any, attrs: list[str], method: str) -> None:
    """Delete ``attrs`` (placeholder submodules) from ``module`` and make its class's method
    ``method`` its forward, as the host's ``fuse()`` does (``m.forward = m.forward_fuse``)."""
    import inspect

    from ..match.host import FUSED_NAME

    if not FUSED_NAME.match(method) or not inspect.isfunction(inspect.getattr_static(type(module), method, None)):
        raise ValueError(f"{type(module).__name__} has no fused forward {method!r}")
    for a in attrs:
        if a not in module._modules:
            raise ValueError(f"{type(module).__name__} has no submodule {a!r}")
    for a in attrs:
        delattr(module, a)
    module.__dict__["forward"] = getattr(module, method)
