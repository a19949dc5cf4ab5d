"""The pipeline for PyTorch models: capture → references → passes (in rounds) → verify →
write, on each model of the checkpoint in place (:class:`SlotRun`: one model and what its run
needs). See docs/architecture.md."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .errors import BadInput, ParityError


@dataclass
class SlotRun:
    """One model being operated on, and everything its run needs."""

    model: Any
    storage: Any  # read/prepare.py StorageState
    passes: list  # pass names, in order
    opts: Any  # RunOptions
    spec: Any  # verify/inputs.py InputSpec
    report: Any  # the Report everything accumulates into
    recipe: Any  # the structural edits that rebuild a state_dict's model
    slot_name: str | None = None  # "model" / "ema" in a multi-model checkpoint
    primary: bool = True  # the model the report's before/after figures and an ONNX export describe
    host_code: bool = True  # False for an .onnx output: no host code (its own fuse()) runs on it
    state: Any = None  # read/prepare.py BufferState, set by operate()
    original: Any = None  # () -> the original model read again (the lazy float64 run), or None

    @property
    def label(self) -> str:
        return f"{self.slot_name}: " if self.slot_name else ""

    def status(self, message: str) -> None:
        if self.opts.status is not None:
            self.opts.status(self.label + message)


def run_torch(command, passes, opts, ckpt, report, out_path, out_fmt) -> Any:
    from .read.prepare import prepare
    from .verify.exact import reload_original
    from .passes.base import PassReport
    from .verify.compare import ParityReport
    from .verify.inputs import InputSpec

    status = opts.status or (lambda _msg: None)
    spec = InputSpec.parse(opts.input_shape, "float32" if opts.dtype == "auto" else opts.dtype, opts.seed)
    multi = len(ckpt.slots) > 1
    report.slots = [s.name for s in ckpt.slots]
    report.notes.extend(n for n in ckpt.notes if n not in report.notes)  # the loader's (aliased slots)
    report.passes = [PassReport(name) for name in passes]
    report.parity = ParityReport(trials=opts.trials, checked=opts.verify)
    primary = ckpt.primary()
    primary_refs = None
    for slot in ckpt.slots:
        status(f"{slot.name}: preparing" if multi else "preparing")
        slot.storage = prepare(slot.module)
        slot.storage.mode_stored = not ckpt.needs_arch
        recipe = ckpt.recipe_for(slot)  # one per model: a safetensors output records its own
        refs = operate(SlotRun(slot.module, slot.storage, passes, opts, spec, report, recipe,
                               slot_name=slot.name if multi else None, primary=slot is primary,
                               original=lambda name=slot.name: reload_original(opts, name),
                               host_code=out_fmt != "onnx"))
        if slot is primary:
            primary_refs = refs
        if report.stopped:
            break
    report.inputs = list(spec.shapes)
    if report.stopped:  # a pass answered an inspection (truncate --list): nothing more to do
        report.parity = ParityReport(checked=False, note=f"({report.stopped}: nothing rewritten)")
        return report
    if opts.dry_run:
        report.parity = ParityReport(checked=False, note="(--dry-run: nothing rewritten)")
    elif not opts.verify:
        report.parity = ParityReport(checked=False, note="(--no-verify)")
    report.inputs = list(spec.shapes)
    hint = report.extra.pop("parity_hint", "")
    if opts.verify and not report.parity.passed:
        if not opts.force:
            raise ParityError(f"parity failed ({report.parity.worst()}){hint}; nothing written", report)
        report.warnings.append("parity failed; writing anyway because of --force")
    if ckpt.format == "container" and report.applied and ckpt.container.get("optimizer") is not None:
        report.warnings.append("the checkpoint's optimizer state was kept as is; it does not match the "
                               "rewritten parameters (resume training from the original checkpoint)")
    _save(ckpt, opts, report, out_path, out_fmt, primary, primary_refs)
    return report


def operate(run: SlotRun) -> Any:
    """Capture, rewrite and verify one model in place; accumulate into ``run.report``.

    Returns the :class:`References` (the original's outputs), for an ONNX export's parity.
    Whatever happens, buffers that running the model changed are left as the checkpoint had
    them (:class:`BufferState`).
    """
    from .read.prepare import BufferState

    run.state = BufferState(run.model)
    try:
        return _operate(run)
    finally:
        run.state.restore()


def _operate(run: SlotRun) -> Any:
    from . import passes as registry
    from .passes.base import TorchContext
    from .passes.manager import own_verification, run_rounds
    from .read.prepare import compute_dtype
    from .report.stats import torch_stats
    from .rewrite.modules import ModuleEditor
    from .verify.compare import Tolerance
    from .verify.exact import own_rounding_wanted
    from .verify.points import TorchPoints, empty_everywhere
    from .verify.torch import ModelRunError, References

    model, storage, opts, spec, report, state = run.model, run.storage, run.opts, run.spec, run.report, run.state
    label, slot_name, primary = run.label, run.slot_name, run.primary
    per_pass = {p.name: p for p in report.passes}
    impls = [registry.get(name, "torch") for name in run.passes]
    if storage.upcast:
        report.notes.append(f"{slot_name or 'the model'} is stored in {str(storage.default_dtype).replace('torch.', '')}: "
                            "evaluated in float32, rewritten weights rounded to the stored dtype")
    dtype = _input_dtype(spec, storage, compute_dtype(storage), report)
    t = time.perf_counter()
    run.status("capturing the dataflow graph")
    refs = References(spec, opts.trials, dtype)
    refs.at = list(opts.verify_at)
    graph, out0, flops = _first_capture(model, spec, refs, report, compute_dtype(storage))
    report.timings["capture"] = report.timings.get("capture", 0) + time.perf_counter() - t
    before = torch_stats(model, graph, flops)
    points = TorchPoints(model, graph, out0, opts.verify_at)  # where to compare (verify/points.py)
    if points.describe() and primary:
        report.notes.append(label + points.describe())
        report.extra.update(post_processed=dict(points.post), suggest_verify_at=points.suggestion)
    editor = ModuleEditor(model, storage, run.recipe)
    extra: dict = {}  # the passes' report sections (TorchContext.report_extra)
    inputs0 = refs.inputs(0)
    current = {"graph": graph, "stale_after": None}  # the graph describes the model until a pass changes it

    def context(p) -> TorchContext:
        if current["stale_after"] is not None:  # re-capture only when another pass needs the graph
            run.status(f"{current['stale_after']}: re-capturing")
            current["graph"] = _recapture(model, inputs0, current["stale_after"])
            current["stale_after"] = None
        return TorchContext(model=model, graph=current["graph"], inputs=inputs0, editor=editor,
                            options=opts.pass_options[p.name], slot=slot_name, report_extra=extra, references=refs,
                            host_code=run.host_code)

    for p in impls:  # option checks against the model, before anything else runs
        p.prepare(context(p))
    t = time.perf_counter()
    run.status(f"recording references ({opts.trials} trial{'s' if opts.trials > 1 else ''})")
    try:
        refs.record(model, out0)
    except ModelRunError as e:
        raise BadInput(f"the model cannot run on inputs {spec.describe()}: {e}")
    del out0
    if own_rounding_wanted(opts, storage, dtype, run.passes):
        if run.original is not None:  # run when an output fails the fixed rule, on the file read again
            refs.exact_source = run.original
        else:  # a model in memory only: before the rewrite
            run.status("running the original in float64 (its own rounding)")
            refs.exact_error = refs.record_exact(model)
    changed_by_running = state.changed()
    if changed_by_running:
        report.warnings.append(
            f"{label}running the model changes its buffers ({', '.join(changed_by_running[:4])}"
            f"{', ...' if len(changed_by_running) > 4 else ''}: a module updating its state in eval mode); "
            "they are kept at the checkpoint's values in the output")
    state.restore()
    if refs.grown_error is not None and primary:
        report.notes.append(f"{label}the model does not run at inputs {spec.describe(grow=1)} ({refs.grown_error}): "
                            f"parity is checked at {spec.describe()} only")
    report.timings["reference"] = report.timings.get("reference", 0) + time.perf_counter() - t
    tol = Tolerance.default(storage.default_dtype, opts.atol, opts.rtol)

    def taken(p, ctx, _pr) -> None:
        for check in ctx.checks:  # a pass's own checks (focus-to-conv --check-grad) count as parity
            report.parity.merge(check, prefix=label)
        _take_warnings(report, ctx, label)

    def fresh(p) -> TorchContext:
        ctx = context(p)
        run.status(f"{p.name}: matching")
        return ctx

    def changed(p, _ctx) -> None:
        current["stale_after"] = p.name
        if opts.verify_each and opts.verify and p.preserves_function:
            step = refs.check(model, tol, runner=_rewritten_runner(p.name))
            points.judge(step, editor)
            if not step.passed and not opts.force:
                report.parity.merge(step, prefix=label)
                raise ParityError(f"parity failed after {p.name} ({label}{step.worst()}){points.hint(step)}; "
                                  "nothing written", report)

    t = time.perf_counter()
    rounds = run_rounds(impls, per_pass, context=fresh, taken=taken, changed=changed, repeat=opts.repeat,
                        dry_run=opts.dry_run, slot=slot_name)
    if rounds.stopped:  # an inspection answered (e.g. truncate --list): end the run here
        report.stopped = rounds.stopped
        report.extra.update(extra)
        if primary:
            report.before = before
        return refs
    if rounds.warning():
        report.warnings.append(label + rounds.warning())
    function_changed = any(not p.preserves_function and p.name in rounds.changed for p in impls)
    if refs.uninformative:  # said after the passes: an inspection (truncate --list) compares nothing
        report.warnings.append(f"{label}every output is zero on {refs.trials} random inputs: parity cannot "
                               "tell a right rewrite from a wrong one (choose other --input-shape/--seed)")
    for name in empty_everywhere(refs.outputs)[:4]:
        report.warnings.append(f"{label}{name} is empty on every trial (post-processing kept nothing): parity "
                               "proves nothing about it; compare a module's outputs with --verify-at MODULE")
    if opts.repeat:
        report.extra["rounds"] = max(report.extra.get("rounds", 0), rounds.count)
    report.timings["rewrite"] = report.timings.get("rewrite", 0) + time.perf_counter() - t
    if opts.dry_run:  # nothing was rewritten: there is nothing to verify
        if primary:
            report.before, report.after = before, before
            report.extra.update(extra)
        return refs
    if editor.placeholders:  # folded modules removed as the host's own fuse() removes them
        from .rewrite.removal import finish_removals
        from .verify.compare import compare_outputs

        run.status("checking the host's fused forwards")
        state.restore()
        same = lambda a, b: all(d.passed for d in compare_outputs(a, b, tol))  # noqa: E731
        report.notes.extend(label + n for n in finish_removals(model, editor, inputs0, same))
    t = time.perf_counter()
    run.status("verifying")
    state.restore()  # the verification starts from the state the references started from
    try:
        graph_after, out_after, flops_after = _capture(model, inputs0, count_flops=True)
    except ModelRunError as e:
        raise ParityError(f"the rewritten model fails to run: {e}; nothing written", report)
    if primary:
        report.before, report.after = before, torch_stats(model, graph_after, flops_after)
    if opts.verify:
        own = own_verification(impls, rounds, tol)
        for _p, ctx, result in own:
            _take_warnings(report, ctx, label)
            report.parity.merge(result, prefix=label)
        if not own:
            result = refs.check(model, tol, first_output=out_after, runner=_rewritten_runner(None))
            report.notes.extend(label + n for n in points.judge(result, editor))
            report.extra["parity_hint"] = report.extra.get("parity_hint") or points.hint(result)
            report.parity.merge(result, prefix=label)
        if function_changed:
            # the function changed on purpose: an ONNX export must reproduce the rewritten model
            refs.record(model, out_after)
            refs.rewritten = True
    if primary:
        report.extra.update(extra)
    if refs.exact_error is not None:
        report.notes.append(f"{label}the model's own float32 rounding is not measured ({refs.exact_error}): "
                            "parity uses the fixed tolerance alone")
    report.timings["verify"] = report.timings.get("verify", 0) + time.perf_counter() - t
    return refs


def _take_warnings(report, ctx, label: str) -> None:
    for w in ctx.warnings:
        if label + w not in report.warnings:
            report.warnings.append(label + w)
    ctx.warnings.clear()


def _input_dtype(spec, storage, compute, report) -> Any:
    import torch

    want = spec.torch_dtype()
    if spec.dtype == "float32" and compute == torch.float64:
        return compute
    if want in (torch.float16, torch.bfloat16) and storage.upcast:
        report.notes.append("inputs generated in float32: the model is evaluated in float32")
        return torch.float32
    return want


def _capture(model, inputs, count_flops=False):
    from .capture import capture
    from .verify.torch import ModelRunError

    try:
        return capture(model, inputs, count_flops=count_flops)
    except Exception as e:
        raise ModelRunError(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e


def _first_capture(model, spec, refs, report, compute=None):
    """Capture on the given shapes, or guess shapes from the first layer if none were given."""
    from .verify.inputs import guess_shapes
    from .verify.torch import ModelRunError, dtype_problem

    if spec.shapes:
        try:
            return _capture(model, refs.inputs(0), count_flops=True)
        except ModelRunError as e:
            dtype_problem(model, spec, refs, compute, e)
            raise BadInput(f"the model cannot run on inputs {spec.describe()}: {e}", code="model-cannot-run")
    candidates = guess_shapes(model)
    errors = []
    for shapes in candidates:
        spec.shapes = list(shapes)
        try:
            result = _capture(model, refs.inputs(0), count_flops=True)
        except ModelRunError as e:
            errors.append(f"{spec.describe()}: {e}")
            continue
        spec.guessed = True
        report.warnings.append(f"no --input-shape given: used {spec.describe()}, guessed from the first layer")
        return result
    spec.shapes = []
    tried = "; ".join(errors[:3]) if errors else "no conv or linear layer to guess from"
    raise BadInput(f"no --input-shape given and none could be guessed ({tried}): pass --input-shape")


def _recapture(model, inputs, pass_name):
    from .verify.torch import ModelRunError

    try:
        graph, _out, _ = _capture(model, inputs)
    except ModelRunError as e:
        raise ParityError(f"the model fails to run after {pass_name}: {e}; nothing written")
    return graph


def _rewritten_runner(pass_name):
    from .verify.torch import ModelRunError, run

    def runner(model, inputs):
        try:
            return run(model, inputs)
        except ModelRunError as e:
            after = f" after {pass_name}" if pass_name else ""
            raise ParityError(f"the rewritten model fails to run{after}: {e}; nothing written")

    return runner


def _save(ckpt, opts, report, out_path, out_fmt, primary, refs) -> None:
    from .write.onnx_export import export, ort_run
    from .write.atomic import atomic_path
    from .write.torch import how_to_load, save_pt, save_safetensors
    from .verify.compare import Tolerance, compare_outputs, summarise

    status = opts.status or (lambda _msg: None)
    t = time.perf_counter()
    if opts.dry_run:
        for s in ckpt.slots:
            s.storage.restore(s.module)
        return
    if out_fmt == "onnx":
        status(f"exporting {out_path.name}")
        with atomic_path(out_path) as tmp:
            export(primary.module, refs.inputs(0), tmp, opts.opset)
            if opts.verify:
                tol = Tolerance.default(primary.storage.default_dtype, opts.atol, opts.rtol)
                per_trial = []
                for trial in refs.same_shape_trials():  # the export has the example's fixed shapes
                    try:
                        outs = ort_run(tmp, refs.inputs(trial))
                    except Exception as e:
                        raise ParityError(f"onnxruntime cannot run the exported model: {str(e).splitlines()[0]}; nothing written", report)
                    per_trial.append(compare_outputs(_flat_tensors(refs.outputs[trial]), outs, tol))
                onnx_parity = summarise(per_trial, tol)
                report.parity.merge(onnx_parity, prefix="onnx:")
                report.parity.note = ("onnx outputs compared with onnxruntime (optimisations off) against the "
                                      + ("rewritten torch model (the pass changes the function on purpose)"
                                         if getattr(refs, "rewritten", False) else "original torch model"))
                if not onnx_parity.passed and not opts.force:
                    raise ParityError(f"onnxruntime parity failed ({onnx_parity.worst()}); nothing written", report)
            if len(ckpt.slots) > 1:
                report.notes.append(f"exported the '{primary.name}' model")
        for s in ckpt.slots:
            s.storage.restore(s.module)
    else:
        for s in ckpt.slots:
            s.storage.restore(s.module)
        status(f"writing {out_path.name}")
        if out_fmt == "pt":
            save_pt(ckpt, out_path)
        else:
            name, warnings = save_safetensors(ckpt, out_path)
            report.warnings.extend(warnings)
            if len(ckpt.slots) > 1:
                report.notes.append(f"wrote the '{name}' model's tensors")
        if ckpt.format in ("module", "container") and out_fmt == "safetensors":
            report.notes.append("rebuild with modelsurgeon.load(path, arch='package.module:factory') "
                                "using the original architecture's factory")
        elif ckpt.needs_arch:
            note, report.extra["load"] = how_to_load(ckpt, out_path)
            report.notes.append(note)
    report.written = True
    report.timings["save"] = time.perf_counter() - t


def _flat_tensors(out: Any) -> list:
    from .verify.compare import flatten_outputs

    return [v for _, v in flatten_outputs(out) if hasattr(v, "shape")]
