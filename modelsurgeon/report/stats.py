"""Before/after figures of a model: parameters, FLOPs, BatchNorm count, modules (PyTorch) or nodes (ONNX)."""

from __future__ import annotations

from typing import Any

from . import ModelStats


def torch_stats(model: Any, graph: Any = None, flops: int | None = None) -> ModelStats:
    """"ops per forward" counts the ops that read the input's values: a grid or anchors built
    from constants (YOLO's ``_make_grid``) or parameter-only computations are no per-input work."""
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    st = ModelStats(params=params, flops=flops, modules=sum(1 for _ in model.modules()))
    if graph is not None:
        st.bn, st.ops = _bn_count(model, graph), sum(1 for ev in graph.events if graph.reads_variable(ev))
    return st


def _bn_count(model: Any, graph: Any) -> int:
    """BatchNorm-like modules of the model (any class holding running statistics: frozen BN
    computes ``x * scale + shift``, no ``batch_norm`` op), plus ``batch_norm`` ops run outside
    them (inline in a host forward)."""
    from ..match.affine import is_bn_like

    modules = {id(m) for m in model.modules() if is_bn_like(m)}
    inline = 0
    for ev in graph.events:
        if ev.name == "batch_norm" and not any(id(c.module) in modules for c in graph.enclosing_calls(ev)):
            inline += 1
    return len(modules) + inline


def onnx_stats(model: Any) -> ModelStats:
    """Before/after figures of an ONNX model: elements of the constant tensors (initializers and
    ``Constant`` nodes), FLOPs of its Conv/Gemm/MatMul nodes (batch of one), BatchNormalization
    nodes (those inside If / Loop bodies included), nodes of the main graph (reported as both
    ``modules`` and ``ops``)."""
    from ..capture.onnx import subgraph_nodes
    from .flops import onnx_flops

    nodes = list(model.graph)
    params = sum(int(v.const_value.size) for v in model.graph.initializers.values() if v.const_value is not None)
    params += sum(int(n.attributes["value"].as_tensor().size) for n in nodes
                  if n.op_type == "Constant" and "value" in n.attributes)
    bn = sum(n.op_type == "BatchNormalization" for n in nodes)
    bn += sum(n.op_type == "BatchNormalization" for _, n in subgraph_nodes(model.graph))
    return ModelStats(params=params, flops=onnx_flops(model), bn=bn, modules=len(nodes), ops=len(nodes))
