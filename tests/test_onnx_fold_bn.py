"""fold-bn on ONNX graphs written like exporters write them (opsets 8-17, Constant nodes,
symbolic batch, randomised statistics); every result is re-run here in onnxruntime against
the original, independently of modelsurgeon's own parity check."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import onnx_graphs as G
from conftest import run_cli
from onnx_graphs import Builder, out, tensor


def fold(tmp_path, model, *args, command="fold-bn", name="m"):
    return G.run_pass(tmp_path, model, command, *args, name=name)


def initializers(path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("opset", [11, 12, 13, 14, 15, 16, 17])
@pytest.mark.parametrize("const_nodes", [False, True])
def test_conv_bn_relu_becomes_conv_relu(tmp_path, opset, const_nodes):
    rep, src, dst = fold(tmp_path, G.conv_bn_relu(opset, const_nodes=const_nodes, seed=opset))
    assert G.ops(dst) == ["Conv", "Relu"]
    assert rep["backend"] == "onnx" and rep["parity"]["passed"] and rep["parity"]["checked"]
    assert rep["before"]["bn"] == 1 and rep["after"]["bn"] == 0
    assert rep["after"]["modules"] == 2 and rep["before"]["modules"] > 2
    a = rep["applied"][0]
    assert a["pass"] == "fold-bn" and a["layer"] == "conv" and a["folded"][0]["source"] == "batch_norm"
    m = onnx.load(str(dst))
    assert m.opset_import[0].version == opset and m.producer_name == "test-exporter"
    assert [i.name for i in m.graph.input] == ["x"] and m.graph.output[0].name == "relu_out"
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    G.assert_same_function(src, dst)


def test_caffe_bn_scale_chain(tmp_path):
    rep, src, dst = fold(tmp_path, G.caffe_chain())
    assert G.ops(dst) == ["Conv", "Relu"]
    assert [f["path"] for f in rep["applied"][0]["folded"]] == ["bn", "scale_mul", "scale_add"]
    G.assert_same_function(src, dst)


def test_bias_free_conv_gains_a_bias(tmp_path):
    rep, src, dst = fold(tmp_path, G.conv_bn_relu(13, bias=False, const_nodes=True))
    assert rep["applied"][0]["bias_added"] is True
    conv = onnx.load(str(dst)).graph.node[0]
    assert conv.op_type == "Conv" and len(conv.input) == 3
    G.assert_same_function(src, dst)


def test_conv_transpose_with_groups(tmp_path):
    b = Builder(10)
    y = b.node("ConvTranspose", ["x", b.weight((8, 3, 3, 3), "ct_w"), b.weight((6,), "ct_b")], name="ct",
               group=2, strides=[2, 2], pads=[1, 1, 1, 1])
    y = b.bn(y, 6, name="bn")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 8, 8, 8])], [out(y, ["N", 6, 15, 15])], 13))
    assert G.ops(dst) == ["ConvTranspose"]
    G.assert_same_function(src, dst)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_both_layouts(tmp_path, trans_b, with_c):
    b = Builder(11 + trans_b)
    ins = ["x", b.weight((10, 12) if trans_b else (12, 10), "gemm_w")] + ([b.weight((10,), "gemm_c")] if with_c else [])
    y = b.node("Gemm", ins, name="gemm", transB=trans_b, alpha=0.7, beta=1.3)
    y = b.node("Relu", [b.bn(y, 10, name="bn")], name="relu")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 12])], [out(y, ["N", 10])], 13))
    assert G.ops(dst) == ["Gemm", "Relu"]
    G.assert_same_function(src, dst)


def test_matmul_add_bn_and_rank3_matmul_scales(tmp_path):
    b = Builder(14)
    y = b.node("MatMul", ["x", b.weight((12, 10), "mm_w")], name="mm")
    y = b.bn(b.node("Add", [y, b.weight((10,), "mm_b")], name="mm_add"), 10, name="bn")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 12])], [out(y, ["N", 10])], 13), name="a")
    assert G.ops(dst) == ["MatMul", "Add"]
    G.assert_same_function(src, dst)

    b = Builder(15)
    y = b.node("MatMul", ["x", b.weight((12, 10), "mm_w")], name="mm")
    y = b.node("Mul", [y, b.weight((10,), "s")], name="scale")
    y = b.node("Sub", [b.weight((1, 1, 10), "t"), y], name="rsub")  # t - s * (x @ W)
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 5, 12])], [out(y, ["N", 5, 10])], 13), name="b")
    assert G.ops(dst) == ["MatMul", "Add"]
    G.assert_same_function(src, dst)


def test_bn_on_rank3_matmul_output_is_skipped(tmp_path):
    b = Builder(21)
    y = b.node("MatMul", ["x", b.weight((12, 5), "mm_w")], name="mm")
    y = b.bn(y, 4, name="bn")  # normalises axis 1 (the 4 tokens), not the 5 output features
    rep, src, dst = fold(tmp_path, b.model([tensor("x", [2, 4, 12])], [out(y, [2, 4, 5])], 13))
    assert G.ops(dst) == ["MatMul", "BatchNormalization"]
    assert rep["skipped"][0]["code"] == "other-axis"


def test_per_channel_div_folds_but_spatial_add_stays(tmp_path):
    b = Builder(20)
    y = b.node("Div", [b.conv("x", 3, 8, name="conv"), b.const(np.full((8, 1, 1), 2.5, np.float32))], name="div")
    y = b.node("Add", [y, b.weight((1, 1, 8, 8), "spatial")], name="spatial_add")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 8, 8, 8])], 13))
    assert G.ops(dst) == ["Conv", "Add"]
    G.assert_same_function(src, dst)


def test_fp16_model_stays_fp16(tmp_path):
    rep, src, dst = fold(tmp_path, G.conv_bn_relu(13, dtype=np.float16, seed=3))
    assert G.ops(dst) == ["Conv", "Relu"]
    assert all(a.dtype == np.float16 for a in initializers(dst).values())
    assert rep["parity"]["rtol"] == pytest.approx(1e-2)
    G.assert_same_function(src, dst, rtol=1e-2)


def test_weight_shared_by_two_convs_is_not_changed_under_the_other(tmp_path):
    b = Builder(16)
    w = b.weight((8, 3, 3, 3), "shared_w")
    y1 = b.bn(b.node("Conv", ["x", w], name="conv1", pads=[1] * 4), 8, name="bn1")
    y2 = b.node("Conv", ["x", w], name="conv2", pads=[1] * 4)
    model = b.model([tensor("x", ["N", 3, 8, 8])], [out(b.node("Add", [y1, y2], name="sum"), ["N", 8, 8, 8])], 13)
    original = numpy_helper.to_array(model.graph.initializer[0])
    rep, src, dst = fold(tmp_path, model)
    assert G.ops(dst) == ["Conv", "Conv", "Add"]
    assert rep["applied"][0]["weight_duplicated"] is True
    m = onnx.load(str(dst))
    inits = initializers(dst)
    conv1, conv2 = m.graph.node[0], m.graph.node[1]
    assert conv2.input[1] == w and np.array_equal(inits[w], original)
    assert conv1.input[1] != w and not np.allclose(inits[conv1.input[1]], original)
    G.assert_same_function(src, dst)


def test_constant_node_shared_by_two_batchnorms(tmp_path):
    b = Builder(22, const_nodes=True)
    shared = b.const(np.linspace(0.5, 1.5, 8).astype(np.float32), "gamma")
    outs = []
    for i in range(2):
        y = b.conv("x", 3, 8, name=f"conv{i}")
        y = b.node("BatchNormalization", [y, shared, b.weight((8,)), b.weight((8,), scale=0.1),
                                          b.const(np.linspace(0.5, 2, 8).astype(np.float32))], name=f"bn{i}")
        outs.append(y)
    y = b.node("Add", outs, name="sum")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 8, 8, 8])], 13))
    assert G.ops(dst) == ["Conv", "Conv", "Add"]
    G.assert_same_function(src, dst)


def test_conv_output_read_twice_is_skipped_with_reason(tmp_path):
    b = Builder(17)
    y = b.conv("x", 3, 8, name="conv")
    z = b.bn(y, 8, name="bn")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(b.node("Add", [y, z], name="res"), ["N", 8, 8, 8])], 13))
    assert G.ops(dst) == ["Conv", "BatchNormalization", "Add"]
    (s,) = rep["skipped"]
    assert s["target"] == "bn" and s["code"] == "other-readers"
    assert rep["applied"] == []


def test_training_mode_and_non_conv_batchnorms_are_skipped(tmp_path):
    b = Builder(18)
    y = b.conv("x", 3, 8, name="conv")
    b.nodes.append(helper.make_node("BatchNormalization", [y, b.weight((8,)), b.weight((8,)), b.weight((8,)),
                                                           b.const(np.ones(8, np.float32))], ["t", "rm", "rv"],
                                    name="bn_train", training_mode=1))
    z = b.bn(b.node("Relu", ["t"], name="relu"), 8, name="bn_after_relu")
    rep, src, dst = fold(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(z, ["N", 8, 8, 8])], 15))
    codes = {s["target"]: s["code"] for s in rep["skipped"]}
    assert codes == {"bn_train": "training-mode", "bn_after_relu": "not-foldable"}
    assert "Relu" in next(s["reason"] for s in rep["skipped"] if s["target"] == "bn_after_relu")  # named
    assert G.ops(dst).count("BatchNormalization") == 2


def test_ir_version_3_initializers_listed_as_inputs(tmp_path):
    m = G.conv_bn_relu(opset=8, seed=9)
    m.ir_version = 3
    for init in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    rep, src, dst = fold(tmp_path, m)
    assert G.ops(dst) == ["Conv", "Relu"]
    res = onnx.load(str(dst))
    assert res.ir_version == 3
    assert {i.name for i in res.graph.input} == {"x"} | {t.name for t in res.graph.initializer}
    G.assert_same_function(src, dst)


def test_pytorch_exported_model(tmp_path):
    """A YOLOv5-style stem + C3 exported by torch.onnx (TorchScript exporter, no constant folding)."""
    import torch
    from models.common import C3, Conv, Focus

    torch.manual_seed(0)
    net = torch.nn.Sequential(Focus(3, 8, 3), Conv(8, 16, 3, 2), C3(16, 16, 1)).eval()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.5)
            mod.running_var.uniform_(0.3, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_(0, 0.5)
    src = tmp_path / "yolo.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), str(src), dynamo=False, opset_version=12,
                      input_names=["images"], output_names=["out"], dynamic_axes={"images": {0: "batch"}},
                      do_constant_folding=False)
    dst = tmp_path / "yolo.opt.onnx"
    r = run_cli("optimize", src, "-o", dst, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["before"]["bn"] == 7 and rep["after"]["bn"] == 0
    assert set(G.ops(dst)) == {"Conv", "Sigmoid", "Mul", "Add", "Concat"}
    assert G.ops(dst)[:3] == ["Conv", "Sigmoid", "Mul"]  # the Focus stem is one conv
    G.assert_same_function(src, dst)
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        ref = net(x).numpy()
    (got,) = G.ort_outputs(dst, {"images": x.numpy()})
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_overridable_initializer_is_not_a_constant(tmp_path):
    """IR >= 4: an initializer also listed as a graph input is a default the caller may override."""
    m = G.conv_bn_relu(13, seed=12)
    mean = next(i for i in m.graph.node if i.op_type == "BatchNormalization").input[3]
    init = next(t for t in m.graph.initializer if t.name == mean)
    m.graph.input.append(helper.make_tensor_value_info(mean, init.data_type, list(init.dims)))
    rep, src, dst = fold(tmp_path, m)
    assert "BatchNormalization" in G.ops(dst)
    assert rep["skipped"][0]["code"] == "computed-tensor"


def test_batchnorm_inside_a_subgraph_is_reported_and_counted(tmp_path):
    """A Conv + BatchNormalization in an If branch: left intact (subgraphs are not rewritten),
    but reported as skipped and counted in the BatchNorm stats, like every unfolded BN."""
    inner = Builder(60)
    y = inner.bn(inner.conv("x", 3, 4, k=1, p=0, name="branch_conv"), 4, name="branch_bn")
    then_g = helper.make_graph(inner.nodes, "then", [], [out(y, [1, 4, 4, 4])], inner.inits)
    else_g = helper.make_graph([helper.make_node("Identity", ["x4"], ["e_out"])], "else", [], [out("e_out", [1, 4, 4, 4])])
    b = Builder(61)
    z = b.node("If", ["cond"], name="branch", then_branch=then_g, else_branch=else_g)
    y = b.bn(b.conv(z, 4, 4, name="conv"), 4, name="bn")  # one BN in the main graph, folded
    model = b.model([tensor("x", [1, 3, 4, 4]), tensor("x4", [1, 4, 4, 4]), tensor("cond", [], onnx.TensorProto.BOOL)],
                    [out(y, [1, 4, 4, 4])], 13)
    rep, src, dst = fold(tmp_path, model)
    assert [a["target"] for a in rep["applied"]] == ["conv"]
    (s,) = rep["skipped"]
    assert s["target"] == "branch_bn" and s["reason"] == "inside a subgraph (If branch): not rewritten"
    assert rep["before"]["bn"] == 2 and rep["after"]["bn"] == 1
    branch = next(n for n in onnx.load(str(dst)).graph.node if n.op_type == "If")
    then = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert [n.op_type for n in then.node] == ["Conv", "BatchNormalization"]
    for cond in (True, False):
        feeds = G.random_feeds(src)
        feeds["cond"] = np.array(cond)
        a, = G.ort_outputs(src, feeds)
        b_, = G.ort_outputs(dst, feeds)
        assert np.allclose(a, b_, rtol=1e-4, atol=1e-5)


def test_declared_output_shape_is_kept_after_a_fold(tmp_path):
    """The exporter's dim names of a graph output are part of the interface: folding the node
    that produced it must not rename them to the inferred ones (N, unk__0)."""
    for name, x_dims, y_dims, args in (("renamed", ["N", 3, 8, 8], ["out_batch", 8, 8, 8], ()),
                                       ("unk", [1, 3, "H", "W"], [1, 8, "h", "w"], ("-s", "1,3,8,8"))):
        b = Builder(62)
        y = b.bn(b.conv("x", 3, 8, name="conv"), 8, name="bn")
        rep, src, dst = fold(tmp_path, b.model([tensor("x", x_dims)], [out(y, y_dims)], 13), *args, name=name)
        assert G.ops(dst) == ["Conv"]
        o = onnx.load(str(dst)).graph.output[0]
        assert o.name == y
        assert [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] == y_dims
        assert o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        onnx.checker.check_model(str(dst), full_check=True)
        G.assert_same_function(src, dst, dims={"H": 8, "W": 8})


def test_rewritten_initializer_keeps_its_doc_string(tmp_path):
    m = G.conv_bn_relu()
    w = next(t for t in m.graph.initializer if len(t.dims) == 4)
    w.doc_string = "the stem's weight"
    rep, src, dst = fold(tmp_path, m)
    docs = {t.name: t.doc_string for t in onnx.load(str(dst)).graph.initializer}
    assert docs[w.name] == "the stem's weight"
