"""An independent forward pass of darknet layers, written from darknet's C loops (float64).

The second reference beside OpenCV, for what OpenCV 4.x's darknet importer does not read or
reads differently: weighted / multi-input ``[shortcut]``, ``maxpool_depth``, ``[reorg3d]``,
``stride_x`` / ``stride_y``, dilation, ``[upsample] scale``, multi-input grouped routes,
``[softmax] groups``, ``[batchnorm]``, activations it lacks, and BatchNorm's eps (darknet
1e-5, OpenCV 1e-6). Layers come from modelsurgeon's ``.cfg`` reader (options and sizes); every
computation here follows darknet's source (blas.c, *_layer.c, activations.h), flat-index
semantics included, and shares no code with the ONNX graph builder.
"""

from __future__ import annotations

import numpy as np
import torch


def act(x: np.ndarray, a: str) -> np.ndarray:
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    if a == "linear":
        return x
    if a in ("leaky", "revleaky"):
        return np.where(x > 0, x, 0.1 * x)
    if a == "relu":
        return x * (x > 0)
    if a == "relu6":
        return np.minimum(np.maximum(x, 0), 6)
    if a == "logistic":
        return sig(x)
    if a == "tanh":
        return 2 / (1 + np.exp(-2 * x)) - 1
    if a == "swish":
        return x * sig(x)
    if a == "mish":
        sp = np.where(x > 20, x, np.where(x < -20, np.exp(x), np.log(np.exp(x) + 1)))
        return x * np.tanh(sp)
    if a == "hard_mish":
        return np.where(x > 0, x, np.where(x > -2, x * x / 2 + x, 0))
    if a == "elu":
        return (x >= 0) * x + (x < 0) * (np.exp(x) - 1)
    if a == "selu":
        return (x >= 0) * 1.0507 * x + (x < 0) * 1.0507 * 1.6732 * (np.exp(x) - 1)
    if a == "relie":
        return np.where(x > 0, x, 0.01 * x)
    if a == "ramp":
        return x * (x > 0) + 0.1 * x
    if a == "loggy":
        return 2 / (1 + np.exp(-x)) - 1
    if a == "hardtan":
        return np.clip(x, -1, 1)
    raise KeyError(a)


def _bn(y: np.ndarray, a: dict, axis_shape) -> np.ndarray:
    r = lambda v: np.asarray(v, np.float64).reshape(axis_shape)  # noqa: E731
    return (y - r(a["rolling_mean"])) / np.sqrt(r(a["rolling_variance"]) + 0.00001) * r(a["scales"]) + r(a["biases"])


def conv(L, a, x):
    p = L.p
    w = np.asarray(a["weights"], np.float64)
    if p["flipped"]:
        w = w.reshape(-1, w.shape[0]).T.reshape(w.shape)
    pad = p["pad"] * p["dilation"]  # im2col_cpu_ext is called with pad * dilation
    y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=p["stride"], padding=pad,
                                   dilation=p["dilation"], groups=p["groups"]).numpy()
    y = _bn(y, a, (1, -1, 1, 1)) if p["bn"] else y + np.asarray(a["biases"], np.float64).reshape(1, -1, 1, 1)
    return act(y, p["activation"])


def maxpool(L, x):
    p = L.p
    n, c, h, w = x.shape
    if p["depth"]:  # out[g] = max over channels g, g + out_c, ...
        oc = p["out_channels"]
        return np.stack([x[:, g::oc].max(axis=1) for g in range(oc)], axis=1)
    (sy, sx), size, off = p["stride"], p["size"], p["padding"] // 2
    out = np.full((n, c, L.h, L.w), float(-np.finfo(np.float32).max))  # -FLT_MAX: an empty window
    for i in range(L.h):
        for j in range(L.w):
            for dy in range(size):
                for dx in range(size):
                    r, s = -off + i * sy + dy, -off + j * sx + dx
                    if 0 <= r < h and 0 <= s < w:
                        out[:, :, i, j] = np.maximum(out[:, :, i, j], x[:, :, r, s])
    return out


def route(L, ins):
    g, gid = L.p["groups"], L.p["group_id"]
    parts = []
    for v in ins:
        flat = v.reshape(v.shape[0], -1)
        part = flat.shape[1] // g
        parts.append(flat[:, part * gid:part * (gid + 1)])
    return np.concatenate(parts, axis=1).reshape(-1, L.c, L.h, L.w)


