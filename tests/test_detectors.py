"""Detectors with their post-processing in the model's forward (torchvision-style): the passes
must not crash on it, and parity must not raise false alarms on its tie-breaking."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from detectors import tiny_detector


@pytest.fixture()
def detector_pt(tmp_path):
    def make(half: bool = False, seed: int = 5):
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


# -- post-processed outputs and --verify-at ---------------------------------------------------------

def _fold(src, tmp_path, *args):
    dst = tmp_path / "out.pt"
    r = run_cli("fold-bn", src, "--trust-pickle", "-s", "1,3,64,64", "-o", dst, "--json", *args)
    return r, dst


def test_tie_breaking_in_post_processing_fails_today_and_is_reported(tmp_path, detector_pt):
    """Stored in fp16: the exact fold moves the head's outputs by fp16 rounding (well within
    tolerance), and top-k / NMS then pick other boxes: refused, with the reason and the module
    to compare instead."""
    r, dst = _fold(detector_pt(half=True), tmp_path)
    assert r.code == 1 and not dst.exists()
    rep = r.json()
    assert rep["error"]["code"] == "parity-failed"
    assert {"out[0]['boxes']", "out[0]['labels']"} <= set(rep["post_processed"])
    assert rep["suggest_verify_at"] == "head"
    assert "--verify-at head" in r.err


def test_verify_at_head_passes_the_exact_fold(tmp_path, detector_pt):
    src = detector_pt(half=True)
    r, dst = _fold(src, tmp_path, "--verify-at", "head")
    assert r.code == 0, r.err
    outs = {o["name"]: o for o in r.json()["parity"]["outputs"]}
    assert outs["at:head:out[0][0]"]["passed"] and outs["at:head:out[0][1]"]["passed"]
    excused = [n for n, o in outs.items() if o.get("excused")]
    assert excused and all(not n.startswith("at:") for n in excused)
    assert all(o["passed"] for o in outs.values())
    model = torch.load(dst, weights_only=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_verify_at_does_not_pass_a_wrong_fold(tmp_path, detector_pt, monkeypatch):
    import modelsurgeon.passes.fold_bn.torch as fb

    real = fb.fold_bias
    monkeypatch.setattr(fb, "fold_bias", lambda b, s, t: real(b, s, t) + 0.05)
    r, dst = _fold(detector_pt(half=True), tmp_path, "--verify-at", "head")
    assert r.code == 1 and not dst.exists()
    outs = {o["name"]: o for o in r.json()["parity"]["outputs"]}
    assert not outs["at:head:out[0][0]"]["passed"]
    assert not any(o.get("excused") for o in outs.values())


def test_a_rewrite_after_the_verified_module_is_not_excused(tmp_path, monkeypatch):
    """--verify-at backbone while a (wrong) fold happens in the head, after it: the backbone's
    outputs match, but they do not stand between that rewrite and the outputs."""
    import modelsurgeon.passes.fold_bn.torch as fb

    real = fb.fold_bias

    def wrong_in_head(bias, scale, shift):
        out = real(bias, scale, shift)
        return out + 0.5 if out.numel() == 12 else out  # the head's cls conv: 3 anchors x 4 classes

    monkeypatch.setattr(fb, "fold_bias", wrong_in_head)
    src = tmp_path / "det.pt"
    torch.save(tiny_detector(1, half=True, head_norm=True), src)
    r, dst = _fold(src, tmp_path, "--verify-at", "backbone")
    assert r.code == 1 and not dst.exists()
    outs = {o["name"]: o for o in r.json()["parity"]["outputs"]}
    assert outs["at:backbone:out[0]"]["passed"]
    assert not any(o.get("excused") for o in outs.values())
    assert any("not excused" in n for n in r.json()["notes"])


@pytest.mark.parametrize("target", ["no.such.module", "unused"])
def test_verify_at_a_module_that_is_not_there_or_never_runs(tmp_path, detector_pt, target):
    src = detector_pt()
    model = torch.load(src, weights_only=False)
    model.unused = torch.nn.Conv2d(1, 1, 1)  # registered, never called
    torch.save(model, src)
    r, dst = _fold(src, tmp_path, "--verify-at", target)
    assert r.code == 2 and r.json()["error"]["code"] == "verify-at" and not dst.exists()


def test_empty_results_are_said_to_prove_nothing(tmp_path):
    src = tmp_path / "det.pt"
    torch.save(tiny_detector(1, score_thresh=1.5), src)  # no score can pass: every result is empty
    r, dst = _fold(src, tmp_path)
    assert r.code == 0, r.err
    assert any("out[0]['boxes']" in w and "--verify-at" in w for w in r.json()["warnings"])


# -- ONNX: --verify-at TENSOR -----------------------------------------------------------------------

def _topk_graph(seed: int = 0):
    """fp16 conv -> BN -> ReLU -> head conv -> Sigmoid -> flatten -> TopK (values, int64 indices):
    folding the BN rounds the conv to fp16 and TopK's ties come out in another order."""
    import numpy as np
    from onnx import TensorProto

    from onnx_graphs import Builder, out, tensor

    b = Builder(seed=seed, dtype=np.float16)
    y = b.node("Relu", [b.bn(b.conv("x", 3, 16, name="conv0"), 16, name="bn0")], name="relu0")
    s = b.node("Sigmoid", [b.conv(y, 16, 8, name="head")], name="scores")
    f = b.node("Reshape", [s, b.const(np.array([1, -1], np.int64), "flat")], name="flatten")
    v, i = b.node("TopK", [f, b.const(np.array([200], np.int64), "k")], n_out=2, name="topk")
    return b.model([tensor("x", [1, 3, 16, 16], TensorProto.FLOAT16)],
                   [out(v, [1, 200], TensorProto.FLOAT16), out(i, [1, 200], TensorProto.INT64)], opset=13)


def _onnx_fold(tmp_path, *args):
    from onnx_graphs import save

    src = save(_topk_graph(), tmp_path / "topk.onnx")
    dst = tmp_path / "out.onnx"
    return run_cli("fold-bn", src, "-o", dst, "--json", *args), dst


def test_onnx_topk_ties_are_reported(tmp_path):
    r, dst = _onnx_fold(tmp_path)
    assert r.code == 1 and not dst.exists()
    rep = r.json()
    assert "topk_out1" in rep["post_processed"] and rep["suggest_verify_at"]


def test_onnx_verify_at_a_tensor_after_the_rewrite(tmp_path):
    r, dst = _onnx_fold(tmp_path, "--verify-at", "relu0_out")
    assert r.code == 0, r.err
    outs = {o["name"]: o for o in r.json()["parity"]["outputs"]}
    assert outs["at:relu0_out"]["passed"]
    assert dst.exists()


@pytest.mark.parametrize("tensor,exit_code", [("x", 1), ("no_such_tensor", 2)])
def test_onnx_verify_at_cannot_vouch_for_what_it_does_not_separate(tmp_path, tensor, exit_code):
    """The graph input lies before the fold: its values match trivially and prove nothing."""
    r, dst = _onnx_fold(tmp_path, "--verify-at", tensor)
    assert r.code == exit_code and not dst.exists()
    assert not any(o.get("excused") for o in r.json().get("parity", {}).get("outputs", []))
