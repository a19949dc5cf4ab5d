"""truncate on PyTorch models: drop the last blocks of a backbone stage, repair the head.

Details: docs/architecture.md (*truncate, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref
from ...errors import BadInput, ParityError, first_line
from ...match import dims
from ...match.conv import CONV_OPS
from ...match.head import GATHERING, NEUTRAL, is_classifier_layer, layer_of, shape_only, short_name
from ...match.stage import Stage, StageError, find_stages, module_flops, stage_at
from ..base import Applied, Match, Pass, Skipped, TorchContext
from ...options.base import escape
from . import TruncateOptions

INIT_SEED = 0


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


@dataclass
class TruncateApplied(Applied):
    """The cut made, and what ``verify`` compares: the last kept block's output on every trial,
    recorded before the rewrite."""

    match: TruncateMatch | None = None
    prefix_refs: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


class _Reached(Exception):
    def __init__(self, shape):
        self.shape = shape


class Truncate(Pass):
    name = "truncate"
    preserves_function = False

    def prepare(self, ctx: TorchContext) -> None:
        o: TruncateOptions = ctx.options
        if o.blocks is None and o.after is None and not o.list_blocks:
            o.fail("truncate needs {blocks} or {after} (or {list_blocks} to see the stage's blocks)",
                   blocks=..., after=..., list_blocks=...)

    # -- matching ------------------------------------------------------------------------------
    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        o: TruncateOptions = ctx.options
        g: DataflowGraph = ctx.graph
        per_module, total_flops = module_flops(ctx.model, ctx.inputs, g)
        stages = find_stages(g, ctx.model, per_module, total_flops)
        stage, why = _choose(stages, o, ctx.model, g, per_module, total_flops)
        keep = _keep(stage, o)
        params = sum(p.numel() for p in ctx.model.parameters())
        rows = []
        for b in stage.blocks:
            r = b.row()
            if keep is not None:
                r["removed"] = b.index >= keep
            rows.append(r)
        info = {
            "stage": stage.path, "stage_label": stage.label, "host": stage.host, "reason": why,
            "candidates": [s.summary() for s in stages[:5]],
            "blocks": rows,
            "params": {"before": params}, "flops": {"before": total_flops},
        }
        if stage.trimmed:
            info["not_blocks"] = stage.trimmed
        ctx.report_extra["truncate"] = info
        if keep is not None:
            removed = stage.blocks[keep:]
            info.update({
                "removed": [b.path for b in removed],
                "removed_modules": [p for b in removed for p in b.paths],
                "kept_blocks": keep,
                "last_kept": stage.blocks[keep - 1].path,
                "output_channels": {"before": stage.blocks[-1].out_channels,
                                    "after": stage.blocks[keep - 1].out_channels},
                "removed_params": sum(b.params for b in removed),
                "removed_flops": sum(b.flops for b in removed),
            })
        if o.list_blocks:
            ctx.stop = f"listed the {len(stage.blocks)} blocks of {stage.label}"
            return
        m = _plan(g, ctx.model, stage, keep, o.head)
        info["head"] = {"mode": o.head, "model_output_is_stage_output": m.output_reached,
                        "unchanged": m.unchanged, "layers": [
            {"path": l.path, "type": type(l.module).__name__, "before": _describe(l.module),
             "action": "to rebuild if its input width changes" if l.kind == "rebuild" else "to drop"}
            for l in m.layers]}
        yield m

    # -- rewriting -----------------------------------------------------------------------------
    def rewrite(self, ctx: TorchContext, m: TruncateMatch) -> Applied:
        import torch

        refs = ctx.references
        last = m.last_kept
        prefix_refs = []
        for t in range(refs.trials):
            with refs.kernels(t):
                prefix_refs.append(_run_to(ctx.model, last.out_call.module, refs.inputs(t))[0])
        ed = ctx.editor
        for b in m.removed:
            for mod in b.modules:
                ed.replace(mod, torch.nn.Identity())
        try:
            head_rows = _repair_head(ctx, m)
            _check_runs(ctx.model, ctx.inputs)
        except _Fails as f:
            raise _refusal(m, f) from f.error
        info = ctx.report_extra.setdefault("truncate", {})
        info.setdefault("head", {})["layers"] = head_rows
        n = m.stage.children
        k = sum(len(b.calls) for b in m.removed)
        info["identity_note"] = (f"the {k} module{'s' if k != 1 else ''} of the removed blocks "
                                 f"{'are' if k != 1 else 'is'} nn.Identity in place, so {m.stage.label} keeps "
                                 f"its {n} entries (indices and attribute names the host forward uses stay valid)")
        if m.head == "drop":
            ctx.warnings.append(f"--head drop: the model now returns the features of {last.path} "
                                "(head layers replaced by nn.Identity)")
        removed = m.removed
        span = removed[0].path if len(removed) == 1 else f"{removed[0].path} … {removed[-1].path}"
        c0, c1 = m.stage.blocks[-1].out_channels, last.out_channels
        detail = (f"removed {len(removed)} block{'s' if len(removed) > 1 else ''} ({span}) → nn.Identity; "
                  f"{m.stage.label} output {c0} → {c1} channels")
        for action, verb in (("rebuilt", "rebuilt (re-initialised)"), ("dropped", "dropped"),
                             ("kept", "kept (input width unchanged)")):
            rows = [r for r in head_rows if r["action"] == action]
            if rows:
                detail += f"; {verb}: " + ", ".join(
                    f"{r['path']} {r['before']}" + (f" → {r['after']}" if action != "kept" else "") for r in rows)
        return TruncateApplied(m.stage.label, detail, {
            "stage": m.stage.path, "removed": [b.path for b in removed], "kept_blocks": m.keep,
            "output_channels": {"before": c0, "after": c1}, "head": head_rows,
        }, match=m, prefix_refs=prefix_refs, info=info)

    # -- verification --------------------------------------------------------------------------
    def verify(self, ctx: TorchContext, applied: list[Applied], tolerance: Any) -> Any:
        """Kept prefix exact on every trial; the whole model runs; output shapes recorded."""
        from ...verify.compare import ParityReport, Tolerance, compare_outputs, summarise
        from ...verify.torch import ModelRunError

        if not applied:  # nothing was truncated (dry run)
            return ParityReport(trials=0, atol=tolerance.atol, rtol=tolerance.rtol)
        st: TruncateApplied = applied[-1]
        refs = ctx.references
        exact = Tolerance(0.0, 0.0)
        last = st.match.last_kept
        per_trial = []
        outputs = None
        flops_after = None
        for t in range(refs.trials):
            try:
                with refs.kernels(t):  # as the prefix references were taken: exactly comparable
                    prefix, out, flops = _run_to(ctx.model, last.out_call.module, refs.inputs(t), full=True,
                                                 count_flops=t == 0)
            except ModelRunError as e:
                raise ParityError(f"the truncated model fails to run: {e}; nothing written")
            if t == 0:
                outputs, flops_after = out, flops
            diffs = compare_outputs(st.prefix_refs[t], prefix, exact) if prefix is not None else []
            if prefix is None:
                from ...verify.compare import OutputDiff

                diffs = [OutputDiff("out", float("inf"), float("inf"), False, "the last kept block was not called")]
            for d in diffs:
                d.name = f"kept prefix {last.out_call.path}" + d.name[3:]
            per_trial.append(diffs)
        result = summarise(per_trial, exact)
        info = st.info
        params_after = sum(p.numel() for p in ctx.model.parameters())
        for key, after in (("params", params_after), ("flops", flops_after)):
            before = info[key]["before"]
            info[key]["after"] = after
            info[key]["saved"] = round(1 - after / before, 4) if before and after is not None else None
        info["output_shapes"] = {"before": _shapes(refs.outputs[0]), "after": _shapes(outputs)}
        info["prefix_exact"] = result.passed and result.max_abs == 0.0
        return result


# ------------------------------------------------------------------------------------------
# the stage and the cut


def _choose(stages: list[Stage], o: TruncateOptions, model: Any, g: DataflowGraph, flops: dict,
            total_flops: int) -> tuple[Stage, str]:
    from ...rewrite.recipe import get_module

    found = ", ".join(f"{s.label} ({len(s.blocks)} blocks)" for s in stages[:4]) or "none"
    if o.stage is not None:
        path = "" if o.stage.strip() in ("", ".", "<model>") else o.stage.strip()
        try:
            get_module(model, path)
        except (AttributeError, KeyError, TypeError):
            o.fail("{stage}: the model has no module at that path", stage=o.stage)
        try:
            stage = stage_at(g, model, flops, total_flops, path)
        except StageError as e:
            o.fail("{stage}: " + escape(f"{e} (stages found: {found})"), stage=o.stage)
        return stage, "chosen with --stage: " + stage.describe()
    if not stages:
        raise BadInput("no backbone stage found: no chain of two or more modules, each reading the previous "
                       "one's output, on the input→output path; name one with --stage", code="no-stage")
    if o.after is not None:
        holding = [s for s in stages if any(o.after in b.paths for b in s.blocks)]
        if holding:
            return holding[0], f"the stage holding --after {o.after}: " + holding[0].describe()
    best = stages[0]
    why = "found automatically: " + best.describe()
    if len(stages) > 1:
        nxt = stages[1]
        why += (f"; it ranks first by blocks × share of {best.measure} ({best.score:.2f}; next: "
                f"{nxt.label}, {len(nxt.blocks)} blocks, {nxt.share:.0%}, {nxt.score:.2f})")
    return best, why


def _keep(stage: Stage, o: TruncateOptions) -> int | None:
    n = len(stage.blocks)
    if o.blocks is not None:
        k = int(o.blocks)
        if n == 1:
            head = f"; {', '.join(stage.trimmed)} is its head" if stage.trimmed else ""
            o.fail("{blocks}: " + escape(f"the stage {stage.label} has one block ({stage.blocks[0].path}{head}), so "
                   "none can be removed; name the container inside it with ") + "{stage} (see {list_blocks})",
                   blocks=k, stage=..., list_blocks=...)
        if k >= n:
            o.fail("{blocks}: " + escape(f"the stage {stage.label} has {n} blocks, so at most {n - 1} can be "
                   "removed") + " (see {list_blocks})", blocks=k, list_blocks=...)
        return n - k
    if o.after is not None:
        idx = _block_index(stage, o)
        if idx == n - 1:
            o.fail("{after}: " + escape(f"it is the last block of {stage.label}; nothing to remove"), after=o.after)
        return idx + 1
    return None


def _block_index(stage: Stage, o: TruncateOptions) -> int:
    name = o.after
    for b in stage.blocks:
        for p in b.paths:  # the block, or a parameter-free call attached to it
            if p == name or (stage.path and p == f"{stage.path}.{name}"):
                return b.index
    try:
        i = int(name)
    except ValueError:
        i = None
    if i is not None and -len(stage.blocks) <= i < len(stage.blocks):
        return i % len(stage.blocks)
    paths = ", ".join(b.path for b in stage.blocks[:6]) + (" …" if len(stage.blocks) > 6 else "")
    o.fail("{after}: " + escape(f"not a block of the stage {stage.label} (its blocks: {paths}; ") + "see {list_blocks})",
           after=name, list_blocks=...)


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


# ------------------------------------------------------------------------------------------
# running and rebuilding


def _repair_head(ctx: TorchContext, m: TruncateMatch) -> list[dict]:
    """Drop or rebuild the head layers for the new input width; rows for the report."""
    import torch

    ed = ctx.editor
    head_rows = []
    for i, layer in enumerate(m.layers):
        old = layer.module
        if layer.kind == "drop":
            ed.replace(old, torch.nn.Identity())
            head_rows.append({"path": layer.path, "type": type(old).__name__, "action": "dropped",
                              "before": _describe(old), "after": "Identity"})
            continue
        width = _probe_width(ctx.model, old, ctx.inputs, layer.path)
        if width == _in_width(old):  # same input width (e.g. a block of equal channels removed)
            head_rows.append({"path": layer.path, "type": type(old).__name__, "action": "kept",
                              "before": _describe(old), "after": _describe(old),
                              "reinitialised": False})
            continue
        new = _rebuild(old, width, INIT_SEED + i)
        ed.replace(old, new)
        head_rows.append({"path": layer.path, "type": type(old).__name__, "action": "rebuilt",
                          "before": _describe(old), "after": _describe(new), "reinitialised": True})
        ctx.warnings.append(f"{layer.path} was rebuilt as {_describe(new)} with fresh random weights: "
                            "the model needs fine-tuning before its outputs mean anything")
    return head_rows


def _run_to(model: Any, module: Any, inputs: list, full: bool = False, count_flops: bool = False):
    """Run ``model`` and take ``module``'s output (only that unless ``full``).

    Returns ``(module_output, model_output, flops)``.
    """
    import torch

    from ...verify.torch import detach, run

    got: list = []

    def hook(_m, _args, out):
        got.append(detach(out))

    h = module.register_forward_hook(hook)
    try:
        if count_flops:
            from ...capture import capture
            from ...verify.torch import ModelRunError

            try:
                _, out, flops = capture(model, inputs, count_flops=True)
            except Exception as e:  # same contract as verify.torch.run
                raise ModelRunError(f"{type(e).__name__}: {str(e).strip()[:300]}") from e
        else:
            with torch.no_grad():
                out = run(model, inputs)
            flops = None
    finally:
        h.remove()
    return (got[0] if got else None), (out if full else None), flops


def _probe_width(model: Any, layer: Any, inputs: list, path: str) -> int:
    """The input width ``layer`` receives in the (truncated) model, by running up to it."""
    import torch
    import torch.nn as nn

    def pre(_m, args):
        x = args[0] if args else None
        raise _Reached(tuple(x.shape) if isinstance(x, torch.Tensor) else None)

    h = layer.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model(*inputs)
    except _Reached as r:
        if r.shape is None or len(r.shape) < 1:
            raise ParityError(f"head layer {path} receives no tensor after truncation; nothing written")
        return int(r.shape[-1] if isinstance(layer, nn.Linear) else r.shape[1])
    except Exception as e:
        raise _Fails(e, f"before reaching {path}") from e
    finally:
        h.remove()
    raise ParityError(f"head layer {path} is no longer called after truncation; nothing written")


class _Fails(Exception):
    """The truncated model raised ``error`` (``where``: how far it got)."""

    def __init__(self, error: BaseException, where: str = ""):
        super().__init__(where)
        self.error, self.where = error, where


def _check_runs(model: Any, inputs: list) -> None:
    """The truncated model runs on the example input, or the cut is refused (exit 2) with what
    the removed blocks changed: a neck that combines the stage's output with features of the
    size it used to have (an FPN's upsample-and-add, say) cannot take a cut that changes it."""
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        raise _Fails(e) from e


def _refusal(m: TruncateMatch, f: _Fails) -> BadInput:
    e = f.error
    msg = first_line(e)
    last = m.last_kept
    old, new = m.stage.blocks[-1].out_shape, last.out_shape
    change = ""
    if old is not None and new is not None and tuple(old[2:]) != tuple(new[2:]):
        change = (f"; the removed blocks change the stage's output size from {dims(old)} to {dims(new)}, and "
                  "later layers need the old size (only the channel count can change)")
    where = f" {f.where}" if f.where else ""
    return BadInput(f"cannot truncate {m.stage.label} after {last.path}: the truncated model fails{where} "
                    f"({type(e).__name__}: {msg}){change}; nothing written", code="truncated-model-fails")


def _rebuild(old: Any, width: int, seed: int) -> Any:
    """A fresh torch layer like ``old`` with input width ``width`` (default initialisation)."""
    import torch
    import torch.nn as nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(old, nn.Linear):
            new = nn.Linear(width, old.out_features, bias=old.bias is not None)
        else:
            nd = len(old.kernel_size)
            kwargs = dict(in_channels=width, out_channels=old.out_channels, kernel_size=old.kernel_size,
                          stride=old.stride, padding=old.padding, dilation=old.dilation, groups=1,
                          bias=old.bias is not None, padding_mode=old.padding_mode)
            if old.transposed:
                cls = getattr(nn, f"ConvTranspose{nd}d")
                kwargs["output_padding"] = old.output_padding
            else:
                cls = getattr(nn, f"Conv{nd}d")
            new = cls(**kwargs)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.train(old.training)
    new.requires_grad_(old.weight.requires_grad)
    return new


def _in_width(m: Any) -> int:
    import torch.nn as nn

    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _describe(m: Any) -> str:
    import torch.nn as nn

    if isinstance(m, nn.Linear):
        return f"{type(m).__name__}({m.in_features}→{m.out_features})"
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(map(str, m.kernel_size))
        return f"{type(m).__name__}({m.in_channels}→{m.out_channels}, {k})"
    return type(m).__name__


def _shapes(out: Any) -> list:
    from ...capture.recorder import flatten_tensors

    return [list(t.shape) for t in flatten_tensors(out)]
