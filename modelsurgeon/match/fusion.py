"""Recognise feature-fusion modules: weighted sums of several inputs, whatever their code.

Details: docs/architecture.md (*fold-fusion, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.graph import VIEW_OPS, DataflowGraph, ModuleCall, Ref
from ..report.codes import Refusal
from . import dims
from .affine import ADD, DIV, MUL, RSUB, SUB, _cast_module

FUSION_OPS = MUL | DIV | ADD | SUB | RSUB | VIEW_OPS | frozenset({
    "Tensor.__setitem__", "cat", "concat", "concatenate", "stack", "sum", "Tensor.sum", "clone",
    "Tensor.clone", "Tensor.copy_", "zeros_like", "Tensor.new_zeros", "pad", "Tensor.narrow",
    "narrow", "Tensor.to", "Tensor.type_as", "Tensor.float", "Tensor.neg", "neg",
    "Tensor.__neg__",
})
"""Ops a fusion module's data path may consist of (the probe decides what they compute)."""


@dataclass
class Candidate:
    call: ModuleCall
    read: list[int]  # distinct input values read by the fusion, in first-slot order
    slots: dict[int, list[int]]  # value id -> positions among the call's flattened inputs
    out_value: int  # the fused value (the module output, or the chain's input)
    chain: list[ModuleCall] = field(default_factory=list)  # child modules applied after the sum
    computed: bool = False  # does the forward compute anything from parameters alone?
    multiplies: int = 0  # constant multiplies in its data path


@dataclass
class Probe:
    out_channels: int
    coefficients: list[Any]  # per read value: float64 vector over the n_i channels it reaches
    bias: Any  # float64 vector over C_out channels, or None
    offsets: list[int] = field(default_factory=list)  # per read value: the output channel its channel 0 lands on


SIZE_DEPENDENT = "size-dependent"
"""The code :func:`probe` gives when the module is a weighted sum at the recorded input size
only: its weights must then not move, not even as inline ones."""


class NotFusion(Exception):
    """Probing showed the module is not a per-channel weighted sum."""


def candidate(g: DataflowGraph, call: ModuleCall, home: str | None = None) -> Candidate | Refusal | None:
    """A fusion candidate; a reason when it is a weighted sum that cannot be replaced; ``None``
    when it is no weighted sum at all. ``home``: the path its trailing children must be under
    (its own by default; the served module's for a generated forward)."""
    if call.parent is None:
        return None
    direct = list(g.events_in(call, direct=True))
    active = [e for e in direct if g.reads_variable(e)]
    if not active or any(e.name not in FUSION_OPS for e in active):
        return None
    weighted = [e for e in active if e.name in MUL | DIV and any(
        isinstance(a, Ref) and g.value(a.value).const for a in e.args[:2])]
    inputs = set(call.inputs)
    read = [v for v in dict.fromkeys(call.inputs) if any(v in e.inputs for e in active)]
    if not weighted or len(read) < 2:
        return None
    path = call.path if home is None else home
    n = g.call_count(call.module)
    if n > 1:
        return Refusal("shared-module", f"it is called {n} times (a shared module)")
    if len(call.outputs) != 1:
        return Refusal("layer-settings", f"it returns {len(call.outputs)} tensors")
    chain, const_children = [], []
    for cid in call.children:
        child = g.call(cid)
        if any(g.reads_variable(e) for e in g.events_in(child)):
            chain.append(child)
        else:
            const_children.append(child)
    last = max(e.id for e in active)
    if chain:
        cur = chain[0].inputs[0] if len(chain[0].inputs) == 1 else None
        out_value = cur
        for child in chain:
            if child.inputs != (cur,) or len(child.outputs) != 1 or child.start <= last:
                return Refusal("not-a-pattern", "its forward mixes child modules into its weighted sum")
            if not child.path.startswith(path + ".") or g.call_count(child.module) != 1:
                return Refusal("outside", f"it calls a module that is not its own child or is shared ({child.path})")
            cur = child.outputs[0]
        if call.outputs != (cur,) or len({id(c.module) for c in chain}) != len(chain):
            return Refusal("not-a-pattern", "its forward mixes child modules into its weighted sum")
    else:
        out_value = call.outputs[0]
    if out_value is None or g.producer(out_value) is None or g.producer(out_value).id not in {e.id for e in active}:
        return Refusal("not-a-pattern", "it does not compute its output from its inputs")
    produced = {o for e in active for o in e.outputs}
    for e in active:
        for i in e.inputs:
            if not g.value(i).const and i not in inputs and i not in produced:
                return Refusal("outside", "it reads a tensor that is not among its arguments")
    # no in-place update of an input (or of a view of one): the caller would see it
    views = set(inputs)
    for e in direct:
        if e.name in VIEW_OPS and e.inputs and e.inputs[0] in views:
            views.update(e.outputs)
        if e.inplace and any(g.value(o).version_of in views for o in e.outputs):
            return Refusal("not-a-pattern", "it modifies one of its inputs in place")
    out = g.value(out_value).shape
    if out is None or len(out) < 2:
        return Refusal("other-axis", "its output has no channel axis")
    for v in read:
        s = g.value(v).shape
        if s is None or len(s) != len(out) or s[0] != out[0] or s[2:] != out[2:]:
            return Refusal("not-a-pattern", "its inputs differ from its output in more than the channel count")
        if not (g.value(v).dtype is not None and g.value(v).dtype.is_floating_point):
            return Refusal("not-a-pattern", "it sums non-floating tensors")
    slots: dict[int, list[int]] = {}
    for k, v in enumerate(call.inputs):
        slots.setdefault(v, []).append(k)
    computed = any(not g.reads_variable(e) for e in g.events_in(call))
    return Candidate(call, read, slots, out_value, chain, computed, len(weighted))


