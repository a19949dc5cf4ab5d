"""The ONNX graph clean-up of ``optimize``, rewrite by rewrite, on small graphs written the way
exporters write them: what each removes, what it must leave (with the reason), symbolic sizes
kept symbolic, and the result checked against the original in onnxruntime at another batch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import onnx_graphs as G
from conftest import run_cli
from modelsurgeon import passes as registry
from onnx_graphs import Builder, out, tensor


def run(tmp_path, model, *args, name="m"):
    """``optimize`` on ``model`` (parity checked by modelsurgeon): (report, src, dst)."""
    return G.run_pass(tmp_path, model, "optimize", *args, name=name)


def applied(rep, pass_name):
    return [a for a in rep["applied"] if a["pass"] == pass_name]


def skipped(rep, pass_name):
    return [s for s in rep["skipped"] if s["pass"] == pass_name]


def dims(path, which="input"):
    m = onnx.load(str(path))
    v = (m.graph.input if which == "input" else m.graph.output)[0]
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


# -- fold-shapes + fuse-pad: TF "SAME" padding ---------------------------------------------------

def test_same_padding_from_static_sizes_becomes_one_conv(tmp_path):
    rep, src, dst = run(tmp_path, G.same_pad_conv(hw=(15, 17)))
    assert G.ops(dst) == ["Conv"]
    assert applied(rep, "fold-shapes") and applied(rep, "fuse-pad")
    conv = onnx.load(str(dst)).graph.node[0]
    pads = next(a.ints for a in conv.attribute if a.name == "pads")
    assert list(pads) == [1, 1, 1, 1]  # 15 → 8 (s2 k3): 1+1; 17 → 9: 1+1 (begin, end per axis)
    assert dims(dst) == ["N", 3, 15, 17]  # the symbolic batch stays symbolic
    G.assert_same_function(src, dst, batch=3)


def test_asymmetric_same_padding(tmp_path):
    rep, src, dst = run(tmp_path, G.same_pad_conv(hw=(16, 16), k=3, s=2))
    conv = onnx.load(str(dst)).graph.node[0]
    assert G.ops(dst) == ["Conv"]
    assert list(next(a.ints for a in conv.attribute if a.name == "pads")) == [0, 0, 1, 1]  # TF pads the end
    G.assert_same_function(src, dst, batch=2)


def test_shape_of_a_symbolic_input_is_not_folded(tmp_path):
    rep, src, dst = run(tmp_path, G.same_pad_conv(symbolic_hw=True), "-s", "1,3,15,15", "--keep-symbolic")
    ops = G.ops(dst)
    assert "Shape" in ops and "Pad" in ops and not applied(rep, "fold-shapes") and not applied(rep, "fix-input-shapes")
    assert dims(dst) == ["N", 3, "H", "W"]
    G.assert_same_function(src, dst, dims={"H": 11, "W": 20})  # still right at another size


def test_input_shape_fixes_the_symbolic_dims_and_says_which(tmp_path):
    rep, src, dst = run(tmp_path, G.same_pad_conv(symbolic_hw=True), "-s", "2,3,15,15")
    assert G.ops(dst) == ["Conv"]
    assert dims(dst) == [2, 3, 15, 15] and dims(dst, "output")[:1] == [2]  # the output's N too
    (fix,) = applied(rep, "fix-input-shapes")
    assert fix["target"] == "x" and [(f["dim"], f["name"], f["size"]) for f in fix["fixed"]] == [
        (0, "N", 2), (2, "H", 15), (3, "W", 15)]
    G.assert_same_function(src, dst, batch=2, dims={"H": 15, "W": 15})


def test_a_defaulted_batch_is_not_fixed(tmp_path):
    rep, src, dst = run(tmp_path, G.same_pad_conv())  # no -s: batch 1 only for verification
    assert not applied(rep, "fix-input-shapes") and dims(dst)[0] == "N"


def test_view_by_a_symbolic_size_becomes_a_constant_target(tmp_path):
    rep, src, dst = run(tmp_path, G.view_by_size())
    assert G.ops(dst) == ["Conv", "Reshape", "Gemm"]
    m = onnx.load(str(dst))
    reshape = next(n for n in m.graph.node if n.op_type == "Reshape")
    target = next(i for i in m.graph.initializer if i.name == reshape.input[1])
    assert onnx.numpy_helper.to_array(target).tolist() == [0, -1]  # copy the batch, infer the rest
    assert dims(dst)[0] == "N"
    G.assert_same_function(src, dst, batch=4)


def test_allowzero_reshape_by_a_symbolic_size(tmp_path):
    """The dynamo exporter writes ``allowzero=1``: the constant target's 0 must mean "copy", so
    the attribute goes."""
    b = Builder(31)
    y = b.node("Relu", ["x"])
    shape = b.node("Concat", [b.node("Shape", [y], start=0, end=1), G._i64(b, [-1])], axis=0)
    y = b.node("Reshape", [y, shape], name="flatten", allowzero=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 4])], [out(y, ["N", 12])], opset=18))
    assert G.ops(dst) == ["Relu", "Reshape"]
    reshape = next(n for n in onnx.load(str(dst)).graph.node if n.op_type == "Reshape")
    assert all(a.i == 0 for a in reshape.attribute if a.name == "allowzero")
    G.assert_same_function(src, dst, batch=3)


def test_expand_to_a_partly_symbolic_shape(tmp_path):
    """``t.expand(x.shape[0], -1)`` where t already has x's batch: the target becomes [1, C]."""
    b = Builder(12)
    y = b.node("Relu", ["x"])
    n = G._unsq(b, G._size(b, "x", 0))
    c = G._unsq(b, G._size(b, "x", 1))
    y = b.node("Expand", [y, b.node("Concat", [n, c], axis=0)], name="expand")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 6])], [out(y, ["N", 6])]))
    assert G.ops(dst) == ["Relu"]  # the target is [1, 6]: an Expand to the input's own shape, removed
    G.assert_same_function(src, dst, batch=5)


