"""Synthesise the forward of a rewritten feature-fusion module: a plain (or partly weighted) sum.

Details: docs/architecture.md (*fold-fusion, in one paragraph*).
"""

from __future__ import annotations

from typing import Any

from ..report.codes import Refusal
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
    """The submodule ``module`` runs as its forward (a rewritten fusion module, bound to it or,
    as earlier versions wrote it, unbound), else ``None``."""
    from .forward import generated_forward as bound

    f = vars(module).get("forward")
    if f is None:
        return None
    if any(f is m for m in getattr(module, "_modules", {}).values()):
        return f
    return bound(module)


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

def signature_spec(module: Any, n_args: int, keywords: tuple = ()) -> tuple[list[dict], str | None] | Refusal:
    """The forward's positional parameters for a call (:func:`modelsurgeon.rewrite.forward.replay.signature_spec`)."""
    from .forward.replay import signature_spec as spec

    return spec(module, n_args, keywords)


def sum_graph(spec: dict, owner: bool = False) -> Any:
    """The fx graph of the sum ``spec`` describes. With ``owner`` its first placeholder is the
    module it serves and the trailing children are that module's (``m.conv(...)``); without,
    they are the graph's own submodules (the format of earlier versions)."""
    import operator

    import torch
    import torch.fx as fx

    g = fx.Graph()
    owner_node = g.placeholder("m") if owner else None
    placeholders = []
    for a in spec["args"]:
        if "default" in a:
            placeholders.append(g.placeholder(a["name"], default_value=a["default"]))
        else:
            placeholders.append(g.placeholder(a["name"]))
    var = g.placeholder("*" + spec["varargs"]) if spec.get("varargs") else None
    n_fixed = len(placeholders)
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
            node = g.call_function(operator.mul, (node, g.get_attr(f"weight{i}")))
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
        acc = g.call_function(operator.add, (acc, g.get_attr("bias")))
    for child in spec.get("children", []):
        name = child["name"]
        acc = g.call_method(name, (owner_node, acc)) if owner else g.call_module(name, (acc,))
    g.output(acc)
    return g


def _constants(spec: dict, tensors: dict | None) -> dict:
    out = {f"weight{i}": _tensor(tensors, f"weight{i}", t["scale"]) for i, t in enumerate(spec["terms"])
           if t.get("scale") is not None}
    if spec.get("bias") is not None:
        out["bias"] = _tensor(tensors, "bias", spec["bias"])
    return out


def owner_forward(spec: dict, tensors: dict) -> tuple[dict, Any]:
    """``(graph spec, GraphModule)`` of the sum as the generated forward of the module it serves
    (bound to it: the trailing children stay that module's)."""
    from .forward.spec import build, to_spec

    constants = _constants(spec, tensors)
    gspec = to_spec(sum_graph(spec, owner=True), constants, owner="m")
    gm = build(gspec, constants)
    setattr(gm, MARKER, True)
    return gspec, gm


def build_module(spec: dict, tensors: dict[str, Any] | None = None, children: dict[str, Any] | None = None) -> Any:
    """The stand-alone GraphModule of the sum (earlier versions' format, and a module replaced
    as a whole): ``tensors`` are its buffers (zeros when ``None``: a state_dict fills them),
    ``children`` the modules applied after the sum, its own."""
    from .forward.spec import build, to_spec

    constants = _constants(spec, tensors)
    mods = {c["name"]: (children or {})[c["name"]] for c in spec.get("children", [])}
    gspec = to_spec(sum_graph(spec), constants, {k: None for k in mods}, class_name=spec.get("class_name") or GRAPH_CLASS_NAME)
    gm = build(gspec, constants, mods)
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
