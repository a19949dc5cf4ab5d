"""The clean-up rewrites found on real exports (ConvNeXt, LeViT, Inception, NF-ResNet), each on
a small graph written the way the exporter writes it: what it removes, the look-alike it must
leave, and the result checked against the original in onnxruntime at another batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_graphs as G
from onnx_graphs import Builder, out, tensor


def run(tmp_path, model, *args, name="m"):
    return G.run_pass(tmp_path, model, "optimize", *args, name=name)


def applied(rep, pass_name):
    return [a for a in rep["applied"] if a["pass"] == pass_name]


def count(path, op):
    return G.ops(path).count(op)


# -- merge-concats --------------------------------------------------------------------------------

def test_nested_concats_on_the_same_axis_become_one(tmp_path):
    """Inception-E: cat([a, cat([b, c]), cat([d, e]), f]) on channels."""
    b = Builder(41)
    br = [b.node("Relu", [b.conv("x", 3, c, k=1, p=0)]) for c in (2, 3, 4, 5, 6, 7)]
    inner1 = b.node("Concat", br[1:3], axis=1)
    inner2 = b.node("Concat", [br[3], b.node("Concat", br[4:6], axis=-3)], axis=1)  # three deep, negative axis
    y = b.node("Concat", [br[0], inner1, inner2], axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 5, 5])], [out(y, ["N", 27, 5, 5])]))
    assert count(dst, "Concat") == 1 and applied(rep, "merge-concats")
    G.assert_same_function(src, dst, batch=3)


def test_concats_that_cannot_be_spliced_stay(tmp_path):
    b = Builder(42)
    a, c, d = (b.node("Relu", [b.conv("x", 3, 2, k=1, p=0)]) for _ in range(3))
    shared = b.node("Concat", [a, c], axis=1)  # another node reads it
    y = b.node("Concat", [shared, d], axis=1)
    wide = [b.node("Concat", [b.node(op, ["x"]), b.node("Neg", ["x"])], axis=2) for op in ("Tanh", "Sigmoid")]
    z = b.node("Concat", wide, axis=1)  # inner ones on another axis
    outs = [out(y, ["N", 6, 4, 4]), out(b.node("Sigmoid", [shared]), ["N", 4, 4, 4]), out(z, ["N", 6, 8, 4])]
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 4, 4])], outs))
    assert count(dst, "Concat") == 5 and not applied(rep, "merge-concats")
    G.assert_same_function(src, dst, batch=2)


# -- merge-slices ---------------------------------------------------------------------------------

def test_slices_of_distinct_axes_become_one(tmp_path):
    """LeViT's subsampling ``x[:, ::2, ::2]`` as the exporters write it: one Slice per axis."""
    b = Builder(43)
    y = b.node("Relu", ["x"])
    y = b.node("Slice", [y, G._i64(b, [0]), G._i64(b, [G.INT64_MAX]), G._i64(b, [2]), G._i64(b, [2])])
    y = b.node("Slice", [y, G._i64(b, [1]), G._i64(b, [-1]), G._i64(b, [-1]), G._i64(b, [2])])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 7, 9])], [out(y, ["N", 3, 4, 4])]))
    assert count(dst, "Slice") == 1 and applied(rep, "merge-slices")
    G.assert_same_function(src, dst, batch=3)


def test_slices_of_the_same_axis_or_shared_stay(tmp_path):
    b = Builder(44)
    y = b.node("Relu", ["x"])
    s1 = b.node("Slice", [y, G._i64(b, [1]), G._i64(b, [6]), G._i64(b, [2])])
    same = b.node("Slice", [s1, G._i64(b, [1]), G._i64(b, [3]), G._i64(b, [2])])  # the same axis again
    s2 = b.node("Slice", [y, G._i64(b, [0]), G._i64(b, [2]), G._i64(b, [1])])
    other = b.node("Slice", [s2, G._i64(b, [0]), G._i64(b, [3]), G._i64(b, [2])])  # s2 has another reader
    model = b.model([tensor("x", ["N", 3, 7, 7])], [out(same, ["N", 3, 2, 7]), out(other, ["N", 2, 3, 7]),
                                                    out(b.node("Sigmoid", [s2]), ["N", 2, 7, 7])])
    rep, src, dst = run(tmp_path, model)
    assert count(dst, "Slice") == 4 and not applied(rep, "merge-slices")