def test_expand_by_a_symbolic_size_the_input_lacks_stays(tmp_path):
    """A class token expanded to the batch: the batch is not the token's, nothing to fold."""
    b = Builder(13)
    token = b.weight((1, 1, 4), "cls")
    shape = b.node("Concat", [G._unsq(b, G._size(b, "x", 0)), G._i64(b, [1, 4])], axis=0)
    y = b.node("Concat", [b.node("Expand", [token, shape], name="expand"), "x"], axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 4])], [out(y, ["N", 4, 4])]))
    assert "Expand" in G.ops(dst) and "Shape" in G.ops(dst)
    G.assert_same_function(src, dst, batch=3)


# -- remove-identity, castlike-to-cast, remove-noops ----------------------------------------------

def test_identity_and_inference_dropout_are_removed(tmp_path):
    b = Builder(14)
    y = b.node("Identity", [b.conv("x", 3, 4, name="conv")], name="id")
    ratio, train = b.const(np.array(0.3, np.float32), "ratio"), b.const(np.array(False), "train")
    y = b.node("Dropout", [y, ratio, train], name="drop")
    y = b.node("Concat", [b.node("Relu", [y])], name="cat1", axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])]))
    assert G.ops(dst) == ["Conv", "Relu"]
    assert {a["op"] for a in applied(rep, "remove-identity")} == {"Identity", "Dropout", "Concat"}
    G.assert_same_function(src, dst)


def test_training_dropout_and_an_identity_between_graph_input_and_output_stay(tmp_path):
    b = Builder(15)
    ratio, train = b.const(np.array(0.5, np.float32), "ratio"), b.const(np.array(True), "train")
    y = b.node("Dropout", ["x", ratio, train], name="drop")
    same = b.node("Identity", ["x"], name="passthrough")
    model = b.model([tensor("x", [2, 3])], [out(y, [2, 3]), out(same, [2, 3])])
    rep, src, dst = run(tmp_path, model, "--no-verify")  # a training Dropout draws a new mask each run
    assert G.ops(dst) == ["Dropout", "Identity"]
    (why,) = skipped(rep, "remove-identity")
    assert why["target"] == "drop" and why["code"] == "training-mode"


