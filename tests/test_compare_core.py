"""The verification core: one comparison with its statistics, one seeded generator, runners,
layer pairing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from modelsurgeon.verify.compare import STAT_KEYS, Tolerance, compare_arrays, summarise
from modelsurgeon.verify.layers import Point, pair, scope_path
from testmodels import randomize_all


def test_statistics_of_one_comparison():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(10_000)
    err = rng.standard_normal(10_000) * 1e-3
    d = compare_arrays("y", ref, ref + err, Tolerance(atol=1e-6, rtol=1e-4))
    a, scale = np.abs(err), np.abs(ref).max()
    s = d.stats
    assert set(STAT_KEYS) <= set(s)
    assert d.max_abs == pytest.approx(a.max()) and d.max_rel == pytest.approx(a.max() / scale)
    assert s["mean_abs"] == pytest.approx(a.mean()) and s["median_abs"] == pytest.approx(np.median(a))
    assert s["p99_abs"] == pytest.approx(np.percentile(a, 99)) and s["p99_rel"] == pytest.approx(s["p99_abs"] / scale)
    cos = ref @ (ref + err) / np.linalg.norm(ref) / np.linalg.norm(ref + err)
    assert s["cosine"] == pytest.approx(cos)
    assert not d.passed
    # the smallest tolerances that pass do pass, and anything smaller does not
    assert compare_arrays("y", ref, ref + err, Tolerance(atol=s["min_atol"] * (1 + 1e-9), rtol=1e-4)).passed
    assert not compare_arrays("y", ref, ref + err, Tolerance(atol=s["min_atol"] * 0.999, rtol=1e-4)).passed
    assert compare_arrays("y", ref, ref + err, Tolerance(atol=1e-6, rtol=s["min_rtol"] * (1 + 1e-9))).passed
    assert not compare_arrays("y", ref, ref + err, Tolerance(atol=1e-6, rtol=s["min_rtol"] * 0.999)).passed


def test_mismatches_are_failures_with_both_shapes():
    d = compare_arrays("y", np.zeros((2, 3)), np.zeros((3, 2)), Tolerance(1e-6, 1e-4))
    assert not d.passed and d.stats["shape"] == [3, 2] and d.stats["ref_shape"] == [2, 3]
    d = compare_arrays("y", np.array([1.0, np.nan]), np.array([1.0, 2.0]), Tolerance(1e-6, 1e-4))
    assert not d.passed
    d = compare_arrays("y", np.arange(4), np.arange(4), Tolerance(1e-6, 1e-4))
    assert d.passed and d.stats["mean_abs"] == 0


def test_summarise_keeps_the_worst_statistics():
    tol = Tolerance(1e-6, 1e-4)
    ref = np.linspace(-1, 1, 100)
    small = compare_arrays("y", ref, ref + 1e-7, tol)
    big = compare_arrays("y", ref, -ref, tol)
    (w,) = summarise([[small], [big]], tol).outputs
    assert not w.passed and w.stats["cosine"] == pytest.approx(-1.0) and w.stats["mean_abs"] == big.stats["mean_abs"]
    assert "mean_abs" in summarise([[small]], tol).to_json()["outputs"][0]


def test_one_generator_for_both_back_ends():
    from modelsurgeon.verify.inputs import InputSpec
    from modelsurgeon.verify.onnx import OnnxInputs

    spec = InputSpec([(2, 3, 4, 4)], "float32", seed=7)
    onnx_spec = OnnxInputs(names=["x"], shapes=[(2, 3, 4, 4)], dtypes=[np.dtype("float32")], seed=7)
    for t in range(3):
        np.testing.assert_array_equal(spec.make(t)[0].numpy(), onnx_spec.make(t)["x"])
    assert not np.array_equal(spec.make(0)[0].numpy(), spec.make(1)[0].numpy())


def test_exporter_scopes_read_as_module_paths():
    mods = {"layer1", "layer1.0", "layer1.0.conv1", "layer1.0.relu", "backbone", "backbone.layer3",
            "backbone.layer3.1", "backbone.layer3.1.conv1", "model", "model.0", "model.0.conv"}
    assert scope_path("/layer1/layer1.0/conv1/Conv", mods) == "layer1.0.conv1"
    assert scope_path("/backbone/layer3/layer3.1/conv1/Conv", mods) == "backbone.layer3.1.conv1"
    assert scope_path("/model.0/conv/Conv", mods) == "model.0.conv"
    assert scope_path("/layer1/layer1.0/relu_1/Relu", mods) == "layer1.0.relu"
    assert scope_path("/Add", mods) is None and scope_path("/nowhere/Conv", mods) is None


def test_a_layer_one_side_lacks_extends_the_pair_before_it():
    tol = Tolerance(1e-6, 1e-4)
    x = np.arange(6.0)
    conv, bn, act = x, 2 * x + 1, np.maximum(2 * x + 1, 3)
    a = [Point("conv", "conv", conv), Point("bn", "bn", bn), Point("act", "act", act)]
    b = [Point("conv", "conv", bn), Point("act", "act", act)]  # bn folded into conv
    pairs = pair(a, b, tol)
    assert [(p.a, p.a_output, p.b, p.passed) for p in pairs] == [("conv", "bn", "conv", True), ("act", None, "act", True)]
    # the other way round too (the side with more layers is walked)
    pairs = pair(b, a, tol)
    assert [(p.a, p.b, p.b_output, p.passed) for p in pairs] == [("conv", "conv", "bn", True), ("act", "act", None, True)]
    # a real divergence is the first failing pair
    b[1] = Point("act", "act", act + 1)
    pairs = pair(a, b, tol)
    assert [p.passed for p in pairs] == [True, False]


def test_torch_runner_names_outputs_and_records_layers():
    from modelsurgeon.verify.runners import TorchRunner

    m = randomize_all(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), 4).eval()
    r = TorchRunner(m)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, layers = r.run([x], layers=True)
    assert list(out) == ["out"] and list(layers) == ["0", "1", "2"]
    with torch.no_grad():
        np.testing.assert_array_equal(out["out"], m(torch.from_numpy(x)).numpy())
    assert r.calls == {"0": 1, "1": 1, "2": 1}
