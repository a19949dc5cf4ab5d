"""truncate on PyTorch models: drop the last blocks of a backbone stage, repair the head.

Details: docs/architecture.md (*truncate, in one paragraph*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from ...capture.graph import DataflowGraph
from ...errors import BadInput, ParityError
from ...match.stage import Stage, StageError, find_stages, stage_at
from ...report.flops import module_flops
from ..base import Applied, Match, Pass, Skipped, TorchContext
from ...options.base import escape
from . import TruncateOptions
from .cut import TruncateMatch, _describe, _plan
from .head import _Fails, _check_runs, _refusal, _repair_head, _run_to, _shapes


@dataclass
class TruncateApplied(Applied):
    """The cut made, and what ``verify`` compares: the last kept block's output on every trial,
    recorded before the rewrite."""

    match: TruncateMatch | None = None
    prefix_refs: list = field(default_factory=list)
    info: dict = field(default_factory=dict)


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
