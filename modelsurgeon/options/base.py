"""Options declared once: a dataclass whose fields carry their help text, CLI flag, help panel
and checks (:func:`option`). The CLI's parameters (``cli/params.py``), the API's keyword
arguments and validation all come from it; an error names the Python parameter in the API
(``blocks=-1``) and the flag on the command line (``--blocks -1``). See docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, NoReturn

from ..errors import BadInput

BACKEND_NAMES = {"torch": "PyTorch", "onnx": "ONNX"}


@dataclass(frozen=True)
class OptionInfo:
    """What a field says about itself besides its name, type and default."""

    help: str
    flags: tuple[str, ...] = ()  # default: --field-name
    panel: str | None = None  # --help panel (None: the command's own "Options")
    metavar: str | None = None
    choices: tuple | None = None
    minimum: float | None = None
    check: Callable[[Any], str | None] | None = None  # the problem with a value, or None
    convert: Callable[[Any], Any] | None = None  # API value -> stored value (may raise ValueError)
    backend: str | None = None  # "torch" / "onnx": meaningless on the other back end
    argument: bool = False  # a positional argument on the command line
    api: bool = True  # a keyword argument of the API functions


def option(default: Any = MISSING, *, help: str, flags: tuple[str, ...] | str = (), panel: str | None = None,
           metavar: str | None = None, choices: tuple | None = None, minimum: float | None = None,
           check: Callable[[Any], str | None] | None = None, convert: Callable[[Any], Any] | None = None,
           backend: str | None = None, argument: bool = False, api: bool = True) -> Any:
    """A dataclass field declaring one option."""
    info = OptionInfo(help=help, flags=(flags,) if isinstance(flags, str) else tuple(flags), panel=panel,
                      metavar=metavar, choices=choices, minimum=minimum, check=check, convert=convert,
                      backend=backend, argument=argument, api=api)
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata={"option": info})


@dataclass(frozen=True)
class OptionField:
    name: str
    info: OptionInfo
    type: Any  # the resolved annotation
    default: Any

    @property
    def flag(self) -> str:
        return self.info.flags[0] if self.info.flags else "--" + self.name.replace("_", "-")

    @property
    def negated(self) -> bool:
        """A bool on by default, switched off by its ``--no-...`` flag."""
        return self.default is True and self.flag.startswith("--no-")

    def describe(self, surface: str, value: Any = ...) -> str:
        """How the option is named on one surface: ``--blocks 2`` / ``blocks=2``; without a
        value, its metavar (``--blocks N`` / ``blocks=N``)."""
        if surface == "cli":
            if self.info.argument:
                return self.info.metavar or self.name.upper()
            if value is ...:
                return f"{self.flag} {self.info.metavar}" if self.info.metavar else self.flag
            if isinstance(value, bool):
                return self.flag
            items = value if isinstance(value, (list, tuple)) else [value]
            return " ".join(f"{self.flag} {_cli_value(v)}" for v in items) or self.flag
        if value is ...:
            if self.info.metavar:
                return f"{self.name}={self.info.metavar}"
            return f"{self.name}={not self.default}" if isinstance(self.default, bool) else self.name
        return f"{self.name}={value!r}"


def _cli_value(v: Any) -> str:
    return repr(v) if isinstance(v, str) and (not v or any(c.isspace() for c in v)) else str(v)


class OptionError(BadInput):
    """An option value that cannot be used: names the option the way the caller wrote it."""

    code = "bad-option"

    def __init__(self, template: str, values: Mapping[str, Any], fields: Mapping[str, OptionField]):
        self.template, self.values, self.fields = template, dict(values), dict(fields)
        self.option = next(iter(self.values), None)  # the (first) field at fault
        super().__init__(self.render("api"))

    def render(self, surface: str) -> str:
        """The message for ``surface``: "api" (Python parameters) or "cli" (flags)."""
        names = {k: self.fields[k].describe(surface, v) if k in self.fields else k for k, v in self.values.items()}
        return self.template.format(**names)


class Options:
    """Base of every options dataclass (subclasses are ``@dataclass``): converts and checks every
    field on construction, so a value is checked once, wherever it came from."""

    _fields_cache: ClassVar[dict[type, dict[str, OptionField]]] = {}

    def __post_init__(self) -> None:
        for f in self.option_fields().values():
            value = getattr(self, f.name)
            try:
                value = _coerce(f, value)
            except ValueError as e:
                self.fail("{%s}: %s" % (f.name, escape(str(e))), **{f.name: value})
            setattr(self, f.name, value)
            problem = _problem(f, value)
            if problem:
                self.fail("{%s}: %s" % (f.name, escape(problem)), **{f.name: value})
        self.check()

    def check(self) -> None:
        """Rules between fields (``self.fail`` on a problem); per-field rules are declared."""

    @classmethod
    def option_fields(cls) -> dict[str, OptionField]:
        """The declared options, in declaration order."""
        cached = Options._fields_cache.get(cls)
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = {}
            for f in dataclasses.fields(cls):
                info = f.metadata.get("option")
                if info is not None:
                    default = f.default if f.default is not MISSING else MISSING
                    cached[f.name] = OptionField(f.name, info, hints[f.name], default)
            Options._fields_cache[cls] = cached
        return cached

    @classmethod
    def from_kwargs(cls, where: str, values: Mapping[str, Any], **fixed: Any) -> "Options":
        """Build from API keyword arguments; an unknown one is a ``TypeError`` as Python gives."""
        fields = cls.option_fields()
        for k in values:
            if k not in fields or not fields[k].info.api:
                raise TypeError(f"{where}() got an unexpected keyword argument {k!r}")
        return cls(**fixed, **values)

    def fail(self, template: str, **values: Any) -> NoReturn:
        """Raise an :class:`OptionError`: ``template`` names fields as ``{field}``; a value
        ``...`` names the field without a value."""
        raise OptionError(template, values, self.option_fields())

    def changed(self) -> dict[str, Any]:
        """The options given other values than their defaults."""
        return {n: getattr(self, n) for n, f in self.option_fields().items() if getattr(self, n) != f.default}

    def check_backend(self, backend: str, what: str = "models") -> None:
        """Refuse options meaningful only on the other back end."""
        wrong = [n for n in self.changed() if self.option_fields()[n].info.backend not in (None, backend)]
        if wrong:
            other = BACKEND_NAMES[self.option_fields()[wrong[0]].info.backend]
            names = ", ".join("{%s}" % n for n in wrong)
            self.fail(f"{names}: for {other} {what} only", **{n: ... for n in wrong})


@dataclass
class NoOptions(Options):
    """A pass without options of its own."""


# -- conversion and the declared checks -------------------------------------------------------

def _coerce(f: OptionField, value: Any) -> Any:
    if f.info.convert is not None and value is not None:
        value = f.info.convert(value)
    return _typed(f.type, value)


def _typed(tp: Any, value: Any) -> Any:
    """``value`` as the annotation ``tp`` wants it (API values are not parsed by the CLI)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _typed(a, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else "no value")
    if origin is tuple:
        items = [value] if isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        return tuple(_typed(args[0], v) for v in items)
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected True or False, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ValueError(f"expected a path, got {value!r}")
        return Path(value)
    return value


def _problem(f: OptionField, value: Any) -> str | None:
    if value is None:
        return None
    info = f.info
    if info.choices is not None and value not in info.choices:
        names = [str(c) for c in info.choices]
        return f"choose {' or '.join(names)}" if len(names) == 2 else f"choose one of {', '.join(names)}"
    if info.minimum is not None and not (value >= info.minimum):
        return f"must be at least {info.minimum:g}"
    if info.check is not None:
        return info.check(value)
    return None


def escape(text: str) -> str:
    """``text`` inside an OptionError template (braces kept as they are)."""
    return text.replace("{", "{{").replace("}", "}}")


def finite_non_negative(value: float) -> str | None:
    return None if math.isfinite(value) and value >= 0 else "a tolerance must be a finite number >= 0"


def comma_list(value: Any) -> Any:
    """``"a,b"`` (the CLI's form: repeatable, comma-separated) or a list of names -> a tuple."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        return value  # the type check says what is wrong
    return tuple(p.strip() for v in items for p in v.split(",") if p.strip())
