"""fold-fusion on ONNX graphs: constant subgraphs evaluated, constant scales folded into convs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_graphs as G
from conftest import run_cli
from onnx_graphs import Builder, out, tensor


def run(tmp_path, model, *args, command="fold-fusion", name="m"):
    return G.run_pass(tmp_path, model, command, *args, name=name)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_weighted_fusion_becomes_two_convs_and_an_add(tmp_path, opset):
    rep, src, dst = run(tmp_path, G.weighted_fusion(opset))
    assert G.ops(dst) == ["Conv", "Conv", "Add"]
    what = [a["detail"] for a in rep["applied"]]
    assert any("Relu, ReduceSum" in d for d in what)
    assert {a["target"] for a in rep["applied"]} >= {"conv1", "conv2"}
    G.assert_same_function(src, dst)


def test_weighted_fusion_target_after_optimize(tmp_path):
    rep, src, dst = run(tmp_path, G.weighted_fusion(), command="optimize")
    assert G.ops(dst) == ["Conv", "Conv", "Add"]
    G.assert_same_function(src, dst)


def test_scale_on_a_conv_output_read_twice_stays_one_mul(tmp_path):
    b = Builder(40)
    y = b.conv("x", 3, 4, name="conv")
    p = b.const(np.array([2.0], np.float32), "p", as_node=False)
    w = b.node("Sigmoid", [p], name="w")  # a computed constant
    scaled = b.node("Mul", [y, w], name="scale")
    model = b.model([tensor("x", ["N", 3, 8, 8])], [out(b.node("Add", [scaled, y], name="sum"), ["N", 4, 8, 8])], 13)
    rep, src, dst = run(tmp_path, model)
    assert G.ops(dst) == ["Conv", "Mul", "Add"]
    assert any(s["target"] == "scale" and s["code"] == "other-readers" for s in rep["skipped"])
    m = onnx.load(str(dst))
    mul = next(n for n in m.graph.node if n.op_type == "Mul")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert inits[mul.input[1]] == pytest.approx(1 / (1 + np.exp(-2.0)))
    G.assert_same_function(src, dst)


def test_scale_constant_shared_by_two_convs_and_a_weight_shared_with_an_unscaled_conv(tmp_path):
    b = Builder(41)
    s = b.const(np.linspace(0.5, 2.0, 4).reshape(1, 4, 1, 1).astype(np.float32), "s", as_node=False)
    w = b.weight((4, 3, 3, 3), "w")
    y1 = b.node("Mul", [b.node("Conv", ["x", w], name="conv1", pads=[1] * 4), s], name="m1")
    y2 = b.node("Mul", [b.conv("x", 3, 4, name="conv2"), s], name="m2")
    y3 = b.node("Conv", ["x", w], name="conv3", pads=[1] * 4)
    y = b.node("Add", [b.node("Add", [y1, y2], name="a1"), y3], name="a2")
    model = b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])], 13)
    w0 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w))
    rep, src, dst = run(tmp_path, model)
    assert sorted(G.ops(dst)) == ["Add", "Add", "Conv", "Conv", "Conv"]
    m = onnx.load(str(dst))
    conv3 = next(n for n in m.graph.node if n.name == "conv3")
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert conv3.input[1] == w and np.array_equal(inits[w], w0)
    G.assert_same_function(src, dst)


def test_large_expanded_constant_is_not_materialised(tmp_path):
    b = Builder(42)
    big = b.node("Expand", [b.const(np.array(0.5, np.float32), "half"), b.const(np.array([1, 8, 512, 512], np.int64), "shape")],
                 name="expand")
    y = b.node("Add", ["x", big], name="add")
    rep, src, dst = run(tmp_path, b.model([tensor("x", [1, 8, 512, 512])], [out(y, [1, 8, 512, 512])], 13))
    assert "Expand" in G.ops(dst)
    assert any(s["code"] == "too-large" for s in rep["skipped"])


def test_dequantize_linear_is_kept(tmp_path):
    b = Builder(43)
    wq = b.const(b.rng.integers(-100, 100, (4, 3, 3, 3)).astype(np.int8), "wq", as_node=False)
    w = b.node("DequantizeLinear", [wq, b.const(np.array(0.01, np.float32), "scale", as_node=False)], name="dq")
    y = b.node("Conv", ["x", w], name="conv", pads=[1] * 4)
    y = b.node("Mul", [y, b.const(np.array(3.0, np.float32), "k", as_node=False)], name="scale_mul")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])], 13))
    assert G.ops(dst)[:2] == ["DequantizeLinear", "Conv"]
    assert rep["applied"] == [] or all("dq" not in a.get("evaluated", []) for a in rep["applied"])


def test_constant_nodes_become_initializers_with_their_names(tmp_path):
    b = Builder(44, const_nodes=True)
    y = b.node("Reshape", ["x", b.const(np.array([0, -1], np.int64), "shape")], name="flatten")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 4])], [out(y, ["N", 12])], 13))
    assert G.ops(dst) == ["Reshape"]
    m = onnx.load(str(dst))
    assert m.graph.node[0].input[1] in {t.name for t in m.graph.initializer}
    assert rep["applied"][0]["lifted"] == [m.graph.node[0].input[1]]
    G.assert_same_function(src, dst)


def test_scalar_constants_stay_scalars(tmp_path):
    """A PyTorch export with a dynamic batch: Shape -> Gather(0-d index) -> Unsqueeze -> Concat ->
    Reshape. Lifting the 0-d Constant index must keep it 0-d (else the Concat breaks)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            y = self.conv(x) * 0.5
            return y.reshape(y.shape[0], 4, -1).mean(-1)

    torch.manual_seed(0)
    src = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(1, 3, 8, 8),), str(src), dynamo=False, opset_version=13,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}}, do_constant_folding=False)
    assert "Constant" in G.ops(src) and "Shape" in G.ops(src)
    dst = tmp_path / "o.onnx"
    r = run_cli("optimize", src, "-o", dst, "--json")
    assert r.code == 0, r.err
    assert "Constant" not in G.ops(dst) and "Mul" not in G.ops(dst)
    G.assert_same_function(src, dst, batch=3)