def test_castlike_of_a_constant_is_folded(tmp_path):
    """The dynamo exporter's zero bias: Expand(CastLike(0, activation), Shape(weight)[0:1])."""
    b = Builder(16)
    w = b.weight((4, 3, 3, 3), "w")
    zero = b.const(np.array(0, np.int64), "zero", as_node=True)
    channels = b.node("Shape", [w], start=0, end=1)
    bias = b.node("Expand", [b.node("CastLike", [zero, "x"], name="castlike"), channels])
    y = b.node("Conv", ["x", w, bias], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.bn(y, 4, name="bn")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])], opset=18))
    assert G.ops(dst) == ["Conv"] and applied(rep, "castlike-to-cast") and applied(rep, "fold-bn")
    G.assert_same_function(src, dst)


@pytest.mark.parametrize("kind", ["cast", "reshape", "pad", "slice", "transpose", "add0", "mul1", "sub0", "div1"])
def test_noops_are_removed(tmp_path, kind):
    b = Builder(17)
    y = b.node("Relu", ["x"])
    if kind == "cast":
        y = b.node("Cast", [y], to=TensorProto.FLOAT)
    elif kind == "reshape":
        y = b.node("Reshape", [y, G._i64(b, [0, 4, 6])])
    elif kind == "pad":
        y = b.node("Pad", [y, G._i64(b, [0] * 6)], mode="reflect")
    elif kind == "slice":
        y = b.node("Slice", [y, G._i64(b, [0, -6]), G._i64(b, [G.INT64_MAX, 6]), G._i64(b, [1, 2])])
    elif kind == "transpose":
        y = b.node("Transpose", [y], perm=[0, 1, 2])
    else:
        op, v = {"add0": ("Add", 0), "mul1": ("Mul", 1), "sub0": ("Sub", 0), "div1": ("Div", 1)}[kind]
        y = b.node(op, [y, b.const(np.full((1, 6), v, np.float32))])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, 6])], [out(y, ["N", 4, 6])]))
    assert G.ops(dst) == ["Relu"] and applied(rep, "remove-noops")
    G.assert_same_function(src, dst, batch=3)


@pytest.mark.parametrize("kind", ["broadcast", "partial-slice", "real-transpose", "cast-to-half", "zero-first"])
def test_lookalikes_are_kept(tmp_path, kind):
    b = Builder(18)
    y = b.node("Relu", ["x"])
    shape_out = ["N", 4, 6]
    if kind == "broadcast":  # ×1 that broadcasts [N, 4, 1] to [N, 4, 6]
        y = b.node("ReduceMax", [y], axes=[2], keepdims=1)
        y = b.node("Mul", [y, b.const(np.ones((1, 1, 6), np.float32))])
    elif kind == "partial-slice":
        y = b.node("Slice", [y, G._i64(b, [0]), G._i64(b, [5]), G._i64(b, [2])])
        shape_out = ["N", 4, 5]
    elif kind == "real-transpose":
        y = b.node("Transpose", [y], perm=[0, 2, 1])
        shape_out = ["N", 6, 4]
    elif kind == "cast-to-half":
        y = b.node("Cast", [b.node("Cast", [y], to=TensorProto.FLOAT16)], to=TensorProto.FLOAT)
    else:  # 0 - x is not x
        y = b.node("Sub", [b.const(np.zeros((1, 6), np.float32)), y])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, 6])], [out(y, shape_out)]))
    assert G.ops(dst) == G.ops(src)
    G.assert_same_function(src, dst, batch=2)


# -- fuse-pad -------------------------------------------------------------------------------------

