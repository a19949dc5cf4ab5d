"""``modelsurgeon compare A B``: parity of any two models, and where they first diverge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import modelsurgeon as ms
from conftest import run_cli
from testmodels import randomize_all, seeded_resnet

SHAPE = (1, 3, 32, 32)
S = ",".join(map(str, SHAPE))
OUTPUT_KEYS = {"name", "name_b", "max_abs", "max_rel", "mean_abs", "median_abs", "p99_abs", "mean_rel", "median_rel",
               "p99_rel", "cosine", "min_atol", "min_rtol", "passed"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A small ResNet (random BatchNorm statistics and affine) as .pt and its ONNX export."""
    d = tmp_path_factory.mktemp("cmp")
    m = seeded_resnet(3)
    pt, onnx_path = d / "net.pt", d / "net.onnx"
    torch.save(m, pt)
    ms.save(m, onnx_path, SHAPE)
    return d, pt, onnx_path


def test_checkpoint_vs_its_onnx_export_passes_with_the_documented_schema(pair):
    _d, pt, onnx_path = pair
    r = run_cli("compare", pt, onnx_path, "--trust-pickle", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    assert doc["passed"] is True and doc["error"] is None and doc["first_divergence"] is None
    assert {"passed", "a", "b", "inputs", "trials", "atol", "rtol", "outputs", "first_divergence", "notes"} <= set(doc)
    assert "layers" not in doc
    assert doc["inputs"] == [{"name": "input", "shape": list(SHAPE), "dtype": "float32"}]
    (out,) = doc["outputs"]
    assert OUTPUT_KEYS <= set(out)
    assert out["passed"] and out["max_abs"] >= out["p99_abs"] >= out["median_abs"] >= 0
    assert out["cosine"] > 0.999999 and out["max_rel"] < 1e-4
    assert doc["trials"] == 2


def test_the_table_without_json(pair):
    _d, pt, onnx_path = pair
    r = run_cli("compare", pt, onnx_path, "--trust-pickle")
    assert r.code == 0 and "cosine" in r.out


def _perturb_middle_conv(src, dst):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    node = convs[len(convs) // 2]
    init = next(i for i in m.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init).copy()
    w.flat[::7] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(m, str(dst))
    return node


def test_a_perturbed_conv_fails_and_is_named_on_both_sides(pair, tmp_path):
    _d, pt, onnx_path = pair
    bad = tmp_path / "bad.onnx"
    node = _perturb_middle_conv(onnx_path, bad)
    r = run_cli("compare", pt, bad, "--trust-pickle", "--layers", "--json")
    assert r.code == 1, r.err
    doc = r.json()
    assert doc["passed"] is False and doc["error"] is None
    fd = doc["first_divergence"]
    module = ".".join(node.name.strip("/").split("/")[1:-1])  # /layer2/layer2.0/conv1/Conv -> layer2.0.conv1
    assert fd["a"] == module
    assert fd["b"] == node.output[0]
    assert fd["max_abs"] > 0
    layers = doc["layers"]
    i = next(k for k, l in enumerate(layers) if l["a"] == fd["a"])
    assert all(l["passed"] is not False for l in layers[:i])  # every layer before it agrees
    # ONNX against ONNX: by tensor name
    r = run_cli("compare", onnx_path, bad, "--layers", "--json")
    assert r.code == 1
    assert r.json()["first_divergence"]["a"] == node.output[0] == r.json()["first_divergence"]["b"]


def test_a_checkpoint_vs_its_optimized_output_pairs_folded_layers(pair, tmp_path):
    _d, pt, onnx_path = pair
    out = tmp_path / "opt.pt"
    assert run_cli("optimize", pt, "--trust-pickle", "-s", S, "-o", out).code == 0
    r = run_cli("compare", pt, out, "--trust-pickle", "--layers", "--json")
    assert r.code == 0, r.err
    doc = r.json()
    layers = doc["layers"]
    assert layers and all(l["passed"] is not False for l in layers)
    folded = [l for l in layers if l.get("a_output", "").endswith("bn1")]
    assert folded and all(l["a"].endswith("conv1") for l in folded)
    # and the optimized ONNX graph against the original graph
    oo = tmp_path / "opt.onnx"
    assert run_cli("optimize", onnx_path, "-o", oo).code == 0
    r = run_cli("compare", onnx_path, oo, "--layers", "--json")
    assert r.code == 0, r.err
    assert all(l["passed"] is not False for l in r.json()["layers"])


def test_fp16_copy_passes_with_fp16_defaults_and_fails_at_fp32_tolerances(pair, tmp_path):
    _d, pt, _onnx = pair
    half = tmp_path / "half.pt"
    torch.save(seeded_resnet(3).half(), half)
    r = run_cli("compare", pt, half, "--trust-pickle", "--json")
    assert r.code == 0, r.err
    assert r.json()["rtol"] == pytest.approx(1e-2)
    assert r.json()["outputs"][0]["max_rel"] > 1e-4
    r = run_cli("compare", pt, half, "--trust-pickle", "--rtol", "1e-4", "--atol", "1e-6", "--json")
    assert r.code == 1
    out = r.json()["outputs"][0]
    assert not out["passed"] and out["min_rtol"] > 1e-4


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, y.mean()


def test_mismatched_models_exit_2(pair, tmp_path):
    _d, pt, onnx_path = pair
    two = tmp_path / "two.onnx"
    ms.save(randomize_all(TwoHeads(), 1).eval(), two, SHAPE)
    r = run_cli("compare", onnx_path, two, "--json")
    assert r.code == 2 and r.json()["error"]["code"] == "output-mismatch"
    assert "two.onnx" in r.err and "net.onnx" in r.err  # both sides' signatures
    r = run_cli("compare", pt, tmp_path / "missing.onnx", "--trust-pickle", "--json")
    assert r.code == 2 and r.json()["error"]["code"] == "not-found"
    # a model of two inputs against one of one
    class Add(nn.Module):
        def forward(self, a, b):
            return a + b

    add = tmp_path / "add.onnx"
    ms.save(Add(), add, [SHAPE, SHAPE])
    r = run_cli("compare", onnx_path, add, "--json")
    assert r.code == 2 and r.json()["error"]["code"] == "input-mismatch"


def test_real_inputs_and_saved_inputs_and_outputs(pair, tmp_path):
    _d, pt, onnx_path = pair
    x = np.random.default_rng(0).standard_normal((2, *SHAPE[1:])).astype(np.float32)  # two samples
    data = tmp_path / "x.npz"
    np.savez(data, input=x[:1])
    saved_in, saved_out = tmp_path / "in.npz", tmp_path / "out.npz"
    r = run_cli("compare", pt, onnx_path, "--trust-pickle", "--inputs", data, "--save-inputs", saved_in,
                "--save-outputs", saved_out, "--json")
    assert r.code == 0, r.err
    assert r.json()["inputs"][0]["shape"] == list(SHAPE) and r.json()["trials"] == 1
    np.testing.assert_array_equal(np.load(saved_in)["input"], x[:1])
    outs = np.load(saved_out)
    m = seeded_resnet(3)
    with torch.no_grad():
        ref = m(torch.from_numpy(x[:1])).numpy()
    np.testing.assert_allclose(outs["a:out"], ref, rtol=1e-5, atol=1e-6)
    assert {k.split(":")[0] for k in outs.files} == {"a", "b"}
    # several sets, written as NAME@T, read back
    sets = tmp_path / "sets.npz"
    np.savez(sets, **{"input@0": x[:1], "input@1": x[1:]})
    r = run_cli("compare", pt, onnx_path, "--trust-pickle", "--inputs", sets, "--json")
    assert r.code == 0 and r.json()["trials"] == 2
    bad = tmp_path / "bad.npz"
    np.savez(bad, a=x, b=x)
    assert run_cli("compare", onnx_path, onnx_path, "--inputs", bad).code == 2


def test_seeded_inputs_are_saved_and_replayed(pair, tmp_path):
    _d, pt, onnx_path = pair
    saved, o1, o2 = tmp_path / "in.npz", tmp_path / "o1.npz", tmp_path / "o2.npz"
    assert run_cli("compare", pt, onnx_path, "--trust-pickle", "--trials", "3", "--save-inputs", saved,
                   "--save-outputs", o1).code == 0
    assert sorted(np.load(saved).files) == ["input@0", "input@1", "input@2"]
    assert run_cli("compare", pt, onnx_path, "--trust-pickle", "--inputs", saved, "--save-outputs", o2).code == 0
    a, b = np.load(o1), np.load(o2)
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])


