"""The pipeline for ONNX inputs, natively (no PyTorch round trip):

    read       modelsurgeon/read/onnx.py      onnx_ir model, external data checked and mapped
    capture    modelsurgeon/capture/onnx.py   the IR is the graph: readers, constants, evaluation
    reference  modelsurgeon/verify/onnx.py    the ORIGINAL file run in onnxruntime (optimisations off)
    passes     modelsurgeon/passes/*/onnx.py  the same round loop (passes/manager.py) as PyTorch
    cleanup    modelsurgeon/rewrite/onnx.py   dead nodes and initializers removed, topological sort
    write      modelsurgeon/write/onnx.py     staged write, ONNX checker, parity of the written file,
                                              then moved into place (external data above 2 GB)

Darknet and Caffe inputs arrive here as the ONNX graph they were read into (``read/darknet``,
``read/caffe``); the references are that graph's outputs, and a ``.weights`` / ``.caffemodel``
output is written by ``write/darknet.py`` / ``write/caffe.py``, read back with the same reader
and checked like an ``.onnx`` output.

Verification compares every output of the written file, by name, with the original's value
of the tensor of that name. Function-preserving passes keep the output names, so that is the
original outputs; a pass that changes the outputs on purpose (truncate) names the tensors the
references must include in its ``prepare(ctx)``, and is verified by the same rule.
"""

from __future__ import annotations

import time
from typing import Any

from .errors import BadInput, ParityError


def storage_dtype(model: Any) -> str:
    """The float dtype holding most weight elements (sets the default tolerance)."""
    counts: dict[str, int] = {}
    for v in model.graph.initializers.values():
        t = v.const_value
        if t is None or not t.dtype.is_floating_point():
            continue
        name = t.dtype.numpy().name if hasattr(t.dtype, "numpy") else "float32"
        counts[name] = counts.get(name, 0) + int(t.size)
    return max(counts, key=counts.get) if counts else "float32"


def run_onnx(command, passes, opts, ckpt, report, out_path, out_fmt):
    from .capture.onnx import quiet_onnx_ir

    with quiet_onnx_ir():  # onnx_ir's log lines stay off stderr: problems are reported in one line
        return _run_onnx(command, passes, opts, ckpt, report, out_path, out_fmt)


def _type_outputs(model, refs, report) -> None:
    """Give graph outputs that shape inference left untyped (the output of a custom-domain
    op a cut made an output) the elem type and shape of the original's value of that tensor in
    onnxruntime; BadInput when there is none."""
    import numpy as np
    import onnx_ir as ir

    from .capture.onnx import format_shape

    static = all(v.shape is not None and all(isinstance(d, int) for d in v.shape.dims)
                 for v in model.graph.inputs if not v.is_initializer())
    for v in model.graph.outputs:
        if v.dtype is not None:
            continue
        arrays = [o.get(v.name) for o in refs.outputs]
        if not arrays or any(a is None for a in arrays):
            raise BadInput(f"output {v.name!r}: its type is unknown (onnx shape inference cannot give it and "
                           "onnxruntime did not return it), so it cannot be declared; nothing written")
        arr = np.asarray(arrays[0])
        try:
            dtype = ir.DataType.from_numpy(arr.dtype)
        except Exception:
            raise BadInput(f"output {v.name!r}: its type is unknown and onnxruntime returns {arr.dtype}, which "
                           "cannot be declared; nothing written")
        v.dtype = dtype
        said = [f"type {arr.dtype}"]
        if v.shape is None:
            # the run's sizes are those of the example inputs: declared only when every input is static
            v.shape = ir.Shape(arr.shape if static else [None] * arr.ndim)
            said.append(f"shape {format_shape(tuple(d if isinstance(d, int) else None for d in v.shape.dims))}")
        report.notes.append(f"output {v.name!r}: {' and '.join(said)} taken from onnxruntime's run of the original "
                            "(onnx shape inference cannot give it)")


