"""The Python API: the same passes and checks as the CLI, on an ``nn.Module`` in memory.

    import modelsurgeon as ms
    model = ms.load("resnet.pt", trust_pickle=True)
    report = ms.fold_bn(model, input_shape=(1, 3, 224, 224))   # in place, verified
    ms.save(model, "resnet-folded.pt")

The model is rewritten in place (one copy in memory); if parity fails, :class:`ParityError` is
raised with the report attached -- the model is then already modified, so keep a copy if you
need the original afterwards. Whole checkpoint files (YOLO dicts, state_dicts...) are best
handled by :func:`run`, which is what the CLI calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .errors import BadInput, ParityError
from .read import load_checkpoint  # noqa: F401  (re-exported)
from .pipeline import Options, run  # noqa: F401  (re-exported)

Shape = Sequence[int]


def _shape_args(input_shape: Shape | Sequence[Shape] | None) -> list[str]:
    if input_shape is None:
        return []
    shapes = [input_shape] if input_shape and isinstance(input_shape[0], int) else list(input_shape)
    return [",".join(str(int(d)) for d in s) for s in shapes]


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
    ckpt = load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
                           code_paths=code_paths, cfg=cfg, prototxt=prototxt)
    if ckpt.source is not None:
        import onnx

        return onnx.load_from_string(ckpt.source.onnx_bytes)
    if ckpt.is_onnx:
        import onnx

        return onnx.load(str(path))
    return ckpt.primary().module


def apply_passes(model: Any, passes: Sequence[str], input_shape: Shape | Sequence[Shape] | None = None, *,
                 trials: int = 2, seed: int = 0, atol: float | None = None, rtol: float | None = None,
                 verify: bool = True, repeat: bool = False, pass_options: dict | None = None,
                 command: str | None = None):
    """Run passes on ``model`` in place and verify; returns the :class:`~modelsurgeon.report.Report`."""
    from .read.prepare import prepare
    from .passes.base import PassReport
    from .pipeline import operate
    from .report import Report
    from .rewrite.recipe import Recipe
    from .verify.compare import ParityReport
    from .verify.inputs import InputSpec

    opts = Options(input=Path("<module>"), input_shapes=_shape_args(input_shape), trials=trials,
                   seed=seed, atol=atol, rtol=rtol, verify=verify, repeat=repeat,
                   pass_options=pass_options or {})
    opts.check()
    spec = InputSpec.parse(opts.input_shapes, "float32", seed)
    report = Report(command=command or "+".join(passes), input=type(model).__name__)
    report.passes = [PassReport(n) for n in passes]
    report.parity = ParityReport(trials=trials, checked=verify)
    storage = prepare(model)
    try:
        operate(model, storage, passes, opts, spec, report, Recipe())
    finally:
        storage.restore(model)
    report.inputs = list(spec.shapes)
    if report.stopped:
        report.parity = ParityReport(checked=False, note=f"({report.stopped}: nothing rewritten)")
    if verify and not report.parity.passed:
        raise ParityError(f"parity failed ({report.parity.worst()})", report)
    return report


def fold_bn(model: Any, input_shape: Shape | Sequence[Shape] | None = None, **kwargs: Any):
    """Fold every BatchNorm / per-channel affine layer into the layer before it, in place."""
    return apply_passes(model, ["fold-bn"], input_shape, command="fold-bn", **kwargs)


def truncate(model: Any, input_shape: Shape | Sequence[Shape] | None = None, *, blocks: int | None = None,
             after: str | None = None, stage: str | None = None, head: str = "reinit",
             list_blocks: bool = False, **kwargs: Any):
    """Remove the last ``blocks`` blocks of a backbone stage (or those after ``after``), in place,
    and rebuild (``head="reinit"``) or drop the layers that read the stage's output.

    The report's ``extra["truncate"]`` holds the stage, its blocks and the figures; with
    ``list_blocks=True`` nothing is changed and the report only lists the blocks.
    """
    opts = {"truncate": {"blocks": blocks, "after": after, "stage": stage, "list": list_blocks,
                         "head": head, "at": []}}
    return apply_passes(model, ["truncate"], input_shape, pass_options=opts, command="truncate", **kwargs)


def focus_to_conv(model: Any, input_shape: Shape | Sequence[Shape] | None = None, *, check_grad: bool = False,
                  **kwargs: Any):
    """Replace space-to-depth stems (Focus, pixel_unshuffle) + conv by one strided conv, in place."""
    opts = {"focus-to-conv": {"check_grad": check_grad, "bench": False}}
    return apply_passes(model, ["focus-to-conv"], input_shape, pass_options=opts, command="focus-to-conv", **kwargs)


def fold_fusion(model: Any, input_shape: Shape | Sequence[Shape] | None = None, **kwargs: Any):
    """Evaluate fusion weights once and fold them into the convs producing the fused inputs, in place."""
    return apply_passes(model, ["fold-fusion"], input_shape, command="fold-fusion", **kwargs)


def optimize(model: Any, input_shape: Shape | Sequence[Shape] | None = None, *,
             passes: Sequence[str] | None = None, **kwargs: Any):
    """Run every exact pass available for PyTorch (or ``passes``), repeated until nothing changes."""
    from . import passes as registry

    chosen = [p for p in (passes or registry.exact_passes()) if registry.available(p, "torch")]
    kwargs.setdefault("repeat", True)
    return apply_passes(model, chosen, input_shape, command="optimize", **kwargs)


def compare(model: Any, reference: Any, input_shape: Shape | Sequence[Shape], *, trials: int = 1,
           seed: int = 0, atol: float | None = None, rtol: float | None = None):
    """Compare two models on the same random inputs; returns a ParityReport (does not raise)."""
    import torch

    from .verify.compare import Tolerance, compare_outputs, summarise
    from .verify.inputs import InputSpec
    from .verify.torch import run as run_model

    spec = InputSpec.parse(_shape_args(input_shape), "float32", seed)
    dtype = next((p.dtype for p in reference.parameters() if p.is_floating_point()), torch.float32)
    tol = Tolerance.default(dtype, atol, rtol)
    model.eval()
    reference.eval()
    diffs = []
    for t in range(trials):
        x = spec.make(t, dtype)
        diffs.append(compare_outputs(run_model(reference, x), run_model(model, x), tol))
    return summarise(diffs, tol)


def save(model: Any, path: str | Path, input_shape: Shape | Sequence[Shape] | None = None, opset: int = 17) -> Path:
    """Write a module: ``.pt`` (pickled module), ``.safetensors`` (state_dict) or ``.onnx``
    (needs ``input_shape``). Atomic."""
    import torch

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
        from .write.onnx_export import export
        from .verify.inputs import InputSpec

        if input_shape is None:
            raise BadInput("saving to .onnx needs input_shape")
        spec = InputSpec.parse(_shape_args(input_shape), "float32")
        with atomic_path(path) as tmp:
            export(model.eval(), spec.make(0), tmp, opset)
    return path