def _pad_then(b: Builder, amounts, reader="Conv", mode="constant", value=None, **attrs) -> str:
    ins = ["x", G._i64(b, amounts)] + ([b.const(np.array(value, np.float32))] if value is not None else [])
    y = b.node("Pad", ins, name="pad", mode=mode)
    if reader == "Conv":
        return b.node("Conv", [y, b.weight((4, 3, 3, 3), "w")], name="conv", kernel_shape=[3, 3], **attrs)
    return b.node(reader, [y], name="pool", kernel_shape=[2, 2], strides=[2, 2], **attrs)


def test_zero_pad_folds_into_conv_and_average_pool(tmp_path):
    b = Builder(19)
    y = _pad_then(b, [0, 0, 1, 2, 0, 0, 2, 1], pads=[1, 1, 1, 1])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 11, 11])]))
    conv = onnx.load(str(dst)).graph.node
    assert G.ops(dst) == ["Conv"] and list(next(a.ints for a in conv[0].attribute if a.name == "pads")) == [2, 3, 3, 2]
    G.assert_same_function(src, dst, batch=2)
    b = Builder(20)
    y = _pad_then(b, [0, 0, 1, 1, 0, 0, 1, 1], reader="AveragePool")  # count_include_pad 0, no own pads
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 3, 5, 5])]), name="pool")
    assert G.ops(dst) == ["AveragePool"]
    G.assert_same_function(src, dst, batch=2)


@pytest.mark.parametrize("case,why", [
    ("reflect", "layer-settings"), ("value", "layer-settings"), ("negative", "layer-settings"), ("channel", "other-axis"),
    ("maxpool", "other-readers"), ("avgpool-own-pads", "layer-settings"),
])
def test_pads_that_are_not_exact_to_fold_are_kept(tmp_path, case, why):
    b = Builder(21)
    pads = {"negative": [0, 0, -1, 0, 0, 0, 0, 0], "channel": [0, 1, 0, 0, 0, 0, 0, 0]}.get(case, [0, 0, 1, 1, 0, 0, 1, 1])
    if case == "maxpool":  # a Conv and a MaxPool read the Pad: MaxPool pads with -inf, not zeros
        y = _pad_then(b, pads)
        y = b.node("Concat", [y, b.node("MaxPool", ["pad_out"], kernel_shape=[3, 3])], axis=1)
    elif case == "avgpool-own-pads":
        y = _pad_then(b, pads, reader="AveragePool", pads=[1, 1, 1, 1])
    elif case == "channel":
        y = _pad_then(b, pads, reader="AveragePool")
    else:
        y = _pad_then(b, pads, mode="reflect" if case == "reflect" else "constant", value=0.5 if case == "value" else None)
    model = b.model([tensor("x", [2, 3, 8, 8])], [out(y, ["n", "c", "h", "w"])])
    rep, src, dst = run(tmp_path, model)
    assert "Pad" in G.ops(dst)
    (s,) = skipped(rep, "fuse-pad")
    assert s["target"] == "pad" and s["code"] == why
    G.assert_same_function(src, dst)


# -- merge-reshapes, merge-transposes -------------------------------------------------------------

def test_a_chain_of_views_becomes_one_reshape_or_none(tmp_path):
    b = Builder(22)
    y = b.node("Flatten", [b.node("Relu", ["x"])], axis=1)
    y = b.node("Unsqueeze", [y, G._i64(b, [1])])
    y = b.node("Reshape", [y, G._i64(b, [0, 4, 3, 2])])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, 6])], [out(y, ["N", 4, 3, 2])]))
    assert G.ops(dst) == ["Relu", "Reshape"] and applied(rep, "merge-reshapes")
    G.assert_same_function(src, dst, batch=3)
    b = Builder(23)
    y = b.node("Reshape", [b.node("Flatten", [b.node("Relu", ["x"])], axis=1), G._i64(b, [-1, 4, 6])])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, 6])], [out(y, ["N", 4, 6])]), name="back")
    assert G.ops(dst) == ["Relu"]
    G.assert_same_function(src, dst, batch=3)


