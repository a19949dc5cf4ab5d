"""Darknet layers as an ONNX graph (opset 17), one group of nodes per layer.

Details: docs/formats.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..graph_builder import GraphBuilder
from .layers import HEADS, IDENTITY, KEEP_FLAT, Layer

EPS_BN = 1e-5  # normalize_cpu: (x - mean) / sqrt(var + .00001f)
EPS_SHORTCUT = 1e-4  # shortcut_multilayer_cpu: const float eps = 0.0001


class DarknetGraph:
    def __init__(self, layers: list[Layer], arrays: dict, shape: tuple[int, int, int, int]):
        self.layers = layers
        self.arrays = arrays
        self.b = GraphBuilder()
        self.shape = shape
        self.values: dict[int, Any] = {}

    def build(self, name: str) -> tuple[Any, dict]:
        b = self.b
        for L in self.layers:
            b.reserve(L.name)
        x = b.input("input", self.shape)
        for L in self.layers:
            ins = [x if j < 0 else self.values[j] for j in L.inputs]
            if L.kind not in KEEP_FLAT:
                ins = [self.image(L, v, self.layers[j] if j >= 0 else None, k) for k, (v, j) in enumerate(zip(ins, L.inputs))]
            out = self.layer(L, ins)
            if out.producer() is not None and out.name != L.name and out not in ins:
                out.name = L.name
            self.values[L.index] = out
        last = self.layers[-1]
        trailing = last
        for L in reversed(self.layers):
            if L.kind not in ("cost", "dropout", "empty"):
                trailing = L
                break
        for L in self.layers:
            if L.kind in HEADS:
                b.output(self.values[L.index], f"raw input of [{L.kind}] layer {L.index} (decode stays the user's)")
        if trailing.kind not in HEADS:
            b.output(self.values[last.index], f"output of layer {last.index}")
        model = b.build(name, "read from darknet .cfg + .weights by modelsurgeon")
        return model, b.owner

    # -- one layer -------------------------------------------------------------------------
    def layer(self, L: Layer, ins: list) -> Any:
        if L.kind in IDENTITY:
            return ins[0]
        return getattr(self, "_" + L.kind)(L, ins)

    def op(self, L: Layer, op: str, inputs: list, step: str, **attrs: Any) -> Any:
        """A node of layer ``L``: named ``L.name`` for the layer's main op (``step`` empty),
        ``L.name/step`` otherwise; its output ``L.name/step`` (the layer's last output is
        renamed ``L.name`` by :meth:`build`)."""
        name = L.name if step == "" else f"{L.name}/{step}"
        return self.b.op(op, inputs, name, L.index, attrs, out=f"{L.name}/{step or op.lower()}")

    def const(self, L: Layer, array: Any, what: str) -> Any:
        return self.b.const(array, f"{L.name}.{what}")

    def activation(self, L: Layer, x: Any, act: str) -> Any:
        if act == "linear":
            return x
        if act in ("leaky", "revleaky", "relie"):
            return self.op(L, "LeakyRelu", [x], act, alpha=0.1 if act != "relie" else 0.01)
        simple = {"relu": "Relu", "logistic": "Sigmoid", "tanh": "Tanh"}
        if act in simple:
            return self.op(L, simple[act], [x], act)
        if act in ("relu6", "hardtan"):
            lo, hi = (0.0, 6.0) if act == "relu6" else (-1.0, 1.0)
            return self.op(L, "Clip", [x, self.const(L, np.float32(lo), "min"), self.const(L, np.float32(hi), "max")], act)
        if act == "elu":
            return self.op(L, "Elu", [x], act, alpha=1.0)
        if act == "selu":
            return self.op(L, "Selu", [x], act, alpha=1.6732, gamma=1.0507)
        if act == "swish":
            return self.op(L, "Mul", [x, self.op(L, "Sigmoid", [x], "swish_sigmoid")], act)
        if act == "mish":
            t = self.op(L, "Tanh", [self.op(L, "Softplus", [x], "mish_softplus")], "mish_tanh")
            return self.op(L, "Mul", [x, t], act)
        if act == "hard_mish":  # x * clip(x + 2, 0, 2) / 2
            return self.op(L, "Mul", [x, self.op(L, "HardSigmoid", [x], "hard_mish_gate", alpha=0.5, beta=1.0)], act)
        if act == "ramp":  # x * (x > 0) + 0.1 * x
            return self.op(L, "Add", [self.op(L, "Relu", [x], "ramp_relu"),
                                      self.op(L, "Mul", [x, self.const(L, np.float32(0.1), "ramp")], "ramp_mul")], act)
        if act == "loggy":  # 2 / (1 + exp(-x)) - 1
            s2 = self.op(L, "Mul", [self.op(L, "Sigmoid", [x], "loggy_sigmoid"), self.const(L, np.float32(2), "two")],
                         "loggy_mul")
            return self.op(L, "Sub", [s2, self.const(L, np.float32(1), "one")], act)
        raise AssertionError(act)  # layers.py lets only ACTIVATIONS through

    def image(self, L: Layer, x: Any, src: Layer | None, k: int = 0) -> Any:
        """``x`` as N x C x H x W (a connected/softmax output is a vector: C x 1 x 1)."""
        if src is not None and src.flat:
            return self.op(L, "Reshape", [x, self.const(L, np.array([0, src.c, 1, 1]), "shape")], f"as_image{k}")
        return x

    def src(self, L: Layer, k: int = 0) -> Layer | None:
        j = L.inputs[k]
        return self.layers[j] if j >= 0 else None

    # -- layer kinds -------------------------------------------------------------------------
    def _convolutional(self, L: Layer, ins: list) -> Any:
        p, a = L.p, self.arrays[L.index]
        wts = a["weights"]
        if p["flipped"]:  # stored transposed: (c/g * k * k) x n
            n = wts.shape[0]
            wts = wts.reshape(-1, n).T.reshape(wts.shape)
        pads = [p["pad"] * p["dilation"]] * 4
        attrs = dict(kernel_shape=[p["size"]] * 2, strides=list(p["stride"]), pads=pads,
                     dilations=[p["dilation"]] * 2, group=p["groups"])
        x = ins[0]
        if p["bn"]:
            y = self.batchnorm(L, self.op(L, "Conv", [x, self.const(L, wts, "weights")], "", **attrs), "bn")
        else:
            y = self.op(L, "Conv", [x, self.const(L, wts, "weights"), self.const(L, a["biases"], "biases")], "",
                        **attrs)
        return self.activation(L, y, p["activation"])

    def _connected(self, L: Layer, ins: list) -> Any:
        p, a = L.p, self.arrays[L.index]
        x = ins[0]
        src = self.src(L)
        if src is None or not src.flat:
            x = self.op(L, "Flatten", [x], "flatten", axis=1)
        w = self.const(L, a["weights"], "weights")
        if p["bn"]:
            y = self.batchnorm(L, self.op(L, "Gemm", [x, w], "", transB=1), "bn")
        else:
            y = self.op(L, "Gemm", [x, w, self.const(L, a["biases"], "biases")], "", transB=1)
        return self.activation(L, y, p["activation"])

    def batchnorm(self, L: Layer, x: Any, step: str) -> Any:
        """darknet's normalize_cpu + scale_bias + add_bias: scales and biases are BN's affine."""
        a = self.arrays[L.index]
        names = ("scales", "biases", "rolling_mean", "rolling_variance")
        return self.op(L, "BatchNormalization", [x] + [self.const(L, a[n], n) for n in names], step, epsilon=EPS_BN)

    def _batchnorm(self, L: Layer, ins: list) -> Any:
        return self.batchnorm(L, ins[0], "")

    def _activation(self, L: Layer, ins: list) -> Any:
        return self.activation(L, ins[0], L.p["activation"])

    def _maxpool(self, L: Layer, ins: list) -> Any:
        p = L.p
        src = self.src(L)
        if p["depth"]:
            c, oc = (src.c if src else self.shape[1]), p["out_channels"]
            groups = self.op(L, "Reshape", [ins[0], self.const(L, np.array([0, c // oc, oc, L.h, L.w]), "shape")],
                             "groups")
            return self.op(L, "ReduceMax", [groups], "", axes=[1], keepdims=0)
        before = p["padding"] // 2
        after = p["padding"] - before
        x, pads = ins[0], [before, before, after, after]
        if max(before, after) >= p["size"]:  # windows wholly in the padding: darknet gives -FLT_MAX there
            x = self.op(L, "Pad", [x, self.const(L, np.array([0, 0, before, before, 0, 0, after, after]), "pads"),
                                   self.const(L, np.float32(-np.finfo(np.float32).max), "lowest")], "pad")
            pads = [0, 0, 0, 0]
        return self.op(L, "MaxPool", [x], "", kernel_shape=[p["size"]] * 2, strides=list(p["stride"]), pads=pads)

    def _avgpool(self, L: Layer, ins: list) -> Any:
        return self.op(L, "GlobalAveragePool", [ins[0]], "")

    def _softmax(self, L: Layer, ins: list) -> Any:
        p = L.p
        x = ins[0]
        g = p["groups"]
        x = self.op(L, "Reshape", [x, self.const(L, np.array([0, g, L.c // g]), "shape")], "groups")
        if p["temperature"] != 1:
            x = self.op(L, "Div", [x, self.const(L, np.float32(p["temperature"]), "temperature")], "temperature")
        y = self.op(L, "Softmax", [x], "softmax", axis=2)
        return self.op(L, "Reshape", [y, self.const(L, np.array([0, L.c]), "out_shape")], "")

    def _route(self, L: Layer, ins: list) -> Any:
        g, gid = L.p["groups"], L.p["group_id"]
        parts = []
        for k, x in enumerate(ins):
            c = self.layers[L.inputs[k]].c
            if g > 1:
                step = c // g
                x = self.op(L, "Slice", [x, self.const(L, np.array([gid * step]), "starts"),
                                         self.const(L, np.array([(gid + 1) * step]), "ends"),
                                         self.const(L, np.array([1]), "axes")], f"slice{k}")
            parts.append(x)
        if len(parts) == 1:
            return parts[0]
        return self.op(L, "Concat", parts, "", axis=1)

    def _shortcut(self, L: Layer, ins: list) -> Any:
        p = L.p
        n = len(ins)
        weights = None
        if p["weights_type"] != "none":
            raw = self.arrays[L.index]["weights"].reshape(n, 1, -1, 1, 1)
            wv = self.const(L, raw, "weights")
            norm = p["normalization"]
            if norm == "relu":
                wv = self.op(L, "Relu", [wv], "weights_relu")
            elif norm == "softmax":
                top = self.op(L, "ReduceMax", [wv], "weights_max", axes=[0], keepdims=1)
                wv = self.op(L, "Exp", [self.op(L, "Sub", [wv, top], "weights_sub")], "weights_exp")
            if norm != "none":
                total = self.op(L, "ReduceSum", [wv, self.const(L, np.array([0]), "axes")], "weights_sum", keepdims=1)
                total = self.op(L, "Add", [total, self.const(L, np.float32(EPS_SHORTCUT), "eps")], "weights_eps")
                wv = self.op(L, "Div", [wv, total], "weights_normalized")
            weights = wv
        acc = None
        for k, x in enumerate(ins):
            c = self.layers[L.inputs[k]].c
            if c > L.c:
                x = self.op(L, "Slice", [x, self.const(L, np.array([0]), "starts"), self.const(L, np.array([L.c]), "ends"),
                                         self.const(L, np.array([1]), "axes")], f"slice{k}")
            elif c < L.c:
                x = self.op(L, "Pad", [x, self.const(L, np.array([0, 0, 0, 0, 0, L.c - c, 0, 0]), "pads")], f"pad{k}")
            if weights is not None:
                wk = self.op(L, "Gather", [weights, self.const(L, np.array(k), "index")], f"weight{k}", axis=0)
                x = self.op(L, "Mul", [x, wk], f"mul{k}")
            acc = x if acc is None else self.op(L, "Add", [acc, x], "add" if k == n - 1 else f"add{k}")
        return self.activation(L, acc, p["activation"])

    def _upsample(self, L: Layer, ins: list) -> Any:
        s, scale = L.p["stride"], L.p["scale"]
        if s > 0:
            y = self.op(L, "Resize", [ins[0], None, self.const(L, np.array([1, 1, s, s], np.float32), "scales")],
                        "resize", mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
            factor = scale
        else:
            s = -s
            y = self.op(L, "AveragePool", [ins[0]], "pool", kernel_shape=[s, s], strides=[s, s])
            factor = scale * s * s
        if factor != 1:
            y = self.op(L, "Mul", [y, self.const(L, np.float32(factor), "scale")], "scale")
        return y

    def _reorg(self, L: Layer, ins: list) -> Any:
        s, (c, h, w) = L.p["stride"], L.p["call"]
        src = self.src(L)
        here = (src.c, src.h, src.w) if src is not None else tuple(self.shape[1:])
        x = ins[0]
        read_as = (c, h, w) if L.p["reverse"] else (c // (s * s), h * s, w * s)
        if read_as != here:  # the buffer read with other sizes than its own ([reorg])
            x = self.op(L, "Reshape", [x, self.const(L, np.array([0, *read_as]), "in_shape")], "in")
        if L.p["reverse"]:
            x = self.op(L, "DepthToSpace", [x], "depth_to_space", blocksize=s, mode="DCR")
            made = (c // (s * s), h * s, w * s)
        else:
            x = self.op(L, "SpaceToDepth", [x], "space_to_depth", blocksize=s)
            made = (c, h, w)
        if made == (L.c, L.h, L.w):
            return x
        return self.op(L, "Reshape", [x, self.const(L, np.array([0, L.c, L.h, L.w]), "shape")], "")

    _reorg3d = _reorg

    def _scale_channels(self, L: Layer, ins: list) -> Any:
        y = self.op(L, "Mul", [ins[1], ins[0]], "mul")
        return self.activation(L, y, L.p["activation"])

    def _sam(self, L: Layer, ins: list) -> Any:
        y = self.op(L, "Mul", [ins[0], ins[1]], "mul")
        return self.activation(L, y, L.p["activation"])
