"""The Python API: the same passes and checks as the CLI.

    import modelsurgeon as ms
    model = ms.load("resnet.pt", trust_pickle=True)
    model, report = ms.fold_bn(model, input_shape=(1, 3, 224, 224))   # in place, verified
    ms.save(model, "resnet-folded.pt")

Each pass function takes the model, ``input_shape`` and, as keywords, the pass's options (the
fields of its options dataclass: ``ms.truncate(model, shape, blocks=2)``) and the verification
options (``trials``, ``seed``, ``atol``, ``rtol``, ``verify_at``, ``verify``); it returns
``(model, report)``. The model is rewritten in place (one copy in memory); if parity fails,
:class:`ParityError` is raised with the report attached -- the model is then already modified,
so keep a copy if you need the original. Whole files (YOLO dicts, state_dicts...) go through
:func:`run`, what the CLI calls.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

from .errors import BadInput, ParityError
from .options.run import RunOptions

Shape = Sequence[int]

__all__ = ["load", "save", "run", "compare", "fold_bn", "focus_to_conv", "fold_fusion", "reparam", "truncate", "optimize"]


def load(path: str | Path, arch: str | None = None, arch_kwargs: dict | str | None = None, *,
         trust_pickle: bool = False, code_paths: Sequence[str | Path] = (), cfg: str | Path | None = None,
         prototxt: str | Path | None = None) -> Any:
    """Load a model from any file modelsurgeon reads or writes.

    * a pickled module or YOLO-style dict: the module (``ema`` when present) -- needs
      ``trust_pickle=True``, since unpickling runs code;
    * a state_dict ``.pt`` or ``.safetensors`` (with ``arch``; or the arch recorded in the file
      by modelsurgeon, with ``trust_pickle=True`` since that imports and calls code the file
      names): the model rebuilt by the factory, with the file's recorded structural edits
      replayed, and the weights loaded in the dtypes the file stores them in;
    * an ``.onnx`` file: the ``onnx.ModelProto``;
    * a darknet ``.weights`` (with ``cfg``, default: the ``.cfg`` beside it) or a Caffe
      ``.caffemodel`` (with ``prototxt``, default: the ``.prototxt`` beside it): the
      ``onnx.ModelProto`` it is read into.
    """
    from .read import load_checkpoint

    ckpt = load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
                           code_paths=code_paths, cfg=cfg, prototxt=prototxt)
    if ckpt.source is not None:
        import onnx

        return onnx.load_from_string(ckpt.source.onnx_bytes)
    if ckpt.is_onnx:
        import onnx

        return onnx.load(str(path))
    return ckpt.primary().module


def save(model: Any, path: str | Path, input_shape: Shape | Sequence[Shape] | None = None, opset: int = 17) -> Path:
    """Write a module: ``.pt`` (pickled module), ``.safetensors`` (state_dict) or ``.onnx``
    (needs ``input_shape``). Atomic."""
    from .write import output_format
    from .write.atomic import atomic_path, check_output_path
    from .write.torch import write_pt

    path = Path(path)
    fmt = output_format(path)
    check_output_path(path)
    if fmt == "pt":
        write_pt(model, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(sd, str(tmp))
    else:
        from .verify.inputs import InputSpec
        from .write.onnx_export import export

        if input_shape is None:
            raise BadInput("saving to .onnx needs input_shape")
        spec = InputSpec.parse(RunOptions(input=Path(path), input_shape=input_shape).input_shape, "float32")
        with atomic_path(path) as tmp:
            export(model.eval(), spec.make(0), tmp, opset)
    return path


def compare(model: Any, reference: Any, input_shape: Shape | Sequence[Shape] | None = None, *, trials: int = 1,
            seed: int = 0, atol: float | None = None, rtol: float | None = None, layers: bool = False,
            inputs: Any = None, **file_options: Any) -> Any:
    """Compare ``model`` with ``reference`` on the same inputs (seeded random ones of
    ``input_shape``, or ``inputs``: a list of arrays, or a list of such lists); does not raise
    when they differ. Either may be a module, or a file path (any file ``modelsurgeon compare``
    takes; ``file_options``: its options, e.g. ``trust_pickle=True``). Returns a
    :class:`~modelsurgeon.verify.models.Comparison` (``passed``, ``outputs`` with their
    statistics, ``first_divergence`` and ``layers`` with ``layers=True``, ``to_json()``)."""
    import numpy as np

    from .options.compare import CompareOptions
    from .verify.compare import Tolerance
    from .verify.models import compare_runners
    from .verify.runners import TorchRunner, open_model, peek_signature

    shape_texts = RunOptions(input=Path("<module>"), input_shape=input_shape or ()).input_shape
    fopts = CompareOptions.from_kwargs("compare", file_options, a=Path("<a>"), b=Path("<b>"))
    modules = [m for m in (reference, model) if not isinstance(m, (str, Path))]
    dtype = tol = None
    if not isinstance(reference, (str, Path)):  # the reference's dtype sets the inputs' and the tolerance
        import torch

        dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
        tol = Tolerance.default(dtype, atol, rtol)
    for m in modules:
        m.eval()

    def opener(m: Any, label: str):
        if isinstance(m, (str, Path)):
            return lambda: open_model(Path(m), arch=fopts.arch, arch_kwargs=fopts.arch_kwargs,
                                      trust_pickle=fopts.trust_pickle, code_paths=fopts.code_paths, label=label)
        return lambda: TorchRunner(m, input_dtype=dtype, label=label)

    sets = None
    if inputs is not None:
        sets = [inputs] if all(not isinstance(x, (list, tuple)) for x in inputs) else list(inputs)
        sets = [[np.asarray(x.detach().cpu() if hasattr(x, "detach") else x) for x in xs] for xs in sets]
    from .verify.inputs import parse_shape

    return compare_runners(opener(reference, "reference"), opener(model, "model"),
                           shapes=[parse_shape(s) for s in shape_texts], inputs=sets, trials=trials, seed=seed,
                           atol=atol, rtol=rtol, layers=layers, tol=tol, names=("reference", "model"),
                           peek_b=lambda: peek_signature(model))


# -- the passes ---------------------------------------------------------------------------------

def _split(where: str, options: dict, *classes: type, allowed_run: Sequence[str] = RunOptions.MODEL) -> list[dict]:
    """``options`` divided among ``classes`` (then the run options); an unknown one is a TypeError."""
    parts: list[dict] = [{} for _ in classes] + [{}]
    for key, value in options.items():
        for i, cls in enumerate(classes):
            f = cls.option_fields().get(key)
            if f is not None and f.info.api:
                parts[i][key] = value
                break
        else:
            if key not in allowed_run:
                raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
            parts[-1][key] = value
    return parts


def _apply(model: Any, command: str, passes: list[str], input_shape: Any, run_kwargs: dict, pass_options: dict,
           repeat: bool = False, verify_each: bool = False) -> tuple[Any, Any]:
    """Run ``passes`` on ``model`` in place and verify: ``(model, report)``."""
    from . import passes as registry
    from .passes.base import PassReport
    from .pipeline_torch import SlotRun, operate
    from .read.prepare import prepare
    from .report import Report
    from .rewrite.recipe import Recipe
    from .verify.compare import ParityReport
    from .verify.inputs import InputSpec

    opts = RunOptions(input=Path("<module>"), input_shape=input_shape or (), **run_kwargs)
    opts.pass_options.update(pass_options)
    opts.repeat, opts.verify_each = repeat, verify_each
    for name in passes:  # passes given no options run with their defaults
        opts.pass_options.setdefault(name, registry.spec(name).options()).check_backend("torch")
    spec = InputSpec.parse(opts.input_shape, "float32", opts.seed)
    report = Report(command=command, input=type(model).__name__)
    report.passes = [PassReport(n) for n in passes]
    report.parity = ParityReport(trials=opts.trials, checked=opts.verify)
    storage = prepare(model)
    try:
        operate(SlotRun(model, storage, passes, opts, spec, report, Recipe()))
    finally:
        storage.restore(model)
    report.inputs = list(spec.shapes)
    if report.stopped:
        report.parity = ParityReport(checked=False, note=f"({report.stopped}: nothing rewritten)")
    if opts.verify and not report.parity.passed:
        raise ParityError(f"parity failed ({report.parity.worst()})", report)
    return model, report


def _pass_function(name: str, where: str) -> Any:
    def apply(model: Any, input_shape: Shape | Sequence[Shape] | None = None, **options: Any) -> tuple[Any, Any]:
        from . import passes as registry

        spec = registry.spec(name)
        own, run_kwargs = _split(where, options, spec.options)
        return _apply(model, name, [name], input_shape, run_kwargs, {name: spec.options(**own)})

    apply.__name__ = apply.__qualname__ = where
    return apply


fold_bn = _pass_function("fold-bn", "fold_bn")
fold_bn.__doc__ = """Fold every BatchNorm / per-channel affine layer into the layer before it, in place."""
focus_to_conv = _pass_function("focus-to-conv", "focus_to_conv")
focus_to_conv.__doc__ = """Replace space-to-depth stems (Focus, pixel_unshuffle) + conv by one strided conv, in place.
Options: ``check_grad`` (also compare the gradients), ``bench`` (time the stem)."""
fold_fusion = _pass_function("fold-fusion", "fold_fusion")
fold_fusion.__doc__ = """Evaluate fusion weights once and fold them into the convs producing the fused inputs, in place."""
reparam = _pass_function("reparam", "reparam")
reparam.__doc__ = """Merge multi-branch blocks (RepVGG, MobileOne, RepConv, ACNet, DBB) into one conv each, in place."""
truncate = _pass_function("truncate", "truncate")
truncate.__doc__ = """Remove the last ``blocks`` blocks of a backbone stage (or those after ``after``), in place,
and rebuild (``head="reinit"``) or drop the layers that read the stage's output; ``stage``
names the stage. The report's ``extra["truncate"]`` holds the stage, its blocks and the
figures; with ``list_blocks=True`` nothing is changed and the report only lists the blocks."""


def optimize(model: Any, input_shape: Shape | Sequence[Shape] | None = None, **options: Any) -> tuple[Any, Any]:
    """Run every exact pass available for PyTorch (``passes=[...]``: those; ``skip=[...]``: not
    those), repeated until nothing changes, in place; ``verify_each=True`` checks parity after
    each pass."""
    from . import passes as registry
    from .options.optimize import OptimizeOptions, commandless

    others = commandless()
    own, *theirs, run_kwargs = _split("optimize", options, OptimizeOptions, *others.values())
    o = OptimizeOptions(**own)
    chosen = [p for p in o.selected() if registry.available(p, "torch")]
    pass_options = {n: cls(**kw) for (n, cls), kw in zip(others.items(), theirs) if n in chosen}
    return _apply(model, "optimize", chosen, input_shape, run_kwargs, pass_options, repeat=True,
                  verify_each=o.verify_each)


def run(command: str, input: str | Path, output: str | Path | None = None, **options: Any) -> Any:
    """What the CLI runs: ``command`` (a pass's command, or ``"optimize"``) on the file ``input``,
    written to ``output`` (default: next to the input); the keywords are the command's options
    and the run options (``arch``, ``trust_pickle``, ``input_shape``, ``trials``...), named as
    the CLI's flags are, with ``_`` for ``-``. Returns the report."""
    from . import passes as registry
    from .options.optimize import OptimizeOptions, commandless
    from .pipeline import run as run_pipeline

    everything = tuple(n for n, f in RunOptions.option_fields().items() if f.info.api and n not in ("input", "output"))
    if command == "optimize":
        others = commandless()
        own, *theirs, run_kwargs = _split("run", options, OptimizeOptions, *others.values(), allowed_run=everything)
        o = OptimizeOptions(**own)
        passes = o.selected()
        pass_options = {n: cls(**kw) for (n, cls), kw in zip(others.items(), theirs) if n in passes}
        plumbing = {"repeat": True, "verify_each": o.verify_each}
    else:
        spec = next((s for s in registry.specs() if s.cli == command), None)
        if spec is None:
            known = [s.cli for s in registry.specs() if s.cli] + ["optimize"]
            raise BadInput(f"unknown command {command!r} (known: {', '.join(known)})")
        own, run_kwargs = _split("run", options, spec.options, allowed_run=everything)
        passes, pass_options, plumbing = [spec.name], {spec.name: spec.options(**own)}, {}
    opts = RunOptions(input=input, output=output, **run_kwargs)
    opts.pass_options.update(pass_options)
    for key, value in plumbing.items():
        setattr(opts, key, value)
    return run_pipeline(command, passes, opts)


def _signature(fn: Any, classes: list[type], run_fields: Sequence[str]) -> None:
    """Show the keyword arguments in ``help()`` and ``inspect.signature``."""
    base = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    seen = {p.name for p in base}
    fields = RunOptions.option_fields()
    extra = []
    for f in [f for c in classes for f in c.option_fields().values() if f.info.api] + [fields[n] for n in run_fields]:
        if f.name not in seen:
            seen.add(f.name)
            extra.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type))
    fn.__signature__ = inspect.Signature(base + extra)


def _signatures() -> None:
    from .passes.focus_to_conv import FocusToConvOptions
    from .passes.truncate import TruncateOptions
    from .options.optimize import OptimizeOptions

    model_fields = [n for n in RunOptions.MODEL if n != "input_shape"]
    for fn, classes in ((fold_bn, []), (fold_fusion, []), (reparam, []), (focus_to_conv, [FocusToConvOptions]),
                        (truncate, [TruncateOptions]), (optimize, [OptimizeOptions])):
        _signature(fn, classes, model_fields)


_signatures()