def test_a_view_chain_with_another_reader_in_the_middle_stays(tmp_path):
    b = Builder(24)
    flat = b.node("Flatten", [b.node("Relu", ["x"])], axis=1)
    y = b.node("Reshape", [flat, G._i64(b, [0, 4, 3, 2])])
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 4, 6])], [out(y, ["N", 4, 3, 2]), out(flat, ["N", 24])]))
    assert G.ops(dst) == ["Relu", "Flatten", "Reshape"] and not applied(rep, "merge-reshapes")


def test_transposes_compose(tmp_path):
    b = Builder(25)
    y = b.node("Transpose", [b.node("Transpose", [b.node("Relu", ["x"])], perm=[0, 2, 3, 1])], perm=[0, 3, 1, 2])
    z = b.node("Transpose", [b.node("Transpose", [b.node("Sigmoid", ["x"])], perm=[0, 2, 1, 3])], perm=[0, 1, 3, 2])
    model = b.model([tensor("x", ["N", 2, 3, 4])], [out(y, ["N", 2, 3, 4]), out(z, ["N", 3, 4, 2])])
    rep, src, dst = run(tmp_path, model)
    assert G.ops(dst) == ["Relu", "Sigmoid", "Transpose"]
    perm = next(a.ints for n in onnx.load(str(dst)).graph.node if n.op_type == "Transpose" for a in n.attribute)
    assert list(perm) == [0, 2, 3, 1]
    G.assert_same_function(src, dst, batch=2)


# -- fuse-gemm ------------------------------------------------------------------------------------

def test_matmul_add_becomes_gemm_only_for_matrices(tmp_path):
    rep, src, dst = run(tmp_path, G.view_by_size())
    assert "Gemm" in G.ops(dst) and "MatMul" not in G.ops(dst)
    b = Builder(26)
    y = b.node("Add", [b.node("MatMul", ["x", b.weight((4, 5))]), b.weight((5,))])  # [N, T, 4] @ [4, 5]
    z = b.node("Add", [b.node("MatMul", ["x2", b.weight((4, 5))]), "x3"])  # a bias computed at run time
    model = b.model([tensor("x", ["N", 3, 4]), tensor("x2", ["N", 4]), tensor("x3", ["N", 5])],
                    [out(y, ["N", 3, 5]), out(z, ["N", 5])])
    rep, src, dst = run(tmp_path, model, name="nd")
    assert G.ops(dst) == ["MatMul", "Add", "MatMul", "Add"]
    G.assert_same_function(src, dst, batch=2)


# -- dedup-constants + cse, resize-scales, split-sequences ----------------------------------------

def test_repeated_subexpressions_and_constants_merge(tmp_path):
    b = Builder(27)
    outs = []
    for k in range(3):  # three heads each computing Relu(x) * 2 from their own copy of 2
        outs.append(b.node("Mul", [b.node("Relu", ["x"]), b.const(np.array(2.0, np.float32), f"two{k}")]))
    y = b.node("Concat", outs, axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 2])], [out(y, ["N", 6])]))
    assert G.ops(dst) == ["Relu", "Mul", "Concat"] and applied(rep, "dedup-constants") and applied(rep, "cse")
    G.assert_same_function(src, dst, batch=3)


def _resize_to(b: Builder, x: str, like: str) -> str:
    sizes = b.node("Concat", [b.node("Slice", [b.node("Shape", [x]), G._i64(b, [0]), G._i64(b, [2])]),
                              b.node("Slice", [b.node("Shape", [like]), G._i64(b, [2]), G._i64(b, [4])])], axis=0)
    return b.node("Resize", [x, "", "", sizes], mode="linear")


