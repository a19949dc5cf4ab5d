"""truncate on ONNX graphs: --at TENSOR (repeatable) and --list."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnx_graphs as G
from conftest import files_in, run_cli, run_console
from onnx_graphs import Builder, out, tensor


def two_branch_model():
    """a -> conv_a -> relu_a ; b -> conv_b ; out = relu_a + conv_b"""
    b = Builder(50)
    ya = b.node("Relu", [b.conv("a", 3, 4, name="conv_a")], name="relu_a")
    yb = b.conv("b", 3, 4, name="conv_b")
    y = b.node("Add", [ya, yb], name="sum")
    return b.model([tensor("a", ["N", 3, 8, 8]), tensor("b", ["N", 3, 8, 8])], [out(y, ["N", 4, 8, 8])], 13)


def test_at_tensors_become_the_outputs_and_match_the_original(tmp_path):
    src = G.save(G.focus_stem(), tmp_path / "f.onnx")
    dst = tmp_path / "cut.onnx"
    r = run_cli("truncate", src, "--at", "bn_out", "--at", "conv_out", "-o", dst, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert [o.name for o in onnx.load(str(dst)).graph.output] == ["bn_out", "conv_out"]
    ops = G.ops(dst)
    assert "Sigmoid" not in ops and ops.count("Conv") == 1 and "BatchNormalization" in ops
    assert {o["name"] for o in rep["parity"]["outputs"]} == {"bn_out", "conv_out"} and rep["parity"]["passed"]
    (a,) = rep["applied"]
    assert a["outputs"] == ["bn_out", "conv_out"] and a["previous_outputs"] == ["silu_out"] and a["removed_nodes"] == 2
    out_shape = onnx.load(str(dst)).graph.output[0].type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in out_shape.dim] == ["N", 8, 8, 8]
    # independently: the original with bn_out exposed gives the same values
    m = onnx.load(str(src))
    m.graph.output.append(onnx.ValueInfoProto(name="bn_out"))
    G.save(m, tmp_path / "exposed.onnx", check=False)
    feeds = G.random_feeds(src)
    ref = G.ort_outputs(tmp_path / "exposed.onnx", feeds)[1]
    got = G.ort_outputs(dst, feeds)[0]
    assert np.array_equal(ref, got)


def test_inputs_no_longer_read_are_removed(tmp_path):
    src = G.save(two_branch_model(), tmp_path / "two.onnx")
    dst = tmp_path / "cut.onnx"
    r = run_cli("truncate", src, "--at", "relu_a_out", "-o", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["applied"][0]["removed_inputs"] == ["b"]
    assert [i.name for i in onnx.load(str(dst)).graph.input] == ["a"]
    assert G.ops(dst) == ["Conv", "Relu"]


def test_list_prints_candidates_and_writes_nothing(tmp_path):
    src = G.save(G.focus_stem(), tmp_path / "f.onnx")
    before = files_in(tmp_path)
    r = run_cli("truncate", src, "--list", "--json")
    assert r.code == 0, r.err
    rows = r.json()["tensors"]
    names = [row["name"] for row in rows]
    assert "conv_out" in names and "bn_out" in names and names[-1] == "silu_out"
    assert not any(n.startswith("starts") for n in names)  # constants are no candidates
    conv = next(row for row in rows if row["name"] == "conv_out")
    assert conv["op"] == "Conv" and conv["shape"] == "[N, 8, 8, 8]" and rows[-1]["output"] is True
    assert r.json()["written"] is False and files_in(tmp_path) == before
    r = run_cli("truncate", src, "--list")
    assert r.code == 0 and "conv_out" in r.out and "BatchNormalization" in r.out


@pytest.mark.parametrize("args,msg", [
    (["--at", "conv_ou"], "did you mean 'conv_out'"),
    (["--at", "x"], "graph input"),
    (["--at", "conv_w_21"], "constant"),
    ([], "needs --at"),
    (["--blocks", "2"], "--blocks"),
])
def test_bad_truncate_options_exit_2(tmp_path, args, msg):
    src = G.save(G.focus_stem(), tmp_path / "f.onnx")
    before = files_in(tmp_path)
    r = run_cli("truncate", src, "-o", tmp_path / "cut.onnx", *args)
    assert r.code == 2 and msg in r.err and r.err.count("\n") == 1
    assert files_in(tmp_path) == before


def test_truncate_is_not_part_of_optimize(tmp_path):
    src = G.save(G.conv_bn_relu(), tmp_path / "m.onnx")
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 0 and "truncate" not in [p["name"] for p in r.json()["passes"]]


def _custom_op_model():
    """Conv -> com.microsoft Gelu -> Relu: onnx shape inference knows nothing of the Gelu's output."""
    b = Builder(51)
    c = b.conv("x", 3, 4, k=1, p=0, name="conv")
    b.nodes.append(onnx.helper.make_node("Gelu", [c], ["gelu_out"], name="gelu", domain="com.microsoft"))
    y = b.node("Relu", ["gelu_out"], name="relu")
    m = b.model([tensor("x", [1, 3, 4, 4])], [out(y, [1, 4, 4, 4])], 13)
    m.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return m


def test_cut_at_an_untyped_custom_op_output_gets_its_type_from_the_reference_run(tmp_path):
    src = G.save(_custom_op_model(), tmp_path / "ms.onnx")
    dst = tmp_path / "cut.onnx"
    r = run_cli("truncate", src, "--at", "gelu_out", "-o", dst, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["parity"]["passed"] and rep["written"]
    assert any("gelu_out" in n and "onnxruntime" in n for n in rep["notes"])
    (o,) = onnx.load(str(dst)).graph.output
    assert o.name == "gelu_out" and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_value for d in o.type.tensor_type.shape.dim] == [1, 4, 4, 4]
    onnx.checker.check_model(str(dst))
    assert G.ops(dst) == ["Conv", "Gelu"]


def test_cut_at_an_untyped_output_onnxruntime_does_not_return_exits_2(tmp_path, monkeypatch):
    from modelsurgeon.verify.onnx import OnnxReferences

    real = OnnxReferences.record

    def without(self, *args, **kwargs):
        real(self, *args, **kwargs)
        for o in self.outputs:
            o.pop("gelu_out", None)

    monkeypatch.setattr(OnnxReferences, "record", without)
    src = G.save(_custom_op_model(), tmp_path / "ms.onnx")
    before = files_in(tmp_path)
    r = run_cli("truncate", src, "--at", "gelu_out", "-o", tmp_path / "cut.onnx")
    assert r.code == 2 and "'gelu_out'" in r.err and "type is unknown" in r.err and r.err.count("\n") == 1
    assert files_in(tmp_path) == before


def test_console_tables_show_lower_case_symbolic_shapes(tmp_path):
    """'[batch, 4, 8, 8]' is shown as it is, not read as rich markup."""
    b = Builder(52)
    c = b.conv("x", 3, 4, name="conv")
    y = b.node("Relu", [c], name="relu")
    src = G.save(b.model([tensor("x", ["batch", 3, 8, 8])], [out(y, ["batch", 4, 8, 8])], 13), tmp_path / "m.onnx")
    env = {"COLUMNS": "200"}
    r = run_console("truncate", src, "--list", env=env)
    assert r.code == 0 and r.out.count("[batch, 4, 8, 8]") == 2
    r = run_console("truncate", src, "--at", c, "-o", tmp_path / "cut.onnx", env=env)
    assert r.code == 0 and f"outputs {y} → {c} [batch, 4, 8, 8]" in r.out
