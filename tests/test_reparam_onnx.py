"""reparam on ONNX: the training-form blocks of tests/reparam_models.py exported with their
branches (Conv → BatchNormalization, identity BatchNormalization, Add) are re-parameterised
natively -- one Conv per block, no BatchNormalization, no Add -- with parity in onnxruntime;
the zero-padding trap is skipped with its code."""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn

import modelsurgeon as ms
import reparam_models as R
from test_reparam import BLOCKS, MODELS, _built
from testmodels import randomize_all


def _export(model, shape, path, **kw):
    torch.onnx.export(model, (torch.randn(shape),), str(path), dynamo=False, opset_version=17,
                      do_constant_folding=False, **kw)
    return path


def _ops(path):
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return {o: ops.count(o) for o in set(ops)}


@pytest.mark.parametrize("name", [n for n in MODELS if n != "dbb"])
def test_exported_training_form_becomes_one_conv_per_block(name, tmp_path):
    model, shape = _built(name)
    blocks = sum(isinstance(m, BLOCKS)
                 for m in model.modules())
    src = _export(model, shape, tmp_path / "m.onnx")
    before = _ops(src)
    assert before["BatchNormalization"] >= blocks and before["Add"] >= blocks
    out = tmp_path / "o.onnx"
    report = ms.run("optimize", src, out, input_shape=shape)
    assert report.parity.passed
    rp = next(p for p in report.passes if p.name == "reparam")
    assert len(rp.applied) == blocks and not rp.skipped
    after = _ops(out)
    assert "BatchNormalization" not in after and "Add" not in after
    # each block one Conv (RepGhost keeps its primary conv beside it)
    assert after["Conv"] == before["Conv"] - sum(sum("Conv " in b for b in a.data["branches"]) - 1
                                                 for a in rp.applied)
    data = rp.applied[0].to_json()
    assert data["flops"][1] <= data["flops"][0] and data["params"][1] < data["params"][0]


def test_zero_padding_after_bn_is_skipped(tmp_path):
    torch.manual_seed(0)
    src = _export(randomize_all(R.PaddedSequence(3), 2).eval(), (1, 3, 8, 8), tmp_path / "m.onnx")
    report = ms.run("reparam", src, tmp_path / "o.onnx", input_shape=(1, 3, 8, 8))
    (rp,) = report.passes
    assert not rp.applied and [s.code for s in rp.skipped] == ["zero-padding-after-bn"]


def test_groups_mismatch_is_skipped_and_a_residual_is_no_candidate(tmp_path):
    from test_reparam import Branches

    torch.manual_seed(0)
    mixed = randomize_all(Branches(R.conv_bn(4, 4, 3, 1, 1, g=2), R.conv_bn(4, 4, 1, 1, 0)), 1).eval()
    report = ms.run("reparam", _export(mixed, (1, 4, 8, 8), tmp_path / "a.onnx"), tmp_path / "a2.onnx",
                    input_shape=(1, 4, 8, 8))
    assert [s.code for s in report.passes[0].skipped] == ["groups-mismatch"]

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return x + self.bn(self.conv(torch.relu(x)))

    report = ms.run("reparam", _export(randomize_all(Residual(), 2).eval(), (1, 4, 8, 8), tmp_path / "b.onnx"),
                    tmp_path / "b2.onnx", input_shape=(1, 4, 8, 8))
    assert not report.passes[0].applied and not report.passes[0].skipped
