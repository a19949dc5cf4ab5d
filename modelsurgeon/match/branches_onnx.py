"""Multi-branch blocks in an ONNX graph: the ONNX side of :mod:`.branches`.

A sum is a tree of ``Add`` / ``Sum`` nodes of computed tensors; each summand is walked back
through ``Conv`` (2-D, constant weight and bias, explicit or ``NOTSET`` padding),
``BatchNormalization`` (inference), constant per-channel ``Mul`` / ``Add`` / ``Sub`` / ``Div``,
``AveragePool`` (padding counted), constant zero ``Pad`` and ``Identity`` / ``Dropout``; the
source is the latest tensor most chains reach, and the per-channel affine nodes reading the
sum join it. Branch maps, problems and codes are those of the PyTorch side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.onnx import EvaluationError, OnnxGraph, node_label
from ..rewrite import kernels as K
from ..report.codes import Refusal
from .branch_stages import Problem, Stage, branch_map
from .onnx import _attr, _const, affine_step, to_f64

SUMS = {"Add", "Sum"}


@dataclass
class _Unit:  # what affine_step needs to know of the layer before it
    out_channels: int
    axis: int = 1
    rank: int = 4


@dataclass
class OnnxBlock:
    source: Any  # ir.Value every branch reads
    root: Any  # the last Add / Sum node
    final: Any  # the value the merged Conv replaces
    branches: list[list[Stage]]  # each from the source outward ([] = identity)
    maps: list = field(default_factory=list)  # ConvMap per branch
    post: list[Stage] = field(default_factory=list)  # affine nodes after the sum
    problem: Problem | None = None

    @property
    def target(self) -> str:
        return node_label(self.root)

    def describe(self) -> list[str]:
        out = []
        for stages in self.branches:
            parts = [f"{s.event.op_type} {node_label(s.event)}" for s in stages if s.map is not None or s.kind == "conv"]
            out.append("→".join(parts) if parts else "identity")
        return out


def _ints(node: Any, name: str, default: list[int]) -> list[int]:
    v = _attr(node, name, None)
    return [int(x) for x in v] if v is not None else default


def _channels(g: OnnxGraph, v: Any) -> int | None:
    s = g.propagated_shape(v) or (tuple(v.shape) if v.shape is not None else None)
    return s[1] if s is not None and len(s) == 4 and isinstance(s[1], int) else None


def _conv(g: OnnxGraph, node: Any) -> K.ConvMap | Problem:
    import torch

    w, why = _const(g, node.inputs[1] if len(node.inputs) > 1 else None, "weight")
    b_val = node.inputs[2] if len(node.inputs) > 2 else None
    b, why_b = _const(g, b_val, "bias")
    if w is None or (b_val is not None and b is None) or w.ndim != 4:
        return Refusal("computed-tensor", why or why_b or "not a 2-D conv")
    k = list(w.shape[2:])
    dil, stride = _ints(node, "dilations", [1, 1]), _ints(node, "strides", [1, 1])
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", ""):
        if auto != "VALID":
            return Refusal("misaligned-centres", f"auto_pad {auto} may pad one side more")
        pads = [0, 0, 0, 0]
    else:
        pads = _ints(node, "pads", [0, 0, 0, 0])
    if pads[0] != pads[2] or pads[1] != pads[3]:
        return Refusal("misaligned-centres", "a branch's Conv pads one side more")
    bias = to_f64(b).reshape(-1) if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return K.ConvMap(to_f64(w), bias, tuple(stride), (pads[0], pads[1]), tuple(dil), int(_attr(node, "group", 1)))


def _stage(g: OnnxGraph, node: Any) -> Stage | None:
    if not g.is_default_domain(node) or not node.inputs or node.inputs[0] is None:
        return None
    op, x = node.op_type, node.inputs[0]
    if op == "Conv":
        m = _conv(g, node)
        return Stage("conv", node, x, m if isinstance(m, K.ConvMap) else None, m if isinstance(m, Problem) else None)
    if op in ("Identity", "Dropout") and (op == "Identity" or len(node.inputs) < 3 or node.inputs[2] is None):
        return Stage("affine", node, x, None)
    if op == "AveragePool":
        k = _ints(node, "kernel_shape", [])
        pads = _ints(node, "pads", [0] * 4)
        c = _channels(g, x)
        if len(k) != 2 or c is None:
            return None
        if _attr(node, "ceil_mode", 0) or (any(pads) and not _attr(node, "count_include_pad", 0)) or \
                pads[0] != pads[2] or pads[1] != pads[3] or _attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return Stage("avg", node, x, None, Refusal("pooling", "average pooling not counting its padding"))
        return Stage("avg", node, x, K.avg_pool(c, tuple(k), tuple(_ints(node, "strides", [1, 1])), (pads[0], pads[1])))
    if op == "Pad":
        mode = _attr(node, "mode", "constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        try:
            pads = g.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            value = g.const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else 0
        except EvaluationError:
            return None
        if pads is None or value is None:
            return None
        if mode != "constant" or float(value) != 0:
            return Stage("pad", node, x, None, Refusal("padding-mode", f"a branch pads with mode {mode!r}"))
        p = [int(v) for v in pads.reshape(-1)]
        if len(p) != 8 or p[:2] != [0, 0] or p[4:6] != [0, 0] or p[2] != p[6] or p[3] != p[7]:
            return Stage("pad", node, x, None, Refusal("misaligned-centres", "a branch pads one side more"))
        return Stage("pad", node, x, (p[2], p[3], None))
    c = _channels(g, node.outputs[0])
    if c is None:
        return None
    if op == "BatchNormalization":
        st = affine_step(g, node, x, _Unit(c))
    elif op in ("Mul", "Add", "Sub", "Div") and len(node.inputs) == 2:
        x = next((v for v in node.inputs if not g.is_const(v)), None)
        if x is None:
            return None
        st = affine_step(g, node, x, _Unit(c))
    else:
        return None
    if st is None:
        return None
    if isinstance(st, Refusal):
        return Stage("affine", node, x, None, st)
    if isinstance(st, str):
        code = "training-mode" if "batch statistics" in st else "not-affine"
        return Stage("affine", node, x, None, Refusal(code, st))
    return Stage("affine", node, x, (st.affine.scale, st.affine.shift))


def _chain(g: OnnxGraph, v: Any) -> tuple[list, list[Stage]]:
    path, stages = [v], []
    while True:
        p = v.producer()
        st = _stage(g, p) if p is not None else None
        if st is None:
            return path, stages
        stages.append(st)
        v = st.source
        path.append(v)


def _is_sum(g: OnnxGraph, node: Any) -> bool:
    return (node.op_type in SUMS and g.is_default_domain(node) and len(node.inputs) >= 2
            and all(v is not None and not g.is_const(v) for v in node.inputs))


def _summands(g: OnnxGraph, node: Any, out: list, nodes: list) -> None:
    nodes.append(node)
    for v in node.inputs:
        p = v.producer()
        if p is not None and _is_sum(g, p) and g.sole_reader(v) is node:
            _summands(g, p, out, nodes)
        else:
            out.append(v)


def find_blocks(g: OnnxGraph) -> list[OnnxBlock]:
    order = {id(n): i for i, n in enumerate(g.nodes)}
    out = []
    for node in g.nodes:
        if not _is_sum(g, node):
            continue
        r = g.sole_reader(node.outputs[0])
        if r is not None and _is_sum(g, r):
            continue
        leaves, sums = [], []
        _summands(g, node, leaves, sums)
        chains = [_chain(g, v) for v in leaves]
        counts: dict[int, list] = {}
        for path, _ in chains:
            for v in {id(x): x for x in path}.values():
                counts.setdefault(id(v), [v, 0])[1] += 1
        best = max(n for _, n in counts.values())
        if best < 2:
            continue
        src = max((v for v, n in counts.values() if n == best),
                  key=lambda v: order.get(id(v.producer()), -1) if v.producer() is not None else -1)
        if best < len(leaves):
            continue  # a summand not reached linearly (a residual path or a non-linear branch): left alone
        branches = [list(reversed(stages[:[id(x) for x in path].index(id(src))])) for path, stages in chains]
        if not any(s.kind == "conv" for b in branches for s in b):
            continue
        block = OnnxBlock(src, node, node.outputs[0], branches)
        block.problem = _check(g, block)
        if block.problem is None:  # per-channel affine nodes reading the sum join it
            while True:
                r = g.sole_reader(block.final)
                st = _stage(g, r) if r is not None else None
                if st is None or st.kind != "affine" or st.map is None or st.source is not block.final:
                    break
                block.post.append(st)
                block.final = r.outputs[0]
        out.append(block)
    return out


def _check(g: OnnxGraph, b: OnnxBlock) -> Problem | None:
    c = _channels(g, b.source)
    if c is None:
        return Refusal("not-2d", "the branches do not read a 4-D tensor of known channels")
    for stages in b.branches:
        for s in stages:
            if s.problem is not None:
                return s.problem
        for s in stages[1:]:
            if g.reader_count(s.source) != 1:
                return Refusal("other-readers", f"{node_label(s.source.producer())}'s output is read outside its branch")
        if stages and g.reader_count(stages[-1].event.outputs[0]) != 1:
            return Refusal("other-readers", f"{node_label(stages[-1].event)}'s output is read outside the sum")
    groups = {s.map.groups for stages in b.branches for s in stages if s.kind == "conv"}
    if len(groups) > 1:
        return Refusal("groups-mismatch", f"the branches' convs have different groups ({sorted(groups)})")
    maps = []
    for stages in b.branches:
        m = branch_map(stages, c)
        if isinstance(m, Problem):
            return m
        maps.append(m)
    b.maps = maps
    return None
