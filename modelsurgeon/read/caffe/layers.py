"""One function per Caffe layer type: ``(graph, layer, bottoms, where) -> tops``.

``HANDLERS`` is the set of layer types modelsurgeon converts; anything else is refused by
name, type and line before any work. Layers without nodes (Split, Dropout at test time,
Input) pass values through.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ...errors import BadInput
from . import geometry as geo

FLT_MAX = float(np.finfo(np.float32).max)


def _one(bottoms: list, where: str, n: int = 1) -> None:
    if len(bottoms) != n:
        raise BadInput(f"{where}: takes {n} bottom{'s' if n > 1 else ''}, has {len(bottoms)}")


def _spatial(g: Any, v: Any, where: str) -> list[int]:
    s = g.shape(v)
    if len(s) != 4:
        raise BadInput(f"{where}: needs a 4-d (N, C, H, W) input, got shape {s}")
    return s


def convolution(g: Any, layer: Any, bottoms: list, where: str, transposed: bool = False) -> list:
    _one(bottoms, where)
    cp = layer.param.convolution_param
    n, c, h, w = _spatial(g, bottoms[0], where)
    geom = geo.conv_geometry(cp, where)
    groups, out_c = cp.group, cp.num_output
    if groups < 1 or c % groups or out_c % groups or out_c < 1:
        raise BadInput(f"{where}: group {groups} must divide {c} input and {out_c} output channels")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geom["kernel"], geom["stride"], geom["pad"], geom["dilation"]
    wshape = (c, out_c // groups, kh, kw) if transposed else (out_c, c // groups, kh, kw)
    arrays = g.weights(layer, [wshape] + ([(out_c,)] if cp.bias_term else []))
    inputs = [bottoms[0], g.const(layer, arrays[0], "weight")]
    if cp.bias_term:
        inputs.append(g.const(layer, arrays[1], "bias"))
    size = geo.deconv_out if transposed else geo.conv_out
    oh, ow = size(h, kh, sh, ph, dh), size(w, kw, sw, pw, dw)
    if oh < 1 or ow < 1:
        raise BadInput(f"{where}: output size {oh}x{ow} for input {h}x{w}")
    return [g.op(layer, "ConvTranspose" if transposed else "Conv", inputs, "", [n, out_c, oh, ow],
                 kernel_shape=[kh, kw], strides=[sh, sw], pads=[ph, pw, ph, pw], dilations=[dh, dw], group=groups)]


def deconvolution(g: Any, layer: Any, bottoms: list, where: str) -> list:
    return convolution(g, layer, bottoms, where, transposed=True)


def inner_product(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    ip = layer.param.inner_product_param
    shape = g.shape(bottoms[0])
    axis = geo.canonical(ip.axis, len(shape), where)
    k, lead, n = math.prod(shape[axis:]), shape[:axis], ip.num_output
    wshape = (k, n) if ip.transpose else (n, k)
    arrays = g.weights(layer, [wshape] + ([(n,)] if ip.bias_term else []))
    x = bottoms[0]
    if len(shape) != 2 or axis != 1:
        x = g.op(layer, "Reshape", [x, g.const(layer, np.array([math.prod(lead), k]), "in_shape")], "flatten",
                 [math.prod(lead), k])
    inputs = [x, g.const(layer, arrays[0], "weight")] + ([g.const(layer, arrays[1], "bias")] if ip.bias_term else [])
    y = g.op(layer, "Gemm", inputs, "", [math.prod(lead), n], transB=0 if ip.transpose else 1)
    if len(lead) != 1:
        y = g.op(layer, "Reshape", [y, g.const(layer, np.array(lead + [n]), "out_shape")], "reshape", lead + [n])
    return [y]


def batch_norm(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    bp = layer.param.batch_norm_param
    if bp.HasField("use_global_stats") and not bp.use_global_stats:
        raise BadInput(f"{where}: use_global_stats: false normalises with each batch's own statistics at test "
                       "time: not convertible")
    shape = g.shape(bottoms[0])
    c = shape[1]
    blobs = g.model_blobs.get(layer.name) or []
    extra = [(c,), (c,)] if len(blobs) == 5 else []  # NVIDIA Caffe's scale_bias
    mean, var, factor, *affine = g.weights(layer, [(c,), (c,), None] + extra)
    if factor.size != 1:
        raise BadInput(f"{where}: blob 2 (the moving-average factor) has {factor.size} values, 1 expected")
    f = np.float32(factor.reshape(-1)[0])
    sf = np.float32(0) if f == 0 else np.float32(1) / f  # BatchNormLayer: scale_factor = 1 / blobs[2][0]
    mean_s, var_s = (mean * sf).astype(np.float32), (var * sf).astype(np.float32)
    if (var_s + np.float32(bp.eps) <= 0).any():
        raise BadInput(f"{where}: variance / factor + eps is not positive for some channels")
    scale = affine[0] if affine else np.ones(c, np.float32)
    bias = affine[1] if affine else np.zeros(c, np.float32)
    return [g.op(layer, "BatchNormalization", [bottoms[0], g.const(layer, scale, "scale"), g.const(layer, bias, "bias"),
                                               g.const(layer, mean_s, "mean"), g.const(layer, var_s, "var")],
                 "", shape, epsilon=float(bp.eps))]


def _broadcast(shape: list[int], axis: int, pshape: tuple, where: str) -> list[int]:
    if axis + len(pshape) > len(shape) or tuple(shape[axis:axis + len(pshape)]) != tuple(pshape):
        raise BadInput(f"{where}: parameter shape {list(pshape)} does not match the input {shape} at axis {axis}")
    return [1] * axis + list(pshape) + [1] * (len(shape) - axis - len(pshape))


def _param_shape(shape: list[int], axis_param: int, num_axes: int, where: str) -> tuple[int, tuple]:
    axis = geo.canonical(axis_param, len(shape), where)
    if num_axes < -1 or (num_axes >= 0 and axis + num_axes > len(shape)):
        raise BadInput(f"{where}: num_axes {num_axes} out of range")
    end = len(shape) if num_axes == -1 else axis + num_axes
    return axis, tuple(shape[axis:end])


def scale(g: Any, layer: Any, bottoms: list, where: str, bias_only: bool = False) -> list:
    p = layer.param.bias_param if bias_only else layer.param.scale_param
    shape = g.shape(bottoms[0])
    if len(bottoms) == 2:
        other = g.shape(bottoms[1])
        axis = 0 if not other else geo.canonical(p.axis, len(shape), where)
        target = _broadcast(shape, axis, tuple(other), where)
        factor = g.op(layer, "Reshape", [bottoms[1], g.const(layer, np.array(target), "shape")], "param", target)
        pshape = tuple(other)
        n_blobs = 1 if (not bias_only and p.bias_term) else 0
        arrays = g.weights(layer, [pshape]) if n_blobs else []
    else:
        _one(bottoms, where)
        axis, pshape = _param_shape(shape, p.axis, p.num_axes, where)
        if not pshape:
            axis = 0
        target = _broadcast(shape, axis, pshape, where)
        n_blobs = 1 + (1 if (not bias_only and p.bias_term) else 0)
        arrays = g.weights(layer, [pshape] * n_blobs)
        factor = g.const(layer, arrays[0].reshape(target), "bias" if bias_only else "scale")
        arrays = arrays[1:]
    y = g.op(layer, "Add" if bias_only else "Mul", [bottoms[0], factor], "add" if bias_only else "mul", shape)
    if arrays:
        y = g.op(layer, "Add", [y, g.const(layer, arrays[0].reshape(target), "bias")], "add", shape)
    return [y]


def bias(g: Any, layer: Any, bottoms: list, where: str) -> list:
    return scale(g, layer, bottoms, where, bias_only=True)


def pooling(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    pp = layer.param.pooling_param
    n, c, h, w = _spatial(g, bottoms[0], where)
    if pp.pool == 2:
        raise BadInput(f"{where}: STOCHASTIC pooling is not supported")
    geom = geo.pool_geometry(pp, (h, w), where)
    oh, ow = geom["out"]
    if geom["global"]:
        return [g.op(layer, "GlobalMaxPool" if pp.pool == 0 else "GlobalAveragePool", bottoms, "", [n, c, 1, 1])]
    (kh, kw), (sh, sw), (ph, pw) = geom["kernel"], geom["stride"], geom["pad"]
    x = bottoms[0]
    if pp.pool == 0:  # padding never wins a max: pad the far side just enough for the last window
        start = [ph, pw]
        size = (h, w)
    else:  # Caffe divides by the window clipped to [-pad, size + pad): pad with zeros, then count only those
        if ph or pw:
            x = g.op(layer, "Pad", [x, g.const(layer, np.array([0, 0, ph, pw, 0, 0, ph, pw]), "pads")], "pad",
                     [n, c, h + 2 * ph, w + 2 * pw])
        start = [0, 0]
        size = (h + 2 * ph, w + 2 * pw)
    end = [max(0, (o - 1) * s + k - sz - st) for o, s, k, sz, st in zip((oh, ow), (sh, sw), (kh, kw), size, start)]
    if any(e >= k for e, k in zip(end, (kh, kw))):  # a last window starts past the input (stride > kernel)
        if pp.pool != 0:
            raise BadInput(f"{where}: the last average window starts outside the input (Caffe divides by a "
                           "window size of 0 or less there): not supported")
        # Caffe's max over an empty window is -FLT_MAX: pad with it, then pool without padding
        x = g.op(layer, "Pad", [x, g.const(layer, np.array([0, 0, ph, pw, 0, 0, end[0], end[1]]), "pads"),
                                g.const(layer, np.float32(-FLT_MAX), "lowest")], "pad",
                 [n, c, h + ph + end[0], w + pw + end[1]])
        size, start, end = (h + ph + end[0], w + pw + end[1]), [0, 0], [0, 0]
    full = [(sz + st + e - k) // s + 1 for sz, st, e, k, s in zip(size, start, end, (kh, kw), (sh, sw))]
    attrs = dict(kernel_shape=[kh, kw], strides=[sh, sw], pads=start + end)
    if pp.pool == 1:
        attrs["count_include_pad"] = 0
    y = g.op(layer, "MaxPool" if pp.pool == 0 else "AveragePool", [x], "" if full == [oh, ow] else "pool",
             [n, c] + full, **attrs)
    if full != [oh, ow]:
        y = g.op(layer, "Slice", [y, g.const(layer, np.array([0, 0]), "starts"), g.const(layer, np.array([oh, ow]), "ends"),
                                  g.const(layer, np.array([2, 3]), "axes")], "", [n, c, oh, ow])
    return [y]


def eltwise(g: Any, layer: Any, bottoms: list, where: str) -> list:
    ep = layer.param.eltwise_param
    shape = g.shape(bottoms[0])
    if len(bottoms) < 2 or any(g.shape(b) != shape for b in bottoms):
        raise BadInput(f"{where}: needs two or more bottoms of one shape")
    if ep.coeff and (ep.operation != 1 or len(ep.coeff) != len(bottoms)):
        raise BadInput(f"{where}: coeff is for SUM only, one per bottom")
    if ep.operation == 2:
        return [g.op(layer, "Max", bottoms, "", shape)]
    acc = None
    for i, x in enumerate(bottoms):
        if ep.operation == 1 and ep.coeff and ep.coeff[i] != 1:
            x = g.op(layer, "Mul", [x, g.const(layer, np.float32(ep.coeff[i]), f"coeff{i}")], f"mul{i}", shape)
        if acc is not None:
            last = i == len(bottoms) - 1
            acc = g.op(layer, "Add" if ep.operation == 1 else "Mul", [acc, x], "" if last else f"acc{i}", shape)
        else:
            acc = x
    return [acc]


def concat(g: Any, layer: Any, bottoms: list, where: str) -> list:
    cp = layer.param.concat_param
    shape = g.shape(bottoms[0])
    axis = geo.canonical(cp.axis if cp.HasField("axis") or not cp.HasField("concat_dim") else cp.concat_dim,
                         len(shape), where)
    if len(bottoms) == 1:
        return bottoms
    out = list(shape)
    out[axis] = 0
    for b in bottoms:
        s = g.shape(b)
        if len(s) != len(shape) or any(a != c for k, (a, c) in enumerate(zip(s, shape)) if k != axis):
            raise BadInput(f"{where}: bottoms of shapes {shape} and {s} cannot be joined on axis {axis}")
        out[axis] += s[axis]
    return [g.op(layer, "Concat", bottoms, "", out, axis=axis)]


def unary(op: str, **fixed: Any):
    def handler(g: Any, layer: Any, bottoms: list, where: str) -> list:
        _one(bottoms, where)
        attrs = {k: (v(layer.param) if callable(v) else v) for k, v in fixed.items()}
        return [g.op(layer, op, bottoms, "", g.shape(bottoms[0]), **attrs)]
    return handler


def relu(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    slope = layer.param.relu_param.negative_slope
    if slope == 0:
        return [g.op(layer, "Relu", bottoms, "", g.shape(bottoms[0]))]
    return [g.op(layer, "LeakyRelu", bottoms, "", g.shape(bottoms[0]), alpha=float(slope))]


def prelu(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    shape = g.shape(bottoms[0])
    shared = layer.param.prelu_param.channel_shared
    (slope,) = g.weights(layer, [(1,) if shared else (shape[1],)])
    if not shared:
        slope = slope.reshape([shape[1]] + [1] * (len(shape) - 2))
    return [g.op(layer, "PRelu", [bottoms[0], g.const(layer, slope, "slope")], "", shape)]


def softmax(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    shape = g.shape(bottoms[0])
    axis = geo.canonical(layer.param.softmax_param.axis, len(shape), where)
    return [g.op(layer, "Softmax", bottoms, "", shape, axis=axis)]


def passthrough(g: Any, layer: Any, bottoms: list, where: str) -> list:
    """Split (every top is the bottom) and Dropout at test time."""
    _one(bottoms, where)
    if layer.type == "Dropout":
        dp = layer.param.dropout_param
        if dp.HasField("scale_train") and not dp.scale_train:  # Fast R-CNN's Caffe scales at test time
            return [g.op(layer, "Mul", [bottoms[0], g.const(layer, np.float32(1 - dp.dropout_ratio), "scale")], "",
                         g.shape(bottoms[0]))]
    return [bottoms[0]] * max(1, len(layer.param.top))


def input_layer(g: Any, layer: Any, bottoms: list, where: str) -> list:
    return [g.values[t] for t in layer.param.top]


def _reshape_to(g: Any, layer: Any, bottoms: list, new: list[int]) -> list:
    return [g.op(layer, "Reshape", [bottoms[0], g.const(layer, np.array(new), "shape")], "", new)]


def flatten(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    return _reshape_to(g, layer, bottoms, geo.flatten(g.shape(bottoms[0]), layer.param.flatten_param, where))


def reshape(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    return _reshape_to(g, layer, bottoms, geo.reshape(g.shape(bottoms[0]), layer.param.reshape_param, where))


def permute(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    shape = g.shape(bottoms[0])
    order = [geo.canonical(int(o), len(shape), where) for o in layer.param.permute_param.order]
    if len(set(order)) != len(order):
        raise BadInput(f"{where}: order repeats an axis")
    order += [a for a in range(len(shape)) if a not in order]
    return [g.op(layer, "Transpose", bottoms, "", [shape[a] for a in order], perm=order)]


def slice_layer(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    sp = layer.param.slice_param
    shape = g.shape(bottoms[0])
    axis = geo.canonical(sp.axis if sp.HasField("axis") or not sp.HasField("slice_dim") else sp.slice_dim,
                         len(shape), where)
    n_tops = len(layer.param.top)
    if sp.slice_point:
        points = [0] + [int(p) for p in sp.slice_point] + [shape[axis]]
        if len(points) != n_tops + 1 or any(b <= a for a, b in zip(points, points[1:])):
            raise BadInput(f"{where}: slice points {list(sp.slice_point)} do not give {n_tops} parts of {shape[axis]}")
    else:
        if shape[axis] % n_tops:
            raise BadInput(f"{where}: {shape[axis]} does not split into {n_tops} equal parts")
        points = [shape[axis] * i // n_tops for i in range(n_tops + 1)]
    sizes = [b - a for a, b in zip(points, points[1:])]
    shapes = [shape[:axis] + [s] + shape[axis + 1:] for s in sizes]
    if n_tops == 1:
        return bottoms
    outs = g.b.op("Split", [bottoms[0], g.const(layer, np.array(sizes), "split")], layer.name, layer.index,
                  {"axis": axis}, out=layer.name, outputs=n_tops)
    return [g.set_shape(v, s) for v, s in zip(outs, shapes)]


def power(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    pp = layer.param.power_param
    shape = g.shape(bottoms[0])
    x = bottoms[0]
    if pp.scale != 1:
        x = g.op(layer, "Mul", [x, g.const(layer, np.float32(pp.scale), "scale")], "mul", shape)
    if pp.shift != 0:
        x = g.op(layer, "Add", [x, g.const(layer, np.float32(pp.shift), "shift")], "add", shape)
    if pp.power != 1:
        x = g.op(layer, "Pow", [x, g.const(layer, np.float32(pp.power), "power")], "pow", shape)
    if x is bottoms[0]:
        return [g.op(layer, "Identity", [x], "", shape)]
    return [x]


def lrn(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    lp = layer.param.lrn_param
    if lp.norm_region != 0:
        raise BadInput(f"{where}: LRN WITHIN_CHANNEL is not supported")
    return [g.op(layer, "LRN", bottoms, "", g.shape(bottoms[0]), size=int(lp.local_size), alpha=float(lp.alpha),
                 beta=float(lp.beta), bias=float(lp.k))]


def _resize(g: Any, layer: Any, bottoms: list, size: tuple[int, int], **attrs: Any) -> list:
    n, c = g.shape(bottoms[0])[:2]
    sizes = g.const(layer, np.array([n, c, size[0], size[1]]), "sizes")
    return [g.op(layer, "Resize", [bottoms[0], None, None, sizes], "", [n, c, size[0], size[1]], **attrs)]


def upsample(g: Any, layer: Any, bottoms: list, where: str) -> list:
    if len(bottoms) != 1:
        raise BadInput(f"{where}: Upsample with {len(bottoms)} bottoms (SegNet's max-unpooling) is not supported")
    n, c, h, w = _spatial(g, bottoms[0], where)
    s = int(layer.param.upsample_param.scale)
    return _resize(g, layer, bottoms, (h * s, w * s), mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")


def interp(g: Any, layer: Any, bottoms: list, where: str) -> list:
    _one(bottoms, where)
    n, c, h, w = _spatial(g, bottoms[0], where)
    return _resize(g, layer, bottoms, geo.interp_out(layer.param.interp_param, (h, w), where), mode="linear",
                   coordinate_transformation_mode="align_corners")


HANDLERS = {
    "Convolution": convolution, "Deconvolution": deconvolution, "InnerProduct": inner_product,
    "BatchNorm": batch_norm, "Scale": scale, "Bias": bias, "ReLU": relu, "PReLU": prelu, "Pooling": pooling,
    "Eltwise": eltwise, "Concat": concat, "Softmax": softmax, "Dropout": passthrough, "Split": passthrough,
    "Flatten": flatten, "Reshape": reshape, "Permute": permute, "Slice": slice_layer,
    "Sigmoid": unary("Sigmoid"), "TanH": unary("Tanh"), "ELU": unary("Elu", alpha=lambda p: float(p.elu_param.alpha)),
    "Power": power, "LRN": lrn, "Input": input_layer, "Upsample": upsample, "Interp": interp,
    "AbsVal": unary("Abs"),
}
