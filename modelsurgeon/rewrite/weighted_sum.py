"""Synthesise the forward of a rewritten feature-fusion module: a plain (or partly weighted) sum.

A fusion module's forward normalises its learnt weights and sums its inputs, each multiplied by
its weight; inputs with fewer channels than the output are added into the first channels (zero
padding), inputs with more are cut to the output's channels (Darknet's weighted ``[shortcut]``).
Once the weights are constants and most of them have moved into the convs producing the inputs,
what is left is

    out = sum_i  align(x_i [* k_i])  [+ b]        then, optionally, a chain of child modules

or, for a weighted concatenation, ``cat(x_i [* k_i]) [+ b]``.

That computation is a ``torch.fx.GraphModule`` generated here (:func:`build_module`): it
pickles with torch alone (its forward is stored as generated Python source and re-traced on
load), takes the original forward's arguments (reading each input at the same place:
``outputs[12]``, ``x[1]``...), holds the remaining constants as buffers and the trailing child
modules as its own. The fusion module itself is kept -- its class, so a host dispatching on the
class name still recognises it, also in a ``copy.deepcopy``; its attributes (``layers``, YOLO's
``i``/``f``) -- and runs the GraphModule as its forward: it becomes the module's submodule
``fused`` (:data:`FORWARD_NAME`) and its instance attribute ``forward``
(:func:`modelsurgeon.rewrite.recipe.set_forward`), the parameters, buffers and submodules its
own forward used being removed. A state_dict of it is rebuilt from the recipe: the edit
``set_forward`` with a module of kind ``weighted-sum`` registered here (plain data: argument
names, input positions, channel counts, buffer shapes, moved children).

Files written by earlier versions hold the GraphModule *in place of* the fusion module (named
like it, recipe ``replace`` with this kind): they load and replay as before, and the pass
recognises them (:func:`is_generated`).
"""

from __future__ import annotations

import inspect
from typing import Any

from .recipe import build, register_kind

KIND = "weighted-sum"
MARKER = "_generated_weighted_sum"
"""Attribute set on every synthesised module (survives pickling, not ``copy.deepcopy``: a
GraphModule's copy keeps only what its graph reads): lets the pass recognise it."""
OLD_MARKERS = ("_modelsurgeon_weighted_sum",)
"""Names the attribute had in files written by earlier versions (still recognised)."""
FORWARD_NAME = "fused"
"""Submodule name of the generated forward in the fusion module it serves (another when taken)."""
GRAPH_CLASS_NAME = "GraphModule"
"""Class name of a generated forward: torch's own, which ``copy.deepcopy`` gives it anyway."""


def generated_forward(module: Any) -> Any:
    """The submodule ``module`` runs as its forward (a rewritten fusion module), else ``None``."""
    f = vars(module).get("forward")
    if f is None or not any(f is m for m in getattr(module, "_modules", {}).values()):
        return None
    return f


def is_generated(module: Any, owner: Any = None) -> bool:
    """Is ``module`` a weighted sum synthesised here (by this version or an earlier one) -- a
    GraphModule carrying the marker, the forward of its parent ``owner``, or a fusion module
    whose forward was rewritten?"""
    if any(bool(getattr(module, name, False)) for name in (MARKER, *OLD_MARKERS)):
        return True
    if owner is not None and generated_forward(owner) is module:
        return True
    return generated_forward(module) is not None


_NN_MODULE_PROTOCOL = ("__call__", "__getstate__", "__reduce__", "__reduce_ex__", "__deepcopy__", "__copy__")


def can_take_forward(module: Any) -> bool:
    """Is an instance ``forward`` on ``module`` what it runs, and does it survive pickling and
    ``copy.deepcopy``? Not on a GraphModule (it rebuilds itself from its code) nor on a class
    with its own ``__call__`` or pickling: such a module is replaced by the generated one as a
    whole (named like it)."""
    import torch

    if isinstance(module, torch.fx.GraphModule):
        return False
    cls = type(module)
    return all(getattr(cls, n, None) is getattr(torch.nn.Module, n, None) for n in _NN_MODULE_PROTOCOL)


def free_name(module: Any, removed: Any = ()) -> str:
    """:data:`FORWARD_NAME`, or ``fused_1``... when ``module`` already uses that name."""
    taken = (set(vars(module)) | set(module._parameters) | set(module._buffers) | set(module._modules)
             | set(dir(type(module)))) - set(removed)
    name, i = FORWARD_NAME, 0
    while name in taken:
        i += 1
        name = f"{FORWARD_NAME}_{i}"
    return name

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
    gm = fx.GraphModule(root, g, class_name=spec.get("class_name") or GRAPH_CLASS_NAME)
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
