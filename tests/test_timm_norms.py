"""fold-bn on norms written the way timm writes them (``tests/timm_norms.py``): the frozen
BN+activation, a BatchNorm before a Linear / unpadded conv, a BatchNorm after a mixed conv."""

from __future__ import annotations

import torch
import torch.nn as nn

import modelsurgeon as ms
from timm_norms import FrozenBatchNormAct2d, FrozenNet, randomize


def _fold(model, shape, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
    out, r = ms.fold_bn(model, input_shape=shape)
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-4, atol=1e-5)
    return out, r


def test_frozen_batchnorm_act_folds_and_keeps_its_activation():
    model = randomize(FrozenNet(), 3)
    out, r = _fold(model, (2, 3, 16, 16))
    assert not r.skipped
    assert sorted(a.target for a in r.applied) == ["a.conv", "b.conv"]
    assert not any(isinstance(m, FrozenBatchNormAct2d) for m in out.modules())
    assert isinstance(out.a.bn1, nn.Sequential) and isinstance(out.a.bn1[-1], nn.SiLU)
    assert out.a.conv.bias is not None


def test_frozen_batchnorm_act_with_a_second_reader_is_refused():
    class TwoReaders(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = FrozenBatchNormAct2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    model = randomize(TwoReaders(), 4)
    out, r = _fold(model, (1, 3, 8, 8))
    assert not r.applied
    assert [s.code for s in r.skipped] == ["other-readers"]
    assert isinstance(out.bn, FrozenBatchNormAct2d)
