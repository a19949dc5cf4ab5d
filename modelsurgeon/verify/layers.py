"""Where two models first diverge (``compare --layers``): each side's intermediate values as
*points* in execution order, paired by key, errors per pair in order.

Keys: a PyTorch module path; for an ONNX graph next to a PyTorch model, the module path in the
exporter's node names (``/backbone/layer3/layer3.1/conv1/Conv`` -> ``backbone.layer3.1.conv1``,
the point being the last value computed inside that module); between two ONNX graphs, the
tensor name. Pairs are walked in the order of the side with more points. A point the other
side lacks -- a BatchNorm a rewrite folded into its conv (``nn.Identity``, removed, or folded
by the exporter), a tensor a graph rewrite renamed away -- takes over the previous pair: its
value is what the other side's point computes, so folded layers still pair up and the pair is
named from its first layer (``a``) to the one whose value is compared (``a_output``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from .compare import Tolerance, compare_arrays


@dataclass
class Point:
    key: str
    name: str  # what the report calls it (module path, tensor name)
    value: Any  # numpy array


@dataclass
class LayerPair:
    a: str
    b: str
    a_output: str | None = None  # the a-side layer whose value is compared, when a later one
    b_output: str | None = None
    max_abs: float | None = None
    max_rel: float | None = None
    passed: bool | None = None  # None: not comparable (shapes differ)
    note: str = ""
    stats: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"a": self.a, "b": self.b, "max_abs": self.max_abs, "max_rel": self.max_rel, "passed": self.passed}
        if self.a_output:
            d["a_output"] = self.a_output
        if self.b_output:
            d["b_output"] = self.b_output
        if self.note:
            d["note"] = self.note
        return d


def torch_points(values: dict, model_paths: dict) -> list[Point]:
    """A PyTorch side's recorded module outputs (call order); ``nn.Identity`` modules -- a
    rewrite's placeholders -- are not points."""
    import torch.nn as nn

    return [Point(p, p, v) for p, v in values.items() if not isinstance(model_paths.get(p), nn.Identity)]


def skipped_keys(calls: dict) -> set[str]:
    """Modules that ran more than once (a shared ReLU): which call an exporter's node belongs to is
    not known, so they are neither paired nor taken as missing."""
    return {p for p, n in calls.items() if n > 1}


def scope_path(node_name: str, modules: set[str]) -> str | None:
    """The module path of an exporter node name (``/layer1/layer1.0/conv1/Conv`` ->
    ``layer1.0.conv1``): each scope segment is read relative to the current module or its parent."""
    parts = [p for p in node_name.split("/") if p][:-1]
    stack: list[str] = [""]
    for seg in parts:
        found = None
        for s in (seg, re.sub(r"_\d+$", "", seg)):  # a module's second call: ``relu_1``
            for base in (stack[-1], stack[-2] if len(stack) > 1 else "", ""):
                cand = f"{base}.{s}" if base else s
                if cand in modules:
                    found = cand
                    break
            if found:
                break
        if found is None:
            return None
        stack.append(found)
    return stack[-1] or None


def onnx_points_by_module(nodes: Sequence[tuple[str, list[str]]], values: dict, modules: set[str]) -> list[Point]:
    """An ONNX side's points keyed by module path: for each module with nodes, the first output
    of the last node inside it (its sub-modules included), in graph order."""
    last: dict[str, tuple[int, str, str]] = {}
    for i, (name, outs) in enumerate(nodes):
        path = scope_path(name, modules) if name else None
        if path is None or not outs or outs[0] not in values:
            continue
        prefix = path.split(".")
        for k in range(1, len(prefix) + 1):
            p = ".".join(prefix[:k])
            if p in modules:
                last[p] = (i, outs[0], name)
    ordered = sorted(last.items(), key=lambda kv: kv[1][0])
    return [Point(p, tensor, values[tensor]) for p, (_i, tensor, _n) in ordered]


def onnx_points_by_name(nodes: Sequence[tuple[str, list[str]]], values: dict) -> list[Point]:
    out, seen = [], set()
    for _name, outs in nodes:
        for t in outs:
            if t in values and t not in seen:
                seen.add(t)
                out.append(Point(t, t, values[t]))
    return out


def pair(a: list[Point], b: list[Point], tol: Tolerance, skip: set[str] = frozenset()) -> list[LayerPair]:
    """The paired layers in execution order, each with its error (module docstring); keys in
    ``skip`` are left out on both sides."""
    a, b = [p for p in a if p.key not in skip], [p for p in b if p.key not in skip]
    flipped = len(b) > len(a)
    walk, other = (b, a) if flipped else (a, b)
    by_key = {p.key: p for p in other}
    pairs: list[list] = []  # [first walked point, walked point compared, other point]
    for p in walk:
        q = by_key.get(p.key)
        if q is not None:
            pairs.append([p, p, q])
        elif pairs:
            pairs[-1][1] = p
    out = []
    for first, last, q in pairs:
        wa, wb = (q, last) if flipped else (last, q)
        lp = LayerPair(a=(q.name if flipped else first.name), b=(first.name if flipped else q.name))
        if last is not first:
            if flipped:
                lp.b_output = last.name
            else:
                lp.a_output = last.name
        ra, rb = wa.value, wb.value
        if getattr(ra, "dtype", None) is None or ra.dtype.kind not in "fc" or rb.dtype.kind not in "fc":
            continue
        if ra.shape != rb.shape:
            if ra.size != rb.size:
                lp.note = f"shapes differ: {list(ra.shape)} vs {list(rb.shape)}"
                out.append(lp)
                continue
            rb = rb.reshape(ra.shape)
        d = compare_arrays(lp.a, ra, rb, tol)
        lp.max_abs, lp.max_rel, lp.passed, lp.stats = d.max_abs, d.max_rel, d.passed, d.stats or {}
        out.append(lp)
    return out


def first_divergence(pairs: list[LayerPair]) -> LayerPair | None:
    return next((p for p in pairs if p.passed is False), None)
