"""ONNX recognisers shared by the passes: rewritable linear layers and per-channel affine steps.

The ONNX counterpart of :mod:`.conv` and :mod:`.affine`:

* :func:`linear_unit` -- a ``Conv`` / ``ConvTranspose`` / ``Gemm`` / ``MatMul`` node whose
  weight (and bias) are constants, with its output-channel axis;
* :func:`affine_step` -- one node mapping the layer output ``y`` to ``s[c] * y + t[c]`` along
  that axis: an inference-mode ``BatchNormalization`` (every opset's attribute form), or a
  ``Mul`` / ``Add`` / ``Sub`` / ``Div`` whose other operand is a constant (initializer,
  ``Constant`` node or constant subgraph) broadcasting along the channel axis only;
* :func:`walk` -- the chain of such steps after a layer, through values with no other reader.

The affine maths (:class:`~.affine.ChannelAffine`, float64) is the PyTorch side's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..capture.onnx import EvaluationError, OnnxGraph, node_label, shape_of
from ..report.codes import Refusal
from .affine import ChannelAffine, _per_channel

LINEAR = {"Conv": "conv", "ConvTranspose": "conv_transpose", "Gemm": "gemm", "MatMul": "matmul"}
ELEMENTWISE = {"Mul", "Add", "Sub", "Div"}


@dataclass
class LinearUnit:
    """A layer whose weights a fold can rewrite."""

    node: Any
    kind: str  # conv | conv_transpose | gemm | matmul
    weight: Any  # ir.Value
    weight_array: Any  # np.ndarray
    bias: Any = None  # ir.Value (Conv B, Gemm C) or None
    bias_array: Any = None
    out_channels: int = 0
    groups: int = 1
    axis: int = 1  # output-channel axis (non-negative)
    rank: int = 4  # output rank
    trans_b: bool = False
    beta: float = 1.0

    @property
    def label(self) -> str:
        return node_label(self.node)

    def describe(self) -> str:
        return f"{self.node.op_type} {self.label} ({self.out_channels} outputs)"


@dataclass
class Step:
    """One per-channel affine node after the layer."""

    node: Any
    affine: ChannelAffine
    label: str
    source: str  # "batch_norm" | "inline"
    out: Any  # the node's output value
    inp: Any = None  # the value it reads (a reshape of the layer output may come in between)


def _float(arr: Any) -> bool:
    import numpy as np

    return arr is not None and (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16")


def to_f64(arr: Any):
    """A numpy array (any float dtype, incl. ml_dtypes bfloat16) as a float64 torch tensor."""
    import numpy as np
    import torch

    return torch.from_numpy(np.asarray(arr).astype(np.float64))


def _attr(node: Any, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _const(g: OnnxGraph, value: Any, what: str):
    """(array, None) or (None, refusal)."""
    if value is None:
        return None, None
    if not g.is_const(value):
        if value.is_graph_input():
            return None, Refusal("computed-tensor", f"its {what} is a graph input (overridable at run time)")
        return None, Refusal("computed-tensor", f"its {what} is computed at run time")
    try:
        arr = g.const_array(value)
    except EvaluationError as e:
        return None, Refusal("unevaluable", f"its {what} cannot be evaluated ({e})")
    if not _float(arr):
        return None, Refusal("layer-settings", f"its {what} is not floating point ({arr.dtype})")
    return arr, None


def linear_unit(g: OnnxGraph, node: Any) -> LinearUnit | Refusal:
    """The rewritable layer at ``node``, or why it cannot be rewritten."""
    kind = LINEAR.get(node.op_type)
    if kind is None or not g.is_default_domain(node):
        return Refusal("layer-settings", "not a Conv, ConvTranspose, Gemm or MatMul")
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return Refusal("layer-settings", "it has no weight input")
    w, why = _const(g, node.inputs[1], "weight")
    if w is None:
        return why
    b_val = node.inputs[2] if len(node.inputs) > 2 else None
    b = None
    if b_val is not None and kind != "matmul":
        b, why = _const(g, b_val, "bias" if kind != "gemm" else "C input")
        if b is None:
            return why
    unit = LinearUnit(node, kind, node.inputs[1], w, b_val, b)
    if kind in ("conv", "conv_transpose"):
        if w.ndim < 3:
            return Refusal("layer-settings", f"its weight has {w.ndim} dimensions")
        unit.groups = int(_attr(node, "group", 1))
        unit.out_channels = int(w.shape[0] if kind == "conv" else w.shape[1] * unit.groups)
        unit.axis, unit.rank = 1, w.ndim
        if b is not None and b.size != unit.out_channels:
            return Refusal("layer-settings", f"its bias has {b.size} values for {unit.out_channels} outputs")
    elif kind == "gemm":
        if w.ndim != 2:
            return Refusal("layer-settings", "its B input is not a matrix")
        unit.trans_b = bool(_attr(node, "transB", 0))
        unit.beta = float(_attr(node, "beta", 1.0))
        unit.out_channels = int(w.shape[0] if unit.trans_b else w.shape[1])
        unit.axis, unit.rank = 1, 2
    else:  # matmul
        if w.ndim != 2:
            return Refusal("layer-settings", "its weight operand is not a matrix")
        a_shape = shape_of(node.inputs[0])
        out_shape = shape_of(node.outputs[0])
        rank = len(out_shape) if out_shape is not None else (len(a_shape) if a_shape is not None else None)
        if rank is None:
            return Refusal("layer-settings", "the rank of its output is unknown")
        if g.is_const(node.inputs[0]):
            return Refusal("layer-settings", "both of its operands are constant")
        unit.out_channels = int(w.shape[1])
        unit.rank = max(rank, 1)
        unit.axis = unit.rank - 1
    return unit


def _bn_training(g: OnnxGraph, node: Any) -> bool:
    if int(_attr(node, "training_mode", 0)) == 1:
        return True
    # before opset 7 the flag was ``is_test`` (default 0): training only when its extra outputs exist
    return g.opset < 7 and int(_attr(node, "is_test", 0)) == 0 and len(node.outputs) > 1


def batch_norm_affine(g: OnnxGraph, node: Any, channels: int) -> ChannelAffine | Refusal:
    """The exact affine map of an inference-mode BatchNormalization, or why it has none."""
    import torch

    if _bn_training(g, node):
        return Refusal("training-mode", "it normalises with batch statistics (training_mode=1)")
    if g.opset < 9 and int(_attr(node, "spatial", 1)) == 0:
        return Refusal("other-axis", "spatial=0: its statistics are per activation, not per channel")
    for extra in node.outputs[1:]:
        if extra.name and (extra.uses() or extra.is_graph_output()):
            return Refusal("training-mode", f"its running-statistics output {extra.name} is read (a training graph)")
    arrays = []
    for i, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")):
        if len(node.inputs) <= i or node.inputs[i] is None:
            return Refusal("layer-settings", f"it has no {what} input")
        arr, why = _const(g, node.inputs[i], what)
        if arr is None:
            return why
        if arr.size != channels:
            return Refusal("other-axis", f"its {what} has {arr.size} values for {channels} channels")
        arrays.append(to_f64(arr).reshape(-1))
    gamma, beta, mean, var = arrays
    eps = float(_attr(node, "epsilon", 1e-5))
    denom = var + eps
    if bool((denom <= 0).any()):
        return Refusal("not-affine", "variance + epsilon is not positive")
    scale = gamma * torch.rsqrt(denom)
    return ChannelAffine(scale, beta - mean * scale)


def affine_step(g: OnnxGraph, node: Any, cur: Any, unit: LinearUnit, allow_bn: bool = True) -> Step | Refusal | None:
    """The per-channel affine step at ``node`` reading ``cur``: a :class:`Step`, a reason why
    this candidate cannot be folded, or ``None`` when ``node`` is no affine step at all."""
    import torch

    if not g.is_default_domain(node):
        return None
    op = node.op_type
    if op == "BatchNormalization":
        if not allow_bn or not node.inputs or node.inputs[0] is not cur:
            return None
        if unit.axis != 1:
            return Refusal("other-axis", "it normalises axis 1, not the layer's output-channel axis")
        aff = batch_norm_affine(g, node, unit.out_channels)
        if isinstance(aff, Refusal):
            return aff
        return Step(node, aff, f"BatchNormalization {node_label(node)}", "batch_norm", node.outputs[0], cur)
    if op not in ELEMENTWISE or len(node.inputs) != 2:
        return None
    a, b = node.inputs
    x_first, x_second = a is cur, b is cur
    if x_first == x_second:
        return None
    other = b if x_first else a
    if not g.is_const(other):
        return None
    try:
        arr = g.const_array(other)
    except EvaluationError:
        return None
    if not _float(arr):
        return None
    pseudo = tuple(unit.out_channels if i == unit.axis else 1 for i in range(unit.rank))
    c = _per_channel(to_f64(arr), pseudo, unit.axis)
    if c is None:
        return None
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    if op == "Mul":
        aff = ChannelAffine(c, zero)
    elif op == "Add":
        aff = ChannelAffine(one, c)
    elif op == "Sub":
        aff = ChannelAffine(one, -c) if x_first else ChannelAffine(-one, c)
    else:  # Div
        if not x_first or bool((c == 0).any()):
            return None
        aff = ChannelAffine(1.0 / c, zero)
    what = other.name or "a constant"
    return Step(node, aff, f"{op} {node_label(node)} by {what}", "inline", node.outputs[0], cur)


@dataclass
class Walk:
    steps: list[Step] = field(default_factory=list)
    stop: tuple | None = None  # (node, reason): an affine candidate that cannot be folded


def walk(g: OnnxGraph, unit: LinearUnit, allow_bn: bool = True) -> Walk:
    """Affine steps after ``unit``'s output, through values with a single reader."""
    result = Walk()
    cur, at = unit.node.outputs[0], unit  # ``at``: the unit with the channel axis where ``cur`` has it
    while True:
        reader = _data_reader(g, cur)
        if reader is None:
            if not result.steps and g.reader_count(cur) > 1:
                for r in g.readers(cur):
                    if r.op_type == "BatchNormalization" and allow_bn:
                        result.stop = (r, Refusal("other-readers", f"the {unit.node.op_type} output it normalises has "
                                          f"{g.reader_count(cur)} readers ({g.describe_readers(cur)}), so the layer cannot be changed"))
                        break
            break
        step = affine_step(g, reader, cur, at, allow_bn)
        if step is None:
            moved = _reshaped(g, reader, cur, at)  # LeViT: MatMul -> Reshape / Flatten -> BatchNormalization
            if moved is None:
                break
            cur, at = reader.outputs[0], moved
            continue
        if isinstance(step, Refusal):
            result.stop = (reader, step)
            break
        result.steps.append(step)
        cur = step.out
    return result


