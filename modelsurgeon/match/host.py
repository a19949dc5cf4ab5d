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


def _own_methods(cls: type) -> dict[str, Any]:
    """``name -> ast.FunctionDef`` of the methods of ``cls`` and its own bases (torch's aside)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if klass.__module__.startswith("torch.") or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                out.update({f.name: f for f in node.body if isinstance(f, ast.FunctionDef)})
    return out


def _self_attrs(fn: Any) -> set[str]:
    return {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self"}


def _guard(fn: Any) -> tuple[str, str] | None:
    """``("hasattr", name)`` / ``("flag", name)`` when ``fn`` starts by returning if the module
    has attribute ``name`` / if ``self.name`` is true."""
    body = [s for s in fn.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if not body or not isinstance(body[0], ast.If) or not any(isinstance(s, ast.Return) for s in body[0].body):
        return None
    t = body[0].test
    if isinstance(t, ast.Call) and isinstance(t.func, ast.Name) and t.func.id == "hasattr" and len(t.args) == 2 \
            and isinstance(t.args[1], ast.Constant) and isinstance(t.args[1].value, str):
        return "hasattr", t.args[1].value
    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
        return "flag", t.attr
    return None


@functools.lru_cache(maxsize=None)
def deploy_methods(cls: type, removed: frozenset) -> tuple[tuple[str, tuple[str, str] | None], ...]:
    """The host's own re-parameterisation entry points of ``cls``: methods (not forwards, not
    called by another method) that read one of the ``removed`` children, each with its guard
    (:func:`_guard`) or ``None`` -- once the branches are merged, a guarded one must find its
    guard satisfied (the merged conv under the name it tests, or its flag set), and an
    unguarded one cannot be called any more."""
    methods = _own_methods(cls)
    called = {n.func.attr for f in methods.values() for n in ast.walk(f)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    reads: dict[str, set[str]] = {}

    def reach(name: str, seen: set) -> set[str]:
        if name in seen or name not in methods:
            return set()
        seen.add(name)
        got = _self_attrs(methods[name])
        for callee in list(got):
            got |= reach(callee, seen)
        return got

    out = []
    for name, fn in methods.items():
        if name.startswith("forward") or name.startswith("__") or name in called:
            continue
        reads[name] = reach(name, set())
        if reads[name] & removed:
            out.append((name, _guard(fn)))
    return tuple(out)


def forward_names(cls: type) -> list[str]:
    """Attributes the class's forwards call (``self.name(...)``) or test (``hasattr(self, name)``)."""
    names: list[str] = []
    for name, fn in _own_methods(cls).items():
        if not (name.startswith("forward") or FUSED_NAME.match(name)):
            continue
        for n in ast.walk(fn):
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) \
                    and n.func.value.id == "self":
                names.append(n.func.attr)
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "hasattr" and \
                    len(n.args) == 2 and isinstance(n.args[1], ast.Constant):
                names.append(str(n.args[1].value))
    return list(dict.fromkeys(names))
