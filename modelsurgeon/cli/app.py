"""The ``modelsurgeon`` command line: thin Typer commands over :mod:`modelsurgeon.pipeline`.

Nothing heavy is imported at start-up (no torch, no onnx): ``--help`` and ``--version`` answer
at once; a command imports what it needs when it runs.

Exit codes: 0 done, 1 parity failed, 2 bad input or usage, 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from .._version import __version__
from .options import surgery_command

app = typer.Typer(
    name="modelsurgeon",
    help="Exact, verified surgery on trained PyTorch checkpoints and ONNX files.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class ExitWith(Exception):
    def __init__(self, code: int):
        self.code = code


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"modelsurgeon {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Exact, verified surgery on trained PyTorch checkpoints and ONNX files.

    Every rewrite is checked against the original on random inputs; a mismatch exits 1 and
    writes nothing. Exit codes: 0 done, 1 parity failed, 2 bad input, 3 internal error.
    """


@surgery_command(app, "fold-bn", ["fold-bn"])
def fold_bn() -> dict:
    """Fold BatchNorm (any class) and per-channel scale layers into the conv/linear before them.

    Example: modelsurgeon fold-bn model.pt --trust-pickle -s 1,3,224,224 -o folded.pt
    """
    return {}


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the exit code."""
    code = _main(sys.argv[1:] if argv is None else argv)
    if argv is None:
        sys.exit(code)
    return code


def _main(argv: list[str]) -> int:
    from ..errors import SurgeryError

    debug = "--debug" in argv
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="modelsurgeon", standalone_mode=False)
        return 0
    except ExitWith as e:
        return e.code
    except SurgeryError as e:
        if debug:
            import traceback

            traceback.print_exc()
        _error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except typer.Exit as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        _error("aborted")
        return 130
    except Exception as e:
        fmt = getattr(e, "format_message", None)
        if fmt is not None and hasattr(e, "exit_code"):  # click/typer usage errors
            _error(fmt() + _usage_hint(e))
            return int(e.exit_code)
        if debug:
            import traceback

            traceback.print_exc()
        _error(f"internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
               f"(rerun with --debug for the traceback)")
        return 3


def _usage_hint(e: Exception) -> str:
    ctx = getattr(e, "ctx", None)
    if ctx is not None and getattr(ctx, "command_path", None):
        return f" (see '{ctx.command_path} --help')"
    return ""


def _error(message: str) -> None:
    msg = " ".join(message.split())
    sys.stderr.write(f"modelsurgeon: error: {msg}\n")
    sys.stderr.flush()


if __name__ == "__main__":  # pragma: no cover
    main()
