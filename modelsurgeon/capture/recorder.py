"""Record the real execution of a model into a :class:`DataflowGraph`.

No tracing and no symbolic execution: the model runs on the example input exactly as it would
anyway (data-dependent ``if``/loops, ``float(tensor)`` and all), while a
``TorchFunctionMode`` sees every torch function / tensor method / ``torch.nn.functional`` call
and global module hooks see every module call. Nothing is attached to the model: the hooks are
global and removed on exit, so the model pickles exactly as before.

Tensors are identified by object identity through weak references, so activations are freed as
usual during the recording: memory stays that of a plain forward.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from .graph import DataflowGraph, ModuleCall, OpEvent, Ref

CONST_KEEP_NUMEL = 1 << 16
"""Derived constants up to this many elements are kept for the passes to read."""

_METADATA = frozenset(
    {
        "size", "dim", "ndimension", "numel", "nelement", "__len__", "stride", "is_contiguous",
        "storage_offset", "element_size", "get_device", "is_floating_point", "is_complex",
        "data_ptr", "__hash__", "untyped_storage", "_is_view", "is_set_to", "has_names",
        "is_inference", "is_signed", "__reduce_ex__", "__deepcopy__", "_typed_storage",
        "requires_grad_", "retain_grad", "register_hook", "_version",
    }
)
_METADATA_PROPS = frozenset(
    {
        "shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout", "is_quantized",
        "is_meta", "is_sparse", "names", "grad_fn", "is_leaf", "is_mkldnn", "is_nested",
        "output_nr", "_base", "itemsize", "nbytes", "is_cpu", "_cdata", "is_xpu", "is_mps",
    }
)
_INPLACE_DUNDERS = frozenset(
    {
        "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
        "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
        "__setitem__",
    }
)
_RANDOM = frozenset(
    {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "normal",
     "bernoulli", "multinomial", "randperm", "uniform_", "normal_", "dropout", "feature_dropout"}
)


def op_name(func: Callable) -> str:
    """A stable name: ``conv2d``, ``batch_norm``, ``Tensor.__getitem__``, ``Tensor.shape``."""
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # property getter of a tensor attribute
        owner = getattr(func, "__self__", None)
        return "Tensor." + getattr(owner, "__name__", "?")
    qual = getattr(func, "__qualname__", "") or ""
    if qual.startswith(("TensorBase.", "Tensor.", "_TensorBase.")):
        return "Tensor." + name
    return name


def _flatten(obj: Any, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flatten(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flatten(o, out)


def flatten_tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _flatten(obj, out)
    return out


class Recorder(TorchFunctionMode):
    """Context manager: ``with Recorder(model) as rec: out = model(*inputs)``; then ``rec.graph``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.graph = DataflowGraph()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self._stack: list[int] = []
        self._handles: list[Any] = []
        self._paths: dict[int, str] = {}
        g = self.graph
        for path, mod in model.named_modules(remove_duplicate=False):
            g.module_paths.setdefault(id(mod), []).append(path)
            self._paths.setdefault(id(mod), path)
        for name, p in _named_tensors(model):
            if id(p) in g._param_values:
                continue
            kind = "param" if isinstance(p, torch.nn.Parameter) else "buffer"
            v = g._new_value(kind=kind, shape=tuple(p.shape), dtype=p.dtype, const=True,
                             name=name, tensor=p)
            g._param_values[id(p)] = v.id
            self._bind(p, v.id)

    # -- tensor identity ---------------------------------------------------------------------
    def _bind(self, t: torch.Tensor, vid: int) -> None:
        try:
            ref = weakref.ref(t)
        except TypeError:  # pragma: no cover - every torch.Tensor supports weakrefs
            return
        self._live[id(t)] = (ref, vid)

    def _lookup(self, t: torch.Tensor) -> int | None:
        hit = self._live.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        return None

    def value_of(self, t: torch.Tensor, kind: str = "attr") -> int:
        """The current value id of tensor ``t``, registering it if never seen."""
        vid = self._lookup(t)
        if vid is None:
            const = kind == "attr"
            v = self.graph._new_value(kind=kind, shape=tuple(t.shape), dtype=t.dtype, const=const,
                                      tensor=t.detach() if const and t.numel() <= CONST_KEEP_NUMEL else None)
            vid = v.id
            self._bind(t, vid)
        return vid

    def _replace(self, obj: Any, inputs: list[int]) -> Any:
        if isinstance(obj, torch.Tensor):
            vid = self.value_of(obj)
            inputs.append(vid)
            return Ref(vid)
        if isinstance(obj, tuple):
            return tuple(self._replace(o, inputs) for o in obj)
        if isinstance(obj, list):
            return [self._replace(o, inputs) for o in obj]
        if isinstance(obj, dict):
            return {k: self._replace(o, inputs) for k, o in obj.items()}
        return obj

    # -- op recording ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._record(func, args, kwargs, out)
        except Exception:  # pragma: no cover - recording must never change the model's result
            pass
        return out

    def _record(self, func: Callable, args: tuple, kwargs: dict, out: Any) -> None:
        name = op_name(func)
        short = name[7:] if name.startswith("Tensor.") else name
        if short in _METADATA or (name.startswith("Tensor.") and short in _METADATA_PROPS):
            return
        if not self._stack:  # outside the model call (e.g. building inputs)
            return
        g = self.graph
        inputs: list[int] = []
        rargs = self._replace(tuple(args), inputs)
        rkwargs = self._replace(dict(kwargs), inputs)
        if not inputs and not isinstance(out, torch.Tensor) and not flatten_tensors(out):
            return
        const = all(g.values[i].const for i in inputs) and short not in _RANDOM
        eid = len(g.events)
        outs: list[int] = []
        in_ids = {id(a) for a in flatten_tensors(args)} | {id(a) for a in flatten_tensors(kwargs)}
        mutated: list[torch.Tensor] = []
        if short in _INPLACE_DUNDERS or (short.endswith("_") and not short.startswith("_")):
            if args and isinstance(args[0], torch.Tensor):
                mutated.append(args[0])
        if isinstance(kwargs.get("out"), torch.Tensor):
            mutated.append(kwargs["out"])
        inplace = bool(mutated)
        results = flatten_tensors(out)
        for t in results:
            if id(t) in in_ids and not any(t is m for m in mutated):
                mutated.append(t)  # returned an input object: an in-place update (or a no-op)
                inplace = True
        for t in mutated:
            prev = self._lookup(t)
            v = g._new_value(kind="op", shape=tuple(t.shape), dtype=t.dtype, producer=eid,
                             version_of=prev, const=const and (prev is None or g.values[prev].const))
            if v.const and t.numel() <= CONST_KEEP_NUMEL:
                v.tensor = t.detach().clone()
            self._bind(t, v.id)
            outs.append(v.id)
        for t in results:
            if any(t is m for m in mutated):
                continue
            v = g._new_value(kind="op", shape=tuple(t.shape), dtype=t.dtype, producer=eid,
                             const=const)
            if const and t.numel() <= CONST_KEEP_NUMEL:
                v.tensor = t.detach()
            self._bind(t, v.id)
            outs.append(v.id)
        g.events.append(
            OpEvent(id=eid, name=name, func=func, args=rargs, kwargs=rkwargs, inputs=tuple(inputs),
                    outputs=tuple(outs), scope=self._stack[-1], inplace=inplace)
        )

    # -- module calls ------------------------------------------------------------------------
    def _pre_hook(self, module: torch.nn.Module, args: tuple) -> None:
        g = self.graph
        cid = len(g.calls)
        parent = self._stack[-1] if self._stack else None
        kind = "input" if parent is None else "attr"
        ins = tuple(self.value_of(t, kind=kind) for t in flatten_tensors(args))
        if parent is None:
            g.inputs = list(ins)
        path = self._paths.get(id(module), f"<unregistered {type(module).__name__}>")
        call = ModuleCall(id=cid, path=path, module=module, parent=parent, inputs=ins,
                          start=len(g.events))
        g.calls.append(call)
        if parent is not None:
            g.calls[parent].children.append(cid)
        self._stack.append(cid)

    def _post_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._stack:
            return
        g = self.graph
        cid = self._stack.pop()
        call = g.calls[cid]
        call.end = len(g.events)
        # global pre-hooks cannot take kwargs, global forward hooks can: how the module was called
        call.arg_count, call.kwarg_names = len(args), tuple(kwargs)
        call.outputs = tuple(self.value_of(t, kind="opaque") for t in flatten_tensors(output))
        if not self._stack:
            g.outputs = list(call.outputs)
            g.output_structure = _structure(output)
        g._invalidate()

    def __enter__(self):
        self._handles = [
            torch.nn.modules.module.register_module_forward_pre_hook(self._pre_hook),
            torch.nn.modules.module.register_module_forward_hook(self._post_hook, with_kwargs=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        # torch's handle forgets the with_kwargs flag of a global forward hook: drop it too, or
        # every capture would leave an entry behind (torch.compile then warns about global hooks)
        flags = getattr(torch.nn.modules.module, "_global_forward_hooks_with_kwargs", {})
        for h in self._handles:
            h.remove()
            flags.pop(h.id, None)
        self._handles = []
        self._live.clear()
        self.graph._invalidate()
        return super().__exit__(*exc)


def _named_tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=True)
    for name, b in model.named_buffers(remove_duplicate=True):
        if b is not None:
            yield name, b


def _structure(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return "tensor"
    if isinstance(obj, (list, tuple)):
        return [_structure(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _structure(v) for k, v in obj.items()}
    return type(obj).__name__
