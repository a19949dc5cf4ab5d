"""``modelsurgeon compare A B``: a thin command over :func:`modelsurgeon.verify.models.compare_files`
(exit 0 the models agree, 1 they differ, 2 bad input)."""

from __future__ import annotations

import inspect
from typing import Any

import typer

COMPARE_HELP = ("Compare two models on the same inputs (any two of .pt/.safetensors/.onnx/darknet/Caffe): "
                "per-output error statistics; --layers names the first layer where they diverge. "
                "Exit 0 equal, 1 differ, 2 bad input.\n\nExample: modelsurgeon compare model.pt model.onnx --layers")


def compare_command() -> Any:
    from ..options.compare import CompareOptions
    from . import params
    from .options import Command

    def fn(**kwargs: Any) -> None:
        from rich.console import Console

        from ..verify.models import compare_files
        from .run import ExitWith, write_json

        opts = params.build(CompareOptions, kwargs)
        general = params.build(params.GeneralOptions, kwargs)
        err = Console(stderr=True, highlight=False)
        status = err.status("comparing") if not general.quiet and not general.json and err.is_terminal else None
        if status:
            status.start()
        try:
            result = compare_files(opts)
        finally:
            if status:
                status.stop()
        if general.json:
            write_json(result.to_json())
        elif not general.quiet:
            from ..report.compare import render_comparison

            render_comparison(result, Console(highlight=False, soft_wrap=False))
        raise ExitWith(0 if result.passed else 1)

    fn.__signature__ = inspect.Signature(params.parameters(CompareOptions, params.GeneralOptions))  # type: ignore[attr-defined]
    fn.__name__ = "compare"
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("compare", help=COMPARE_HELP, cls=Command)(fn)
    return typer.main.get_command(app)
