"""What the host project's own deploy code expects of a module, read from its classes.

* :func:`fused_forwards` -- the forward a class provides for after its norm is fused (YOLOv5 /
  Ultralytics ``Conv.forward_fuse``, YOLOv7 ``Conv.fuseforward``, ``forward_deploy``...): the
  host's ``fuse()`` deletes the norm attribute and sets ``m.forward = m.forward_fuse``, and a
  folded module is left the same way when the fused forward computes the same
  (:mod:`modelsurgeon.rewrite.removal`).
* :func:`statistics_reader` -- a host method that reads running statistics and reaches a
  norm through its attribute name (Ultralytics ``RepConv._fuse_bn_tensor``:
  ``branch.bn.running_mean``): removing that norm would break the host's own
  re-parameterisation, so it is not folded.

Only the model's own classes are read (never ``torch.*``); a class whose source cannot be read
has no such method as far as this module knows.
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import textwrap
from typing import Any

FUSED_NAME = re.compile(r"^(forward_?(fuse|fused|deploy)|(fuse|fused|deploy)_?forward)$", re.IGNORECASE)
STATISTICS = frozenset({"running_mean", "running_var"})


def fused_forwards(cls: type) -> list[str]:
    """Names of the methods of ``cls`` (or its bases, torch's aside) named like a fused forward."""
    names = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        for name, value in vars(klass).items():
            if FUSED_NAME.match(name) and inspect.isfunction(value) and name not in names:
                names.append(name)
    return names


@functools.lru_cache(maxsize=None)
def _statistics_reads(cls: type) -> tuple[tuple[str, str], ...]:
    """``(attribute, method)`` for every attribute name a method of ``cls`` (not a forward)
    accesses, in methods that also read ``running_mean`` / ``running_var`` -- the names through
    which such a method may reach a norm (``branch.bn`` then ``bn.running_mean``)."""
    found: list[tuple[str, str]] = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) or fn.name.startswith("forward"):
                continue
            attrs = [n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)]
            if STATISTICS & set(attrs):
                found.extend((a, f"{klass.__name__}.{fn.name}") for a in dict.fromkeys(attrs) if a not in STATISTICS)
    return tuple(found)


def statistics_reader(root: Any, path: str) -> str | None:
    """The host method that reads the statistics of the norm at ``path`` by its attribute name
    (in the class of its parent or of any module above), or ``None``."""
    from ..rewrite.recipe import get_module

    parent_path, _, attr = path.rpartition(".")
    parts = parent_path.split(".") if parent_path else []
    for i in range(len(parts), -1, -1):
        try:
            mod = get_module(root, ".".join(parts[:i]))
        except (AttributeError, KeyError):
            continue
        for name, method in _statistics_reads(type(mod)):
            if name == attr:
                return method
    return None
