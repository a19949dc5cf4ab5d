"""The pipeline every command runs: read → capture → match → rewrite → verify → write.

    read     modelsurgeon/read      safe unpickling, containers, --arch, safetensors, ONNX, Darknet, Caffe
    capture  modelsurgeon/capture   dataflow graph of the real forward (no tracing needed)
    match    modelsurgeon/passes/*  pattern + exactness check (shared helpers: modelsurgeon/match)
    rewrite  modelsurgeon/passes/*  in-place edit (shared helpers: modelsurgeon/rewrite), in rounds
                                    (passes/manager.py)
    verify   modelsurgeon/verify    parity on random inputs against references taken first
    write    modelsurgeon/write     atomic .pt / .safetensors / .onnx

Only one copy of the model is ever in memory: references are the original's outputs, captured
before the rewrite, which then happens in place. The back ends: ``pipeline_torch.py``,
``pipeline_onnx.py``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from .errors import BadInput
from .options.run import RunOptions
from .report import Report


def default_output(opts: RunOptions, command: str) -> Path:
    """``INPUT.<command>.<ext>`` next to the input; a ``.bin`` / ``.tar`` / ``.pkl`` checkpoint
    gets ``.pt`` (the container torch writes)."""
    from .write import FORMATS

    src = Path(opts.input)
    if opts.in_place:
        return src
    suffix = src.suffix if src.suffix.lower() in FORMATS else ".pt"
    return src.with_name(f"{src.stem}.{command}{suffix}")


def run(command: str, passes: Sequence[str], opts: RunOptions) -> Report:
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
    passes = list(passes)
    for name in passes:  # unknown names refused; passes given no options run with their defaults
        if name not in opts.pass_options:
            opts.pass_options[name] = registry.spec(name).options()
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
                           prototxt=opts.prototxt, input_shapes=opts.input_shape)
    report.timings["load"] = time.perf_counter() - t
    report.input_format = ckpt.format
    backend = "onnx" if ckpt.is_onnx else "torch"
    if len(passes) > 1:  # optimize: passes without this back end are left out, and said so
        for name in [p for p in passes if not registry.available(p, backend)]:
            if registry.spec(name).group != "cleanup":  # graph clean-up has no meaning for a module
                report.notes.append(f"{name} is not available for {backend} models: not run")
            passes.remove(name)
    for name in passes:
        if not registry.available(name, backend):
            raise BadInput(f"{name} is not available for {backend} models")
        opts.pass_options[name].check_backend(backend)
    if ckpt.is_onnx:
        from .pipeline_onnx import run_onnx

        return run_onnx(command, passes, opts, ckpt, report, out_path, out_fmt)
    from .pipeline_torch import run_torch

    return run_torch(command, passes, opts, ckpt, report, out_path, out_fmt)
