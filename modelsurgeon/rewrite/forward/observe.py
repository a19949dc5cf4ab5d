"""Watch chosen modules being called by the whole model: what they receive and return (and, at
the recorded size, how they call their children), at the example input and at other sizes.

A generated forward is proved against these: it must give bit for bit what the module gave, on
the arguments the model itself passed, at the recorded input size and at two more input sizes
and batch sizes (:func:`variants`). Arguments and outputs are copied when seen (a later
in-place op of the host must not change them); the run stops as soon as every watched call
is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OTHER_SIZES = 2
"""Input sizes besides the recorded one a generated forward is checked at."""


@dataclass
class Seen:
    args: tuple
    kwargs: dict
    output: Any = None
    children: list = field(default_factory=list)  # (module, args skeleton, kwargs skeleton, output skeleton)


@dataclass(frozen=True)
class Slot:
    """A tensor in an argument or output structure: its position among the flattened tensors."""

    index: int


def skeleton(obj: Any, counter: list) -> Any:
    """``obj`` with each tensor replaced by a :class:`Slot` (in flattening order)."""
    import torch

    if isinstance(obj, torch.Tensor):
        counter[0] += 1
        return Slot(counter[0] - 1)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(skeleton(o, counter) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(skeleton(o, counter) for o in obj)
    if isinstance(obj, dict):
        return {k: skeleton(o, counter) for k, o in obj.items()}
    return obj


def clone(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(clone(o) for o in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: clone(o) for k, o in obj.items()}
    return obj


def same(a: Any, b: Any) -> bool:
    """Bit for bit the same (NaNs where the other has NaNs), structure included."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):  # (fx's immutable_list is a list)
        kind = (isinstance(a, list) and isinstance(b, list)) or type(a) is type(b)
        return kind and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


def variants(inputs: list, seed: int = 0) -> list[list]:
    """Inputs at other sizes, in the order they are tried: batch + 1 with the last spatial side
    doubled (not square), batch + 2 at half the size, then batch + 1 at twice the size, batch + 2
    one pixel larger, and larger batches alone (for models that take one size only)."""
    import torch

    g = torch.Generator().manual_seed(seed + 7)
    plans = [(1, lambda s: s[:-1] + [s[-1] * 2]), (2, lambda s: [max(1, d // 2) for d in s]),
             (1, lambda s: [d * 2 for d in s]), (2, lambda s: [d + 1 for d in s]),
             (1, lambda s: s), (2, lambda s: s)]
    out, seen = [], {tuple(tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor))}
    for grow, spatial in plans:
        new = []
        for t in inputs:
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                new.append(t)
                continue
            shape = list(t.shape)
            shape[0] += grow
            if t.dim() >= 3:
                shape[2:] = spatial(shape[2:])
            if t.is_floating_point():
                new.append(torch.randn(shape, generator=g, dtype=torch.float64).to(t.dtype))
            elif t.numel() and t.dtype != torch.bool:
                lo, hi = int(t.min()), int(t.max())
                new.append(torch.randint(lo, hi + 1, shape, generator=g).to(t.dtype))
            else:
                new.append(torch.zeros(shape, dtype=t.dtype))
        key = tuple(tuple(t.shape) for t in new if isinstance(t, torch.Tensor))
        if key not in seen:
            seen.add(key)
            out.append(new)
    return out


class _Done(Exception):
    pass


def observe(model: Any, inputs: list, modules: list, counts: dict[int, int],
            children: dict[int, list] | None = None, on_call: Any = None) -> dict[int, list[Seen]]:
    """Run ``model(*inputs)``; for each module of ``modules`` (``counts``: how many calls to
    wait for, by ``id``), every call's :class:`Seen`, with the structure of its calls of the
    modules ``children`` lists for it (by ``id``). With ``on_call(module, seen)`` each call is
    handed over when it ends and not kept (only one call's arguments are held at a time).
    Raises what the model raises."""
    import torch
    from torch.nn.modules import module as torch_module

    found: dict[int, list[Seen]] = {id(m): [] for m in modules}
    stack: list = []
    open_calls: dict[int, list[Seen]] = {}
    handles = []
    remaining = [sum(counts.get(id(m), 1) for m in {id(m): m for m in modules}.values())]

    def push(mod, _args):
        stack.append(mod)

    def pop(_mod, _args, _out):
        if stack:
            stack.pop()

    def pre(mod, args, kwargs):
        seen = Seen(clone(args), clone(kwargs))
        if on_call is None:
            found[id(mod)].append(seen)
        open_calls.setdefault(id(mod), []).append(seen)

    def post(mod, _args, _kwargs, output):
        seen = open_calls[id(mod)].pop()
        if on_call is not None:
            seen.output = output  # (compared right away, before the host can change it)
            on_call(mod, seen)
        else:
            seen.output = clone(output)
        remaining[0] -= 1
        if remaining[0] <= 0:
            raise _Done

    def child_pre(mod, args, kwargs):
        parent = stack[-2] if len(stack) > 1 else None
        calls = open_calls.get(id(parent)) if parent is not None else None
        if calls:
            c = [0]
            calls[-1].children.append([mod, skeleton(args, c), skeleton(kwargs, c), None])

    def child_post(mod, _args, _kwargs, output):
        parent = stack[-1] if stack else None  # the global hook has popped the child already
        calls = open_calls.get(id(parent)) if parent is not None else None
        if calls and calls[-1].children and calls[-1].children[-1][0] is mod and calls[-1].children[-1][3] is None:
            calls[-1].children[-1][3] = skeleton(output, [0])

    try:
        handles.append(torch_module.register_module_forward_pre_hook(push))
        handles.append(torch_module.register_module_forward_hook(pop))
        targets = {id(m): m for m in modules}
        for m in targets.values():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooked: set[int] = set()
        for m in targets.values():
            for child in (children or {}).get(id(m), []):
                if id(child) not in targets and id(child) not in hooked:
                    hooked.add(id(child))
                    handles.append(child.register_forward_pre_hook(child_pre, with_kwargs=True))
                    handles.append(child.register_forward_hook(child_post, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        with torch.no_grad():
            try:
                model(*inputs)
            except _Done:
                pass
    finally:
        for h in handles:
            h.remove()
    return found
