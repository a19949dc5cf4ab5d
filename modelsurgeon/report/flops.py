"""FLOPs of a recorded forward pass, with ``torch.utils.flop_counter``'s own formulas.

``FlopCounterMode`` is a ``TorchDispatchMode``; the first dispatch mode a process enters imports
``torch._dynamo`` (seconds of start-up, more than a whole small checkpoint rewrite). The graph
capture already records every conv/linear/matmul with its shapes, so the library's registered
formulas (``flop_registry``: the same numbers ``FlopCounterMode`` reports, tested to agree) are
applied to those records instead -- no extra forward, no dispatch mode.
"""

from __future__ import annotations

from math import prod
from typing import Any

_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
_MATMUL = {"matmul", "Tensor.matmul", "Tensor.__matmul__", "Tensor.__rmatmul__", "mm", "Tensor.mm",
           "bmm", "Tensor.bmm"}
_ADDMM = {"addmm", "Tensor.addmm", "baddbmm", "Tensor.baddbmm"}


def _shape(graph: Any, arg: Any) -> tuple[int, ...] | None:
    from ..capture.graph import Ref

    if isinstance(arg, Ref):
        return graph.value(arg.value).shape
    return None


def _matmul_flops(registry: dict, aten: Any, a: tuple, b: tuple) -> int:
    if len(a) == 1:
        a = (1, a[0])
    if len(b) == 1:
        b = (b[0], 1)
    batch = 1
    for x, y in zip(reversed(a[:-2]), reversed(b[:-2])):
        batch *= max(x, y)
    longer = a[:-2] if len(a) > len(b) else b[:-2]
    batch *= prod(longer[: abs(len(a) - len(b))]) if len(a) != len(b) else 1
    return int(registry[aten.bmm]((batch, a[-2], a[-1]), (batch, b[-2], b[-1])))


def graph_flops(graph: Any, per_module: bool = False) -> int:
    """Total FLOPs of the recorded forward (conv, linear, matmul family, SDPA).

    With ``per_module``, also sets ``graph.module_flops``: module path -> FLOPs of the ops run
    inside its calls ('' is the model), as ``FlopCounterMode`` attributes them to its parents.
    """
    total = 0
    per: dict[str, int] = {}
    for ev in graph.events:
        f = event_flops(graph, ev)
        if not f:
            continue
        total += f
        if per_module:
            for path in {c.path for c in graph.enclosing_calls(ev)}:
                per[path] = per.get(path, 0) + f
    if per_module:
        graph.module_flops = per
    return total


def event_flops(graph: Any, ev: Any) -> int:
    """FLOPs of one recorded op (0 for ops ``torch.utils.flop_counter`` does not count)."""
    import torch
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    name = ev.name
    try:
        if name in _CONV:
            x, w = _shape(graph, ev.args[0]), _shape(graph, ev.args[1])
            out = graph.value(ev.outputs[0]).shape
            if len(x) == len(w) - 1:  # unbatched input
                x, out = (1, *x), (1, *out)
            return int(flop_registry[aten.convolution](x, w, None, None, None, None,
                                                       name.startswith("conv_transpose"), out_val=out))
        if name == "linear":
            x, w = _shape(graph, ev.args[0]), _shape(graph, ev.args[1])
            return int(flop_registry[aten.mm]((prod(x[:-1]), x[-1]), (w[1], w[0])))
        if name in _MATMUL:
            a, b = _shape(graph, ev.args[0]), _shape(graph, ev.args[1])
            if name == "Tensor.__rmatmul__":
                a, b = b, a
            return _matmul_flops(flop_registry, aten, a, b)
        if name in _ADDMM:
            return _matmul_flops(flop_registry, aten, _shape(graph, ev.args[1]), _shape(graph, ev.args[2]))
        if name == "scaled_dot_product_attention":
            q, k, v = (_shape(graph, ev.args[i]) for i in range(3))
            out = graph.value(ev.outputs[0]).shape
            return int(flop_registry[aten._scaled_dot_product_efficient_attention](q, k, v, out_val=out))
    except (TypeError, IndexError, KeyError):  # an argument we cannot read: not counted
        return 0
    return 0


def onnx_flops(model: Any) -> int | None:
    """FLOPs of an ONNX graph (Conv, ConvTranspose, Gemm, MatMul) from its inferred shapes,
    with the same ``torch.utils.flop_counter`` formulas, for a batch of one (a symbolic leading
    dimension counts as 1). ``None`` when any other dimension of those nodes is unknown: no
    count rather than a wrong one."""
    import torch
    from torch.utils.flop_counter import flop_registry

    from ..capture.onnx import shape_of

    aten = torch.ops.aten

    def dims(value: Any) -> tuple[int, ...] | None:
        shape = shape_of(value)
        if shape is None or not all(isinstance(d, int) for d in shape[1:]):
            return None
        return tuple(d if isinstance(d, int) else 1 for d in shape)

    total, known = 0, True
    for node in model.graph:
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        shapes = [dims(v) if v is not None else None for v in list(node.inputs[:2]) + [node.outputs[0]]]
        if any(s is None for s in shapes):
            known = False
            continue
        a, b, out = shapes
        try:
            if op in ("Conv", "ConvTranspose"):
                total += int(flop_registry[aten.convolution](a, b, None, None, None, None, op == "ConvTranspose",
                                                             out_val=out))
            elif op == "Gemm":
                ta = node.attributes.get("transA")
                tb = node.attributes.get("transB")
                a = a[::-1] if ta is not None and ta.as_int() else a
                b = b[::-1] if tb is not None and tb.as_int() else b
                total += int(flop_registry[aten.mm](a, b))
            else:
                total += _matmul_flops(flop_registry, aten, a, b)
        except (TypeError, IndexError, KeyError, ValueError):
            known = False
    return total if known else None

def module_flops(model: Any, inputs: list, graph: Any = None) -> tuple[dict[str, int], int]:
    """FLOPs per module path (nested calls included) and in all, for one forward pass: from
    the capture when it counted them, else by capturing the model once more."""
    if graph is None or graph.module_flops is None:
        from ..capture import capture

        graph, _, _ = capture(model, inputs, count_flops=True)
    return graph.module_flops, graph.module_flops.get("", 0)
