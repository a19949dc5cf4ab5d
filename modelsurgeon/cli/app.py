"""The ``modelsurgeon`` command line: thin Typer commands over :mod:`modelsurgeon.pipeline`.

Nothing heavy is imported at start-up (no torch, no onnx): ``--help`` and ``--version`` answer
at once; a command imports what it needs when it runs.

Exit codes: 0 done, 1 parity failed, 2 bad input or usage, 3 internal error, 130 interrupted.
"""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from .._version import __version__
from .options import Group, surgery_command
from .run import ExitWith, write_json

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


@surgery_command(app, "fold-bn", ["fold-bn"])
def fold_bn() -> dict:
    """Fold BatchNorm (any class) and per-channel scale layers into the conv/linear before them.

    Example (after python examples/build.py): modelsurgeon fold-bn examples/checkpoints/resnet.pt --trust-pickle --code-path examples -s 1,3,64,64 -o resnet-folded.pt
    """
    return {}


@surgery_command(app, "focus-to-conv", ["focus-to-conv"])
def focus_to_conv(
    check_grad: Annotated[bool, typer.Option("--check-grad", help="Also check that gradients of the new conv equal the original's mapped gradients.")] = False,
    bench: Annotated[bool, typer.Option("--bench", help="Measure the stem's CPU latency before and after.")] = False,
) -> dict:
    """Replace space-to-depth stems (YOLOv5 Focus, pixel_unshuffle) + conv by one strided conv.

    Example (after python examples/build.py): modelsurgeon focus-to-conv examples/checkpoints/yolov5s-focus.pt --trust-pickle --code-path examples/yolo -s 1,3,64,64 -o yolov5s-v6stem.pt
    """
    return {"focus-to-conv": {"check_grad": check_grad, "bench": bench}}


@surgery_command(app, "truncate", ["truncate"])
def truncate(
    blocks: Annotated[Optional[int], typer.Option("--blocks", "-n", metavar="N", help="Remove the last N blocks of the stage.", show_default=False)] = None,
    after: Annotated[Optional[str], typer.Option("--after", metavar="BLOCK", help="Keep everything up to and including this block.", show_default=False)] = None,
    stage: Annotated[Optional[str], typer.Option("--stage", metavar="PATH", help="Module path of the stage to cut (default: found automatically).", show_default=False)] = None,
    list_blocks: Annotated[bool, typer.Option("--list", help="List the stage's blocks (index, path, channels, params, FLOPs) and exit.")] = False,
    head: Annotated[str, typer.Option("--head", metavar="reinit|drop", help="What to do with layers whose input width changed: reinit or drop.")] = "reinit",
    at: Annotated[Optional[List[str]], typer.Option("--at", metavar="TENSOR", help="ONNX: make this tensor a graph output and remove what follows; repeatable.", show_default=False)] = None,
) -> dict:
    """Drop the last blocks of a backbone stage and rewire what consumed them.

    Example (after python examples/build.py): modelsurgeon truncate examples/checkpoints/mobilenetv2.pt --arch zoo.mobilenetv2:mobilenet_v2 --code-path examples -s 1,3,64,64 --blocks 2 -o mobilenetv2-small.pt
    """
    return {"truncate": {"blocks": blocks, "after": after, "stage": stage, "list": list_blocks,
                         "head": head, "at": list(at or [])}}


@surgery_command(app, "fold-fusion", ["fold-fusion"])
def fold_fusion() -> dict:
    """Fold fusion weights: evaluate parameter-only computations and fold constant scales into convs.

    Example (after python examples/build.py): modelsurgeon fold-fusion examples/checkpoints/bifpn.pt --trust-pickle --code-path examples -s 1,3,64,64 -o bifpn-folded.pt
    """
    return {}


def _optimize_passes(own: dict) -> list[str]:
    from ..errors import BadInput
    from ..passes import REGISTRY, cleanup_passes, exact_passes

    def names(text: str) -> list[str]:  # "cleanup" names the whole graph clean-up
        out = [p.strip() for p in text.split(",") if p.strip()]
        return [q for p in out for q in (cleanup_passes() if p == "cleanup" else [p])]

    chosen = exact_passes()
    if own.get("passes"):
        wanted = names(own["passes"])
        for p in wanted:
            if p not in REGISTRY or not REGISTRY[p].exact:
                raise BadInput(f"--passes: {p!r} is not an exact pass (choose from {', '.join(exact_passes())})")
        chosen = [p for p in chosen if p in wanted]
    if own.get("skip"):
        skip = names(own["skip"])
        for p in skip:
            if p not in REGISTRY:
                raise BadInput(f"--skip: unknown pass {p!r}")
        chosen = [p for p in chosen if p not in skip]
    if not chosen:
        raise BadInput("no pass left to run")
    return chosen


@surgery_command(app, "optimize", _optimize_passes, repeat=True)
def optimize(
    passes: Annotated[Optional[str], typer.Option("--passes", metavar="LIST", help="Comma-separated passes to run (default: every exact pass; 'cleanup': all of the ONNX graph clean-up).", show_default=False)] = None,
    skip: Annotated[Optional[str], typer.Option("--skip", metavar="LIST", help="Comma-separated passes not to run ('cleanup': all of the ONNX graph clean-up).", show_default=False)] = None,
    verify_each: Annotated[bool, typer.Option("--verify-each", help="Check parity after each pass, not only at the end.")] = False,
    keep_symbolic: Annotated[bool, typer.Option("--keep-symbolic", help="ONNX: keep symbolic input dimensions symbolic even when --input-shape sizes them for verification.")] = False,
) -> dict:
    """Run every exact pass (focus-to-conv, fold-fusion, fold-bn; on ONNX also the graph clean-up) until nothing changes; verify once.

    Example (after python examples/build.py): modelsurgeon optimize examples/checkpoints/yolov5s-focus.pt --trust-pickle --code-path examples/yolo -s 1,3,64,64 -o yolov5s.onnx
    """
    return {"fix-input-shapes": {"keep_symbolic": keep_symbolic}}


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns (and exits with) the exit code."""
    code = _main(sys.argv[1:] if argv is None else argv)
    if argv is None:
        sys.exit(code)
    return code


def _main(argv: list[str]) -> int:
    from ..errors import SurgeryError

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
        return _fail(str(e), e.code, e.exit_code, as_json and not getattr(e, "json_written", False))
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
        return _fail(f"internal error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
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
