"""truncate: the plan of a cut -- what is removed, what the head is -- and the checks that refuse one
(skip connections and routing into the removed range, the model's output layer, a head that
cannot be rebuilt). Details: docs/architecture.md (*truncate, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from ...errors import BadInput
from ...match.conv import CONV_OPS
from ...match.head import GATHERING, NEUTRAL, is_classifier_layer, layer_of, shape_only, short_name
from ...match.stage import Stage
from ..base import Match


@dataclass
class HeadLayer:
    call: ModuleCall
    kind: str  # "rebuild" | "drop"

    @property
    def module(self) -> Any:
        return self.call.module

    @property
    def path(self) -> str:
        return self.call.path


@dataclass
class TruncateMatch(Match):
    stage: Stage = None
    keep: int = 0
    head: str = "reinit"
    layers: list[HeadLayer] = field(default_factory=list)
    output_reached: bool = False  # the stage's output (through shape-only ops) is a model output
    unchanged: bool = False  # the new stage output has the old one's shape: the head is left as is

    @property
    def removed(self) -> list:
        return self.stage.blocks[self.keep:]

    @property
    def last_kept(self) -> Any:
        return self.stage.blocks[self.keep - 1]


# ------------------------------------------------------------------------------------------
# safety and the head


def _plan(g: DataflowGraph, model: Any, stage: Stage, keep: int, head: str) -> TruncateMatch:
    removed = stage.blocks[keep:]
    last_kept = stage.blocks[keep - 1]
    removed_calls = [c for b in removed for c in b.calls]
    ranges = [(c.start, c.end) for c in removed_calls]

    def in_removed(eid: int) -> bool:
        return any(s <= eid < e for s, e in ranges)

    where = f"{stage.label} after {last_kept.path}"
    new_out = last_kept.out_call.outputs[0]
    stage_out = removed[-1].out_call.outputs[0]
    # 1. tensors computed inside the removed blocks are read only inside them
    for b in removed:
        for call in b.calls:
            values = [v for ev in g.events_in(call) for v in ev.outputs] + list(call.outputs)
            own = set(call.outputs)
            for v in dict.fromkeys(values):
                if v in (stage_out, new_out):
                    continue
                what = (f"the output of removed block {call.path}" if v in own
                        else f"a tensor computed inside removed block {call.path}")
                for u in g.uses(v):
                    if u == OUTPUT:
                        raise BadInput(f"cannot truncate {where}: {what} is returned by the model; nothing written", code="model-output")
                    if not in_removed(u):
                        raise BadInput(f"cannot truncate {where}: {what} is also read by {_consumer(g, u, stage)} "
                                       "(a skip connection or routing into the removed range); nothing written", code="other-readers")
    # 2. nothing outside calls a module or reads a tensor that lives only inside them
    removed_paths = [p for c in removed_calls for p in (g.paths_of(c.module) or [c.path])]

    def under(path: str) -> bool:
        return any(path == r or path.startswith(r + ".") for r in removed_paths)

    named = list(model.named_modules(remove_duplicate=False))
    kept_modules = {id(mod) for p, mod in named if not under(p)}
    removed_modules = {id(mod) for p, mod in named if under(p)} - kept_modules
    kept_tensors = set()
    for p, mod in named:
        if not under(p):
            kept_tensors.update(id(t) for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None)
    inside = set()
    for rc in removed_calls:
        stack = [rc.id]
        while stack:
            c = stack.pop()
            inside.add(c)
            stack.extend(g.call(c).children)
    for c in g.calls:
        if c.id in inside or c.parent is None:
            continue
        if id(c.module) in removed_modules:  # (a module created in forward, e.g. a slice, is no one's)
            raise BadInput(f"cannot truncate {where}: {c.path} lives inside a removed block but is also called "
                           f"from {g.call(c.parent).path or 'the model'}; nothing written", code="shared-module")
    for rc in removed_calls:
        for name, t in list(rc.module.named_parameters()) + list(rc.module.named_buffers()):
            if t is None or id(t) in kept_tensors:
                continue
            for e in g.param_uses(t):
                if not in_removed(e):
                    raise BadInput(f"cannot truncate {where}: {rc.path}.{name} is also read by "
                                   f"{_consumer(g, e, stage)}; nothing written", code="read-outside")
    # 3. a stage that stops before the end of its container: its later children must not read it
    _refuse_later_readers(g, model, stage, stage_out, where)
    # 4. the model's own output layer is not cut away under --head reinit
    if head == "reinit":
        for ev, owner in _output_layers(g):
            if in_removed(ev.id):
                block = next(b for b in removed if any(c.start <= ev.id < c.end for c in b.calls))
                raise BadInput(f"cannot truncate {where}: removed block {block.path} holds the model's final output "
                               f"layer {owner.path} ({_describe(owner.module)}), so the model would return the "
                               "stage's features instead of its outputs; --head reinit only rebuilds layers after "
                               "the stage (--head drop returns the features on purpose; --stage picks another "
                               "stage, see --list); nothing written", code="model-output")
    # 5. the head: what the stage's output reaches
    protected = set()
    c = last_kept.out_call.parent
    while c is not None:
        protected.add(c)
        c = g.call(c).parent
    same_shape = g.value(new_out).shape == g.value(stage_out).shape
    if same_shape and head == "reinit":  # nothing downstream sees a different tensor shape
        return TruncateMatch(target=stage.label, stage=stage, keep=keep, head=head, unchanged=True)
    layers, reached = _walk_head(g, stage, stage_out, head, protected, where)
    return TruncateMatch(target=stage.label, stage=stage, keep=keep, head=head, layers=layers,
                         output_reached=reached)


def _refuse_later_readers(g: DataflowGraph, model: Any, stage: Stage, stage_out: int, where: str) -> None:
    """A stage that is a run in the middle of a list of blocks (a ``Sequential``, ``ModuleList``
    or ``ModuleDict``: the automatic choice only) may not feed the list's later children by any
    path: they are the same backbone's next blocks (a host op between ``features.3`` and
    ``features.4`` splits the run), not a head to repair. The later children of a module with
    named parts (``lat5``, ``head``) are left to the head walk."""
    import torch.nn as nn

    from ...rewrite.recipe import get_module

    if not stage.later:
        return
    try:
        container = get_module(model, stage.path)
    except (AttributeError, KeyError, TypeError):
        return
    if not isinstance(container, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return
    later = [(c.start, c.end, c) for c in stage.later]
    hits = []

    def step(_v: int, u: int) -> list[int]:
        if u == OUTPUT:
            return []
        hit = next((c for s, e, c in later if s <= u < e), None)
        if hit is not None:
            hits.append(hit)
            return []
        return g.event(u).outputs

    g.walk_uses(stage_out, step)
    if hits:
        hit = min(hits, key=lambda c: c.start)
        raise BadInput(f"cannot truncate {where}: the stage's output feeds {hit.path} ({hit.type_name}), a later "
                       f"block of {stage.label}, so cutting here would remove blocks from the middle of "
                       f"{stage.label}; nothing written", code="mid-stage")


def _output_layers(g: DataflowGraph) -> list[tuple[OpEvent, ModuleCall]]:
    """The layers that compute the model's outputs: walking back from each output through
    shape-only ops, a torch Linear; a conv whose output reaches it with no activation on the
    way (a segmentation or detection output conv); or a 1x1 conv classifier (pooling / flatten
    before or after it). A conv followed by BatchNorm, or by an activation and pooling (a VGG
    feature layer), is a backbone's last layer, not an output layer."""
    import torch.nn as nn

    found = []
    for o in dict.fromkeys(g.outputs):
        v, act, gathered = o, False, False
        for _ in range(256):
            ev = g.producer(v)
            if ev is None:
                break
            if ev.name in CONV_OPS:
                owner = layer_of(g, ev)
                if owner is not None and owner.outputs[:1] and (
                        isinstance(owner.module, nn.Linear)
                        or (isinstance(owner.module, nn.modules.conv._ConvNd) and not act)
                        or is_classifier_layer(owner.module, gathered)):
                    found.append((ev, owner))
                break
            a0 = ev.args[0] if ev.args else None
            if not isinstance(a0, Ref) or not shape_only(g, ev, a0.value):
                break
            name = short_name(ev)
            if name in GATHERING:
                gathered = True
            elif name not in NEUTRAL:
                act = True
            v = a0.value
    return found


