"""Synthesise the module that replaces a feature-fusion module: a plain (or partly weighted) sum.

A fusion module's forward normalises its learnt weights and sums its inputs, each multiplied by
its weight; inputs with fewer channels than the output are added into the first channels (zero
padding), inputs with more are cut to the output's channels (Darknet's weighted ``[shortcut]``).
Once the weights are constants and most of them have moved into the convs producing the inputs,
what is left is

    out = sum_i  align(x_i [* k_i])  [+ b]        then, optionally, a chain of child modules

or, for a weighted concatenation, ``cat(x_i [* k_i]) [+ b]``.

The replacement is a ``torch.fx.GraphModule`` generated for exactly that computation: it pickles
with torch alone (its forward is stored as generated Python source and re-traced on load), keeps
the original class name, takes the original forward's arguments (reading each input at the same
place: ``outputs[12]``, ``x[1]``...), and holds the remaining constants as buffers -- so the
``.pt`` it ends up in loads without modelsurgeon, and a state_dict of it is rebuilt from the
recipe kind ``weighted-sum`` registered here (plain data: argument names, input positions,
channel counts, buffer shapes, moved children).
"""

from __future__ import annotations

import inspect
from typing import Any

from .recipe import build, register_kind

KIND = "weighted-sum"
MARKER = "_modelsurgeon_weighted_sum"
"""Attribute set on every synthesised module (survives pickling): lets the pass recognise it."""

_JSON_DEFAULTS = (int, float, str, bool, type(None))


def signature_spec(module: Any, n_args: int, keywords: tuple = ()) -> tuple[list[dict], str | None] | str:
    """Positional parameters of ``module.forward`` for a call with ``n_args`` positional
    arguments and ``keywords``: ``([{"name", "default"?}], varargs_name)``, or why they cannot
    be mirrored."""
    try:
        sig = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return "its forward's signature cannot be read"
    params: list[dict] = []
    varargs = None
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            d: dict = {"name": p.name}
            if p.default is not p.empty:
                if not isinstance(p.default, _JSON_DEFAULTS):
                    if len(params) < n_args:
                        d = {"name": p.name}  # always passed: the default is never used
                    else:
                        return f"its forward's argument {p.name} has a default that cannot be recorded"
                else:
                    d["default"] = p.default
            params.append(d)
        elif p.kind == p.VAR_POSITIONAL:
            varargs = p.name
        elif p.kind == p.KEYWORD_ONLY and p.default is p.empty:
            return f"its forward takes the keyword-only argument {p.name}"
    if n_args > len(params) and varargs is None:
        return "it is called with more arguments than its forward declares"
    names = [p["name"] for p in params]
    for k in keywords:
        if k not in names[n_args:]:
            return f"it is called with the keyword argument {k}, which the replacement cannot take"
    return params, varargs


def build_module(spec: dict, tensors: dict[str, Any] | None = None, children: dict[str, Any] | None = None) -> Any:
    """The GraphModule ``spec`` describes; ``tensors`` are its buffers (zeros when ``None``:
    a state_dict fills them), ``children`` the modules applied after the sum."""
    import operator

    import torch
    import torch.fx as fx

    g = fx.Graph()
    placeholders = []
    for a in spec["args"]:
        if "default" in a:
            placeholders.append(g.placeholder(a["name"], default_value=a["default"]))
        else:
            placeholders.append(g.placeholder(a["name"]))
    var = g.placeholder("*" + spec["varargs"]) if spec.get("varargs") else None
    n_fixed = len(placeholders)
    root: dict[str, Any] = {}
    out_c = int(spec["out_channels"])

    def read(path: list) -> Any:
        first = int(path[0])
        node = placeholders[first] if first < n_fixed else g.call_function(operator.getitem, (var, first - n_fixed))
        for key in path[1:]:
            node = g.call_function(operator.getitem, (node, key))
        return node

    def channels(node: Any, lo: int | None, hi: int | None) -> Any:
        return g.call_function(operator.getitem, (node, (slice(None), slice(lo, hi))))

    terms = []
    for i, t in enumerate(spec["terms"]):
        node = read(t["path"])
        c = int(t["channels"])
        if c > out_c:
            node = channels(node, None, out_c)
            c = out_c
        if t.get("scale") is not None:
            name = f"weight{i}"
            root[name] = _tensor(tensors, name, t["scale"])
            node = g.call_function(operator.mul, (node, g.get_attr(name)))
        terms.append((node, c, int(t.get("offset", 0))))
    if spec.get("layout", "sum") == "cat":  # whole inputs one after another
        acc = g.call_function(torch.cat, ([n for n, _, _ in sorted(terms, key=lambda t: t[2])], 1))
        rest = []
    else:
        acc, rest = _sum_start(g, terms, out_c, int(spec["ndim"]))
    for node, c, _ in rest:
        if c == out_c:
            acc = g.call_function(operator.add, (acc, node))
        else:  # add into the first c channels, keep the others
            head = g.call_function(operator.add, (channels(acc, None, c), node))
            acc = g.call_function(torch.cat, ([head, channels(acc, c, None)], 1))
    if spec.get("bias") is not None:
        root["bias"] = _tensor(tensors, "bias", spec["bias"])
        acc = g.call_function(operator.add, (acc, g.get_attr("bias")))
    for child in spec.get("children", []):
        name = child["name"]
        root[name] = (children or {})[name]
        acc = g.call_module(name, (acc,))
    g.output(acc)
    gm = fx.GraphModule(root, g, class_name=spec.get("class_name") or "WeightedSum")
    gm._graphmodule_cls_name = type(gm).__name__  # torch restores the class name from this on load
    setattr(gm, MARKER, True)
    return gm


def _sum_start(g: Any, terms: list, out_c: int, ndim: int) -> tuple:
    """The term to start the sum from (a full-width one, else the first zero-padded) and the rest."""
    import torch

    full = [i for i, (_, c, _) in enumerate(terms) if c == out_c]
    if not full:  # every input narrower than the output: start from zeros
        first, c0, _ = terms[0]
        pad = [0, 0] * (ndim - 2) + [0, out_c - c0]
        return g.call_function(torch.nn.functional.pad, (first, pad)), terms[1:]
    start = full[0]
    return terms[start][0], terms[:start] + terms[start + 1:]


def _tensor(tensors: dict | None, name: str, shape: list) -> Any:
    import torch

    if tensors is not None and name in tensors:
        return tensors[name]
    return torch.zeros(shape)


def _build_from_recipe(spec: dict, root: Any) -> Any:
    children = {c["name"]: build(c["module"], root) for c in spec.get("children", [])}
    return build_module(spec, None, children)


register_kind(KIND, _build_from_recipe)
