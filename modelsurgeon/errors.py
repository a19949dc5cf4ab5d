"""The errors modelsurgeon raises, each carrying the exit code the CLI returns for it and a
stable code string for machines (``--json`` prints ``{"error": {"code", "message",
"exit_code"}}``; docs/json.md lists the codes).

Exit codes: 0 done, 1 parity failed (nothing written), 2 bad input or usage (nothing written),
3 an internal error (a bug in modelsurgeon: please report it with ``--debug`` output),
130 interrupted.
"""

from __future__ import annotations


class SurgeryError(Exception):
    """Base class: a failure with a one-line message for the user."""

    exit_code = 2
    code = "bad-input"

    def __init__(self, message: str = "", *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class BadInput(SurgeryError):
    """The input file, the options or the model cannot be used as given (exit 2)."""

    exit_code = 2
    code = "bad-input"


class UnsafeCheckpoint(BadInput):
    """Loading the checkpoint would unpickle code objects and --trust-pickle was not given."""

    code = "unsafe-checkpoint"


class ParityError(SurgeryError):
    """The rewritten model does not reproduce the original's outputs (exit 1)."""

    exit_code = 1
    code = "parity-failed"

    def __init__(self, message: str, report=None, *, code: str | None = None):
        super().__init__(message, code=code)
        self.report = report


def first_line(e: BaseException, limit: int = 300, *, typed: bool = False) -> str:
    """The first non-blank line of an exception's message, at most ``limit`` characters; the
    exception's type name when the message is empty. ``typed``: as ``Type: line``."""
    try:
        text = str(e)
    except Exception:  # a broken __str__ must not hide the error being reported
        text = ""
    line = next((l.strip() for l in text.splitlines() if l.strip()), "")[:limit]
    if typed:
        return f"{type(e).__name__}: {line}" if line else type(e).__name__
    return line or type(e).__name__
