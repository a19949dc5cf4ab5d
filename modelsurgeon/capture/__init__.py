"""Stage 2 of the pipeline: the dataflow graph of a model on its example input.

``capture(model, inputs)`` runs the model once under a recorder and returns the graph together
with the model's real output (reused as the first parity reference, so capture costs no extra
forward pass). ONNX models need no capture: their IR already is the graph
(:mod:`modelsurgeon.capture.onnx`).
"""

from __future__ import annotations

from typing import Any, Sequence

from .graph import OUTPUT, DataflowGraph, ModuleCall, OpEvent, Ref, Value
from .recorder import Recorder, flatten_tensors, op_name

__all__ = [
    "OUTPUT", "DataflowGraph", "ModuleCall", "OpEvent", "Ref", "Value", "capture",
    "flatten_tensors", "op_name",
]


def capture(model, inputs: Sequence[Any], count_flops: bool = False):
    """Run ``model(*inputs)`` once, recording it. Returns ``(graph, output, flops)``.

    ``flops`` is ``None`` unless ``count_flops``; it comes from ``torch.utils.flop_counter``,
    which also gives ``graph.module_flops`` (module path -> FLOPs inside its calls).
    """
    import torch

    flops = None
    with torch.no_grad():
        if count_flops:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter, Recorder(model) as rec:
                out = model(*inputs)
            flops = int(counter.get_total_flops())
            rec.graph.module_flops = flops_by_path(counter, model)
        else:
            with Recorder(model) as rec:
                out = model(*inputs)
    return rec.graph, out, flops


def flops_by_path(counter, model) -> dict[str, int]:
    """A ``FlopCounterMode``'s per-module counts keyed by module path ('' = the model)."""
    root = type(model).__name__
    per: dict[str, int] = {}
    for name, ops in counter.get_flop_counts().items():
        if name == root:
            path = ""
        elif name.startswith(root + "."):
            path = name[len(root) + 1:]
        else:
            continue
        per[path] = int(sum(ops.values()))
    return per
