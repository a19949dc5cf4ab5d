"""The options every surgery command shares, declared once as ``Annotated`` parameters, and
the command classes that print help as people read it."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

_P = inspect.Parameter


class _ReadableHelp:
    """Typer writes a required argument as ``{input}`` in the usage line and a type label after
    every option (``<bool>`` after a flag, ``<list[str]>``): the usage line shows ``INPUT``,
    flags show nothing, other options their metavar (``SHAPE``, ``DIR``...)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)  # type: ignore[misc]
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class Command(_ReadableHelp, TyperCommand):
    pass


class Group(_ReadableHelp, TyperGroup):
    pass


COMMON: list[inspect.Parameter] = [
    _P("input", _P.POSITIONAL_OR_KEYWORD, annotation=Annotated[Path, typer.Argument(
        metavar="INPUT", help="Checkpoint (.pt/.pth/.ckpt, .safetensors), ONNX file, darknet .weights or Caffe "
        ".caffemodel.", show_default=False)]),
    _P("output", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[Path], typer.Option(
        "--output", "-o", metavar="PATH", help="Output file; format by extension: .pt/.pth/.ckpt, .safetensors, .onnx "
        "(.weights + .cfg, .caffemodel + .prototxt for darknet / Caffe inputs). "
        "Default: INPUT's name with the command inserted.", show_default=False)]),
    _P("input_shape", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[List[str]], typer.Option(
        "--input-shape", "-s", metavar="SHAPE", help="Example input shape, e.g. 1,3,640,640; repeat for several inputs. "
        "Default: guessed from the first layer (PyTorch) or the graph's declared shapes (ONNX).",
        show_default=False)]),
    _P("dtype", _P.KEYWORD_ONLY, default="auto", annotation=Annotated[str, typer.Option(
        metavar="DTYPE", help="Input dtype: auto (the model's compute dtype), float32, float64, float16, bfloat16, int64, int32.")]),
    _P("trials", _P.KEYWORD_ONLY, default=2, annotation=Annotated[int, typer.Option(
        metavar="N", help="Random inputs to check parity on: the example input, then fresh ones (the second one batch larger, "
        "when the model runs at it).")]),
    _P("seed", _P.KEYWORD_ONLY, default=0, annotation=Annotated[int, typer.Option(metavar="N", help="Seed of the random inputs.")]),
    _P("atol", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[float], typer.Option(
        metavar="FLOAT", help="Absolute tolerance (default by dtype: 1e-6 for float32 weights).", show_default=False)]),
    _P("rtol", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[float], typer.Option(
        metavar="FLOAT", help="Tolerance relative to each output's largest magnitude (default by dtype: 1e-4 float32, "
        "1e-2 float16, 5e-2 bfloat16).", show_default=False)]),
    _P("verify_at", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[List[str]], typer.Option(
        "--verify-at", metavar="MODULE", help="Also compare this module's outputs (ONNX: this tensor's), e.g. a "
        "detector's head; repeatable. A post-processed output (top-k, NMS) that differs by tie-breaking is then "
        "excused when these match and every rewrite lies before them.", show_default=False)]),
    _P("no_verify", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--no-verify", help="Skip the parity check.")]),
    _P("force", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--force", help="Write the output even if parity fails.")]),
    _P("dry_run", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--dry-run", help="Report what would change; write nothing.")]),
    _P("in_place", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--in-place", help="Allow the output to replace the input file (atomically).")]),
    _P("arch", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[str], typer.Option(
        metavar="PKG.MODULE:FN", help="Model factory for state_dict/safetensors inputs: package.module:function.", show_default=False)]),
    _P("arch_kwargs", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[str], typer.Option(
        "--arch-kwargs", metavar="JSON", help="JSON object of keyword arguments for --arch.", show_default=False)]),
    _P("trust_pickle", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow unpickling code objects (full modules, YOLO dicts), and importing the "
        "model factory a modelsurgeon-written file names. Runs code the file chooses: only for checkpoints you trust.")]),
    _P("code_path", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[List[Path]], typer.Option(
        "--code-path", metavar="DIR", help="Directory to put on the import path (the model's source tree); repeatable.",
        show_default=False)]),
    _P("cfg", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[Path], typer.Option(
        "--cfg", metavar="FILE", help="The .cfg of a darknet .weights input (default: the .cfg beside it).", show_default=False)]),
    _P("prototxt", _P.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[Path], typer.Option(
        "--prototxt", metavar="FILE", help="The .prototxt of a Caffe .caffemodel input (default: the .prototxt beside it).",
        show_default=False)]),
    _P("opset", _P.KEYWORD_ONLY, default=17, annotation=Annotated[int, typer.Option(
        metavar="N", help="ONNX opset for .onnx outputs exported from PyTorch.")]),
    _P("json_", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--json", help="Print one JSON report on stdout and nothing else there.")]),
    _P("quiet", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--quiet", "-q", help="Print nothing but errors.")]),
    _P("debug", _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
        "--debug", help="Show tracebacks.")]),
]
COMMON_NAMES = [p.name for p in COMMON]


def surgery_command(app: typer.Typer, name: str, passes: list[str] | Callable[[dict], list[str]],
                    *, verify_each: bool = False, repeat: bool = False) -> Callable:
    """Register ``fn`` as command ``name`` with the common options plus ``fn``'s own.

    ``fn(**own_options)`` returns the per-pass options dict (``{pass_name: {...}}``) and may
    raise ``BadInput`` for impossible combinations; everything else is the pipeline's job.
    """

    def deco(fn: Callable[..., dict]) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(kind=_P.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(fn).parameters.values()]

        def command(**kwargs: Any) -> None:
            from .run import execute

            common = {k: kwargs.pop(k) for k in COMMON_NAMES}
            execute(name, passes, fn, kwargs, common, verify_each=verify_each, repeat=repeat)

        command.__signature__ = inspect.Signature(COMMON + own)  # type: ignore[attr-defined]
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        app.command(name, help=fn.__doc__, cls=Command)(command)
        return fn

    return deco