# --------------------------------------------------------------------------------------------
# call arguments


@dataclass(frozen=True)
class Slot:
    index: int  # position among the call's flattened tensor inputs


@dataclass
class CallArgs:
    args: Any  # the positional arguments, tensors replaced by Slot
    kwargs: dict
    paths: list[tuple]  # access path of each slot: (arg index, key, key...)
    kw_tensors: bool = False


def _skeleton(obj: Any, path: tuple, paths: list) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        paths.append(path)
        return Slot(len(paths) - 1)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_skeleton(o, path + (i,), paths) for i, o in enumerate(obj)))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_skeleton(o, path + (i,), paths) for i, o in enumerate(obj))
    if isinstance(obj, dict):
        return {k: _skeleton(o, path + (k,), paths) for k, o in obj.items()}
    return obj


def record_args(model: Any, inputs: list, modules: list) -> dict[int, CallArgs]:
    """Run the model once; the argument structure of each module's first call, by ``id``."""
    import torch

    from ..capture.recorder import flatten_tensors

    found: dict[int, CallArgs] = {}
    handles = []

    def hook(mod, args, kwargs):
        if id(mod) in found:
            return None
        paths: list = []
        skel = tuple(_skeleton(a, (i,), paths) for i, a in enumerate(args))
        found[id(mod)] = CallArgs(skel, dict(kwargs), paths, bool(flatten_tensors(kwargs)))
        return None

    try:
        for m in {id(m): m for m in modules}.values():
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return found


# --------------------------------------------------------------------------------------------
# probing


class _Stop(Exception):
    pass


def probe(module: Any, call_args: CallArgs, slot_shapes: list, groups: list[list[int]], out_shape: tuple,
          stop_at: Any = None, seed: int = 0) -> Probe | Refusal:
    """What the weighted sum computes; ``groups`` are the slots of each read value (aliases get
    the same tensor); ``stop_at`` is the first module of a chain after the sum (its input is
    the sum)."""
    import torch

    last = Refusal("not-affine", "probing it failed")
    for dtype in (torch.float64, torch.float32):
        try:
            return _probe(module, call_args, slot_shapes, groups, out_shape, stop_at, dtype, seed)
        except NotFusion as e:
            why = e.args[0] if e.args else ""
            return why if isinstance(why, Refusal) else Refusal("not-a-pattern", str(e))
        except Exception as e:  # e.g. a forward that creates float32 tensors: retry in float32
            last = Refusal("not-affine", f"probing it failed ({type(e).__name__})")
    return last


