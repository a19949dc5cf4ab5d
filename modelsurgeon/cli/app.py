"""The ``modelsurgeon`` command line: thin Typer commands over :mod:`modelsurgeon.pipeline`,
one per registered pass (plugins included) plus ``optimize``, built from their declarations
(:mod:`.options`).

Nothing heavy is imported at start-up (no torch, no onnx): ``--help`` and ``--version`` answer
at once; a command imports what it needs when it runs.

Exit codes: 0 done, 1 parity failed, 2 bad input or usage, 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .._version import __version__
from .options import Group
from .run import ExitWith, message_of, write_json

EXIT_CODES = ("Exit codes: 0 done; 1 parity failed (nothing written); 2 bad input or usage (nothing "
              "written); 3 internal error (a bug: rerun with --debug and report it); 130 interrupted.")

app = typer.Typer(
    name="modelsurgeon",
    cls=Group,
    help="Exact, verified surgery on trained PyTorch checkpoints and ONNX files.\n\n"
         "Every rewrite is checked against the original on random inputs; a mismatch exits 1 and "
         "writes nothing. With --json, stdout holds one JSON object, an error included.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"modelsurgeon {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Exact, verified surgery on trained PyTorch checkpoints and ONNX files."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the exit code."""
    code = _main(sys.argv[1:] if argv is None else argv)
    if argv is None:
        sys.exit(code)
    return code


def _main(argv: list[str]) -> int:
    from ..errors import SurgeryError, first_line

    debug = "--debug" in argv
    as_json = "--json" in argv
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="modelsurgeon", standalone_mode=False)
        if rv == 130:  # typer turns a KeyboardInterrupt into Exit(130) and returns its code
            return _fail("interrupted", "interrupted", 130, as_json)
        return rv if isinstance(rv, int) else 0
    except ExitWith as e:
        return e.code
    except SurgeryError as e:
        if debug:
            import traceback

            traceback.print_exc()
        return _fail(message_of(e), e.code, e.exit_code, as_json and not getattr(e, "json_written", False))
    except KeyboardInterrupt:
        return _fail("interrupted", "interrupted", 130, as_json)
    except typer.Exit as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        return _fail("aborted", "interrupted", 130, as_json)
    except Exception as e:
        fmt = getattr(e, "format_message", None)
        if fmt is not None and hasattr(e, "exit_code"):  # click/typer usage errors
            return _fail((fmt() or "missing command") + _usage_hint(e), "usage", int(e.exit_code), as_json)
        if debug:
            import traceback

            traceback.print_exc()
        return _fail(f"internal error: {first_line(e, typed=True)} "
                     f"(rerun with --debug for the traceback)", "internal-error", 3, as_json)


def _fail(message: str, code: str, exit_code: int, as_json: bool) -> int:
    """One line on stderr; with ``--json`` also the error object on stdout (docs/json.md)."""
    _error(message)
    if as_json:
        write_json({}, message=message, code=code, exit_code=exit_code)
    return exit_code


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