def _run_onnx(command, passes, opts, ckpt, report, out_path, out_fmt):
    from . import passes as registry
    from .capture.onnx import OnnxGraph, infer_shapes
    from .passes.base import OnnxContext, PassReport
    from .passes.manager import own_verification, run_rounds
    from .report.stats import onnx_stats
    from .rewrite.onnx import OnnxEditor
    from .write.atomic import atomic_files
    from .write.onnx import check, wants_external, write
    from .verify.compare import ParityReport, Tolerance
    from .verify.onnx import OnnxInputs, OnnxReferences, OrtError
    from .verify.points_onnx import OnnxPoints

    status = opts.status or (lambda _msg: None)
    report.backend = "onnx"
    native = ckpt.format if ckpt.source is not None else None
    if out_fmt != "onnx" and out_fmt != native:
        if native is not None:
            raise BadInput(f"a {native} model is written as .onnx or {NATIVE_SUFFIX[native]} (got {out_path.name!r}); "
                           "PyTorch outputs of it are not supported", code="output-format")
        raise BadInput(f"an ONNX input is written as .onnx (got {out_path.name!r}): modelsurgeon edits ONNX "
                       "graphs natively and does not convert them to PyTorch")
    report.notes.extend(n for n in ckpt.notes if n not in report.notes)
    if out_fmt != "onnx" and any(registry.spec(p).group == "cleanup" for p in passes):
        # a .cfg / .prototxt can record the surgery passes' rewrites, not a cleaned-up graph
        passes = [p for p in passes if registry.spec(p).group != "cleanup"]
        report.notes.append(f"graph clean-up not run: {native} files record only the surgery passes' rewrites "
                            "(write .onnx to have it)")
    model = ckpt.container
    if ckpt.metadata.get("sparse_initializers"):
        n = ckpt.metadata["sparse_initializers"]
        report.notes.append(f"{n} sparse initializer{'s' if n > 1 else ''} read as dense (written dense)")
    spec = OnnxInputs.from_model(model, opts.input_shape, opts.dtype, opts.seed)
    report.inputs = list(spec.shapes)
    report.notes.extend(spec.notes)
    report.passes = [PassReport(name) for name in passes]
    report.parity = ParityReport(trials=opts.trials, checked=opts.verify)
    report.before = onnx_stats(model)
    editor = OnnxEditor(model)
    input_shapes = dict(zip(spec.names, spec.shapes))
    given = input_shapes if opts.input_shape else {}
    impls = [registry.get(name, "onnx") for name in passes]

    def context(p) -> OnnxContext:
        return OnnxContext(model=model, graph=OnnxGraph(model), editor=editor, options=opts.pass_options[p.name],
                           input_shapes=input_shapes, given_shapes=given, references=refs)

    # options checks + tensors the references must include (before anything runs)
    points = OnnxPoints(model, opts.verify_at)  # --verify-at tensors, post-processed outputs
    if points.describe():
        report.notes.append(points.describe())
        report.extra.update(post_processed=dict(points.post), suggest_verify_at=points.suggestion)
    refs = OnnxReferences(spec, opts.trials)
    extra: list[str] = list(opts.verify_at)
    for p in impls:
        extra += [n for n in (p.prepare(context(p)) or []) if n not in extra]
    original_outputs = [v.name for v in model.graph.outputs]
    expected = extra if any(not p.preserves_function for p in impls) else original_outputs + list(opts.verify_at)

    values = OnnxGraph(model).values_by_name()
    types = {n: int(values[n].dtype) for n in extra if n in values and values[n].dtype is not None}

    def references() -> OnnxReferences:
        """The original FILE's outputs, run on first need (the in-memory model may be edited)."""
        if not refs.outputs:
            t = time.perf_counter()
            status(f"recording references ({opts.trials} trial{'s' if opts.trials > 1 else ''})")
            try:
                refs.record(ckpt.onnx_source, extra, types)
            except OrtError as e:
                raise BadInput(f"onnxruntime cannot run {ckpt.path.name} on inputs {spec.describe()}: {e}")
            if refs.grown_error is not None:
                report.notes.append(f"the model does not run at inputs {spec.describe(grow=1)} ({refs.grown_error}): "
                                    f"parity is checked at {spec.describe()} only")
            report.timings["reference"] = time.perf_counter() - t
        return refs

    tol = Tolerance.default(storage_dtype(model), opts.atol, opts.rtol)
    per_pass = {p.name: p for p in report.passes}

    def taken(p, ctx, _pr) -> None:
        report.warnings.extend(w for w in ctx.warnings if w not in report.warnings)
        report.extra.update(ctx.report_extra)

    def changed(p, _ctx) -> None:
        editor.cleanup()
        infer_shapes(model)
        if opts.verify_each and opts.verify:
            status(f"{p.name}: checking parity")
            step = _check_in_memory(model, ckpt, references(), tol, [n for n in expected if n not in opts.verify_at],
                                    p.name, report)
            if not step.passed and not opts.force:
                report.parity.merge(step)
                raise ParityError(f"parity failed after {p.name} ({step.worst()}); nothing written", report)

    def fresh(p) -> OnnxContext:
        status(f"{p.name}: matching")
        return context(p)

    t = time.perf_counter()
    rounds = run_rounds(impls, per_pass, context=fresh, taken=taken, changed=changed, repeat=opts.repeat,
                        dry_run=opts.dry_run)
    if rounds.stopped:  # an inspection answered (truncate --list): end the run here
        report.stopped = rounds.stopped
        report.output = None
        report.parity = ParityReport(checked=False, note=f"({rounds.stopped})")
        return report
    if rounds.warning():
        report.warnings.append(rounds.warning())
    report.extra["rounds"] = rounds.count
    report.timings["rewrite"] = time.perf_counter() - t
    report.after = onnx_stats(model)
    points.after_passes(model)

    if opts.dry_run:
        report.parity = ParityReport(checked=False, note="(--dry-run: nothing rewritten)")
        return report
    if not opts.verify:
        report.parity = ParityReport(checked=False, note="(--no-verify)")
    else:
        for _p, _ctx, result in own_verification(impls, rounds, tol):  # added to the written file's check
            report.parity.merge(result)

    if any(v.dtype is None for v in model.graph.outputs):
        _type_outputs(model, references(), report)

    if out_fmt != "onnx":
        return _write_native(model, ckpt, opts, report, out_path, references, tol, expected, points)
    t = time.perf_counter()
    external = wants_external(model, bool(ckpt.metadata.get("external_data")))
    status(f"writing {out_path.name}")
    with atomic_files(out_path) as tmp_dir:
        tmp = write(model, tmp_dir, out_path.name, external)
        problem = check(tmp)
        if problem:
            original = check(ckpt.onnx_source)
            if original is not None:
                report.notes.append(f"the input fails the ONNX checker too: {original}")
            elif not opts.force:
                raise ParityError(f"the rewritten model fails the ONNX checker: {problem}; nothing written", report)
            else:
                report.warnings.append(f"the rewritten model fails the ONNX checker ({problem}); written anyway because of --force")
        report.timings["save"] = time.perf_counter() - t
        if opts.verify:
            _verify_written(tmp, references, tol, expected, opts, report, points, model,
                            "the written file run in onnxruntime (graph optimisations off) against the original file, "
                            "output by output")
    if external:
        report.notes.append(f"tensors written as external data next to the model: {out_path.name}.data")
    report.written = True
    return report