def _probe(module, call_args, slot_shapes, groups, out_shape, stop_at, dtype, seed) -> Probe:
    import torch

    tol = 1e-9 if dtype == torch.float64 else 2e-5
    restore = _cast_module(module, dtype) if dtype == torch.float64 else None
    zeros: dict[int, Any] = {}
    try:
        def run(feed: dict[int, Any], expect: tuple = tuple(out_shape)):
            def fill(o):
                if isinstance(o, Slot):
                    t = feed.get(o.index)
                    if t is None:
                        shape, dt = slot_shapes[o.index]
                        if o.index not in zeros:
                            zeros[o.index] = torch.zeros(shape, dtype=dtype if dt.is_floating_point else dt)
                        t = zeros[o.index]
                    return t
                if isinstance(o, tuple) and hasattr(o, "_fields"):
                    return type(o)(*(fill(i) for i in o))
                if isinstance(o, (list, tuple)):
                    return type(o)(fill(i) for i in o)
                if isinstance(o, dict):
                    return {k: fill(v) for k, v in o.items()}
                return o

            args, kwargs = fill(call_args.args), fill(call_args.kwargs)
            stash: list = []
            handle = None
            if stop_at is not None:
                def pre(_mod, a):
                    stash.append(a[0])
                    raise _Stop
                handle = stop_at.register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    y = module(*args, **kwargs)
            except _Stop:
                y = stash[0]
            finally:
                if handle is not None:
                    handle.remove()
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != expect:
                raise NotFusion("it does not return one tensor of the expected shape")
            return y.detach().to(torch.float64)

        c_out = out_shape[1]
        b_full = run({})
        scale = max(1.0, float(b_full.abs().max()))
        bias = _per_channel(b_full, tol * 10 * scale, "constant term")
        coefficients, offsets = [], []
        for slots in groups:
            shape = slot_shapes[slots[0]][0]
            ones = torch.ones(shape, dtype=dtype)
            y = run({k: ones for k in slots}) - b_full
            k = _per_channel(y, tol * 10 * max(1.0, float(y.abs().max())), "weight")
            reached = torch.nonzero(k.abs() > tol * 10).flatten()
            o = 0
            if reached.numel() and int(reached.max()) >= min(shape[1], c_out):  # not a prefix: where from?
                view = [1, -1] + [1] * (len(shape) - 2)
                index = torch.arange(1, shape[1] + 1, dtype=dtype).view(view).expand(shape).contiguous()
                yi = _per_channel(run({k_: index for k_ in slots}) - b_full, tol * 10 * shape[1] * max(
                    1.0, float(k.abs().max())), "weight")
                source = yi[reached] / k[reached] - 1
                offset = reached.to(torch.float64) - source
                o = int(round(float(offset[0])))
                if float((offset - o).abs().max()) > 1e-3 or o < 0:
                    raise NotFusion("its inputs' channels are rearranged, not placed one after another")
            n = min(shape[1], c_out - o)
            outside = torch.cat([k[:o], k[o + n:]])
            if n <= 0 or bool((outside.abs() > tol * 10).any()):
                raise NotFusion("its inputs' channels are rearranged, not placed one after another")
            coefficients.append(k[o:o + n].clone())
            offsets.append(o)
        g = torch.Generator().manual_seed(seed)
        # two random trials at the recorded size, then at other spatial sizes, larger and smaller
        # (the replacement serves every size: a forward behaving differently there -- a branch
        # on the input size -- must not be replaced)
        spatial = list(out_shape[2:])
        sizes = [None, None] + _other_sizes(spatial)
        for trial, size in enumerate(sizes):
            other = size is not None
            xs = [(torch.randn(_resized(slot_shapes[s[0]][0], size), generator=g,
                               dtype=torch.float64) * 3 + 0.5).to(dtype) for s in groups]
            expect = _resized(out_shape, size)
            try:
                y = run({k: x for s, x in zip(groups, xs) for k in s}, expect)
            except NotFusion:
                if other:
                    raise NotFusion(_size_dependent(size))
                raise
            except Exception:
                if other:  # it cannot run at that size at all: neither can the original model
                    continue
                raise
            pred = b_full.clone() if not other else _grown(b_full, expect)
            for x, k, o in zip(xs, coefficients, offsets):
                c = k.numel()
                view = [1, c] + [1] * (x.dim() - 2)
                pred[:, o:o + c] += x[:, :c].to(torch.float64) * k.view(view)
            err = float((y - pred).abs().max()) if y.numel() else 0.0
            if not bool(torch.isfinite(y).all()) or err > tol * 10 * max(1.0, float(y.abs().max())):
                raise NotFusion(_size_dependent(size) if other else
                                "it is not a per-channel weighted sum of its inputs")
        has_bias = bool((bias.abs() > 0).any())
        return Probe(c_out, coefficients, bias if has_bias else None, offsets)
    finally:
        if restore is not None:
            restore()


def _other_sizes(spatial: list[int]) -> list[list[int]]:
    """Spatial sizes to probe besides the recorded one: one pixel larger, one pixel smaller and
    half the size (those the input allows: every side at least 1), each once."""
    out: list[list[int]] = []
    for cand in ([d + 1 for d in spatial], [d - 1 for d in spatial], [d // 2 for d in spatial]):
        if cand and all(d >= 1 for d in cand) and cand != spatial and cand not in out:
            out.append(cand)
    return out


def _resized(shape: tuple, spatial: list[int] | None) -> tuple:
    return tuple(shape) if spatial is None else tuple(shape[:2]) + tuple(spatial)


def _size_dependent(spatial: list[int]) -> Refusal:
    return Refusal(SIZE_DEPENDENT, f"it behaves differently at other input sizes (at {dims(spatial)})")


def _grown(b_full: Any, shape: tuple) -> Any:
    """The (per-channel constant) term at another spatial size."""
    per = b_full.movedim(1, -1).reshape(-1, b_full.shape[1])[0]
    return per.view([1, -1] + [1] * (len(shape) - 2)).expand(shape).clone()


def _per_channel(y: Any, tol: float, what: str) -> Any:
    import torch

    per = y.movedim(1, 0).reshape(y.shape[1], -1)
    if not bool(torch.isfinite(per).all()):
        raise NotFusion(f"its {what} is not finite")
    ref = per[:, :1]
    if per.numel() and float((per - ref).abs().max()) > tol:
        raise NotFusion(f"its {what} varies within a channel (not per-channel)")
    return ref[:, 0].clone()