def test_darknet_against_its_onnx(tmp_path):
    import native_models as M

    _cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=8)
    out = tmp_path / "v3.onnx"
    assert run_cli("optimize", weights, "-o", out).code == 0
    r = run_cli("compare", weights, out, "--layers", "--json")
    assert r.code == 0, r.err
    assert len(r.json()["outputs"]) >= 1


def test_api_compare_on_files_and_modules(pair):
    _d, pt, onnx_path = pair
    c = ms.compare(onnx_path, pt, trust_pickle=True, layers=True)
    assert c.passed and c.layers and c.first_divergence is None
    assert c.to_json()["outputs"][0]["cosine"] > 0.999999
    a, b = seeded_resnet(3), seeded_resnet(3)
    with torch.no_grad():
        b.layer3[0].conv2.weight.add_(0.3)
    c = ms.compare(b, a, SHAPE, layers=True)
    assert not c.passed and c.first_divergence.a == "layer3.0.conv2"
    x = torch.randn(*SHAPE)
    assert ms.compare(a, seeded_resnet(3), inputs=[x]).passed


def test_state_dict_side_with_its_factory(pair, tmp_path):
    _d, pt, _onnx = pair
    st = tmp_path / "net.safetensors"
    ms.save(seeded_resnet(3), st)
    r = run_cli("compare", pt, st, "--trust-pickle", "--arch-b", "zoo.resnet:resnet", "-s", S, "--layers", "--json")
    assert r.code == 0, r.err
    assert r.json()["first_divergence"] is None and r.json()["outputs"][0]["max_abs"] == 0
    assert run_cli("compare", pt, st, "--trust-pickle", "--json").json()["error"]["code"] == "needs-arch"