# -- transpose-to-reshape, gather-to-reshape (with merge-reshapes) ---------------------------------

def test_layer_norm_2d_on_a_pooled_map_loses_its_transposes(tmp_path):
    """ConvNeXt's head: a [N, C, 1, 1] map, permute to channels-last, LayerNorm, permute back,
    flatten: the Transposes move sizes of 1 only."""
    b = Builder(45)
    y = b.node("GlobalAveragePool", [b.conv("x", 3, 6)])
    y = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    y = b.node("LayerNormalization", [y, b.weight((6,)), b.weight((6,))], axis=-1, epsilon=1e-6)
    y = b.node("Transpose", [y], perm=[0, 3, 1, 2])
    y = b.node("Flatten", [y], axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 6, 6])], [out(y, ["N", 6])], opset=17))
    assert G.ops(dst) == ["Conv", "GlobalAveragePool", "Reshape", "LayerNormalization", "Reshape"]
    assert len(applied(rep, "transpose-to-reshape")) == 2
    G.assert_same_function(src, dst, batch=4)


def test_a_transpose_moving_real_sizes_stays(tmp_path):
    b = Builder(46)
    y = b.node("Transpose", [b.node("Relu", ["x"])], perm=[0, 2, 3, 1])  # [N, 1, 3, 4] → [N, 3, 4, 1]: fine
    z = b.node("Transpose", [b.node("Sigmoid", ["x"])], perm=[0, 1, 3, 2])  # swaps 3 and 4: a real transpose
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 1, 3, 4])], [out(y, ["N", 3, 4, 1]), out(z, ["N", 1, 4, 3])]))
    assert G.ops(dst) == ["Relu", "Reshape", "Sigmoid", "Transpose"]
    G.assert_same_function(src, dst, batch=2)


def test_gather_of_every_index_in_order_is_a_view(tmp_path):
    """The dynamo exporter's ``as_strided`` of a pooled map: flatten, Gather by arange(C) shaped
    [1, 1, 1, C]; then channels-last LayerNorm."""
    b = Builder(47)
    y = b.node("ReduceMean", [b.conv("x", 3, 5)], axes=[2, 3], keepdims=1)
    y = b.node("Reshape", [y, G._i64(b, [-1])])
    y = b.node("Gather", [y, G._i64(b, np.arange(5).reshape(1, 1, 1, 5))], axis=0)
    y = b.node("LayerNormalization", [y, b.weight((5,)), b.weight((5,))], axis=-1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", [1, 3, 4, 4])], [out(y, [1, 1, 1, 5])], opset=17))
    assert G.ops(dst) == ["Conv", "ReduceMean", "Reshape", "LayerNormalization"] and applied(rep, "gather-to-reshape")
    G.assert_same_function(src, dst, batch=1)


def test_gather_of_reordered_or_missing_indices_stays(tmp_path):
    b = Builder(48)
    y = b.node("Relu", ["x"])
    p = b.node("Gather", [y, G._i64(b, [1, 0, 2])], axis=1)
    q = b.node("Gather", [y, G._i64(b, [0, 1])], axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 4])], [out(p, ["N", 3, 4]), out(q, ["N", 2, 4])]))
    assert count(dst, "Gather") == 2 and not applied(rep, "gather-to-reshape")


# -- remove-noops: reductions over sizes of 1 -------------------------------------------------------

