"""What every surgery command does once its options are parsed: run the pipeline, report."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import SurgeryError


class ExitWith(Exception):
    """Raised when a command finished: carries its exit code to ``app.main``."""

    def __init__(self, code: int):
        self.code = code


def execute(name: str, passes: list[str], opts: Any, general: Any) -> None:
    """Run ``passes`` with the run options ``opts`` (a RunOptions, pass options set) and print
    the report as ``general`` (GeneralOptions) asks."""
    from rich.console import Console

    from ..pipeline import run

    quiet, as_json = general.quiet, general.json
    err = Console(stderr=True, highlight=False)
    out = Console(highlight=False, soft_wrap=False)
    status = None
    if not quiet and err.is_terminal:
        status = err.status("starting")
        status.start()
        opts.status = lambda msg: status.update(msg)
    report = None
    try:
        report = run(name, passes, opts)
    except SurgeryError as e:
        if status:
            status.stop()
        report = getattr(e, "report", None)
        if as_json:  # one JSON object on stdout: the report so far (if any) and the error
            write_json(report.to_json() if report is not None else {}, e)
            e.json_written = True
        elif report is not None:
            _emit(report, False, quiet, out)
        raise
    finally:
        if status:
            status.stop()
    _emit(report, as_json, quiet, out)
    raise ExitWith(0)


def error_json(exc: BaseException | None, message: str | None = None, code: str | None = None,
               exit_code: int | None = None) -> dict | None:
    """The ``"error"`` member of a ``--json`` document (docs/json.md); ``None`` on success."""
    if exc is None and message is None:
        return None
    return {"code": code or getattr(exc, "code", "internal-error"),
            "message": " ".join((message if message is not None else message_of(exc)).split()),
            "exit_code": exit_code if exit_code is not None else int(getattr(exc, "exit_code", 3))}


def message_of(exc: BaseException) -> str:
    """An error's message as the command line says it (an option named by its flag)."""
    from ..options.base import OptionError

    return exc.render("cli") if isinstance(exc, OptionError) else str(exc)


def write_json(doc: dict, exc: BaseException | None = None, **error: Any) -> None:
    doc = dict(doc)
    doc["error"] = error_json(exc, **error)
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _emit(report: Any, as_json: bool, quiet: bool, out: Any) -> None:
    if report is None:
        return
    if as_json:
        write_json(report.to_json())
    elif not quiet:
        from ..report.render import render

        render(report, out)
