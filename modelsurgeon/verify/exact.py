"""Running the original model in float64 without a second copy of it.

Lazily: the pipeline runs it only when an output fails the fixed tolerance
(``verify/torch.py: References.check``), on the original read again from the file
(:func:`reload_original`); in memory only (the API), before the rewrite, as references are.

:func:`float64` makes the model compute in float64 for the duration of a block: each module's
own parameters and buffers are cast when the module is entered and get their float32 data back
when it returns (global module hooks), so at any moment only the modules on the call stack
hold float64 copies -- a few layers, not the model (a 1 GB model does not take 2 GB more).
The very tensor objects get their own data back (storage sharing between tensors is kept),
and module attributes the forward replaced or appended to while in float64 (a cached grid)
are put back as they were. A tensor the model reads outside its module's call stays float32:
such a model raises (mixed dtypes) and its own rounding is simply not measured.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


@contextlib.contextmanager
def float64(model: Any) -> Iterator[None]:
    import torch

    depth: dict[int, int] = {}
    saved: dict[int, list] = {}  # id(module) -> [(tensor, its float32 data)]
    cast_by: dict[int, int] = {}  # id(tensor) -> id(module) that cast it (a shared tensor: the first)

    def enter(module, _args):
        key = id(module)
        depth[key] = depth.get(key, 0) + 1
        if depth[key] > 1:
            return
        mine = []
        for store in (module._parameters, module._buffers):
            for t in store.values():
                if t is not None and t.is_floating_point() and t.dtype != torch.float64 and id(t) not in cast_by:
                    mine.append((t, t.data))
                    cast_by[id(t)] = key
                    t.data = t.data.to(torch.float64)
        saved[key] = mine

    def leave(module, _args, _out):
        key = id(module)
        depth[key] = depth.get(key, 1) - 1
        if depth[key] > 0:
            return
        for t, data in saved.pop(key, []):
            t.data = data
            cast_by.pop(id(t), None)

    entries, attrs = [], []
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            entries.extend((store, name, t) for name, t in store.items() if t is not None)
        attrs.append((mod, {k: (v, list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else None)
                            for k, v in vars(mod).items() if not k.startswith("_")}))
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.no_grad():
            yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for mine in saved.values():  # modules left by an exception
                for t, data in mine:
                    t.data = data
        for store, name, t in entries:
            store[name] = t
        for mod, state in attrs:
            for k in [k for k in vars(mod) if not k.startswith("_") and k not in state]:
                del mod.__dict__[k]
            for k, (obj, contents) in state.items():
                mod.__dict__[k] = obj
                if isinstance(contents, list):
                    obj[:] = contents
                elif isinstance(contents, dict):
                    obj.clear()
                    obj.update(contents)


def reload_original(opts, slot_name: str | None):
    """The original model of slot ``slot_name`` read again from the input file (memory-mapped
    where the format allows), prepared as the run prepared it: the float64 run's subject once
    the in-place rewrite has changed the model in memory."""
    from ..read import load_checkpoint
    from ..read.prepare import prepare

    ckpt = load_checkpoint(opts.input, arch=opts.arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle,
                           code_paths=opts.code_paths, mmap=True)
    slot = next((s for s in ckpt.slots if s.name == slot_name), None) if slot_name else ckpt.primary()
    if slot is None:
        raise LookupError(f"no model {slot_name!r} in the file")
    prepare(slot.module, check_finite=False)
    return slot.module


def own_rounding_wanted(opts, storage, dtype, passes) -> bool:
    """Whether to run the original in float64 too (``verify/compare.py``): float32 weights and
    inputs, the default tolerances, function-preserving passes, and a run that verifies."""
    import torch

    from .. import passes as registry

    if not opts.verify or opts.dry_run or opts.atol is not None or opts.rtol is not None:
        return False
    if storage.default_dtype != torch.float32 or dtype != torch.float32:
        return False
    if any(o.get("list") for o in opts.pass_options.values() if isinstance(o, dict)):
        return False  # an inspection: nothing is compared
    return all(registry.get(name, "torch").preserves_function for name in passes)
