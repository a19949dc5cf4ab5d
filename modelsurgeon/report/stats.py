"""Before/after figures of a PyTorch model: parameters, FLOPs, BatchNorm count, modules."""

from __future__ import annotations

from typing import Any

from . import ModelStats


def torch_stats(model: Any, graph: Any = None, flops: int | None = None) -> ModelStats:
    seen: set[int] = set()
    params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    st = ModelStats(params=params, flops=flops, modules=sum(1 for _ in model.modules()))
    if graph is not None:
        st.bn = graph.op_count("batch_norm")
        st.ops = len(graph.events)
    return st
