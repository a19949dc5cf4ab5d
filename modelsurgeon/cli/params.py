"""Typer parameters generated from options dataclasses (:mod:`modelsurgeon.options`): each field
becomes an ``Annotated`` argument or option with its flag, help, metavar and ``--help`` panel;
the parsed values go back into the dataclass, which checks them."""

from __future__ import annotations

import inspect
import typing
from dataclasses import MISSING, dataclass
from typing import Annotated, Any, List, Optional

import typer

from ..options.base import OptionField, Options, option
from ..options.run import GENERAL

_P = inspect.Parameter


@dataclass
class GeneralOptions(Options):
    """Options of the command line itself, not of the run."""

    json: bool = option(False, panel=GENERAL, help="Print one JSON report on stdout and nothing else there.")
    quiet: bool = option(False, flags=("--quiet", "-q"), panel=GENERAL, help="Print nothing but errors.")
    debug: bool = option(False, panel=GENERAL, help="Show tracebacks.")


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """The type Typer parses for annotation ``tp``, and whether the option repeats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return args[0], True
    if args and type(None) in args:  # X | None (X | dict | None: the first, what a command line gives)
        return next(a for a in args if a is not type(None)), False
    return tp, False


def parameter(f: OptionField) -> inspect.Parameter:
    """One field as a Typer parameter named like the field."""
    info = f.info
    tp, repeated = _cli_type(f.type)
    if info.argument:
        return _P(f.name, _P.POSITIONAL_OR_KEYWORD, annotation=Annotated[tp, typer.Argument(
            metavar=info.metavar, help=info.help, show_default=False, rich_help_panel=info.panel)])
    flags = list(info.flags) or [f.flag]
    if f.negated:  # on by default: the flag switches it off
        return _P(f.name, _P.KEYWORD_ONLY, default=False, annotation=Annotated[bool, typer.Option(
            *flags, help=info.help, rich_help_panel=info.panel)])
    default = None if repeated else f.default
    if default is MISSING:
        raise TypeError(f"option {f.name} has no default: only the input may be required")
    show = default is not None and tp is not bool
    annotation = Optional[List[tp]] if repeated else Optional[tp] if default is None else tp
    return _P(f.name, _P.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, typer.Option(
        *flags, metavar=info.metavar, help=info.help, show_default=show, rich_help_panel=info.panel)])


def parameters(*classes: type) -> list[inspect.Parameter]:
    """The parameters of every field of ``classes``; a name used twice is refused."""
    out, seen = [], set()
    for cls in classes:
        for f in cls.option_fields().values():
            if f.name in seen:
                raise TypeError(f"option {f.name!r} is declared twice")
            seen.add(f.name)
            out.append(parameter(f))
    return out


def values(cls: type, parsed: dict) -> dict:
    """The parsed values of ``cls``'s fields, as the dataclass takes them."""
    out = {}
    for name, f in cls.option_fields().items():
        value = parsed[name]
        if f.negated:
            value = not value
        elif value is None and f.default is not None and f.default is not MISSING:
            value = f.default  # a repeatable option not given
        out[name] = value
    return out


def build(cls: type, parsed: dict) -> Any:
    return cls(**values(cls, parsed))