def _walk_head(g: DataflowGraph, stage: Stage, stage_out: int, head: str, protected: set[int],
               where: str) -> tuple[list[HeadLayer], bool]:
    layers: list[HeadLayer] = []
    reached = False
    seen: set[int] = set()  # events handled (a dropped module's, all at once)

    def step(v: int, u: int) -> list[int]:
        nonlocal reached
        if u == OUTPUT:
            reached = True
            return []
        if u in seen:
            return []
        seen.add(u)
        ev = g.event(u)
        if head == "reinit" and ev.name in CONV_OPS:
            layers.append(_rebuildable(g, ev, v, stage, where))
            return []
        if shape_only(g, ev, v):
            return ev.outputs
        if head == "drop":
            d = _droppable(g, ev, v, protected)
            if d is not None:
                layers.append(HeadLayer(d, "drop"))
                seen.update(range(d.start, d.end))
                return [d.outputs[0]]
        hint = (" (only torch Linear/Conv layers are rebuilt; --head drop replaces the head by nn.Identity)"
                if head == "reinit" else " (only whole modules taking it as their one input can be dropped)")
        raise BadInput(f"cannot truncate {where}: the stage's output reaches {_consumer(g, u, stage)}, whose "
                       f"result depends on the channel count and cannot be repaired{hint}; nothing written", code="head-not-rebuildable")

    g.walk_uses(stage_out, step)
    return layers, reached