def shortcut(L, a, ins):
    """blas.c shortcut_multilayer_cpu, vectorised over the flat index of one sample."""
    n_from = len(ins) - 1
    first = ins[0].reshape(ins[0].shape[0], -1)
    outputs = first.shape[1]
    src_i = np.arange(outputs)
    weights = None if a is None else np.asarray(a["weights"], np.float64).reshape(-1)
    norm = L.p["normalization"]
    if weights is not None:
        layer_step = weights.size // (n_from + 1)
        step = outputs // layer_step
        w_all = np.stack([weights[src_i // step + i * layer_step] for i in range(n_from + 1)])  # (n+1, outputs)
        if norm == "relu":
            r = np.maximum(w_all, 0)
            w_all = r / (0.0001 + r.sum(axis=0))
        elif norm == "softmax":
            e = np.exp(w_all - w_all.max(axis=0))
            w_all = e / (0.0001 + e.sum(axis=0))
    out = first * (w_all[0] if weights is not None else 1)
    for i, v in enumerate(ins[1:]):
        add = v.reshape(v.shape[0], -1)
        m = min(outputs, add.shape[1])  # src_i < add_outputs
        term = add[:, :m] * (w_all[i + 1][:m] if weights is not None else 1)
        out[:, :m] = out[:, :m] + term
    return act(out.reshape(-1, L.c, L.h, L.w), L.p["activation"])


def reorg(L, x):
    """blas.c reorg_cpu(x, out_w, out_h, out_c, batch, stride, forward, out), index by index."""
    s, (oc, oh, ow), forward = L.p["stride"], L.p["call"], int(L.p["reverse"])
    n = x.shape[0]
    xf, out = x.reshape(n, -1), np.zeros((n, x[0].size))
    in_c = oc // (s * s)
    k, j, i = np.meshgrid(np.arange(oc), np.arange(oh), np.arange(ow), indexing="ij")
    in_index = (i + ow * (j + oh * k)).reshape(-1)
    c2, offset = k % in_c, k // in_c
    w2, h2 = i * s + offset % s, j * s + offset // s
    out_index = (w2 + ow * s * (h2 + oh * s * c2)).reshape(-1)
    if forward:
        out[:, out_index] = xf[:, in_index]
    else:
        out[:, in_index] = xf[:, out_index]
    return out.reshape(n, L.c, L.h, L.w)


def upsample(L, x):
    s, scale = L.p["stride"], L.p["scale"]
    if s > 0:
        return scale * x.repeat(s, axis=2).repeat(s, axis=3)
    s = -s
    n, c, h, w = x.shape
    return scale * x.reshape(n, c, h // s, s, w // s, s).sum(axis=(3, 5))


def softmax(L, x):
    g, t = L.p["groups"], L.p["temperature"]
    flat = x.reshape(x.shape[0], g, -1)
    e = np.exp((flat - flat.max(axis=2, keepdims=True)) / t)
    return (e / e.sum(axis=2, keepdims=True)).reshape(x.shape[0], -1)


def forward(layers, arrays, x: np.ndarray) -> dict[int, np.ndarray]:
    """Every layer's output, as darknet computes it, for input ``x`` (N, C, H, W)."""
    x = np.asarray(x, np.float64)
    outs: dict[int, np.ndarray] = {}
    for L in layers:
        ins = [x if j < 0 else outs[j] for j in L.inputs]
        a, k = arrays.get(L.index), L.kind
        if k not in ("connected", "softmax", "activation", "dropout", "cost", "empty", "yolo", "region"):
            ins = [v if v.ndim == 4 else v.reshape(v.shape[0], -1, 1, 1) for v in ins]  # a vector: C x 1 x 1
        if k == "convolutional":
            y = conv(L, a, ins[0])
        elif k == "connected":
            flat = ins[0].reshape(ins[0].shape[0], -1)
            y = flat @ np.asarray(a["weights"], np.float64).T
            y = _bn(y, a, (1, -1)) if L.p["bn"] else y + np.asarray(a["biases"], np.float64)
            y = act(y, L.p["activation"])
        elif k == "batchnorm":
            y = _bn(ins[0], a, (1, -1, 1, 1))
        elif k == "maxpool":
            y = maxpool(L, ins[0])
        elif k == "avgpool":
            y = ins[0].mean(axis=(2, 3), keepdims=True)
        elif k == "route":
            y = route(L, ins)
        elif k == "shortcut":
            y = shortcut(L, a, ins)
        elif k == "upsample":
            y = upsample(L, ins[0])
        elif k in ("reorg", "reorg3d"):
            y = reorg(L, ins[0])
        elif k == "scale_channels":
            prev, src = ins
            if L.p["scale_wh"]:
                y = prev.reshape(prev.shape[0], 1, L.h, L.w) * src
            else:
                y = prev.reshape(prev.shape[0], L.c, 1, 1) * src
            y = act(y, L.p["activation"])
        elif k == "sam":
            y = act(ins[0] * ins[1], L.p["activation"])
        elif k == "softmax":
            y = softmax(L, ins[0])
        elif k == "activation":
            y = act(ins[0], L.p["activation"])
        else:  # dropout, yolo, region, cost, empty: the input
            y = ins[0]
        outs[L.index] = y
    return outs
