"""The re-parameterisation maths (modelsurgeon.rewrite.kernels), in float64 against the
branches run one by one: any kernel shape (1×k / k×1), groups, dilation (mixed: one dense
kernel), identity and average pooling, 1×1 → k×k sequences padded with the bias, and the
refusals (stride, centres)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelsurgeon.rewrite import kernels as K


def _rand(o, i, k, groups=1, stride=(1, 1), padding=(0, 0), dilation=(1, 1), gen=None):
    w = torch.randn(o, i // groups, *k, dtype=torch.float64, generator=gen)
    return K.ConvMap(w, torch.randn(o, dtype=torch.float64, generator=gen), stride, padding, dilation, groups)


def _run(m, x):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


@pytest.mark.parametrize("seed", range(6))
def test_merge_equals_the_sum_of_branches(seed):
    g = torch.Generator().manual_seed(seed)
    c, groups = 4, [1, 2, 4][seed % 3]
    s = (1, 1) if seed % 2 else (2, 2)
    d = 1 + seed % 2
    branches = [
        _rand(c, c, (3, 3), groups, s, (d, d), (d, d), g),  # centred k×k (dilated)
        _rand(c, c, (1, 1), groups, s, (0, 0), (1, 1), g),  # 1×1
        _rand(c, c, (3, 1), groups, s, (d, 0), (d, 1), g),  # k×1
        _rand(c, c, (1, 3), groups, s, (0, 1), (1, 1), g),  # 1×k, undilated: mixed dilation when d = 2
        K.avg_pool(c, (3, 3), s, (1, 1)) if d == 1 else _rand(c, c, (5, 5), groups, s, (4, 4), (2, 2), g),
    ]
    if s == (1, 1):
        branches.append(K.then_affine(K.identity(c, groups), torch.rand(c, dtype=torch.float64, generator=g),
                                      torch.randn(c, dtype=torch.float64, generator=g)))
    merged = K.merge(branches)
    x = torch.randn(2, c, 9, 11, dtype=torch.float64, generator=g)
    want = sum(_run(b, x) for b in branches)
    assert torch.allclose(_run(merged, x), want, atol=1e-10)
    assert merged.groups == groups


def test_sequence_is_exact_when_padded_with_the_bias():
    g = torch.Generator().manual_seed(0)
    first = _rand(6, 4, (1, 1), 2, gen=g)
    second = _rand(6, 6, (3, 3), 2, padding=(1, 1), gen=g)
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64, generator=g)
    y = F.pad(_run(first, x), [1, 1, 1, 1])
    y[:, :, [0, -1], :] = first.bias.view(1, -1, 1, 1)
    y[:, :, :, [0, -1]] = first.bias.view(1, -1, 1, 1)
    want = F.conv2d(y, second.weight, second.bias, groups=2)
    merged = K.compose(first, second)
    assert merged.groups == 2 and torch.allclose(_run(merged, x), want, atol=1e-10)
    k_then_1 = K.compose(second, _rand(3, 6, (1, 1), gen=g))
    assert k_then_1.kernel == (3, 3) and k_then_1.groups == 1


@pytest.mark.parametrize("other, why", [
    (_rand(4, 4, (1, 1), stride=(2, 2)), "stride"),
    (_rand(4, 4, (3, 3), padding=(0, 0)), "centres"),
    (_rand(4, 4, (2, 2), padding=(1, 1)), "centres"),
])
def test_what_cannot_be_one_conv_is_refused(other, why):
    with pytest.raises(ValueError, match=why):
        K.merge([_rand(4, 4, (3, 3), padding=(1, 1)), other])