def _rebuildable(g: DataflowGraph, ev: OpEvent, v: int, stage: Stage, where: str) -> HeadLayer:
    import torch.nn as nn

    what = _consumer(g, ev.id, stage)
    if ev.arg(0, "input") != Ref(v):
        raise BadInput(f"cannot truncate {where}: the stage's output is used as a weight by {what}; nothing written", code="head-not-rebuildable")
    w = ev.arg(1, "weight")
    weight = g.value(w.value).tensor if isinstance(w, Ref) else None
    owner = None
    for call in g.enclosing_calls(ev):
        if call.parent is not None and weight is not None and getattr(call.module, "weight", None) is weight:
            owner = call
            break
    if owner is None:
        raise BadInput(f"cannot truncate {where}: the stage's output reaches {what}, whose weight is no module's "
                       "own parameter, so the layer cannot be rebuilt; nothing written", code="head-not-rebuildable")
    mod = owner.module
    if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
        raise BadInput(f"cannot truncate {where}: the stage's output reaches {owner.path} ({type(mod).__name__}), "
                       "which is no torch Linear/Conv layer and cannot be rebuilt; nothing written", code="head-not-rebuildable")
    if g.call_count(mod) > 1:
        raise BadInput(f"cannot truncate {where}: head layer {owner.path} is called {g.call_count(mod)} times "
                       "(shared), so it cannot be rebuilt for one input; nothing written", code="shared-module")
    if owner.inputs[:1] != (v,):
        raise BadInput(f"cannot truncate {where}: {owner.path} computes its own input from the stage's output; "
                       "nothing written", code="head-not-rebuildable")
    if isinstance(mod, nn.modules.conv._ConvNd) and mod.groups != 1:
        raise BadInput(f"cannot truncate {where}: head layer {owner.path} is a grouped convolution "
                       f"(groups={mod.groups}) tied to the channel count; nothing written", code="head-not-rebuildable")
    return HeadLayer(owner, "rebuild")


def _droppable(g: DataflowGraph, ev: OpEvent, v: int, protected: set[int]) -> ModuleCall | None:
    cands = [c for c in g.calls_starting_with(ev)
             if c.parent is not None and c.id not in protected and c.inputs == (v,) and g.paths_of(c.module)]
    if not cands:
        return None
    d = cands[-1]
    if len(d.outputs) != 1 or g.call_count(d.module) != 1:
        return None
    return d


def _consumer(g: DataflowGraph, eid: int, stage: Stage) -> str:
    ev = g.event(eid)
    call = g.call(ev.scope)
    if call.parent is None:
        return f"{ev.name} in the model's forward"
    text = f"{ev.name} in {call.path} ({call.type_name})"
    top = call
    while g.call(top.parent).parent is not None:  # the outermost module below the model
        top = g.call(top.parent)
    if top is not call:
        text += f", part of {top.path} ({top.type_name})"
    return text


def _describe(m: Any) -> str:
    import torch.nn as nn

    if isinstance(m, nn.Linear):
        return f"{type(m).__name__}({m.in_features}→{m.out_features})"
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(map(str, m.kernel_size))
        return f"{type(m).__name__}({m.in_channels}→{m.out_channels}, {k})"
    return type(m).__name__
