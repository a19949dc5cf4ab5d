"""The registered passes: modelsurgeon's own (``passes/__init__.py``), those registered with
:func:`register_pass`, and those installed packages declare in the entry-point group
``modelsurgeon.passes`` (value ``"package.module:SPEC"``, a :class:`PassSpec`), read once, on
first need. A plugin that fails to load is reported in one line and left out."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable

from ..errors import BadInput, first_line
from .spec import OrderError, PassSpec, ordered

ENTRY_POINT_GROUP = "modelsurgeon.passes"
RESERVED_COMMANDS = ("optimize", "compare")  # commands that are not one pass

REGISTRY: dict[str, PassSpec] = {}
_plugins_read = False
_problems: list[str] = []


class PluginWarning(UserWarning):
    pass


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


report_problem: Callable[[str], None] = _warn
"""Where a plugin that cannot be loaded is said (the CLI sets its own: one line on stderr)."""


def register_pass(spec: PassSpec) -> PassSpec:
    """Add a pass: its command, its place in ``optimize`` (if exact) and the API's ``optimize``
    see it. Refused (``ValueError``): a name or command name taken, an option name taken by the
    run options, a declared order with a cycle."""
    from ..options.run import RunOptions

    if not isinstance(spec, PassSpec):
        raise ValueError(f"register_pass takes a PassSpec, got {type(spec).__name__}")
    if spec.name in REGISTRY:
        raise ValueError(f"a pass named {spec.name!r} is already registered (by {REGISTRY[spec.name].origin})")
    taken = {s.cli for s in REGISTRY.values()} | set(RESERVED_COMMANDS) | {s.group for s in REGISTRY.values()}
    if spec.cli is not None and spec.cli in taken:
        raise ValueError(f"pass {spec.name}: the command name {spec.cli!r} is taken")
    clash = set(spec.options.option_fields()) & set(RunOptions.option_fields())
    if clash:
        raise ValueError(f"pass {spec.name}: option {sorted(clash)[0]!r} is one of the run options")
    try:
        ordered([*REGISTRY.values(), spec])
    except OrderError as e:
        raise ValueError(f"pass {spec.name}: {e}") from None
    REGISTRY[spec.name] = spec
    return spec


def load_plugins() -> list[str]:
    """Read the entry points once; returns the problems met (each also reported)."""
    global _plugins_read
    if _plugins_read:
        return list(_problems)
    _plugins_read = True
    if not _may_declare_plugins():
        return []
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            spec = ep.load()
            if not isinstance(spec, PassSpec):
                raise ValueError(f"{ep.value} is a {type(spec).__name__}, not a PassSpec")
            if spec.name != ep.name:
                raise ValueError(f"{ep.value} registers {spec.name!r}, not {ep.name!r}")
            register_pass(_with_origin(spec, ep))
        except Exception as e:  # a broken plugin must not break the tool
            problem = f"plugin pass {ep.name!r} ({ep.value}) not loaded: {first_line(e, typed=True)}"
            _problems.append(problem)
            report_problem(problem)
    return list(_problems)


def _may_declare_plugins() -> bool:
    """False only when no installed distribution on ``sys.path`` can declare the group: a quick
    look at the ``entry_points.txt`` files (importlib.metadata alone costs more than the rest of
    ``--help``'s start); a path entry that is not a plain directory means "maybe"."""
    import os
    import sys

    marker = f"[{ENTRY_POINT_GROUP}]"
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except NotADirectoryError:
            return True  # a zip archive on the path: let importlib.metadata look
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                try:
                    with open(os.path.join(entry or ".", name, "entry_points.txt"), encoding="utf-8") as f:
                        if marker in f.read():
                            return True
                except OSError:
                    continue
    return False


def _with_origin(spec: PassSpec, ep: Any) -> PassSpec:
    from dataclasses import replace

    dist = getattr(getattr(ep, "dist", None), "name", None)
    return replace(spec, origin=f"plugin {dist or ep.value}")


def specs() -> list[PassSpec]:
    """Every registered pass, plugins included, in registration order."""
    load_plugins()
    return list(REGISTRY.values())


def spec(name: str) -> PassSpec:
    load_plugins()
    found = REGISTRY.get(name)
    if found is None:
        raise BadInput(f"unknown pass {name!r} (known: {', '.join(REGISTRY)})", code="unknown-pass")
    return found


def exact_passes() -> list[str]:
    """The function-preserving passes, in the order ``optimize`` runs them."""
    all_specs = specs()
    return ordered(all_specs, [s.name for s in all_specs if s.exact])


def in_group(group: str) -> list[str]:
    """The passes of ``group`` (e.g. "cleanup": the ONNX graph clean-up), in optimize's order."""
    return [n for n in exact_passes() if REGISTRY[n].group == group]


def in_order(names: list[str]) -> list[str]:
    """``names`` in the order their declarations give (``optimize --passes``)."""
    return ordered(specs(), names)


def available(name: str, backend: str) -> bool:
    load_plugins()
    found = REGISTRY.get(name)
    return found is not None and found.implementation(backend) is not None


def get(name: str, backend: str) -> Any:
    """An instance of pass ``name`` for ``backend`` ("torch" or "onnx")."""
    from .base import Pass

    s = spec(name)
    target = s.implementation(backend)
    if target is None:
        raise BadInput(f"{name} is not available for {backend} models yet", code="unsupported-backend")
    mod_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(mod_name), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or cls.name != name or cls.backend != backend:
        raise TypeError(f"{target} is not the {backend} Pass of {name!r} (a Pass subclass with that name and backend)")
    return cls()


def load_all() -> None:
    """Import every pass module (they may register recipe kinds)."""
    for s in specs():
        for target in (s.torch, s.onnx):
            if target:
                importlib.import_module(target.partition(":")[0])
