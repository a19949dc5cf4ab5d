"""Detectors with their post-processing in the model's forward (torchvision-style): the passes
must not crash on it, and parity must not raise false alarms on its tie-breaking."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from detectors import tiny_detector


@pytest.fixture()
def detector_pt(tmp_path):
    def make(half: bool = False, seed: int = 1):
        p = tmp_path / f"det-{seed}{'-fp16' if half else ''}.pt"
        torch.save(tiny_detector(seed, half=half), p)
        return p

    return make


@pytest.mark.parametrize("command", ["fold-fusion", "optimize", "fold-bn"])
def test_detector_tail_with_a_vector_times_a_0d_tensor(tmp_path, detector_pt, command):
    """``resize_boxes`` multiplies 1-D box coordinates by 0-d ratio tensors: fold-fusion's
    inline-weight matcher used to index a channel axis the vector does not have (exit 3)."""
    src = detector_pt()
    dst = tmp_path / "out.pt"
    r = run_cli(command, src, "--trust-pickle", "-s", "1,3,64,64", "-o", dst, "--json")
    assert r.code == 0, r.err
    assert dst.exists()
    model = torch.load(dst, weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) or command == "fold-fusion"


def test_vector_times_scalar_is_no_channel_affine():
    from modelsurgeon.capture import capture
    from modelsurgeon.match.affine import MUL, elementwise_affine

    class Tail(torch.nn.Module):
        def forward(self, boxes):
            ratio = torch.tensor(96.0) / torch.tensor(64.0)
            x0, y0, x1, y1 = boxes.unbind(1)
            return torch.stack((x0 * ratio, y0, x1 * ratio, y1), 1)

    g, _, _ = capture(Tail(), [torch.rand(7, 4)])
    muls = [e for e in g.events if e.name in MUL]
    assert len(muls) == 2
    for ev in muls:
        x = next(i for i in ev.inputs if not g.value(i).const)
        assert elementwise_affine(g, ev, x, 1) is None
