"""reparam on PyTorch models: each multi-branch block (:mod:`modelsurgeon.match.branches`)
becomes one ``nn.Conv2d`` of the branches' input, merged in float64
(:mod:`modelsurgeon.rewrite.kernels`), called by the block's generated forward
(:mod:`modelsurgeon.rewrite.forward`) where the sum was: the block keeps its class, its
activation and whatever follows; the branches' modules leave it. The merged conv takes the
name the class's own deploy path uses when its forward names one (``rbr_reparam``,
``reparam_conv``...).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from ...match.branches import BlockSum, find_sums
from ...report.flops import event_flops
from ...rewrite import forward
from ...rewrite import kernels as K
from ..base import Applied, Match, Pass, Skipped, TorchContext

MERGE_CODES = {"stride": "stride-mismatch", "centres": "misaligned-centres", "channels": "channels-mismatch"}
MERGE_REASONS = {"stride": "the branches have different strides",
                 "centres": "the branches' kernel centres do not align (padding − dilation·(k−1)/2 differ)",
                 "channels": "the branches have different channel counts"}


@dataclass
class Merge:
    block: BlockSum
    conv: Any  # the merged nn.Conv2d
    name: str = ""
    info: dict = field(default_factory=dict)


@dataclass
class ReparamMatch(Match):
    plan: Any = None
    merges: list[Merge] = field(default_factory=list)


def deploy_name(owner: Any) -> str:
    """The attribute the class's own forward calls and the instance lacks (its deploy conv)."""
    try:
        src = inspect.getsource(type(owner).forward)
    except (OSError, TypeError):
        return "reparam"
    names = re.findall(r"self\.(\w+)\(", src) + re.findall(r"hasattr\(\s*self\s*,\s*['\"](\w+)['\"]", src)
    for n in dict.fromkeys(names):
        if not hasattr(owner, n):
            return n
    return "reparam"


def _target(g: Any, b: BlockSum) -> str:
    return b.owner.path or "model"


def _conv_module(g: Any, ctx: TorchContext, b: BlockSum, m: K.ConvMap) -> Any:
    import torch

    ref = next(s for br in b.branches for s in br.convs)
    wv = g.value(ref.event.arg(1, "weight").value)
    dtype, device = wv.tensor.dtype, wv.tensor.device
    store = dtype
    storage = getattr(ctx.editor, "storage", None)
    if storage is not None and wv.is_param:
        store = storage.storage_dtype(wv.tensor)
    conv = torch.nn.Conv2d(m.in_channels, m.out_channels, m.kernel, m.stride, m.padding, m.dilation, m.groups,
                           bias=True, device=device, dtype=dtype)
    with torch.no_grad():
        conv.weight.copy_(m.weight.to(store).to(dtype))
        conv.bias.copy_(m.bias.to(store).to(dtype))
    return conv.eval()


def _figures(g: Any, b: BlockSum, m: K.ConvMap) -> dict:
    from torch.utils.flop_counter import conv_flop_count

    before = sum(event_flops(g, g.event(e)) for e in b.events)
    x, out = g.value(b.source).shape, g.value(b.final).shape
    after = int(conv_flop_count(list(x), list(m.weight.shape), list(out), transposed=False))
    seen, params = set(), 0
    for e in b.events:
        for i in g.event(e).inputs:
            v = g.value(i)
            if v.is_param and i not in seen:
                seen.add(i)
                params += int(v.tensor.numel())
    return {"branches": [br.describe(g, b.owner.path) for br in b.branches], "post": [_where_post(g, s, b) for s in b.post],
            "kernel": list(m.kernel), "stride": list(m.stride), "padding": list(m.padding),
            "dilation": list(m.dilation), "groups": m.groups, "flops": [before, after],
            "params": [params, int(m.weight.numel() + m.bias.numel())]}


class Reparam(Pass):
    name = "reparam"

    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        g = ctx.graph
        found: dict[int, list[Merge]] = {}
        for b in find_sums(g):
            if b.problem is not None:
                yield Skipped(_target(g, b), b.problem.reason, code=b.problem.code)
                continue
            try:
                m = K.merge([br.map for br in b.branches])
            except ValueError as e:
                yield Skipped(_target(g, b), MERGE_REASONS.get(str(e), str(e)), code=MERGE_CODES.get(str(e), "not-merged"))
                continue
            for s in b.post:
                if s.map is not None:
                    m = K.then_affine(m, *s.map)
            merge = Merge(b, _conv_module(g, ctx, b, m), info=_figures(g, b, m))
            found.setdefault(b.owner.id, []).append(merge)
        if not found:
            return
        plans = forward.open_forwards(g, [g.call(c) for c in found], ctx.model, ctx.inputs)
        for cid, merges in found.items():
            plan = plans.get(cid)
            target = g.call(cid).path or "model"
            if not isinstance(plan, forward.ForwardPlan):
                for _ in merges:
                    yield Skipped(target, f"its forward cannot be regenerated: {plan}",
                                  code=getattr(plan, "code", None) or "forward")
                continue
            why = None
            try:
                for mg in merges:
                    new = plan.call_module(mg.conv, [mg.block.source], deploy_name(plan.owner))
                    mg.name = new.node.target
                    plan.substitute(mg.block.final, new)
            except forward.EditError as e:
                why = forward.Refused(forward.EDIT, str(e))
            why = why or plan.check()
            if why is not None:
                for _ in merges:
                    yield Skipped(target, f"its forward cannot be regenerated: {why}",
                                  code=getattr(why, "code", None) or "forward")
                continue
            yield ReparamMatch(target=target, plan=plan, merges=merges)

    def rewrite(self, ctx: TorchContext, m: ReparamMatch) -> Applied | Skipped:
        c = m.plan.commit(ctx.editor)
        if isinstance(c, forward.Refused):  # pragma: no cover - plan.check() ran in match
            return Skipped(m.target, f"its forward cannot be regenerated: {c}", code=c.code)
        parts = []
        for mg in m.merges:
            i = mg.info
            k = "×".join(map(str, i["kernel"]))
            parts.append(f"{len(i['branches'])} branches ({', '.join(i['branches'])}"
                         + (f"; then {', '.join(i['post'])}" if i["post"] else "") + f") → {mg.name} {k}"
                         + (f"/g{i['groups']}" if i["groups"] > 1 else "")
                         + f"; FLOPs {_num(i['flops'][0])} → {_num(i['flops'][1])}, "
                         f"params {_num(i['params'][0])} → {_num(i['params'][1])}")
        detail = "; ".join(parts) + f"; forward → generated ({c.source}), removed {', '.join(c.removed) or 'nothing'}"
        return Applied(m.target, detail, {
            "kind": "reparam", "forward": c.path, "source": c.source, "removed": c.removed,
            "blocks": [{"conv": mg.name, **mg.info} for mg in m.merges],
        })


def _num(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _where_post(g: Any, s: Any, b: BlockSum) -> str:
    from ...match.branches import _where

    return _where(g, s.event, b.owner.path)
