"""The shared weight maths of space-to-depth + conv == strided conv, for every channel order."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modelsurgeon.rewrite.space_to_depth import (
    focus_phases, merge_weight, onnx_space_to_depth_phases, pixel_unshuffle_phases,
)


def _slices(x, order):
    return torch.cat([x[..., dy::2, dx::2] for dy, dx in order], 1)


@pytest.mark.parametrize("k,s,p", [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2), (5, 2, 2)])
@pytest.mark.parametrize("order", [((0, 0), (1, 0), (0, 1), (1, 1)), ((1, 1), (0, 0), (1, 0), (0, 1))])
def test_focus_any_phase_order(k, s, p, order):
    g = torch.Generator().manual_seed(k * 10 + s)
    x = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    ref = F.conv2d(_slices(x, order), w, b, s, p)
    w2 = merge_weight(w, focus_phases(3, order), 2)
    assert w2.shape == (5, 3, 2 * k, 2 * k)
    assert torch.allclose(F.conv2d(x, w2, b, 2 * s, 2 * p), ref, atol=1e-12)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_pixel_unshuffle_and_onnx_order(r):
    g = torch.Generator().manual_seed(r)
    x = torch.randn(1, 2, 8 * r, 4 * r, generator=g, dtype=torch.float64)
    w = torch.randn(4, 2 * r * r, 3, 3, generator=g, dtype=torch.float64)
    ref = F.conv2d(F.pixel_unshuffle(x, r), w, None, 1, 1)
    assert torch.allclose(F.conv2d(x, merge_weight(w, pixel_unshuffle_phases(2, r), r), None, r, r), ref, atol=1e-12)
    # ONNX SpaceToDepth: blocks first
    s2d = x.reshape(1, 2, 8, r, 4, r).permute(0, 3, 5, 1, 2, 4).reshape(1, 2 * r * r, 8, 4)
    ref2 = F.conv2d(s2d, w, None, 1, 1)
    assert torch.allclose(F.conv2d(x, merge_weight(w, onnx_space_to_depth_phases(2, r), r), None, r, r), ref2, atol=1e-12)


def test_bad_phase_lists_are_rejected():
    w = torch.zeros(1, 8, 1, 1)
    with pytest.raises(ValueError):
        merge_weight(w, focus_phases(2)[:-1] + [focus_phases(2)[0]], 2)
    with pytest.raises(ValueError):
        merge_weight(w, focus_phases(3), 2)


@pytest.mark.parametrize("kind,shape,groups", [
    ("conv", (6, 3, 3, 3), 1), ("linear", (7, 5), 1), ("conv_transpose", (6, 2, 3, 3), 3),
    ("conv_transpose", (4, 5, 2), 1),
])
def test_streamed_in_place_scaling_matches_direct(kind, shape, groups, monkeypatch):
    """Block-wise in-place scaling equals the whole-tensor float64 computation."""
    from modelsurgeon.rewrite import affine

    monkeypatch.setattr(affine, "BLOCK_ELEMENTS", 7)  # force many small blocks
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    out_channels = shape[1] * groups if kind == "conv_transpose" else shape[0]
    s = torch.rand(out_channels, generator=g, dtype=torch.float64) + 0.5
    expected = affine.scale_output_channels(w, s, kind, groups)  # float64
    if kind == "conv_transpose":  # independent reference: scale the output-channel axis directly
        cin_g = shape[0] // groups
        ref = w.double().clone()
        for i in range(shape[0]):
            ref[i] *= s.view(groups, shape[1])[i // cin_g].view(-1, *([1] * (len(shape) - 2)))
    else:
        ref = w.double() * s.view(-1, *([1] * (len(shape) - 1)))
    assert torch.allclose(expected, ref, rtol=0, atol=1e-12)
    affine.scale_output_channels_(w, s, kind, groups)
    assert torch.equal(w, ref.float())
