"""fold-fusion on PyTorch models: evaluate fusion weights once and move them into the convs.

Two shapes of the same idea, because a module's Python forward cannot be edited:

* **Fusion modules** (Darknet weighted ``[shortcut]``, BiFPN fast-normalised / softmax /
  sigmoid fusion, a BiFPN node ``conv(act(sum))``...): a module whose forward is a per-channel
  weighted sum of its inputs (recognised by :mod:`modelsurgeon.match.fusion`, weights read by
  probing, so any normalisation is evaluated once, exactly as the module computes it). Each
  input's weight moves into the layer producing that input when nothing else reads it
  (:mod:`modelsurgeon.match.absorb`); the module is kept (its class, its attributes) and its
  forward becomes a generated ``GraphModule`` computing the remaining sum with the same channel
  slicing / zero padding, the weights that could not move kept as its constant buffers, the
  module's trailing child modules moved into it (:mod:`modelsurgeon.rewrite.weighted_sum`).
* **Inline weighted sums** in a host's forward (RFCR: ``self.scale[0] * a + self.scale[1] * b``):
  a constant multiply (``w * x``, ``x * w``) or division (``x / w``; ``w / x`` is no scaling of
  ``x``) whose result is summed with another feature map -- a Python ``sum()`` included, whose
  ``0 + w[0] * x_0`` starts the sum. When the constant is a
  parameter (or a view of one) read only by such multiplies, each weight moves into its
  producing layer and the parameter is set to 1 (the host's multiply stays, by exactly 1).
  A weight computed inline from parameters (``torch.sigmoid(self.w[0]) * x``) cannot be
  neutralised without editing the source: reported as skipped, with the computation.

A weight whose input is also read elsewhere stays one constant multiply. A module that probes
as a weighted sum at the recorded input size but not at other sizes is not rewritten, and its
weights do not move as inline ones either. Inline sums in a host's forward are read from one
recorded forward: what the host computes at other sizes is not seen (README, *Not detected*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import OUTPUT, VIEW_OPS, DataflowGraph, OpEvent, Ref
from ...match.absorb import Absorber, describe_use, describe_value, find_absorber
from ...match.affine import ADD, DIV, MUL, RSUB, SUB, elementwise_affine
from ...match.calls import read_outside
from ...match.conv import unwritable
from ...match.fusion import Candidate, SizeDependent, candidate, probe, record_args
from ...rewrite import weighted_sum
from ..base import Applied, Match, Pass, Skipped, TorchContext


@dataclass
class Term:
    value: int
    desc: str
    channels: int
    scale: Any  # float64 weight over min(channels, C_out) channels
    absorber: Absorber | None = None
    reason: str | None = None  # why the weight stays a multiply
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


@dataclass
class InlineTerm:
    event: OpEvent
    value: int
    desc: str
    scale: Any
    root: int  # event id of the sum this term belongs to
    host: str
    target: str = ""
    param: Any = None  # Value of the parameter the weight is a view of
    absorber: Absorber | None = None
    reason: str | None = None

    @property
    def one(self) -> bool:
        return bool((self.scale == 1).all())


@dataclass
class InlineFusion(Match):
    terms: list[InlineTerm] = field(default_factory=list)
    params: list = field(default_factory=list)  # Values set to 1


class FoldFusion(Pass):
    name = "fold-fusion"

    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        g: DataflowGraph = ctx.graph
        cands: list[Candidate] = []
        refused: dict[int, str] = {}  # call id -> why the module as a whole is not rewritten
        for call in g.calls:
            if any(call.start >= c.call.start and call.end <= c.call.end and call is not c.call for c in cands):
                continue
            c = candidate(g, call)
            if isinstance(c, Candidate):
                cands.append(c)
            elif isinstance(c, str):
                refused[call.id] = c
        replaced: set[int] = set()  # calls handled as a whole (their multiplies are not inline terms)
        if cands:
            recorded = record_args(ctx.model, ctx.inputs, [c.call.module for c in cands])
            for c in cands:
                m = self._module_match(g, c, recorded.get(id(c.call.module)))
                if isinstance(m, str):
                    refused[c.call.id] = m
                    continue
                replaced.add(c.call.id)
                if m is not None:
                    yield m
        reported: set[int] = set()
        for item in self._inline(g, replaced, refused, reported):
            yield item
        for cid, reason in refused.items():  # weighted sums nothing else said anything about
            if cid not in reported:
                yield Skipped(g.call(cid).path, reason)

    # -- fusion modules --------------------------------------------------------------------
    def _module_match(self, g: DataflowGraph, c: Candidate, call_args) -> ModuleFusion | Skipped | str | None:
        """A match; a Skipped (replaceable but nothing to gain); ``None`` (one of ours, already
        done); or why the module cannot be rewritten as a whole (then its multiplies are
        looked at as inline ones)."""
        import torch

        call, module = c.call, c.call.module
        parent = g.call(call.parent) if call.parent is not None else None
        ours = weighted_sum.is_generated(module, parent.module if parent is not None else None)
        if call_args is None:
            return "it was not called again on the same inputs"
        if call_args.kw_tensors:
            return "it receives tensors as keyword arguments"
        if len(call_args.paths) != len(call.inputs):
            return "its arguments changed between two runs"
        sig = weighted_sum.signature_spec(module, len(call_args.args), tuple(call_args.kwargs))
        if isinstance(sig, str):
            return sig
        out_shape = g.value(c.out_value).shape
        slot_shapes = [(g.value(v).shape, g.value(v).dtype) for v in call.inputs]
        groups = [c.slots[v] for v in c.read]
        p = probe(module, call_args, slot_shapes, groups, out_shape,
                  stop_at=c.chain[0].module if c.chain else None)
        if isinstance(p, str):
            return p
        allowed = {e.id for e in g.events_in(call, direct=True)}
        terms = []
        layout = _layout(p, [g.value(v).shape[1] for v in c.read])
        if layout is None:
            return "its inputs overlap in some channels and not in others (neither a sum nor a concatenation)"
        for v, k, o in zip(c.read, p.coefficients, p.offsets):
            t = Term(v, describe_value(g, v, call), g.value(v).shape[1], k, path=call_args.paths[c.slots[v][0]], offset=o)
            if not t.one:
                full = torch.ones(t.channels, dtype=torch.float64)
                full[:k.numel()] = k
                a = find_absorber(g, v, full, allowed)
                if isinstance(a, str):
                    t.reason = a
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
            return Skipped(call.path, f"its weights are plain parameters and no layer can absorb them ({why})")
        args, varargs = sig
        dtype = g.value(c.out_value).dtype
        target, owner, name, remove = _owner(g, call, parent)
        why = _kept_elsewhere(g, owner, remove, call, target)
        if why is not None:
            return why
        return ModuleFusion(target=target, cand=c, terms=terms, out_channels=p.out_channels, bias=p.bias,
                            bias_term=bias_term, args=args, varargs=varargs, dtype=dtype, ndim=len(out_shape),
                            layout=layout, owner=owner, forward_name=name, remove=remove)

    # -- inline weighted sums --------------------------------------------------------------
    def _inline(self, g: DataflowGraph, replaced: set[int], refused: dict[int, str],
                reported: set[int]) -> Iterable[Match | Skipped]:
        inside = set()
        for cid in replaced:
            c = g.call(cid)
            inside.update(range(c.start, c.end))
        terms: list[InlineTerm] = []
        for ev in g.events:
            if ev.id in inside or (ev.name not in MUL and ev.name not in DIV):
                continue
            t = _inline_term(g, ev)
            if t is not None:
                terms.append(t)
        if not terms:
            return
        # name each sum: host path + its index among the weighted sums of that host
        roots: dict[str, list[int]] = {}
        for t in terms:
            lst = roots.setdefault(t.host, [])
            if t.root not in lst:
                lst.append(t.root)
        for t in terms:
            lst = roots[t.host]
            host = t.host or "the model"
            t.target = f"{host}: weighted sum" + (f" {lst.index(t.root) + 1}" if len(lst) > 1 else "")
        by_event = {t.event.id: t for t in terms}
        live = [t for t in terms if not t.one]
        # a module that probing showed to be a weighted sum at the recorded size only: its
        # weights do not move as inline ones either (the sum would be wrong at other sizes)
        size_dependent = [(g.call(cid), why) for cid, why in refused.items() if isinstance(why, SizeDependent)]
        for t in live:
            for c, why in size_dependent:
                if c.start <= t.event.id < c.end:
                    t.reason = f"{c.path} is a weighted sum at the recorded input size only ({why})"
                    break
        for t in live:
            if t.reason is not None:
                continue
            operand = _const_operand(g, t.event)
            root = g.const_root(operand) if operand is not None else None
            if root is None:
                t.reason = (f"its weight is computed inline in {t.host or 'the model'}.forward "
                            f"({_computation(g, operand)}); without editing that code the multiply stays")
                continue
            t.param = root
            a = find_absorber(g, t.value, t.scale, {t.event.id})
            if isinstance(a, str):
                t.reason = a
            else:
                t.absorber = a
        # a parameter is set to 1 only if every read of it is a weight that moves (or is 1)
        by_param: dict[int, list[InlineTerm]] = {}
        for t in live:
            if t.param is not None:
                by_param.setdefault(t.param.id, []).append(t)
        for pid, ts in by_param.items():
            pv = g.value(pid)
            problem = None
            if any(w.version_of == pid for w in g.values):
                problem = f"{pv.name} is modified in the forward"
            why = None if problem else unwritable(g, pv.tensor, pv.name)
            if why is not None:
                problem = f"it cannot be set to 1: {why}"
            for e in _view_leaves(g, pid):
                if problem:
                    break
                u = by_event.get(e)
                if u is None:
                    problem = f"{pv.name} is also read by {describe_use(g, e)}"
                elif not u.one and u.absorber is None:
                    problem = f"{pv.name} also weighs {u.desc}, whose weight cannot move ({u.reason})"
            if problem:
                for t in ts:
                    if t.reason is None:
                        t.reason, t.absorber = problem, None
        # one match per group of sums linked by a shared parameter
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        for t in live:
            if t.param is not None:
                parent[find(t.root)] = find(-1 - t.param.id)
        groups: dict[int, list[InlineTerm]] = {}
        for t in live:
            groups.setdefault(find(t.root), []).append(t)
        for ts in groups.values():
            ok = [t for t in ts if t.absorber is not None]
            reported.update(g.event(t.root).scope for t in ts)
            for t in ts:
                if t.absorber is None:
                    note = refused.get(g.event(t.root).scope)
                    why = t.reason + (f"; the module as a whole is not rewritten either ({note})"
                                      if note and note not in t.reason else "")
                    yield Skipped(t.target, f"{t.desc} ×{_fmt(t.scale)}: {why}")
            if ok:
                params = list({id(t.param): t.param for t in ok}.values())
                yield InlineFusion(target=ok[0].target, terms=ok, params=params)

    # -- rewriting -------------------------------------------------------------------------
    def rewrite(self, ctx: TorchContext, m: Match) -> Applied | Skipped:
        if isinstance(m, InlineFusion):
            return self._rewrite_inline(ctx, m)
        return self._rewrite_module(ctx, m)

    def _rewrite_inline(self, ctx: TorchContext, m: InlineFusion) -> Applied:
        ed = ctx.editor
        for t in m.terms:
            t.absorber.apply(ed, t.scale)
        for p in m.params:
            ed.neutralise(p.tensor, 1.0)
        parts = [f"{t.desc} ×{_fmt(t.scale)} → {t.absorber.describe()}" for t in m.terms]
        names = ", ".join(p.name for p in m.params)
        detail = "; ".join(parts) + f"; {names} set to 1"
        return Applied(m.target, detail, {
            "kind": "inline",
            "inputs": [{"input": t.desc, "weight": _values(t.scale), "absorbed_by": t.absorber.path,
                        "conv": t.absorber.conv, "through": t.absorber.through} for t in m.terms],
            "neutralised": [p.name for p in m.params],
        })

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
            rel = child.path[len(c.call.path) + 1:]
            children[rel] = child.module
            spec["children"].append({"name": rel, "module": ed.spec_for(child.module)})
        new = weighted_sum.build_module(spec, tensors, children)
        if m.owner is None:  # a module of an earlier version's format, or one whose forward cannot be set
            ed.replace(module, new, spec)
            where = None
        else:
            where = ed.set_forward(m.owner, new, spec, m.forward_name, m.remove)
        shown = m.owner if m.owner is not None else module
        return Applied(m.target, _module_detail(shown, m, where), _module_data(shown, m, where))


# --------------------------------------------------------------------------------------------
# helpers


def _owner(g: DataflowGraph, call: Any, parent: Any) -> tuple[str, Any, str, list[str]]:
    """Where the generated sum goes: ``(target, owner, name, remove)``.

    A fusion module keeps its object and runs the generated module as its forward (``owner`` is
    the module itself; it loses its parameters and buffers -- what they computed is folded or
    the generated module's constants -- and the submodules its forward ran: the trailing ones
    move into the generated module). A generated forward found again (a later round: a weight
    it kept can move now) is regenerated in the module it serves (``owner`` is that one, the
    target its path). A module written by an earlier version (the generated module in place of
    the fusion module) or one whose instance ``forward`` would not survive pickling is replaced
    as a whole (``owner`` is ``None``)."""
    module = call.module
    if parent is not None and weighted_sum.generated_forward(parent.module) is module:
        name = next(n for n, m in parent.module._modules.items() if m is module)
        return parent.path, parent.module, name, [name]
    if weighted_sum.is_generated(module) or not weighted_sum.can_take_forward(module):
        return call.path, None, "", []
    ran = {id(k.module) for k in g.calls if k is not call and call.start <= k.start and k.end <= call.end}
    remove = list(module._parameters) + list(module._buffers)
    for n, child in module._modules.items():
        if child is not None and any(id(s) in ran for s in child.modules()):
            remove.append(n)
    return call.path, module, weighted_sum.free_name(module, remove), remove


def _kept_elsewhere(g: DataflowGraph, owner: Any, remove: list[str], call: Any, target: str) -> str | None:
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
        return (f"{where}{name} is also read outside its forward (by {describe_use(g, e)}), "
                "so it cannot be removed with the module's own computation")
    for n, sub in subs:
        for m in sub.modules():
            outside = [c for c in g.calls_of(m) if not (call.start <= c.start and c.end <= call.end)]
            if outside:
                return (f"{where}{n} is also called outside its forward ({outside[0].path or 'the model'}), "
                        "so it cannot be removed with the module's own computation")
    return None


def _layout(p: Any, channels: list[int]) -> str | None:
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


def _inline_term(g: DataflowGraph, ev: OpEvent) -> InlineTerm | None:
    """``x * w`` / ``w * x`` / ``x / w`` with ``w`` a constant tensor and the product summed
    with another feature map."""
    a0, a1 = (ev.args + (None, None))[:2]
    refs = [a for a in (a0, a1) if isinstance(a, Ref)]
    if len(refs) != 2 or not ev.outputs:
        return None
    var = [r for r in refs if not g.value(r.value).const]
    const = [r for r in refs if g.value(r.value).const]
    if len(var) != 1 or len(const) != 1:
        return None
    x = var[0].value
    if ev.name in DIV and a0 != var[0]:
        return None
    r = elementwise_affine(g, ev, x, 1)
    if r is None:
        return None
    cur = ev.outputs[0]
    nxt = _single_reader(g, cur)
    if nxt is not None and _adds_zero(nxt, cur):  # ``sum(w[i] * x_i ...)`` starts from the int 0
        cur = nxt.outputs[0]
        nxt = _single_reader(g, cur)
    if nxt is None or nxt.name not in ADD | SUB | RSUB:
        return None
    if not any(i != cur and not g.value(i).const for i in nxt.inputs):
        return None
    root = nxt
    while root.outputs:
        u = g.uses(root.outputs[0])
        if len(u) != 1 or u[0] == OUTPUT:
            break
        e = g.event(u[0])
        if e.name not in ADD | SUB | RSUB or e.scope != root.scope:
            break
        root = e
    host = g.call(root.scope).path
    scope_call = g.call(root.scope)
    return InlineTerm(ev, x, describe_value(g, x, scope_call), r[0].scale, root.id, host)


def _single_reader(g: DataflowGraph, vid: int) -> OpEvent | None:
    """The one op reading ``vid``; ``None`` when it has several readers or is a model output."""
    uses = g.uses(vid)
    if len(uses) != 1 or uses[0] == OUTPUT:
        return None
    return g.event(uses[0])


def _adds_zero(ev: OpEvent, vid: int) -> bool:
    """Is ``ev`` ``vid + 0`` (or ``0 + vid``), the start of a Python ``sum()``?"""
    if ev.name not in ADD or ev.inplace or len(ev.outputs) != 1 or len(ev.args) < 2:
        return False
    a0, a1 = ev.args[:2]
    other = a1 if a0 == Ref(vid) else a0 if a1 == Ref(vid) else None
    return isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0


def _const_operand(g: DataflowGraph, ev: OpEvent) -> int | None:
    """The constant operand of a weighting ``x * w`` / ``w * x`` / ``x / w`` (the divisor of a
    division: :func:`_inline_term` accepts no ``w / x``)."""
    for a in ev.args[:2]:
        if isinstance(a, Ref) and g.value(a.value).const:
            return a.value
    return None


def _computation(g: DataflowGraph, vid: int | None) -> str:
    """``relu, sum, add, div of w`` for a constant computed from parameters."""
    if vid is None:
        return "a computation"
    ops: list[str] = []
    params: list[str] = []
    stack, seen = [vid], set()
    while stack and len(seen) < 64:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        val = g.value(v)
        if val.is_param:
            if val.name and val.name not in params:
                params.append(val.name)
            continue
        ev = g.producer(v)
        if ev is None:
            continue
        name = ev.name.replace("Tensor.", "").strip("_")
        if name not in ops:
            ops.insert(0, name)
        stack.extend(ev.inputs)
    what = ", ".join(ops) or "a computation"
    return f"{what} of {', '.join(params)}" if params else what


def _view_leaves(g: DataflowGraph, vid: int) -> list[int]:
    """Events reading value ``vid`` through pure views (the views themselves excluded)."""
    out = []

    def step(v: int, e: int) -> list[int]:
        ev = g.event(e) if e != OUTPUT else None
        if ev is not None and ev.name in VIEW_OPS and ev.inputs and ev.inputs[0] == v and not ev.inplace:
            return ev.outputs
        out.append(e)
        return []

    g.walk_uses(vid, step)
    return list(dict.fromkeys(out))


def _buffer(vec: Any, ndim: int, dtype: Any, store: Any) -> Any:
    """A constant for the replacement: a 0-d tensor if all channels share one value, else
    ``(1, C, 1, ...)``; rounded to the dtype it will be saved in."""
    import torch

    v = vec.to(torch.float64)
    t = v[0].clone() if bool((v == v[0]).all()) else v.view([1, -1] + [1] * (ndim - 2))
    if store is not None and store != dtype:
        t = t.to(store)
    return t.to(dtype).contiguous()


def _fmt(vec: Any) -> str:
    if vec.numel() == 1 or bool((vec == vec[0]).all()):
        return f"{float(vec[0]):.4g}"
    return f"per-channel[{vec.numel()}] {float(vec.min()):.3g}…{float(vec.max()):.3g}"


def _values(vec: Any) -> Any:
    if vec.numel() == 1 or bool((vec == vec[0]).all()):
        return float(vec[0])
    return [float(x) for x in vec]


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
            **({"reason": t.reason} if t.kept else {}),
        } for t in m.terms],
        "bias": None if m.bias is None else {
            "values": _values(m.bias),
            "absorbed_by": m.terms[m.bias_term].absorber.path if m.bias_term is not None else None},
        # the generated torch.fx.GraphModule the module now runs as its forward (its path)...
        "forward": where,
        # ...or, for a module written by an earlier version, what replaced it as a whole
        "replaced_by": "torch.fx.GraphModule" if where is None else None,
        # the trailing child modules, where they are now (in the generated module)
        "chain": [f"{where}.{c.path[len(m.cand.call.path) + 1:]}" if where is not None else c.path
                  for c in m.cand.chain],
    }