def _string_constant_model():
    """A STRING Constant (parsed as numbers at run time) next to a numeric one."""
    b = Builder(46)
    b.nodes.append(helper.make_node("Constant", [], ["s"], name="s_const",
                                    value=helper.make_tensor("sv", onnx.TensorProto.STRING, [2], [b"1.5", b"-2"])))
    text = b.node("Identity", ["s"], name="s_id")
    y = b.node("Concat", [b.node("Cast", ["x"], name="to_str", to=onnx.TensorProto.STRING), text], name="cat", axis=0)
    y = b.node("Cast", [y], name="to_f", to=onnx.TensorProto.FLOAT)
    y = b.node("Mul", [y, b.const(np.array(2.0, np.float32), as_node=True)], name="mul")
    return b.model([tensor("x", [3])], [out(y, [5])], 13)


@pytest.mark.parametrize("command", ["fold-fusion", "optimize"])
def test_string_constants_are_left_alone(tmp_path, command):
    rep, src, dst = run(tmp_path, _string_constant_model(), command=command)
    assert rep["parity"]["passed"]
    m = onnx.load(str(dst))
    const = [n for n in m.graph.node if n.op_type == "Constant"]
    assert [n.name for n in const] == ["s_const"]  # the numeric one became an initializer
    # optimize's clean-up removes the Identity (the string constant is then read directly)
    assert [n.op_type for n in m.graph.node].count("Identity") == (command == "fold-fusion")
    if command == "fold-fusion":
        skipped = [s for s in rep["skipped"] if s["target"] == "s_id_out"]
        assert skipped and skipped[0]["code"] == "non-numeric"
    G.assert_same_function(src, dst)


def test_tensor_bytes_of_string_tensors():
    import onnx_ir as ir

    from modelsurgeon.write.onnx import nbytes

    assert nbytes(ir.Tensor(np.array([b"ab", b"cde"], dtype=object))) == 5
    assert nbytes(ir.Tensor(np.zeros((2, 3), np.float32))) == 24
