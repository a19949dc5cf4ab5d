"""fold-bn on PyTorch models: every BN-like layout folds exactly; the rest is skipped with a reason.

BatchNorm statistics and affine parameters are randomised in every test (default BN hides bugs),
and parity is re-checked here independently of the pass's own verification, on fresh inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import modelsurgeon as ms
from testmodels import (
    ControlFlow, NoRunningStats, OneD, SharedBN, SharedConv, ThreeD, TwoConsumers, WeightStandardised,
    Zoo, InlineScale, randomize_all,
)
from zoo import randomize
from zoo.caffe import caffenet
from zoo.mobilenetv2 import mobilenet_v2
from zoo.resnet import resnet


def _fold(model, shape, seed=0):
    randomize_all(model, seed)
    model.eval()
    original = copy.deepcopy(model)
    _, report = ms.fold_bn(model, shape)
    independent = ms.compare(model, original, shape, trials=3, seed=123)
    assert independent.passed, independent.outputs
    assert report.parity.passed
    return report, original


@pytest.mark.parametrize("build,shape,folds", [
    (lambda: resnet(), (1, 3, 64, 64), 20),
    (lambda: mobilenet_v2(), (1, 3, 64, 64), 52),
    (lambda: caffenet(), (1, 3, 32, 32), 3),
    (lambda: caffenet(caffe_bn=True), (1, 3, 32, 32), 3),
    (Zoo, (2, 3, 16, 16), 6),
    (OneD, (2, 4, 32), 2),
    (ThreeD, (1, 2, 8, 8, 8), 2),
    (ControlFlow, (2, 3, 16, 16), 2),
])
def test_folds_every_batchnorm(build, shape, folds):
    report, _ = _fold(build(), shape)
    assert len(report.applied) == folds
    assert report.after.bn == 0
    assert not report.skipped


def test_kinds_of_norm_layers_and_their_rewrites():
    m = Zoo()
    report, _ = _fold(m, (2, 3, 16, 16))
    by_target = {a.target: a for a in report.applied}
    # timm-style BN+activation: the activation is kept, the BN is gone
    assert isinstance(m.stem_bn, nn.Sequential) and isinstance(m.stem_bn[1], nn.SiLU)
    assert by_target["stem"].data["bias_added"] is True and m.stem.bias is not None
    # buffers-only frozen BN and a custom scale layer are recognised by probing
    assert isinstance(m.dw_bn, nn.Identity)
    assert "probed" in by_target["dw"].detail
    assert isinstance(m.grouped_bn, nn.Identity) and isinstance(m.grouped_scale, nn.Identity)
    # transposed grouped conv and Linear + BatchNorm1d
    assert isinstance(m.up_bn, nn.Identity) and isinstance(m.fc_bn, nn.Identity)


def test_caffe_batchnorm_with_moving_average_factor():
    m = caffenet(caffe_bn=True)
    for mod in m.modules():
        if type(mod).__name__ == "CaffeBatchNorm":
            assert float(mod.factor) != 1.0
    report, _ = _fold(m, (1, 3, 32, 32))
    assert all("CaffeBatchNorm" in a.detail and "Scale" in a.detail for a in report.applied)


def _small_var_resnet():
    m = randomize(resnet(), 5)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_var.uniform_(1e-4, 1e-3)  # small variances make eps matter
                mod.eps = 1e-3
    return m.eval()


def test_eps_is_the_models_own():
    m = _small_var_resnet()
    original = copy.deepcopy(m)
    ms.fold_bn(m, (1, 3, 32, 32))
    assert ms.compare(m, original, (1, 3, 32, 32), trials=2).passed


def test_wrong_eps_is_caught_by_parity_and_nothing_is_kept(monkeypatch):
    """A fold computed with the wrong eps (the Caffe trap) must fail verification."""
    from modelsurgeon.match import affine

    real = affine.batch_norm_args

    def wrong_eps(ev):
        a = real(ev)
        a["eps"] = 1e-5
        return a

    monkeypatch.setattr(affine, "batch_norm_args", wrong_eps)
    with pytest.raises(ms.ParityError) as e:
        ms.fold_bn(_small_var_resnet(), (1, 3, 32, 32))
    assert not e.value.report.parity.passed


def test_inline_parameters_are_folded_and_neutralised():
    m = InlineScale()
    with torch.no_grad():
        m.gamma.uniform_(0.5, 2)
        m.beta.normal_()
    report, _ = _fold(m, (1, 3, 8, 8))
    assert len(report.applied) == 1
    assert torch.all(m.gamma == 1) and torch.all(m.beta == 0)


@pytest.mark.parametrize("build,shape,code", [
    (SharedConv, (1, 4, 8, 8), "shared-module"),
    (SharedBN, (1, 3, 8, 8), "shared-module"),
    (TwoConsumers, (1, 3, 8, 8), "other-readers"),
    (WeightStandardised, (1, 3, 8, 8), "computed-tensor"),
    (NoRunningStats, (2, 3, 8, 8), "training-mode"),
])
def test_unfoldable_patterns_are_skipped_with_reason(build, shape, code):
    m = build()
    report, original = _fold(m, shape)
    assert report.skipped, "expected a skipped match"
    assert any(s.code == code for s in report.skipped), [(s.code, s.reason) for s in report.skipped]


def test_bn_after_activation_is_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(torch.relu(self.c(x)))

    report, _ = _fold(M(), (1, 3, 8, 8))
    assert not report.applied
    assert report.skipped[0].code == "not-foldable"


def test_fp16_weights_are_folded_in_float64_and_stored_in_fp16():
    m = randomize(resnet(), 2).eval().half()
    ref32 = copy.deepcopy(m).float()
    _, report = ms.fold_bn(m, (1, 3, 32, 32))
    assert next(m.parameters()).dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in m.parameters())
    res = ms.compare(m.float(), ref32, (1, 3, 32, 32), rtol=1e-2)
    assert res.passed and report.parity.rtol == 1e-2


def test_training_flags_restored():
    m = randomize(resnet(), 2).train()
    ms.fold_bn(m, (1, 3, 32, 32))
    assert m.training and m.layer1.training