def _verify_written(src, references, tol, expected, opts, report, points, model, note) -> None:
    """Parity of the written model (a staged file, or the graph written files read back into;
    ``--verify-at`` tensors exposed) against the references; ParityError (nothing written)
    unless it passes or --force."""
    from .verify.onnx import OrtError
    from .verify.points_onnx import session_with_outputs

    t = time.perf_counter()
    (opts.status or (lambda _msg: None))("verifying the written model")
    try:
        result = references().check(session_with_outputs(src, opts.verify_at), tol, expected)
    except OrtError as e:
        raise ParityError(f"onnxruntime cannot run the written model: {e}; nothing written", report)
    report.notes.extend(points.judge(result, model))
    report.parity.merge(result)
    report.parity.note = note
    report.timings["verify"] = time.perf_counter() - t
    if not result.passed:
        if not opts.force:
            raise ParityError(f"parity failed ({result.worst()}){points.hint(result)}; nothing written", report)
        report.warnings.append("parity failed; writing anyway because of --force")


NATIVE_SUFFIX = {"darknet": ".weights (+ .cfg)", "caffe": ".caffemodel (+ .prototxt)"}


def _write_native(model, ckpt, opts, report, out_path, references, tol, expected, points):
    """Write the graph back in the input's own format (darknet / Caffe), read the written files
    back with the same reader, and check them like an .onnx output; both files or neither."""
    from .write.atomic import atomic_files, check_output_path

    status = opts.status or (lambda _msg: None)
    if ckpt.format == "darknet":
        from .read.darknet import read_darknet as read
        from .write.darknet import write_darknet as write

        side, original_side = out_path.with_suffix(".cfg"), ckpt.source.cfg_path
    else:
        from .read.caffe import read_caffe as read
        from .write.caffe import write_caffe as write

        side, original_side = out_path.with_suffix(".prototxt"), ckpt.source.prototxt_path
    check_output_path(side, original_side, opts.in_place)
    t = time.perf_counter()
    status(f"writing {out_path.name} and {side.name}")
    with atomic_files(out_path) as tmp_dir:
        main, companion, notes = write(model, ckpt.source, tmp_dir, out_path.name)
        report.notes.extend(notes)
        report.timings["save"] = time.perf_counter() - t
        try:
            back = read(main, companion, opts.input_shape)
        except BadInput as e:
            raise ParityError(f"the written {ckpt.format} files do not read back ({e}); nothing written", report)
        names = {v.name for v in back.model.graph.outputs}
        lost = [n for n in expected if n not in names and n not in opts.verify_at]
        if lost:
            raise BadInput(f"{ckpt.format} files cannot give {lost[0]!r} as an output (its outputs are the heads / "
                           "the last layer); nothing written -- write .onnx instead", code="cannot-write-format")
        if opts.verify:
            _verify_written(back.onnx_bytes, references, tol, expected, opts, report, points, model,
                            f"the written {ckpt.format} files read back and run in onnxruntime (graph optimisations "
                            "off) against the original, output by output")
    report.notes.append(f"written with {side.name} beside it")
    report.written = True
    return report


def _check_in_memory(model, ckpt, refs, tol, expected, pass_name, report):
    """Parity of the model as it stands (--verify-each), without writing it anywhere."""
    import onnx_ir as ir

    from .write.onnx import EXTERNAL_THRESHOLD, nbytes
    from .verify.onnx import OrtError, session

    inline = sum(nbytes(v.const_value) for v in model.graph.initializers.values()
                 if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))
    try:
        if inline > EXTERNAL_THRESHOLD:
            import tempfile
            from pathlib import Path

            from .write.onnx import write

            with tempfile.TemporaryDirectory() as d:
                sess = session(Path(write(model, Path(d), "model.onnx", external=True)))
                return refs.check(sess, tol, expected)
        sess = session(ir.to_proto(model).SerializeToString(), ckpt.path.resolve().parent)
        return refs.check(sess, tol, expected)
    except OrtError as e:
        raise ParityError(f"onnxruntime cannot run the model after {pass_name}: {e}; nothing written", report)
