"""fold-fusion on PyTorch models: evaluate fusion weights once and move them into the convs.

Details: docs/architecture.md (*fold-fusion, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import DataflowGraph
from ...match.absorb import Absorber, describe_use, describe_value, find_absorber
from ...match.calls import read_outside
from ...match.fusion import Candidate, candidate, probe, record_args
from ...report.codes import Refusal
from ...rewrite import weighted_sum
from ..base import Applied, Match, Pass, Skipped, TorchContext
from .inline import ForwardFusion, InlineFusion, _fmt, _values, inline_matches, rewrite_forward, rewrite_inline


@dataclass
class Term:
    value: int
    desc: str
    channels: int
    scale: Any  # float64 weight over min(channels, C_out) channels
    absorber: Absorber | None = None
    reason: str | None = None  # why the weight stays a multiply
    code: str | None = None  # its stable code (report/codes.py)
    path: tuple = ()  # where the module reads it among its arguments
    offset: int = 0  # output channel its channel 0 lands on (concatenation)

    @property
    def one(self) -> bool:
        return bool((self.scale == 1).all())

    @property
    def kept(self) -> bool:
        return self.absorber is None and not self.one


@dataclass
class ModuleFusion(Match):
    cand: Candidate = None
    terms: list[Term] = field(default_factory=list)
    out_channels: int = 0
    bias: Any = None
    bias_term: int | None = None  # index of the term whose layer absorbs the bias
    args: list = field(default_factory=list)
    varargs: str | None = None
    dtype: Any = None
    ndim: int = 4
    layout: str = "sum"  # "sum" | "cat"
    owner: Any = None  # the module whose forward becomes the generated one; None: replace `module` as a whole
    forward_name: str = ""  # the generated forward's submodule name in `owner`
    remove: list = field(default_factory=list)  # what `owner` loses: its parameters, buffers, submodules run
    home: str = ""  # the path the trailing children are named relative to
    bound: bool = True  # False: regenerating an unbound forward of an earlier version (children inside it)


class FoldFusion(Pass):
    name = "fold-fusion"

    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        g: DataflowGraph = ctx.graph
        cands: list[Candidate] = []
        refused: dict[int, Refusal] = {}  # call id -> why the module as a whole is not rewritten
        for call in g.calls:
            if any(call.start >= c.call.start and call.end <= c.call.end and call is not c.call for c in cands):
                continue
            parent = g.call(call.parent) if call.parent is not None else None
            bound = parent is not None and weighted_sum.generated_forward(parent.module) is call.module \
                and vars(parent.module).get("forward") is not call.module  # a bound generated forward
            c = candidate(g, call, parent.path if bound else None)
            if isinstance(c, Candidate):
                cands.append(c)
            elif isinstance(c, Refusal):
                refused[call.id] = c
        replaced: set[int] = set()  # calls handled as a whole (their multiplies are not inline terms)
        if cands:
            recorded = record_args(ctx.model, ctx.inputs, [c.call.module for c in cands])
            for c in cands:
                m = self._module_match(g, c, recorded.get(id(c.call.module)))
                if isinstance(m, Refusal):
                    refused[c.call.id] = m
                    continue
                replaced.add(c.call.id)
                if m is not None:
                    yield m
        reported: set[int] = set()
        yield from inline_matches(ctx, replaced, refused, reported)
        for cid, reason in refused.items():  # weighted sums nothing else said anything about
            if cid not in reported:
                yield Skipped(g.call(cid).path, reason)

    # -- fusion modules --------------------------------------------------------------------
    def _module_match(self, g: DataflowGraph, c: Candidate, call_args) -> ModuleFusion | Skipped | Refusal | None:
        """A match; a Skipped (replaceable but nothing to gain); ``None`` (one of ours, already
        done); or why the module cannot be rewritten as a whole (then its multiplies are
        looked at as inline ones)."""
        import torch

        call, module = c.call, c.call.module
        parent = g.call(call.parent) if call.parent is not None else None
        ours = weighted_sum.is_generated(module, parent.module if parent is not None else None)
        if call_args is None:
            return Refusal("not-reproduced", "it was not called again on the same inputs")
        if call_args.kw_tensors:
            return Refusal("call-arguments", "it receives tensors as keyword arguments")
        if len(call_args.paths) != len(call.inputs):
            return Refusal("not-reproduced", "its arguments changed between two runs")
        bound = parent is not None and call_args.args and call_args.args[0] is parent.module  # (owner, *args)
        sig = weighted_sum.signature_spec(parent.module if bound else module, len(call_args.args) - bound,
                                          tuple(call_args.kwargs))
        if isinstance(sig, Refusal):
            return sig
        out_shape = g.value(c.out_value).shape
        slot_shapes = [(g.value(v).shape, g.value(v).dtype) for v in call.inputs]
        groups = [c.slots[v] for v in c.read]
        p = probe(module, call_args, slot_shapes, groups, out_shape,
                  stop_at=c.chain[0].module if c.chain else None)
        if isinstance(p, Refusal):
            return p
        allowed = {e.id for e in g.events_in(call, direct=True)}
        terms = []
        layout = _layout(p, [g.value(v).shape[1] for v in c.read])
        if layout is None:
            return Refusal("not-a-pattern", "its inputs overlap in some channels and not in others (neither a sum nor a concatenation)")
        for v, k, o in zip(c.read, p.coefficients, p.offsets):
            t = Term(v, describe_value(g, v, call), g.value(v).shape[1], k, path=_shift(call_args.paths[c.slots[v][0]], bound), offset=o)
            if not t.one:
                full = torch.ones(t.channels, dtype=torch.float64)
                full[:k.numel()] = k
                a = find_absorber(g, v, full, allowed)
                if isinstance(a, Refusal):
                    t.reason, t.code = a.reason, a.code
                else:
                    t.absorber = a
            terms.append(t)
        bias_term = None
        if p.bias is not None:
            for i, t in enumerate(terms):
                if t.absorber is not None and t.absorber.can_shift() and t.channels >= p.out_channels:
                    bias_term = i
                    break
                if t.one and t.channels >= p.out_channels:  # a plain input: its layer may take the bias
                    a = find_absorber(g, t.value, torch.ones(t.channels, dtype=torch.float64), allowed)
                    if isinstance(a, Absorber) and a.can_shift():
                        t.absorber, bias_term = a, i
                        break
        absorbed = any(t.absorber is not None for t in terms)
        kept = sum(1 for t in terms if t.kept)
        if not (c.computed or absorbed or kept < c.multiplies):
            if ours:
                return None
            why = "; ".join(f"{t.desc}: {t.reason}" for t in terms if t.reason)
            return Skipped(call.path, f"its weights are plain parameters and no layer can absorb them ({why})",
                           code="not-foldable")
        args, varargs = sig
        dtype = g.value(c.out_value).dtype
        target, owner, name, remove, bound = _owner(g, call, parent, c.chain)
        why = _kept_elsewhere(g, owner, remove, call, target)
        if why is not None:
            return why
        return ModuleFusion(target=target, cand=c, terms=terms, out_channels=p.out_channels, bias=p.bias,
                            bias_term=bias_term, args=args, varargs=varargs, dtype=dtype, ndim=len(out_shape),
                            layout=layout, owner=owner, forward_name=name, remove=remove,
                            home=target if bound else call.path, bound=bound)

    # -- rewriting -------------------------------------------------------------------------
    def rewrite(self, ctx: TorchContext, m: Match) -> Applied | Skipped:
        if isinstance(m, InlineFusion):
            return rewrite_inline(ctx, m)
        if isinstance(m, ForwardFusion):
            return rewrite_forward(ctx, m)
        return self._rewrite_module(ctx, m)

    def _rewrite_module(self, ctx: TorchContext, m: ModuleFusion) -> Applied:
        import torch

        ed = ctx.editor
        c, module = m.cand, m.cand.call.module
        shift = None
        for i, t in enumerate(m.terms):
            if t.absorber is None:
                continue
            full = torch.ones(t.channels, dtype=torch.float64)
            full[:t.scale.numel()] = t.scale
            if i == m.bias_term:
                shift = torch.zeros(t.channels, dtype=torch.float64)
                shift[:m.out_channels] = m.bias
            t.absorber.apply(ed, full, shift if i == m.bias_term else None)
        store = ed.storage.default_dtype if ed.storage is not None else None
        tensors: dict[str, Any] = {}
        spec_terms = []
        for i, t in enumerate(m.terms):
            entry = {"path": list(t.path), "channels": t.channels, "offset": t.offset, "scale": None}
            if t.kept:
                buf = _buffer(t.scale, m.ndim, m.dtype, store)
                tensors[f"weight{i}"] = buf
                entry["scale"] = list(buf.shape)
            spec_terms.append(entry)
        class_name = weighted_sum.GRAPH_CLASS_NAME if m.owner is not None else type(module).__name__
        spec = {"kind": weighted_sum.KIND, "class_name": class_name, "layout": m.layout, "args": m.args,
                "varargs": m.varargs, "out_channels": m.out_channels, "ndim": m.ndim, "terms": spec_terms,
                "bias": None, "children": []}
        if m.bias is not None and m.bias_term is None:
            buf = _buffer(m.bias, m.ndim, m.dtype, store)
            tensors["bias"] = buf
            spec["bias"] = list(buf.shape)
        children = {}
        for child in c.chain:
            rel = child.path[len(m.home) + 1:] if m.home else child.path
            children[rel] = child.module
            spec["children"].append({"name": rel, "module": ed.spec_for(child.module)})
        if m.owner is None:  # a module of an earlier version's format, or one whose forward cannot be set
            ed.replace(module, weighted_sum.build_module(spec, tensors, children), spec)
            where = None
        elif not m.bound:  # an earlier version's unbound forward, its children inside it: as it was
            where = ed.set_forward(m.owner, weighted_sum.build_module(spec, tensors, children), spec, m.forward_name, m.remove)
        else:  # the module's generated forward (the children stay the module's)
            gspec, new = weighted_sum.owner_forward(spec, tensors)
            where = ed.set_forward(m.owner, new, gspec, m.forward_name, m.remove, bind=True)
        shown = m.owner if m.owner is not None else module
        return Applied(m.target, _module_detail(shown, m, where), _module_data(shown, m, where))


# --------------------------------------------------------------------------------------------
# helpers


def _owner(g: DataflowGraph, call: Any, parent: Any, chain: list) -> tuple[str, Any, str, list[str], bool]:
    """Where the generated sum goes: ``(target, owner, name, remove, bound)``.

    A fusion module keeps its object and runs the generated module as its forward (``owner`` is
    the module itself; it loses its parameters and buffers -- what they computed is folded or
    the generated module's constants -- and the submodules its forward ran but the trailing
    ones the sum leads to). A generated forward found again (a later round: a weight it kept
    can move now) is regenerated in the module it serves (``owner`` is that one, the target its
    path; an earlier version's unbound one, holding the trailing children, as it was: ``bound``
    false). A module written by an earlier version (the generated module in place of the fusion
    module) or one whose instance ``forward`` would not survive pickling is replaced as a whole
    (``owner`` is ``None``)."""
    module = call.module
    if parent is not None and weighted_sum.generated_forward(parent.module) is module:
        name = next(n for n, m in parent.module._modules.items() if m is module)
        return parent.path, parent.module, name, [name], vars(parent.module).get("forward") is not module
    if weighted_sum.is_generated(module) or not weighted_sum.can_take_forward(module):
        return call.path, None, "", [], False
    ran = {id(k.module) for k in g.calls if k is not call and call.start <= k.start and k.end <= call.end}
    stay = {k.path[len(call.path) + 1:].split(".")[0] for k in chain}
    remove = list(module._parameters) + list(module._buffers)
    for n, child in module._modules.items():
        if child is not None and n not in stay and any(id(s) in ran for s in child.modules()):
            remove.append(n)
    return call.path, module, weighted_sum.free_name(module, remove), remove, True


def _kept_elsewhere(g: DataflowGraph, owner: Any, remove: list[str], call: Any, target: str) -> Refusal | None:
    """Why ``owner`` cannot lose what ``remove`` names: an op outside the fusion module's call
    reads one of those parameters / buffers (one of a removed submodule's included), or the
    host calls a removed submodule outside it (its forward would no longer find them)."""
    if owner is None:
        return None
    tensors, subs = [], []
    for n in remove:
        sub = owner._modules.get(n)
        if sub is not None:
            subs.append((n, sub))
            tensors += [(f"{n}.{k}", t) for k, t in list(sub.named_parameters()) + list(sub.named_buffers())]
        else:
            tensors.append((n, owner._parameters.get(n, owner._buffers.get(n))))
    where = f"{target}." if target else ""
    found = read_outside(g, tensors, call)
    if found is not None:
        name, e = found
        return Refusal("read-outside", f"{where}{name} is also read outside its forward (by {describe_use(g, e)}), "
                       "so it cannot be removed with the module's own computation")
    for n, sub in subs:
        for m in sub.modules():
            outside = [c for c in g.calls_of(m) if not (call.start <= c.start and c.end <= call.end)]
            if outside:
                return Refusal("read-outside", f"{where}{n} is also called outside its forward "
                               f"({outside[0].path or 'the model'}), so it cannot be removed with the module's own computation")
    return None


def _shift(path: tuple, bound: bool) -> tuple:
    """An argument path of a bound generated forward's call, as the module it serves takes it."""
    return (path[0] - 1,) + tuple(path[1:]) if bound else tuple(path)


def _layout(p: Any, channels: list[int]) -> Refusal | None:
    """"sum" when every input starts at channel 0; "cat" when whole inputs follow one another
    and fill the output; ``None`` otherwise."""
    if not any(p.offsets):
        return "sum"
    pos = 0
    for o, k, c in sorted(zip(p.offsets, p.coefficients, channels), key=lambda t: t[0]):
        if o != pos or k.numel() != c:
            return None
        pos += c
    return "cat" if pos == p.out_channels else None


def _buffer(vec: Any, ndim: int, dtype: Any, store: Any) -> Any:
    """A constant for the replacement: a 0-d tensor if all channels share one value, else
    ``(1, C, 1, ...)``; rounded to the dtype it will be saved in."""
    import torch

    v = vec.to(torch.float64)
    t = v[0].clone() if bool((v == v[0]).all()) else v.view([1, -1] + [1] * (ndim - 2))
    if store is not None and store != dtype:
        t = t.to(store)
    return t.to(dtype).contiguous()


def _module_detail(module: Any, m: ModuleFusion, where: str | None) -> str:
    weights = ", ".join(_fmt(t.scale) for t in m.terms)
    what = "concatenation" if m.layout == "cat" else "sum"
    parts = [f"{type(module).__name__}: weighted {what} of {len(m.terms)} inputs, weights [{weights}]"]
    moved = [f"{t.desc} → {t.absorber.describe()}" for t in m.terms if t.absorber is not None and not t.one]
    if moved:
        parts.append("absorbed: " + ", ".join(moved))
    kept = [f"{t.desc} ({t.reason})" for t in m.terms if t.kept]
    if kept:
        parts.append("multiply kept: " + ", ".join(kept))
    if m.bias is not None:
        parts.append("constant term " + (f"→ {m.terms[m.bias_term].absorber.describe()}" if m.bias_term is not None else "kept"))
    if m.cand.chain:
        parts.append("then " + " → ".join(type(c.module).__name__ for c in m.cand.chain))
    parts.append(f"forward → generated {what} {where}" if where is not None else
                 f"replaced by a generated {what} (torch.fx.GraphModule)")
    return "; ".join(parts)


def _module_data(module: Any, m: ModuleFusion, where: str | None) -> dict:
    return {
        "kind": "module",
        "module": type(module).__name__,
        "layout": m.layout,
        "out_channels": m.out_channels,
        "inputs": [{
            "input": t.desc,
            "channels": t.channels,
            **({"offset": t.offset} if m.layout == "cat" else {}),
            "weight": _values(t.scale),
            "absorbed_by": t.absorber.path if t.absorber is not None and not t.one else None,
            "conv": t.absorber.conv if t.absorber is not None and not t.one else None,
            "through": t.absorber.through if t.absorber is not None and not t.one else [],
            "kept": t.kept,
            **({"reason": t.reason, "code": t.code} if t.kept else {}),
        } for t in m.terms],
        "bias": None if m.bias is None else {
            "values": _values(m.bias),
            "absorbed_by": m.terms[m.bias_term].absorber.path if m.bias_term is not None else None},
        # the generated torch.fx.GraphModule the module now runs as its forward (its path)...
        "forward": where,
        # ...or, for a module written by an earlier version, what replaced it as a whole
        "replaced_by": "torch.fx.GraphModule" if where is None else None,
        # the trailing child modules, where they are now (the module's own, or, unbound, in the generated one)
        "chain": [f"{where}.{c.path[len(m.home) + 1:]}" if where is not None and not m.bound else c.path
                  for c in m.cand.chain],
    }