RESHAPES = {"Reshape", "Flatten"}


def _reshaped(g: OnnxGraph, node: Any, cur: Any, unit: LinearUnit) -> LinearUnit | None:
    """``unit`` with its channel axis and rank where a Reshape / Flatten of ``cur`` puts them,
    when it merges or splits only the dims before that axis (static shapes); else ``None``."""
    import dataclasses

    from .reshape import moved_channel_axis

    if node.op_type not in RESHAPES or not g.is_default_domain(node) or not node.inputs or node.inputs[0] is not cur:
        return None
    src, out = shape_of(cur), shape_of(node.outputs[0])
    if node.op_type == "Flatten" and src and unit.axis == len(src) - 1:
        # merges the dims before its axis, the rest into the second: channels last stay whole,
        # whatever the leading sizes (LeViT's downsampling attention leaves them symbolic)
        at = int(_attr(node, "axis", 1))
        return dataclasses.replace(unit, axis=1, rank=2) if at % len(src) == unit.axis else None
    if not src or not out or not all(isinstance(d, int) for d in tuple(src) + tuple(out)):
        return None
    axis = moved_channel_axis(tuple(src), tuple(out), unit.axis)
    return None if axis is None else dataclasses.replace(unit, axis=axis, rank=len(out))


def _data_reader(g: OnnxGraph, value: Any) -> Any:
    """The only node reading ``value``'s elements: a ``Shape`` / ``Size`` reads its shape only,
    which a fold does not change (``reshape_as`` exports as ``Reshape(y, Shape(x))``)."""
    if value.is_graph_output():
        return None
    uses = [u for u in value.uses() if not (u.node.op_type in ("Shape", "Size") and g.is_default_domain(u.node))]
    return uses[0].node if len(uses) == 1 else None