def test_resize_to_a_size_read_from_a_shape_becomes_scales(tmp_path):
    b = Builder(28)
    y = _resize_to(b, "x", "skip")
    model = b.model([tensor("x", ["N", 2, 4, 4]), tensor("skip", ["N", 2, 8, 12])], [out(y, ["N", 2, 8, 12])], opset=13)
    rep, src, dst = run(tmp_path, model)
    assert G.ops(dst) == ["Resize"] and applied(rep, "resize-scales")
    G.assert_same_function(src, dst, batch=2)
    b = Builder(29)  # 11 → 13: float32(13 / 11) · 11 rounds down to 12, so scales would give another size
    y = _resize_to(b, "x", "skip")
    model = b.model([tensor("x", ["N", 2, 11, 11]), tensor("skip", ["N", 2, 13, 13])], [out(y, ["N", 2, 13, 13])], opset=13)
    rep, src, dst = run(tmp_path, model, name="odd")
    assert "Resize" in G.ops(dst) and not applied(rep, "resize-scales")
    G.assert_same_function(src, dst, batch=2)


def test_split_to_sequence_read_at_constant_positions_becomes_split(tmp_path):
    b = Builder(30)
    seq = b.node("SplitToSequence", ["x", G._i64(b, 3)], axis=1)
    a = b.node("SequenceAt", [seq, G._i64(b, 0)])
    c = b.node("SequenceAt", [seq, G._i64(b, -1)])
    y = b.node("Concat", [b.node("Relu", [c]), a], axis=1)
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 7, 4])], [out(y, ["N", 4, 4])], opset=13))
    assert G.ops(dst) == ["Split", "Relu", "Concat"] and applied(rep, "split-sequences")
    G.assert_same_function(src, dst, batch=2)


# -- the clean-up as a whole ----------------------------------------------------------------------

def test_skip_cleanup_runs_the_surgery_passes_only(tmp_path):
    rep, src, dst = run(tmp_path, G.same_pad_conv(), "--skip", "cleanup")
    assert [p["name"] for p in rep["passes"]] == ["focus-to-conv", "fold-fusion", "reparam", "fold-bn"]
    assert "Pad" in G.ops(dst)
    rep, src, dst = run(tmp_path, G.same_pad_conv(), "--passes", "cleanup", name="only")
    assert [p["name"] for p in rep["passes"]] == registry.in_group("cleanup")


def test_cleanup_passes_are_onnx_only_and_declare_their_order():
    from modelsurgeon.passes.cleanup import CLEANUP

    order = registry.exact_passes()
    for spec in CLEANUP:
        name = spec.name
        p = registry.get(name, "onnx")
        assert p.name == name and not registry.available(name, "torch") and spec.cli is None
        for other in spec.before:  # optimize's order honours what each pass declares
            assert order.index(name) < order.index(other)
        for other in spec.after:
            assert order.index(other) < order.index(name)


def test_human_report_groups_the_idle_passes(tmp_path):
    src = G.save(G.same_pad_conv(), tmp_path / "m.onnx")
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx")
    assert r.code == 0, r.err
    assert "nothing to do:" in r.out and "fuse-pad: 1 rewritten" in r.out


def test_native_outputs_get_the_surgery_passes_only(tmp_path):
    """A .caffemodel written back can record folds, not a cleaned-up graph: the clean-up is left
    out (and said so); written as .onnx, the same input gets it."""
    import native_models as M

    proto, model = M.write_caffe(tmp_path, "resnet", M.RESNET, seed=5)
    r = run_cli("optimize", model, "-o", tmp_path / "merged.caffemodel", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert not any(registry.REGISTRY[p["name"]].group == "cleanup" for p in rep["passes"])
    assert any("graph clean-up not run" in n for n in rep["notes"]) and rep["after"]["bn"] == 0
    r = run_cli("optimize", model, "-o", tmp_path / "merged.onnx", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert [p["name"] for p in rep["passes"]] == registry.exact_passes() and rep["parity"]["passed"]
    assert rep["after"]["modules"] < rep["before"]["modules"]
