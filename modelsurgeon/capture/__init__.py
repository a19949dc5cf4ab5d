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

    ``flops`` is ``None`` unless ``count_flops``; it applies ``torch.utils.flop_counter``'s
    formulas to the recorded ops (:mod:`modelsurgeon.report.flops`), which also fills
    ``graph.module_flops`` (module path -> FLOPs inside its calls).
    """
    import torch

    with torch.no_grad():
        with Recorder(model) as rec:
            out = model(*inputs)
    flops = None
    if count_flops:
        from ..report.flops import graph_flops

        flops = graph_flops(rec.graph, per_module=True)
    return rec.graph, out, flops

