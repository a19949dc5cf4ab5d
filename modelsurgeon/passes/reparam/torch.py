"""reparam on PyTorch models: each multi-branch block (:mod:`modelsurgeon.match.branches`)
becomes one ``nn.Conv2d`` of the branches' input, merged in float64
(:mod:`modelsurgeon.rewrite.kernels`), called by the block's generated forward
(:mod:`modelsurgeon.rewrite.forward`) where the sum was: the block keeps its class, its
activation and whatever follows; the branches' modules leave it. The class's own deploy path
keeps working (:mod:`modelsurgeon.match.host`): the merged conv takes the name a deploy
method's ``hasattr`` guard tests or its forward calls (``conv``, ``rbr_reparam``,
``reparam_conv``...), a deploy method's flag guard (``inference_mode``, ``deploy``) is set, and
an unguarded deploy method is named in the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...match import host
from ...match.branches import BlockSum, find_sums, where
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


def deploy_name(owner: Any, removed: set[str]) -> str:
    """The name the class's own deploy path gives the merged conv: the attribute a deploy
    method's ``hasattr`` guard tests (Ultralytics ``fuse_convs``: ``conv``), else one its
    forwards call and the instance lacks (``rbr_reparam``, ``reparam_conv``...), else ``reparam``."""
    cls = type(owner)
    for _, guard in host.deploy_methods(cls, frozenset(removed)):
        if guard and guard[0] == "hasattr" and not hasattr(owner, guard[1]):
            return guard[1]
    for n in host.forward_names(cls):
        if not hasattr(owner, n) and n.isidentifier():
            return n
    return "reparam"


def branch_children(g: Any, b: BlockSum) -> set[str]:
    """The owner's children that run the block's branches."""
    out = set()
    base = b.owner.path + "." if b.owner.path else ""
    for e in b.events:
        path = g.call(g.event(e).scope).path
        if path.startswith(base) and path != b.owner.path:
            out.add(path[len(base):].split(".")[0])
    return out


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
    return {"branches": [br.describe(g, b.owner.path) for br in b.branches], "post": [where(g, s.event, b.owner.path) for s in b.post],
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
                yield Skipped(_target(g, b), MERGE_REASONS.get(str(e), str(e)), code=MERGE_CODES.get(str(e), "layer-settings"))
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
                                  code=getattr(plan, "code", None) or "edit")
                continue
            why = None
            try:
                removed = set().union(*(branch_children(g, mg.block) for mg in merges))
                for mg in merges:
                    new = plan.call_module(mg.conv, [mg.block.source], deploy_name(plan.owner, removed))
                    mg.name = new.node.target
                    plan.substitute(mg.block.final, new)
            except forward.EditError as e:
                why = forward.Refused(forward.EDIT, str(e))
            why = why or plan.check()
            if why is not None:
                for _ in merges:
                    yield Skipped(target, f"its forward cannot be regenerated: {why}",
                                  code=getattr(why, "code", None) or "edit")
                continue
            yield ReparamMatch(target=target, plan=plan, merges=merges)

    def rewrite(self, ctx: TorchContext, m: ReparamMatch) -> Applied | Skipped:
        c = m.plan.commit(ctx.editor)
        if isinstance(c, forward.Refused):  # pragma: no cover - plan.check() ran in match
            return Skipped(m.target, f"its forward cannot be regenerated: {c}", code=c.code)
        parts, flags, unguarded = [], [], []
        owner = m.plan.owner
        for method, guard in host.deploy_methods(type(owner), frozenset(c.removed)):
            if guard and guard[0] == "flag" and getattr(owner, guard[1], None) is False:
                ctx.editor.set_attribute(owner, guard[1], True)  # the host's deploy method now returns at once
                flags.append(guard[1])
            elif guard is None or not hasattr(owner, guard[1]):
                unguarded.append(f"{type(owner).__name__}.{method}")
        for mg in m.merges:
            i = mg.info
            k = "×".join(map(str, i["kernel"]))
            parts.append(f"{len(i['branches'])} branches ({', '.join(i['branches'])}"
                         + (f"; then {', '.join(i['post'])}" if i["post"] else "") + f") → {mg.name} {k}"
                         + (f"/g{i['groups']}" if i["groups"] > 1 else "")
                         + f"; FLOPs {_num(i['flops'][0])} → {_num(i['flops'][1])}, "
                         f"params {_num(i['params'][0])} → {_num(i['params'][1])}")
        detail = "; ".join(parts) + f"; forward → generated ({c.source}), removed {', '.join(c.removed) or 'nothing'}"
        if flags:
            detail += f"; {', '.join(flags)} set to True (the class's own re-parameterisation returns at once)"
        if unguarded:
            detail += f"; {', '.join(unguarded)} reads the merged branches: not to be called on the output"
        return Applied(m.target, detail, {
            "kind": "reparam", "forward": c.path, "source": c.source, "removed": c.removed,
            "blocks": [{"conv": mg.name, **mg.info} for mg in m.merges],
            "flags_set": flags, "host_methods_unusable": unguarded,
        })


def _num(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)

