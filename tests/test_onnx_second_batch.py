"""ONNX parity at a second batch size when the graph's batch dimension is symbolic."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import run_cli
from testmodels import randomize_all


class Net(nn.Module):
    def __init__(self, fixed_batch: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fixed_batch = fixed_batch

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y.reshape(1, 4 * 6 * 6) if self.fixed_batch else y.flatten(1)


def _export(model, path, dynamic: bool):
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)


def _refs(path):
    import onnx_ir as ir

    from modelsurgeon.verify.onnx import OnnxInputs, OnnxReferences

    spec = OnnxInputs.from_model(ir.load(str(path)))
    refs = OnnxReferences(spec, 2)
    refs.record(path)
    return refs


def test_symbolic_batch_is_checked_at_a_second_batch(tmp_path):
    src = tmp_path / "dyn.onnx"
    _export(randomize_all(Net(), 1).eval(), src, dynamic=True)
    refs = _refs(src)
    assert refs.grown == 1 and refs.outputs[0]["y"].shape[0] == 1 and refs.outputs[1]["y"].shape[0] == 2
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 0, r.err
    assert r.json()["after"]["bn"] == 0


def test_static_batch_and_a_model_that_cannot_grow_keep_one_batch(tmp_path):
    static = tmp_path / "static.onnx"
    _export(randomize_all(Net(), 2).eval(), static, dynamic=False)
    assert _refs(static).grown is None
    stuck = tmp_path / "stuck.onnx"  # declared symbolic, but a Reshape bakes batch 1 in
    _export(randomize_all(Net(fixed_batch=True), 3).eval(), stuck, dynamic=True)
    refs = _refs(stuck)
    assert refs.grown is None and refs.grown_error
    r = run_cli("fold-bn", stuck, "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 0, r.err
    assert any("does not run at inputs" in n for n in r.json()["notes"])


def test_a_result_with_its_batch_fixed_is_checked_at_the_example_batch(tmp_path):
    src = tmp_path / "dyn.onnx"
    _export(randomize_all(Net(), 4).eval(), src, dynamic=True)
    r = run_cli("optimize", src, "-s", "1,3,8,8", "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 0, r.err
    import onnx

    dims = onnx.load(str(tmp_path / "o.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1  # fixed by -s
