"""Small ONNX graphs built the way exporters write them (onnx.helper): weights as initializers
or Constant nodes, opsets 9-17, a symbolic batch dimension, randomised BatchNorm statistics.

Each builder returns an ``onnx.ModelProto``; :func:`save` writes it; :func:`ops` lists the op
types of a file's nodes; :func:`ort_outputs` runs a file in onnxruntime (optimisations off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT
INT64_MAX = 9223372036854775807


class Builder:
    """Collects nodes, initializers and Constant nodes for one graph."""

    def __init__(self, seed: int = 0, const_nodes: bool = False, dtype=np.float32):
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []
        self.const_nodes = const_nodes
        self.dtype = dtype
        self.n = 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr, base: str = "c", as_node: bool | None = None) -> str:
        """A constant: an initializer, or a Constant node when ``const_nodes`` (or ``as_node``)."""
        arr = np.asarray(arr)
        name = self.name(base)
        if self.const_nodes if as_node is None else as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const",
                                               value=numpy_helper.from_array(arr, name)))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def weight(self, shape, base="w", scale=0.5) -> str:
        return self.const((self.rng.standard_normal(shape) * scale).astype(self.dtype), base)

    def node(self, op: str, inputs: list, n_out: int = 1, name: str | None = None, **attrs) -> str | list:
        name = name or self.name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, s: int = 1, p: int = 1, bias: bool = True,
             group: int = 1, name: str | None = None) -> str:
        ins = [x, self.weight((cout, cin // group, k, k), "conv_w")]
        if bias:
            ins.append(self.weight((cout,), "conv_b"))
        return self.node("Conv", ins, name=name, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=group)

    def bn(self, x: str, c: int, name: str | None = None, eps: float = 1e-3, **attrs) -> str:
        r = self.rng
        gamma = self.const((r.uniform(0.5, 1.5, c)).astype(self.dtype), "bn_gamma")
        beta = self.const((r.standard_normal(c) * 0.5).astype(self.dtype), "bn_beta")
        mean = self.const((r.standard_normal(c) * 0.5).astype(self.dtype), "bn_mean")
        var = self.const((r.uniform(0.3, 2.0, c)).astype(self.dtype), "bn_var")
        return self.node("BatchNormalization", [x, gamma, beta, mean, var], name=name, epsilon=eps, **attrs)

    def model(self, inputs: list, outputs: list, opset: int = 13, ir_version: int | None = None,
              name: str = "g") -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="test-exporter")
        if ir_version is not None:
            m.ir_version = ir_version
        elif opset <= 16:
            m.ir_version = 8
        return m


def tensor(name: str, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def out(name: str, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


# -- the pattern graphs -------------------------------------------------------------------

def conv_bn_relu(opset: int = 13, const_nodes: bool = False, bias: bool = True, seed: int = 0,
                 dtype=np.float32, batch="N") -> onnx.ModelProto:
    b = Builder(seed, const_nodes, dtype)
    y = b.conv("x", 3, 8, bias=bias, name="conv")
    y = b.bn(y, 8, name="bn")
    y = b.node("Relu", [y], name="relu")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return b.model([tensor("x", [batch, 3, 16, 16], elem)], [out(y, [batch, 8, 16, 16], elem)], opset)


def caffe_chain(opset: int = 11, const_nodes: bool = False, seed: int = 1) -> onnx.ModelProto:
    """Caffe BatchNorm (no affine: scale 1, bias 0) + Scale exported as Mul + Add."""
    b = Builder(seed, const_nodes)
    r = b.rng
    y = b.conv("x", 3, 8, name="conv")
    mean = b.const((r.standard_normal(8) * 0.5).astype(np.float32), "mean")
    var = b.const(r.uniform(0.3, 2.0, 8).astype(np.float32), "var")
    y = b.node("BatchNormalization", [y, b.const(np.ones(8, np.float32), "one"), b.const(np.zeros(8, np.float32), "zero"),
                                      mean, var], name="bn", epsilon=1e-5)
    y = b.node("Mul", [y, b.const(r.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32), "scale")], name="scale_mul")
    y = b.node("Add", [y, b.const(r.standard_normal((1, 8, 1, 1)).astype(np.float32), "shift")], name="scale_add")
    y = b.node("Relu", [y], name="relu")
    return b.model([tensor("x", ["N", 3, 16, 16])], [out(y, ["N", 8, 16, 16])], opset)


FOCUS_ORDER = ((0, 0), (1, 0), (0, 1), (1, 1))


def _slice(b: Builder, x: str, opset: int, starts, ends, axes, steps) -> str:
    if opset < 10:
        assert all(s == 1 for s in steps)
        return b.node("Slice", [x], starts=list(starts), ends=list(ends), axes=list(axes))
    ins = [x, b.const(np.array(starts, np.int64), "starts"), b.const(np.array(ends, np.int64), "ends"),
           b.const(np.array(axes, np.int64), "axes"), b.const(np.array(steps, np.int64), "steps")]
    return b.node("Slice", ins)


def focus_stem(opset: int = 13, order=FOCUS_ORDER, const_nodes: bool = True, chained: bool = False,
               negative_axes: bool = False, ends=INT64_MAX, seed: int = 2, hw=(16, 16), batch="N",
               bn: bool = True) -> onnx.ModelProto:
    """YOLOv5 Focus: 4 phases of x[..., dy::2, dx::2], Concat(axis=1), Conv, BN, SiLU (Sigmoid, Mul).

    ``chained``: each phase as two one-axis Slices (H then W), as older exporters write it."""
    b = Builder(seed, const_nodes)
    ax_h, ax_w = (-2, -1) if negative_axes else (2, 3)
    parts = []
    for dy, dx in order:
        if chained:
            t = _slice(b, "x", opset, [dy], [ends], [ax_h], [2])
            parts.append(_slice(b, t, opset, [dx], [ends], [ax_w], [2]))
        else:
            parts.append(_slice(b, "x", opset, [dy, dx], [ends, ends], [ax_h, ax_w], [2, 2]))
    y = b.node("Concat", parts, name="focus_cat", axis=1)
    y = b.conv(y, 12, 8, bias=not bn, name="conv")
    if bn:
        y = b.bn(y, 8, name="bn")
    s = b.node("Sigmoid", [y], name="sigmoid")
    y = b.node("Mul", [y, s], name="silu")
    half = [d // 2 if isinstance(d, int) else f"{d}/2" for d in hw]
    return b.model([tensor("x", [batch, 3, *hw])], [out(y, [batch, 8, *half])], opset)


def focus_stem_opset9(seed: int = 3) -> onnx.ModelProto:
    """Slice with attributes (opset < 10: no steps) cannot sub-sample, so old exporters wrote
    Focus as SpaceToDepth; this graph slices two blocks of the width and concatenates them --
    no space-to-depth at all (must be left alone)."""
    b = Builder(seed)
    a = b.node("Slice", ["x"], starts=[0], ends=[8], axes=[3])
    c = b.node("Slice", ["x"], starts=[8], ends=[16], axes=[3])
    y = b.node("Concat", [a, c], axis=1)
    y = b.conv(y, 6, 4, name="conv")
    return b.model([tensor("x", [1, 3, 16, 16])], [out(y, [1, 4, 16, 8])], 9)


def s2d_conv(opset: int = 13, shuffle: str | None = None, seed: int = 4, k: int = 3, p: int = 1, s: int = 1,
             group: int = 1) -> onnx.ModelProto:
    """SpaceToDepth(2) -> [channel Gather | DCR->CRD Reshape/Transpose/Reshape] -> Conv."""
    b = Builder(seed)
    y = b.node("SpaceToDepth", ["x"], name="s2d", blocksize=2)
    if shuffle == "gather":
        perm = b.rng.permutation(12).astype(np.int64)
        y = b.node("Gather", [y, b.const(perm, "perm")], name="shuffle", axis=1)
    elif shuffle == "transpose":  # phase-major (j = p*C + c) -> channel-major (j = c*4 + p)
        y = b.node("Reshape", [y, b.const(np.array([0, 4, 3, 8, 8], np.int64), "shape5")], name="split_phases")
        y = b.node("Transpose", [y], name="swap", perm=[0, 2, 1, 3, 4])
        y = b.node("Reshape", [y, b.const(np.array([0, 12, 8, 8], np.int64), "shape4")], name="merge")
    y = b.conv(y, 12, 8, k=k, s=s, p=p, group=group, name="conv")
    size = (8 + 2 * p - k) // s + 1
    return b.model([tensor("x", ["N", 3, 16, 16])], [out(y, ["N", 8, size, size])], opset)


def weighted_fusion(opset: int = 13, seed: int = 5, const_nodes: bool = True) -> onnx.ModelProto:
    """BiFPN / Darknet weighted shortcut: out = w0 * conv1(a) + w1 * conv2(b) with
    w = relu(p) / (sum(relu(p)) + eps) computed in the graph from a parameter p."""
    b = Builder(seed, const_nodes)
    c1 = b.conv("a", 4, 6, name="conv1")
    c2 = b.conv("b", 4, 6, name="conv2")
    p = b.const(np.array([0.7, 1.6], np.float32), "fusion_w", as_node=False)
    w = b.node("Relu", [p], name="w_relu")
    if opset >= 13:
        ssum = b.node("ReduceSum", [w], name="w_sum", keepdims=0)
    else:
        ssum = b.node("ReduceSum", [w], name="w_sum", keepdims=0, axes=[0])
    den = b.node("Add", [ssum, b.const(np.array(1e-4, np.float32), "eps")], name="w_eps")
    wn = b.node("Div", [w, den], name="w_norm")
    w0 = b.node("Gather", [wn, b.const(np.array(0, np.int64), "i0")], name="w0", axis=0)
    w1 = b.node("Gather", [wn, b.const(np.array(1, np.int64), "i1")], name="w1", axis=0)
    y = b.node("Add", [b.node("Mul", [c1, w0], name="m0"), b.node("Mul", [c2, w1], name="m1")], name="fuse")
    return b.model([tensor("a", ["N", 4, 8, 8]), tensor("b", ["N", 4, 8, 8])], [out(y, ["N", 6, 8, 8])], opset)


# -- shape arithmetic as exporters write it ---------------------------------------------------------

def _i64(b: Builder, v, base: str = "i") -> str:
    return b.const(np.array(v, np.int64), base)


def _f32(b: Builder, v, base: str = "f") -> str:
    return b.const(np.array(v, np.float32), base)


def _size(b: Builder, x: str, axis: int) -> str:
    """x.shape[axis] as a 0-d int64 tensor: Shape → Gather."""
    return b.node("Gather", [b.node("Shape", [x]), _i64(b, axis)], axis=0)


def _unsq(b: Builder, v: str) -> str:
    return b.node("Unsqueeze", [v, _i64(b, [0])])


def same_pad_conv(hw=(15, 15), batch="N", k: int = 3, s: int = 2, cin: int = 3, cout: int = 8, seed: int = 10,
                  symbolic_hw: bool = False, const_nodes: bool = True) -> onnx.ModelProto:
    """TensorFlow "SAME" padding computed from ``x.shape`` in the graph (as timm's Conv2dSame
    exports): per spatial axis ``max((ceil(n / s) - 1) * s + k - n, 0)`` split begin / end, a
    ``Concat`` of the eight pads, ``Pad``, then a ``Conv`` without padding."""
    b = Builder(seed, const_nodes)
    begins, ends = [], []
    for axis in (2, 3):
        n = b.node("Cast", [_size(b, "x", axis)], to=TensorProto.FLOAT)
        t = b.node("Ceil", [b.node("Div", [n, _f32(b, s)])])
        t = b.node("Add", [b.node("Mul", [b.node("Sub", [t, _f32(b, 1)]), _f32(b, s)]), _f32(b, k)])
        t = b.node("Max", [b.node("Sub", [t, n]), _f32(b, 0)])
        total = b.node("Cast", [t], to=TensorProto.INT64)
        begin = b.node("Div", [total, _i64(b, 2)])
        begins.append(_unsq(b, begin))
        ends.append(_unsq(b, b.node("Sub", [total, begin])))
    zero = _i64(b, [0])
    pads = b.node("Concat", [zero, zero, *begins, zero, zero, *ends], axis=0)
    y = b.node("Pad", ["x", pads], name="pad", mode="constant")
    y = b.node("Conv", [y, b.weight((cout, cin, k, k), "conv_w"), b.weight((cout,), "conv_b")], name="conv",
               kernel_shape=[k, k], strides=[s, s])
    dims = ["H", "W"] if symbolic_hw else list(hw)
    out_dims = ["Ho", "Wo"] if symbolic_hw else [-(-d // s) for d in hw]
    return b.model([tensor("x", [batch, cin, *dims])], [out(y, [batch, cout, *out_dims])], 13)


def view_by_size(batch="N", opset: int = 13) -> onnx.ModelProto:
    """``y.view(y.size(0), -1)`` after a conv: Shape → Gather → Unsqueeze → Concat → Reshape, then a
    Linear exported as MatMul + Add."""
    b = Builder(11)
    y = b.conv("x", 3, 4, name="conv")
    shape = b.node("Concat", [_unsq(b, _size(b, y, 0)), _i64(b, [-1])], axis=0)
    y = b.node("Reshape", [y, shape], name="flatten")
    y = b.node("MatMul", [y, b.weight((4 * 8 * 8, 5), "fc_w")], name="fc")
    y = b.node("Add", [y, b.weight((5,), "fc_b")], name="fc_bias")
    return b.model([tensor("x", [batch, 3, 8, 8])], [out(y, [batch, 5])], opset)


# -- helpers -------------------------------------------------------------------------------------

def save(model: onnx.ModelProto, path: Path, check: bool = True) -> Path:
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def run_pass(tmp_path: Path, model: onnx.ModelProto, command: str, *args, name: str = "m"):
    """Save ``model``, run ``modelsurgeon COMMAND`` on it (must succeed): (report, src, dst)."""
    from conftest import run_cli

    src = save(model, tmp_path / f"{name}.onnx")
    dst = tmp_path / f"{name}.out.onnx"
    r = run_cli(command, src, "-o", dst, "--json", *args)
    assert r.code == 0, r.err
    return r.json(), src, dst


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def ort_outputs(path: Path, feeds: dict) -> list:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def random_feeds(path: Path, seed: int = 7, batch: int = 2, dims: dict | None = None) -> dict:
    """Random inputs for every graph input (symbolic batch -> ``batch``, others from ``dims``)."""
    m = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        shape = []
        for k, d in enumerate(i.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append((dims or {}).get(d.dim_param, batch if k == 0 else 8))
        dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dt)
    return feeds


def assert_same_function(original: Path, rewritten: Path, rtol: float = 1e-4, **kw) -> None:
    """Both files give the same outputs (by position) on fresh random inputs -- checked here,
    independently of modelsurgeon's own parity check."""
    feeds = random_feeds(original, **kw)
    a = ort_outputs(original, feeds)
    names = {i.name for i in onnx.load(str(rewritten), load_external_data=False).graph.input}
    b = ort_outputs(rewritten, {k: v for k, v in feeds.items() if k in names})
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        scale = float(np.abs(x.astype(np.float64)).max()) or 1.0
        assert float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) <= rtol * scale
