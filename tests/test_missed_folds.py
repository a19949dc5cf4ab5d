"""Folds that were missed on real models: LeViT's ``Linear -> flatten(0, 1) -> BatchNorm1d ->
reshape_as``, and the zero conv bias a dynamo export (``optimize=False``) computes as
``Expand(CastLike(0, x), Shape(W)[0:1])``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from levit import LinearNorm, levitish
from onnx_graphs import Builder, assert_same_function, ops, out, run_pass, tensor


# -- LeViT: look through reshapes that keep the channel axis --------------------------------------

def test_levit_linear_norm_is_folded(tmp_path):
    src = tmp_path / "levit.pt"
    torch.save(levitish(3), src)
    r = run_cli("fold-bn", src, "--trust-pickle", "-s", "2,3,32,32", "-o", tmp_path / "o.pt", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["before"]["bn"] == 12 and rep["after"]["bn"] == 0  # the heads' BN-before-Linear folded forward
    assert not rep["skipped"]
    assert rep["parity"]["passed"]
    folded = torch.load(tmp_path / "o.pt", weights_only=False)
    for m in folded.modules():
        if isinstance(m, LinearNorm):
            assert isinstance(m.bn, nn.Identity) or not hasattr(m, "bn")
            assert m.linear.bias is not None
    x = torch.randn(3, 3, 32, 32)
    ref = levitish(3)(x)
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-5)


class SplitsChannels(nn.Module):
    """A reshape that splits the channel axis (heads): the per-channel BN after it is over
    another axis and must not be folded into the linear."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8, bias=False)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):  # (B, N, 8) -> (B*N*2, 4)
        y = self.linear(x)
        return self.bn(y.reshape(-1, 4)).reshape_as(y)


class MovesChannels(nn.Module):
    """A reshape that merges the channel axis with a later one: not per-channel any more."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):  # (B, 4, 2, 2) -> (B, 16)
        y = self.conv(x)
        return self.bn(y.flatten(1)).view_as(y)


@pytest.mark.parametrize("cls,shape", [(SplitsChannels, (2, 5, 8)), (MovesChannels, (3, 3, 2, 2))])
def test_reshapes_that_move_channels_are_not_looked_through(cls, shape):
    import modelsurgeon as ms
    from testmodels import randomize_all

    model = randomize_all(cls(), 1).eval()
    _, r = ms.fold_bn(model, input_shape=shape)
    assert not r.applied and r.skipped
    assert isinstance(model.bn, nn.BatchNorm1d)


# -- ONNX: expressions that do not depend on the input's values are constants --------------------

def _dynamo_conv_bn(batch="N") -> onnx.ModelProto:
    """As torch 2.13's dynamo exporter writes a bias-free Conv + BatchNorm with optimize=False:
    the conv's zero bias is Expand(CastLike(0, input), Expand(Shape(W, 0, 1), [1]))."""
    b = Builder(seed=11)
    w = b.weight((8, 3, 3, 3), "conv_w")
    n = b.node("Shape", [w], name="node_Shape_0", start=0, end=1)
    one = b.const(np.array([1], np.int64), "val_1", as_node=True)
    shape = b.node("Expand", [n, one], name="node_Expand_2")
    zero = b.const(np.array(0, np.int64), "val_3", as_node=True)
    z = b.node("CastLike", [zero, "input"], name="node_CastLike_4")
    bias = b.node("Expand", [z, shape], name="node_Expand_5")
    y = b.node("Conv", ["input", w, bias], name="node_conv2d", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.bn(y, 8, name="node_batch_norm", eps=1e-5)
    y = b.node("Relu", [y], name="node_relu")
    return b.model([tensor("input", [batch, 3, 16, 16])], [out(y, [batch, 8, 16, 16])], opset=20, ir_version=10)


@pytest.mark.parametrize("batch", ["N", 1])
def test_dynamo_zero_bias_is_a_constant(tmp_path, batch):
    rep, src, dst = run_pass(tmp_path, _dynamo_conv_bn(batch), "fold-bn")
    assert rep["before"]["bn"] == 1 and rep["after"]["bn"] == 0, rep["skipped"]
    assert ops(dst) == ["Conv", "Relu"]
    assert_same_function(src, dst, batch=2 if batch == "N" else 1)


def test_optimize_folds_the_dynamo_graph(tmp_path):
    rep, src, dst = run_pass(tmp_path, _dynamo_conv_bn(), "optimize")
    assert ops(dst) == ["Conv", "Relu"]
    assert_same_function(src, dst)


def _reshape_by_shape(batch) -> onnx.ModelProto:
    """Relu(x) reshaped to Shape(x) (a no-op whose shape is read at run time), then a conv."""
    b = Builder(seed=12)
    s = b.node("Shape", ["x"], name="shape_of_x")
    y = b.node("Relu", ["x"], name="relu")
    y = b.node("Reshape", [y, s], name="reshape")
    y = b.conv(y, 3, 4, name="conv")
    return b.model([tensor("x", [batch, 3, 8, 8])], [out(y, [batch, 4, 8, 8])], opset=13)


def test_shape_of_a_static_input_is_constant_and_of_a_symbolic_one_is_not(tmp_path):
    from modelsurgeon.capture.onnx import OnnxGraph
    from modelsurgeon.read.onnx import load_onnx
    from onnx_graphs import save

    for batch, const in ((2, True), ("N", False)):
        p = save(_reshape_by_shape(batch), tmp_path / f"r{batch}.onnx")
        g = OnnxGraph(load_onnx(p).container)
        shape_out = next(n for n in g.nodes if n.op_type == "Shape").outputs[0]
        assert g.is_const(shape_out) is const
        if const:
            np.testing.assert_array_equal(g.const_array(shape_out), [2, 3, 8, 8])
        # the constant evaluator alone (the graph clean-up left out)
        rep, src, dst = run_pass(tmp_path, _reshape_by_shape(batch), "optimize", "--skip", "cleanup", name=f"opt{batch}")
        assert ("Shape" in ops(dst)) is not const
        assert_same_function(src, dst, batch=2)
        # with the clean-up, the Reshape to x's own shape is a no-op at any batch: gone, the batch symbolic
        rep, src, dst = run_pass(tmp_path, _reshape_by_shape(batch), "optimize", name=f"all{batch}")
        assert ops(dst) == ["Relu", "Conv"]
        assert onnx.load(str(dst)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == ("" if const else "N")
        assert_same_function(src, dst, batch=2 if const else 3)


def test_castlike_reads_only_the_dtype_of_a_computed_value(tmp_path):
    """The CastLike's second input is a computed activation (not a graph input): still only its
    dtype is read."""
    b = Builder(seed=13)
    h = b.conv("x", 3, 8, name="conv0")
    h = b.node("Relu", [h], name="relu0")
    zero = b.const(np.array(0, np.int64), "zero", as_node=True)
    z = b.node("CastLike", [zero, h], name="castlike")
    bias = b.node("Expand", [z, b.const(np.array([4], np.int64), "c", as_node=True)], name="expand")
    y = b.node("Conv", [h, b.weight((4, 8, 1, 1), "w"), bias], name="conv1", kernel_shape=[1, 1])
    y = b.bn(y, 4, name="bn")
    model = b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])], opset=17)
    rep, src, dst = run_pass(tmp_path, model, "fold-bn")
    assert rep["after"]["bn"] == 0 and "CastLike" not in ops(dst)
    assert_same_function(src, dst)
