"""The pipeline every command runs: load → capture → match → rewrite → verify → save.

    load     modelsurgeon/load      safe unpickling, containers, --arch, safetensors, ONNX, Darknet, Caffe
    capture  modelsurgeon/capture   dataflow graph of the real forward (no tracing needed)
    match    modelsurgeon/passes/*  pattern + exactness check (shared helpers: modelsurgeon/match)
    rewrite  modelsurgeon/passes/*  in-place edit (shared helpers: modelsurgeon/rewrite)
    verify   modelsurgeon/verify    parity on random inputs against references taken first
    save     modelsurgeon/save      atomic .pt / .safetensors / .onnx

Only one copy of the model is ever in memory: references are the original's outputs, captured
before the rewrite, which then happens in place.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import BadInput, ParityError
from .report import Report


@dataclass
class Options:
    input: Path
    output: Path | None = None
    arch: str | None = None
    arch_kwargs: str | dict | None = None
    trust_pickle: bool = False
    code_paths: Sequence[str | Path] = ()
    cfg: Path | None = None  # the .cfg of a darknet .weights input (default: beside it)
    prototxt: Path | None = None  # the .prototxt of a .caffemodel input (default: beside it)
    input_shapes: Sequence[str] = ()
    dtype: str = "auto"
    seed: int = 0
    trials: int = 2
    atol: float | None = None
    rtol: float | None = None
    verify: bool = True
    verify_each: bool = False
    force: bool = False
    dry_run: bool = False
    in_place: bool = False
    opset: int = 17
    verify_at: Sequence[str] = ()  # modules (PyTorch) / tensors (ONNX) whose outputs are compared too
    repeat: bool = False  # run the pass list again until nothing changes (optimize)
    pass_options: dict = field(default_factory=dict)  # pass name -> options
    status: Callable[[str], None] | None = None

    def check(self) -> None:
        """Refuse impossible values before any work (the CLI and the Python API alike)."""
        if self.trials < 1:
            raise BadInput("--trials must be at least 1")
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise BadInput(f"{flag} {value}: a tolerance must be a finite number >= 0")
        if not 0 <= self.seed < 2**32:
            raise BadInput(f"--seed {self.seed}: choose a seed from 0 to 2**32 - 1")


def default_output(opts: Options, command: str) -> Path:
    """``INPUT.<command>.<ext>`` next to the input; a ``.bin`` / ``.tar`` / ``.pkl`` checkpoint
    gets ``.pt`` (the container torch writes)."""
    from .write import FORMATS

    src = Path(opts.input)
    if opts.in_place:
        return src
    suffix = src.suffix if src.suffix.lower() in FORMATS else ".pt"
    return src.with_name(f"{src.stem}.{command}{suffix}")


def run(command: str, passes: Sequence[str], opts: Options) -> Report:
    """Run ``passes`` on ``opts.input`` and write the result; returns the report.

    Raises :class:`BadInput` (exit 2) before writing anything for unusable input, and
    :class:`ParityError` (exit 1, report attached) when the rewritten model's outputs differ
    from the original's beyond tolerance (unless ``force``).
    """
    from . import passes as registry
    from .read import load_checkpoint
    from .write import output_format
    from .write.atomic import check_output_path

    status = opts.status or (lambda _msg: None)
    opts.input = Path(opts.input)
    report = Report(command=command, input=str(opts.input), dry_run=opts.dry_run)
    for name in passes:
        if name not in registry.REGISTRY:
            raise BadInput(f"unknown pass {name!r} (known: {', '.join(registry.REGISTRY)})")
    passes = list(passes)
    opts.check()
    out_path = Path(opts.output) if opts.output else default_output(opts, command)
    out_fmt = output_format(out_path)
    check_output_path(out_path, opts.input, opts.in_place)
    report.output = str(out_path)

    from .read import CONVERTED

    if opts.input.suffix.lower() not in {".onnx", *CONVERTED}:  # timed on its own: the loaders import it lazily
        t = time.perf_counter()
        import torch  # noqa: F401

        report.timings["import"] = time.perf_counter() - t
        if out_fmt == "onnx":
            from .write.onnx_export import check_opset

            check_opset(opts.opset)
    t = time.perf_counter()
    status(f"loading {opts.input.name}")
    ckpt = load_checkpoint(opts.input, arch=opts.arch, arch_kwargs=opts.arch_kwargs,
                           trust_pickle=opts.trust_pickle, code_paths=opts.code_paths, cfg=opts.cfg,
                           prototxt=opts.prototxt, input_shapes=opts.input_shapes)
    report.timings["load"] = time.perf_counter() - t
    report.input_format = ckpt.format
    backend = "onnx" if ckpt.is_onnx else "torch"
    if len(passes) > 1:  # optimize: passes without this back end are left out, and said so
        for name in [p for p in passes if not registry.available(p, backend)]:
            if not registry.REGISTRY[name].cleanup:  # graph clean-up has no meaning for a module
                report.notes.append(f"{name} is not available for {backend} models: not run")
            passes.remove(name)
    for name in passes:
        if not registry.available(name, backend):
            raise BadInput(f"{name} is not available for {backend} models")
    if ckpt.is_onnx:
        from .pipeline_onnx import run_onnx

        return run_onnx(command, passes, opts, ckpt, report, out_path, out_fmt)
    return _run_torch(command, passes, opts, ckpt, report, out_path, out_fmt)


def _run_torch(command, passes, opts, ckpt, report, out_path, out_fmt) -> Report:
    from .read.prepare import prepare
    from .passes.base import PassReport
    from .verify.compare import ParityReport
    from .verify.inputs import InputSpec

    status = opts.status or (lambda _msg: None)
    spec = InputSpec.parse(opts.input_shapes, "float32" if opts.dtype == "auto" else opts.dtype, opts.seed)
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
        refs = operate(slot.module, slot.storage, passes, opts, spec, report, recipe,
                       slot_name=slot.name if multi else None, primary=slot is primary)
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


def operate(model, storage, passes, opts, spec, report, recipe, slot_name=None, primary=True):
    """Capture, rewrite and verify one model in place; accumulate into ``report``.

    Returns the :class:`References` (the original's outputs), for an ONNX export's parity.
    Whatever happens, buffers that running the model changed are left as the checkpoint had
    them (:class:`BufferState`).
    """
    from .read.prepare import BufferState

    state = BufferState(model)
    try:
        return _operate(model, storage, passes, opts, spec, report, recipe, slot_name, primary, state)
    finally:
        state.restore()


def _operate(model, storage, passes, opts, spec, report, recipe, slot_name, primary, state):
    from . import passes as registry
    from .read.prepare import compute_dtype
    from .passes.base import TorchContext, run_pass
    from .report.stats import torch_stats
    from .rewrite.modules import ModuleEditor
    from .verify.compare import Tolerance
    from .verify.exact import own_rounding_wanted
    from .verify.points import TorchPoints, empty_everywhere
    from .verify.torch import ModelRunError, References

    status = opts.status or (lambda _msg: None)
    label = f"{slot_name}: " if slot_name else ""
    per_pass = {p.name: p for p in report.passes}
    if storage.upcast:
        report.notes.append(f"{slot_name or 'the model'} is stored in {str(storage.default_dtype).replace('torch.', '')}: "
                            "evaluated in float32, rewritten weights rounded to the stored dtype")
    dtype = _input_dtype(spec, storage, compute_dtype(storage), report)
    t = time.perf_counter()
    status(f"{label}capturing the dataflow graph")
    refs = References(spec, opts.trials, dtype)
    refs.at = list(opts.verify_at)
    graph, out0, flops = _first_capture(model, spec, refs, report, compute_dtype(storage))
    report.timings["capture"] = report.timings.get("capture", 0) + time.perf_counter() - t
    before = torch_stats(model, graph, flops)
    points = TorchPoints(model, graph, out0, opts.verify_at)  # where to compare (verify/points.py)
    if points.describe() and primary:
        report.notes.append(label + points.describe())
        report.extra.update(post_processed=dict(points.post), suggest_verify_at=points.suggestion)
    t = time.perf_counter()
    status(f"{label}recording references ({opts.trials} trial{'s' if opts.trials > 1 else ''})")
    try:
        refs.record(model, out0)
    except ModelRunError as e:
        raise BadInput(f"the model cannot run on inputs {spec.describe()}: {e}")
    del out0
    if own_rounding_wanted(opts, storage, dtype, passes):
        status(f"{label}running the original in float64 (its own rounding)")
        why = refs.record_exact(model)
        if why is not None:
            report.notes.append(f"{label}the model's own float32 rounding is not measured ({why}): "
                                "parity uses the fixed tolerance alone")
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
    editor = ModuleEditor(model, storage, recipe)
    inputs0 = refs.inputs(0)
    tol = Tolerance.default(storage.default_dtype, opts.atol, opts.rtol)
    custom_verify = None
    stale_after = None  # the pass after which the graph no longer describes the model
    function_changed = False
    extra: dict = {}  # the passes' report sections (TorchContext.report_extra)
    t = time.perf_counter()
    for round_ in range(8):
        changed = False
        for name in passes:
            if stale_after is not None:  # re-capture only when another pass needs the graph
                status(f"{label}{stale_after}: re-capturing")
                graph = _recapture(model, inputs0, stale_after)
                stale_after = None
            p = registry.get(name, "torch")
            status(f"{label}{name}: matching")
            ctx = TorchContext(model=model, graph=graph, inputs=inputs0, editor=editor,
                               options=opts.pass_options.get(name, {}), slot=slot_name,
                               report_extra=extra)
            ctx.references = refs
            pr = run_pass(p, ctx, dry_run=opts.dry_run)
            per_pass[name].add_round(pr, first_round=round_ == 0, slot=slot_name)
            for check in ctx.checks:  # a pass's own checks (focus-to-conv --check-grad) count as parity
                report.parity.merge(check, prefix=label)
            _take_warnings(report, ctx, label)
            if ctx.stop:  # an inspection answered (e.g. truncate --list): end the run here
                report.stopped = ctx.stop
                report.extra.update(extra)
                if primary:
                    report.before = before
                return refs
            if not p.preserves_function:
                custom_verify = (p, ctx)
                function_changed = function_changed or (pr.changed and not opts.dry_run)
            if pr.changed and not opts.dry_run:
                changed = True
                stale_after = name
                if opts.verify_each and opts.verify and p.preserves_function:
                    step = refs.check(model, tol, runner=_rewritten_runner(name))
                    points.judge(step, editor)
                    if not step.passed and not opts.force:
                        report.parity.merge(step, prefix=label)
                        raise ParityError(f"parity failed after {name} ({label}{step.worst()}){points.hint(step)}; "
                                          "nothing written", report)
        if not (opts.repeat and changed):
            break
    if refs.uninformative:  # said after the passes: an inspection (truncate --list) compares nothing
        report.warnings.append(f"{label}every output is zero on {refs.trials} random inputs: parity cannot "
                               "tell a right rewrite from a wrong one (choose other --input-shape/--seed)")
    for name in empty_everywhere(refs.outputs)[:4]:
        report.warnings.append(f"{label}{name} is empty on every trial (post-processing kept nothing): parity "
                               "proves nothing about it; compare a module's outputs with --verify-at MODULE")
    if opts.repeat:
        report.extra["rounds"] = max(report.extra.get("rounds", 0), round_ + 1)
    report.timings["rewrite"] = report.timings.get("rewrite", 0) + time.perf_counter() - t
    if opts.dry_run:  # nothing was rewritten: there is nothing to verify
        if primary:
            report.before, report.after = before, before
            report.extra.update(extra)
        return refs
    if editor.placeholders:  # folded modules removed as the host's own fuse() removes them
        from .rewrite.removal import finish_removals
        from .verify.compare import compare_outputs

        status(f"{label}checking the host's fused forwards")
        state.restore()
        same = lambda a, b: all(d.passed for d in compare_outputs(a, b, tol))  # noqa: E731
        report.notes.extend(label + n for n in finish_removals(model, editor, inputs0, same))
    t = time.perf_counter()
    status(f"{label}verifying")
    state.restore()  # the verification starts from the state the references started from
    try:
        graph_after, out_after, flops_after = _capture(model, inputs0, count_flops=True)
    except ModelRunError as e:
        raise ParityError(f"the rewritten model fails to run: {e}; nothing written", report)
    if primary:
        report.before, report.after = before, torch_stats(model, graph_after, flops_after)
    if opts.verify:
        if custom_verify is not None:
            result = custom_verify[0].verify(custom_verify[1], tol)
            _take_warnings(report, custom_verify[1], label)
        else:
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