def test_mean_over_a_one_by_one_map_is_removed(tmp_path):
    """Inception at a small input: the final feature map is 1×1, its global mean returns it."""
    b = Builder(49)
    y = b.conv("x", 3, 4, k=3, s=1, p=0)  # 3×3 → 1×1
    one = b.node("ReduceMean", [y], axes=[2, 3], keepdims=1)
    two = b.node("ReduceMean", [b.node("Relu", ["x"])], axes=[2, 3], keepdims=1)  # 3×3: a real mean
    flat = b.node("ReduceMax", [y], axes=[2, 3], keepdims=0)  # drops the axes: shape changes, stays
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 3, 3])],
                                          [out(one, ["N", 4, 1, 1]), out(two, ["N", 3, 1, 1]), out(flat, ["N", 4])]))
    assert count(dst, "ReduceMean") == 1 and count(dst, "ReduceMax") == 1
    G.assert_same_function(src, dst, batch=3)


# -- fold-input-scale ---------------------------------------------------------------------------------

@pytest.mark.parametrize("scale,group", [("scalar", 1), ("channel", 1), ("channel", 2), ("channel", 4)])
def test_scale_before_convs_is_folded_into_their_weights(tmp_path, scale, group):
    """NF-ResNet: ``act(x) * beta`` read by the block's convs."""
    b = Builder(50)
    c = np.array(0.7, np.float32) if scale == "scalar" else (np.random.default_rng(5).uniform(0.5, 2, (4, 1, 1))
                                                               .astype(np.float32))
    y = b.node("Mul", [b.node("Relu", ["x"]), b.const(c)])
    p = b.conv(y, 4, 8, k=3, p=1, group=group)
    q = b.conv(y, 4, 4, k=1, p=0)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, 6, 6])], [out(p, ["N", 8, 6, 6]), out(q, ["N", 4, 6, 6])]))
    assert "Mul" not in G.ops(dst) and applied(rep, "fold-input-scale")
    G.assert_same_function(src, dst, batch=2)


@pytest.mark.parametrize("case", ["other-reader", "broadcasts", "runtime-scale"])
def test_scales_that_cannot_be_folded_stay(tmp_path, case):
    b = Builder(51)
    h = 1 if case == "broadcasts" else 6
    r = b.node("Relu", ["x"])
    if case == "broadcasts":  # the scale makes x larger: [N, 4, 1, 6] · [1, 1, 6, 1]
        s = b.const(np.linspace(0.5, 1.5, 6).astype(np.float32).reshape(1, 1, 6, 1))
    else:
        s = b.const(np.float32(1.5)) if case == "other-reader" else b.node("Sigmoid", ["x"])
    y = b.node("Mul", [r, s])
    outs = [out(b.conv(y, 4, 4), ["N", 4, 6, 6])]
    if case == "other-reader":
        outs.append(out(b.node("AveragePool", [y], kernel_shape=[2, 2]), ["N", 4, 5, 5]))
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, h, 6])], outs))
    assert "Mul" in G.ops(dst) and not applied(rep, "fold-input-scale")


# -- constant folding: weight standardisation ----------------------------------------------------------

def test_weight_standardisation_on_constants_is_folded(tmp_path):
    """timm's ScaledStdConv2d calls F.batch_norm on its weight: the dynamo export computes the
    statistics and a training-style BatchNormalization on constants; all of it folds away."""
    b = Builder(52)
    w = b.weight((6, 3, 3, 3))
    v = b.node("Reshape", [w, G._i64(b, [1, 6, -1])])
    mean = b.node("ReduceMean", [v, G._i64(b, [0, 2])], keepdims=0)
    mean_k = b.node("ReduceMean", [v, G._i64(b, [0, 2])], keepdims=1)
    d = b.node("Sub", [v, mean_k])
    var = b.node("ReduceMean", [b.node("Mul", [d, d]), G._i64(b, [0, 2])], keepdims=0)
    gain = b.weight((6,), "gain")
    bn = b.node("BatchNormalization", [v, gain, b.const(np.zeros(6, np.float32)), mean, var], epsilon=1e-5)
    w2 = b.node("Reshape", [bn, G._i64(b, [6, 3, 3, 3])])
    y = b.node("Conv", ["x", w2], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 5, 5])], [out(y, ["N", 6, 5, 5])], opset=18))
    assert G.ops(dst) == ["Conv"]
    G.assert_same_function(src, dst, batch=2)


