"""The ONNX pipeline end to end: the issue's node-count targets, exit codes, parity failures,
bad files, external data, what the written file keeps."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper

import onnx_graphs as G
from conftest import files_in, run_cli, run_console

# pattern -> (builder, the single pass that reaches the target alone or None, target op sequence)
TARGETS = {
    "conv-bn-relu": (lambda: G.conv_bn_relu(13, const_nodes=True), "fold-bn", ["Conv", "Relu"]),
    "caffe-chain": (lambda: G.caffe_chain(11), "fold-bn", ["Conv", "Relu"]),
    "focus-stem": (lambda: G.focus_stem(13), None, ["Conv", "Sigmoid", "Mul"]),
    "space-to-depth": (lambda: G.s2d_conv(13), "focus-to-conv", ["Conv"]),
    "weighted-fusion": (lambda: G.weighted_fusion(13), "fold-fusion", ["Conv", "Conv", "Add"]),
}


@pytest.mark.parametrize("pattern", list(TARGETS))
def test_node_count_targets(tmp_path, pattern):
    build, single, target = TARGETS[pattern]
    src = G.save(build(), tmp_path / "m.onnx")
    for command in ["optimize"] + ([single] if single else []):
        dst = tmp_path / f"{command}.onnx"
        r = run_cli(command, src, "-o", dst, "--json")
        assert r.code == 0, r.err
        assert G.ops(dst) == target, command
        rep = r.json()
        assert rep["after"]["modules"] == len(target) and rep["parity"]["passed"]
        G.assert_same_function(src, dst)


def test_dry_run_and_no_verify(tmp_path):
    src = G.save(G.conv_bn_relu(), tmp_path / "m.onnx")
    before = files_in(tmp_path)
    r = run_cli("fold-bn", src, "--dry-run", "--json")
    assert r.code == 0 and r.json()["dry_run"] is True and r.json()["written"] is False
    assert r.json()["applied"][0]["detail"] == "would be rewritten"
    assert files_in(tmp_path) == before
    r = run_cli("fold-bn", src, "--no-verify", "--json", "-q")
    assert r.code == 0 and r.json()["parity"]["checked"] is False
    assert G.ops(tmp_path / "m.fold-bn.onnx") == ["Conv", "Relu"]  # default output name


def test_parity_failure_exits_1_and_writes_nothing_unless_forced(tmp_path, monkeypatch):
    import modelsurgeon.rewrite.affine as affine

    real = affine.fold

    def wrong(*args, **kwargs):
        w, b = real(*args, **kwargs)
        return w * 1.01, b

    monkeypatch.setattr(affine, "fold", wrong)
    src = G.save(G.conv_bn_relu(), tmp_path / "m.onnx")
    before = files_in(tmp_path)
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 1 and "parity failed" in r.err
    assert r.json()["parity"]["passed"] is False and r.json()["written"] is False
    assert files_in(tmp_path) == before
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx", "--verify-each")
    assert r.code == 1 and "after fold-bn" in r.err and files_in(tmp_path) == before
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx", "--force", "--json")
    assert r.code == 0 and r.json()["written"] is True and r.json()["warnings"]


def test_verify_each_and_trials(tmp_path):
    src = G.save(G.focus_stem(), tmp_path / "m.onnx")
    r = run_cli("optimize", src, "-o", tmp_path / "o.onnx", "--verify-each", "--trials", "3", "--json")
    assert r.code == 0, r.err
    assert r.json()["parity"]["trials"] == 3


@pytest.mark.parametrize("content,msg", [
    (b"this is not a protobuf at all \xff\xfe", "ONNX"),
    (b"\x08\x07", "no graph"),
])
def test_garbage_onnx_is_bad_input(tmp_path, content, msg):
    src = tmp_path / "bad.onnx"
    src.write_bytes(content)
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx")
    assert r.code == 2 and msg in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "missing.bin"])
def test_external_data_outside_the_model_directory_is_refused(tmp_path, location):
    d = tmp_path / "model"
    d.mkdir()
    m = G.conv_bn_relu()
    init = m.graph.initializer[0]
    init.ClearField("raw_data")
    del init.float_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value=location)
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    onnx.save(m, str(d / "m.onnx"))
    r = run_cli("fold-bn", d / "m.onnx", "-o", d / "o.onnx")
    assert r.code == 2 and r.err.count("\n") == 1
    assert ("outside" in r.err and "refused" in r.err) or "not found" in r.err
    assert not (d / "o.onnx").exists()


def test_external_data_read_and_written(tmp_path, monkeypatch):
    import modelsurgeon.write.onnx as save_onnx

    monkeypatch.setattr(save_onnx, "EXTERNAL_MIN_TENSOR", 16)  # these tensors are tiny
    m = G.conv_bn_relu(seed=4)
    src = tmp_path / "ext.onnx"
    onnx.save(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "folded.onnx"
    r = run_cli("fold-bn", src, "-o", dst, "--json")
    assert r.code == 0, r.err
    assert sorted(os.listdir(out_dir)) == ["folded.onnx", "folded.onnx.data"]
    proto = onnx.load(str(dst), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert G.ops(dst) == ["Conv", "Relu"]
    G.assert_same_function(src, dst)


def test_large_output_goes_to_external_data(tmp_path, monkeypatch):
    import modelsurgeon.write.onnx as save_onnx

    monkeypatch.setattr(save_onnx, "EXTERNAL_THRESHOLD", 100)
    monkeypatch.setattr(save_onnx, "EXTERNAL_MIN_TENSOR", 16)
    src = G.save(G.conv_bn_relu(seed=5), tmp_path / "m.onnx")
    dst = tmp_path / "o.onnx"
    r = run_cli("fold-bn", src, "-o", dst, "--json")
    assert r.code == 0, r.err
    assert (tmp_path / "o.onnx.data").exists()
    assert any("external data" in n for n in r.json()["notes"])
    weight = next(t for t in onnx.load(str(dst), load_external_data=False).graph.initializer if len(t.dims) == 4)
    assert weight.data_location == onnx.TensorProto.EXTERNAL
    G.assert_same_function(src, dst)
    # written atomically: no temporary directory left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx", "o.onnx.data"]


def test_what_the_written_file_keeps(tmp_path):
    m = G.conv_bn_relu(15, seed=6)
    helper.set_model_props(m, {"author": "someone", "license": "MIT"})
    m.doc_string = "a model"
    m.graph.doc_string = "its graph"
    m.model_version = 7
    src = G.save(m, tmp_path / "m.onnx")
    dst = tmp_path / "o.onnx"
    assert run_cli("fold-bn", src, "-o", dst).code == 0
    o = onnx.load(str(dst))
    assert {p.key: p.value for p in o.metadata_props} == {"author": "someone", "license": "MIT"}
    assert (o.doc_string, o.graph.doc_string, o.model_version) == ("a model", "its graph", 7)
    assert (o.ir_version, o.opset_import[0].version, o.producer_name) == (m.ir_version, 15, "test-exporter")
    assert [i.name for i in o.graph.input] == ["x"] and [v.name for v in o.graph.output] == ["relu_out"]
    onnx.checker.check_model(o, full_check=True)


def test_input_shapes(tmp_path):
    src = G.save(G.weighted_fusion(), tmp_path / "m.onnx")
    r = run_cli("fold-fusion", src, "-o", tmp_path / "o.onnx", "-s", "1,4,8,8")
    assert r.code == 2 and "2 inputs (a, b)" in r.err
    r = run_cli("fold-fusion", src, "-o", tmp_path / "o.onnx", "-s", "1,4,8,8", "-s", "1,5,8,8")
    assert r.code == 2 and "does not fit input 'b'" in r.err
    r = run_cli("fold-fusion", src, "-o", tmp_path / "o.onnx", "-s", "3,4,8,8", "-s", "3,4,8,8", "--json")
    assert r.code == 0 and r.json()["inputs"] == [[3, 4, 8, 8], [3, 4, 8, 8]]
    r = run_cli("fold-fusion", src, "-o", tmp_path / "o.onnx", "--dtype", "float16")
    assert r.code == 2 and "declared float32" in r.err


def test_onnx_input_with_torch_output_is_bad_input(tmp_path):
    src = G.save(G.conv_bn_relu(), tmp_path / "m.onnx")
    for name in ("o.pt", "o.safetensors"):
        r = run_cli("fold-bn", src, "-o", tmp_path / name)
        assert r.code == 2 and "written as .onnx" in r.err
    assert files_in(tmp_path) == {"m.onnx"}


def test_in_place_and_human_report_via_console(tmp_path):
    src = G.save(G.caffe_chain(), tmp_path / "m.onnx")
    data = src.read_bytes()
    r = run_console("fold-bn", src, "--in-place")
    assert r.code == 0, r.err
    assert "nodes" in r.out and "fold-bn" in r.out and "wrote" in r.out and r.err == ""
    assert src.read_bytes() != data and G.ops(src) == ["Conv", "Relu"]


# -- regressions (QA pass on the ONNX back end) -----------------------------------------------------

def _sparse_model(coordinates: bool = False):
    """x + a sparse initializer (linearised indices, or [NNZ, rank] coordinates)."""
    from onnx import numpy_helper

    values = numpy_helper.from_array(np.array([2.0, 3.0, -1.0], np.float32), "sk")
    idx = np.array([[0, 1], [1, 0], [1, 3]], np.int64) if coordinates else np.array([1, 4, 7], np.int64)
    sp = helper.make_sparse_tensor(values, numpy_helper.from_array(idx, "sk_idx"), [2, 4])
    b = G.Builder(70)
    y = b.node("Add", ["x", "sk"], name="add")
    y = b.node("Relu", [y], name="relu")
    m = b.model([G.tensor("x", ["N", 2, 4])], [G.out(y, ["N", 2, 4])], 13)
    m.graph.sparse_initializer.append(sp)
    return m


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_initializers_are_densified(tmp_path, coordinates):
    src = tmp_path / "sparse.onnx"
    onnx.save(_sparse_model(coordinates), str(src))
    for command in (["fold-bn"], ["truncate", "--at", "add_out"]):
        dst = tmp_path / f"{command[0]}.onnx"
        r = run_cli(*command[:1], src, *command[1:], "-o", dst, "--json")
        assert r.code == 0, r.err
        assert r.json()["parity"]["passed"] and any("sparse initializer" in n for n in r.json()["notes"])
        m = onnx.load(str(dst))
        assert not m.graph.sparse_initializer and "sk" in {t.name for t in m.graph.initializer}
        onnx.checker.check_model(m, full_check=True)
    feeds = G.random_feeds(src)
    dense = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(tmp_path / "fold-bn.onnx")).graph.initializer))
    expected = np.zeros((2, 4), np.float32)
    expected[0, 1], expected[1, 0], expected[1, 3] = 2.0, 3.0, -1.0
    assert np.array_equal(dense, expected)
    (a,), (b_,) = G.ort_outputs(src, feeds), G.ort_outputs(tmp_path / "fold-bn.onnx", feeds)
    assert np.array_equal(a, b_)


def test_invalid_graph_is_one_clear_line_and_no_onnx_ir_log(tmp_path):
    m = G.conv_bn_relu()
    m.graph.node[1].input[0] = "missing_tensor"
    src = G.save(m, tmp_path / "dangling.onnx", check=False)
    r = run_console("fold-bn", src, "-o", tmp_path / "o.onnx", "-q")  # a subprocess: stderr exactly as a user sees it
    assert r.code == 2 and r.err.count("\n") == 1, r.err
    assert "the graph is not valid: node 'bn' reads 'missing_tensor', which no node, input or initializer produces" in r.err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("breakage,msg", [
    ("shadow", "node 'relu' writes 'bn_gamma_", ),
    ("duplicate", "tensor 'conv_out' is produced twice (by node 'conv' and node 'relu')"),
])
def test_invalid_ssa_says_what_is_wrong(tmp_path, breakage, msg):
    m = G.conv_bn_relu()
    relu = m.graph.node[2]
    if breakage == "shadow":
        relu.output[0] = next(t.name for t in m.graph.initializer if t.name.startswith("bn_gamma"))
    else:
        relu.output[0] = "conv_out"
    src = G.save(m, tmp_path / "bad.onnx", check=False)
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx")
    assert r.code == 2 and "the graph is not valid" in r.err and msg in r.err and r.err.count("\n") == 1, r.err
    assert "_deserialize_graph" not in r.err and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("kind", ["zip", "pickle"])
def test_pytorch_checkpoint_renamed_onnx(tmp_path, kind):
    import torch

    src = tmp_path / "model.onnx"
    torch.save({"w": torch.ones(3)}, str(src), _use_new_zipfile_serialization=kind == "zip")
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx")
    assert r.code == 2 and r.err.count("\n") == 1
    assert "model.onnx looks like a PyTorch checkpoint (zip/pickle), not ONNX" in r.err