# -- fold-bn-through-view ---------------------------------------------------------------------------

@pytest.mark.parametrize("view", ["Flatten", "Reshape"])
def test_linear_norm_becomes_matmul_add(tmp_path, view):
    """LeViT's LinearNorm: bn(linear(x).flatten(0, 1)).reshape_as(...), BatchNorm1d over channels."""
    b = Builder(53)
    y = b.node("MatMul", ["x", b.weight((6, 8))])
    y = b.node("Flatten", [y], axis=2) if view == "Flatten" else b.node("Reshape", [y, G._i64(b, [-1, 8])])
    y = b.node("Reshape", [b.bn(y, 8), G._i64(b, [-1, 5, 8])])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 5, 6])], [out(y, ["N", 5, 8])]))
    # fold-bn itself looks through a Flatten that keeps the channel axis last; the clean-up
    # takes the views it does not (a Reshape to [-1, C])
    assert G.ops(dst) == ["MatMul", "Add"]
    assert applied(rep, "fold-bn" if view == "Flatten" else "fold-bn-through-view")
    G.assert_same_function(src, dst, batch=3)


def test_bn_of_a_view_with_other_readers_stays(tmp_path):
    b = Builder(54)
    mm = b.node("MatMul", ["x", b.weight((6, 8))])
    flat = b.node("Flatten", [mm], axis=2)
    y = b.bn(flat, 8)
    rep, src, dst = run(tmp_path, b.model([tensor("x", [2, 5, 6])], [out(y, [10, 8]), out(mm, [2, 5, 8])]))
    assert "BatchNormalization" in G.ops(dst) and not applied(rep, "fold-bn-through-view")


def test_bn_of_a_view_that_splits_the_channels_stays(tmp_path):
    """[N, 5, 8] viewed as [-1, 4]: the BatchNorm's channels are not the MatMul's columns."""
    b = Builder(57)
    y = b.node("Reshape", [b.node("MatMul", ["x", b.weight((6, 8))]), G._i64(b, [-1, 4])])
    y = b.node("Reshape", [b.bn(y, 4), G._i64(b, [-1, 5, 8])])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 5, 6])], [out(y, ["N", 5, 8])]))
    assert "BatchNormalization" in G.ops(dst) and not applied(rep, "fold-bn-through-view")
    G.assert_same_function(src, dst, batch=2)


# -- fold-bn-into-gemm --------------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b,bias,alpha,beta", [(1, True, 1.0, 1.0), (0, False, 0.5, 1.0), (1, True, 2.0, 0.25)])
def test_batchnorm_before_linear_is_folded(tmp_path, trans_b, bias, alpha, beta):
    """LeViT's NormLinear head: BatchNorm1d, then Linear (as Gemm, possibly two heads)."""
    b = Builder(55)
    x = b.bn(b.node("Relu", ["x"]), 6)
    heads = []
    for _ in range(2):
        ins = [x, b.weight((4, 6) if trans_b else (6, 4))] + ([b.weight((4,))] if bias else [])
        heads.append(b.node("Gemm", ins, transB=trans_b, alpha=alpha, beta=beta))
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 6])], [out(h, ["N", 4]) for h in heads]))
    assert "BatchNormalization" not in G.ops(dst) and applied(rep, "fold-bn-into-gemm")
    G.assert_same_function(src, dst, batch=5)


def test_batchnorm_read_by_more_than_gemms_stays(tmp_path):
    b = Builder(56)
    x = b.bn(b.node("Relu", ["x"]), 6)
    y = b.node("Gemm", [x, b.weight((4, 6)), b.weight((4,))], transB=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 6])], [out(y, ["N", 4]), out(b.node("Sigmoid", [x]), ["N", 6])]))
    assert "BatchNormalization" in G.ops(dst) and not applied(rep, "fold-bn-into-gemm")
