"""optimize: every exact pass in a sound order, repeated until nothing changes, verified once at
the end (or after each pass with --verify-each); .pt, .safetensors and .onnx outputs."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import modelsurgeon as ms
from conftest import EXAMPLES, ROOT, files_in, run_cli
from fusionmodels import ConvBN, darknet, darknet_mismatch, finish
from modelsurgeon import passes as registry
from modelsurgeon.capture import capture

TESTS = ROOT / "tests"
TORCH_PASSES = [p for p in registry.exact_passes() if registry.available(p, "torch")]


@pytest.fixture(scope="module")
def fusion_ckpt(tmp_path_factory):
    """A full pickled model: conv+BN+LeakyReLU branches, a per-channel softmax-weighted Darknet
    shortcut with channel-mismatched inputs (padded and sliced), one input also routed on."""
    d = tmp_path_factory.mktemp("fusion")
    model = darknet("per_channel", "softmax", 3, mismatch=True, shared_output=True)
    torch.save(model, d / "dk.pt")
    return d / "dk.pt"


def _optimize(*args):
    r = run_cli("optimize", *args, "--json")
    return r, (r.json() if r.out else None)


def test_optimize_runs_every_pass_until_nothing_changes(fusion_ckpt, tmp_path):
    out = tmp_path / "o.pt"
    r, rep = _optimize(fusion_ckpt, "--trust-pickle", "--code-path", TESTS, "-s", "1,3,16,16", "-o", out)
    assert r.code == 0, r.err
    assert [p["name"] for p in rep["passes"]] == TORCH_PASSES
    for name in registry.exact_passes():
        if name not in TORCH_PASSES:  # the ONNX graph clean-up is left out without a word
            said = f"{name} is not available for torch models: not run" in rep["notes"]
            assert said == (registry.REGISTRY[name].group != "cleanup")
    by_pass = {p["name"]: p for p in rep["passes"]}
    assert by_pass["fold-fusion"]["applied"] == 1 and by_pass["fold-bn"]["applied"] == 6
    targets = [(a["pass"], a["target"]) for a in rep["applied"]]
    assert len(targets) == len(set(targets)) == 7  # a later round repeats nothing
    assert rep["rounds"] == 2 and rep["skipped"] == []
    assert rep["parity"]["passed"] and rep["after"]["bn"] == 0 and rep["before"]["bn"] == 6
    assert rep["after"]["params"] < rep["before"]["params"] and rep["after"]["ops"] < rep["before"]["ops"]
    assert rep["before"]["flops"] > 0 and rep["after"]["modules"] > 0
    folded, original = torch.load(out, weights_only=False), torch.load(fusion_ckpt, weights_only=False)
    assert type(folded.layers[4]).__name__ == "ShortcutLayer"
    assert ms.compare(folded, original, (2, 3, 20, 28), trials=2).passed


def test_optimize_to_onnx(fusion_ckpt, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "o.onnx"
    r, rep = _optimize(fusion_ckpt, "--trust-pickle", "--code-path", TESTS, "--input-shape", "1,3,16,16", "-o", out)
    assert r.code == 0, r.err
    assert rep["written"] and any(o["name"].startswith("onnx:") for o in rep["parity"]["outputs"])
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and "Softmax" not in ops
    assert "Concat" in ops and "Slice" in ops  # the zero-padded input: added into the first channels
    x = torch.randn(1, 3, 16, 16)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = torch.load(fusion_ckpt, weights_only=False)(x).numpy()
    assert np.allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_passes_and_skip_choose_the_passes(fusion_ckpt, tmp_path):
    base = [fusion_ckpt, "--trust-pickle", "--code-path", TESTS, "-s", "1,3,16,16"]
    r, rep = _optimize(*base, "--passes", "fold-bn", "-o", tmp_path / "a.pt")
    assert r.code == 0, r.err
    assert [p["name"] for p in rep["passes"]] == ["fold-bn"] and rep["after"]["bn"] == 0
    untouched = torch.load(tmp_path / "a.pt", weights_only=False).layers[4]
    assert type(untouched).__name__ == "ShortcutLayer" and "forward" not in vars(untouched)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in untouched.modules())
    r, rep = _optimize(*base, "--skip", "fold-bn", "-o", tmp_path / "b.pt")
    assert r.code == 0, r.err
    assert "fold-bn" not in [p["name"] for p in rep["passes"]] and rep["after"]["bn"] == 6
    fused = torch.load(tmp_path / "b.pt", weights_only=False).layers[4]
    assert type(fused).__name__ == "ShortcutLayer" and isinstance(fused.fused, torch.fx.GraphModule)
    assert fused.forward.func is fused.fused and fused.forward.args == (fused,)
    for args, msg in ((["--passes", "fold-bogus"], "--passes"), (["--passes", "truncate"], "not an exact pass"),
                      (["--skip", ",".join(registry.exact_passes())], "no pass left")):
        r = run_cli("optimize", *base, *args, "-o", tmp_path / "c.pt")
        assert r.code == 2 and msg in r.err and r.err.count("\n") == 1
    assert not (tmp_path / "c.pt").exists()


def test_verify_each_names_the_pass_that_broke_parity(fusion_ckpt, tmp_path, monkeypatch):
    from modelsurgeon.match.absorb import Absorber

    base = [fusion_ckpt, "--trust-pickle", "--code-path", TESTS, "-s", "1,3,16,16", "-o", tmp_path / "o.pt"]
    r, rep = _optimize(*base, "--verify-each")
    assert r.code == 0 and rep["parity"]["passed"]
    (tmp_path / "o.pt").unlink()
    real = Absorber.apply

    def wrong(self, editor, scale, shift=None):
        real(self, editor, scale * 1.01, shift)  # a 1% error in every absorbed weight

    monkeypatch.setattr(Absorber, "apply", wrong)
    r, rep = _optimize(*base, "--verify-each")
    assert r.code == 1 and "parity failed after fold-fusion" in r.err
    assert rep["parity"]["passed"] is False
    r, _ = _optimize(*base)
    assert r.code == 1 and "parity failed" in r.err and "after fold-fusion" not in r.err
    assert files_in(tmp_path) == set()


def _stem_ops(model, shape):
    """The ops that read the model's input directly."""
    g, _, _ = capture(model, [torch.randn(shape)])
    return {e.name for e in g.events if g.inputs[0] in e.inputs}


@pytest.mark.parametrize("ext", ["pt", "onnx"])
def test_yolov5_detector_with_focus_stem(ckpts, tmp_path, ext):
    out = tmp_path / f"y.{ext}"
    r, rep = _optimize(ckpts / "yolov5s-focus.pt", "--trust-pickle", "--code-path", EXAMPLES / "yolo",
                       "-s", "1,3,64,64", "-o", out)
    assert r.code == 0, r.err
    assert rep["parity"]["passed"] and rep["after"]["bn"] == 0
    focus = registry.available("focus-to-conv", "torch")
    names = [p["name"] for p in rep["passes"]]
    assert ("focus-to-conv" in names) == focus
    if not focus:
        assert "focus-to-conv is not available for torch models: not run" in rep["notes"]
    if ext == "onnx":
        model = onnx.load(str(out))
        first = {n.op_type for n in model.graph.node if model.graph.input[0].name in n.input}
        assert first == ({"Conv"} if focus else {"Slice"})
        return
    ema = torch.load(out, weights_only=False)["ema"].float().eval()
    assert _stem_ops(ema, (1, 3, 64, 64)) == ({"conv2d"} if focus else {"Tensor.__getitem__"})
    assert (type(ema.model[0]).__name__ == "Focus") == (not focus)


def test_human_report_has_a_section_per_pass(fusion_ckpt, tmp_path):
    r = run_cli("optimize", fusion_ckpt, "--trust-pickle", "--code-path", TESTS, "-s", "1,3,16,16",
                "-o", tmp_path / "o.pt")
    assert r.code == 0, r.err
    assert "fold-fusion: 1 rewritten, 0 skipped" in r.out and "fold-bn: 6 rewritten, 0 skipped" in r.out
    assert "2 rounds until nothing changed" in r.out
    assert "parameters" in r.out and "FLOPs" in r.out and "Parity" in r.out


def test_state_dict_to_safetensors_rebuilds(tmp_path):
    src = tmp_path / "sd.pt"
    torch.save(darknet_mismatch().state_dict(), src)
    out = tmp_path / "o.safetensors"
    r, rep = _optimize(src, "--arch", "fusionmodels:darknet_mismatch", "--code-path", TESTS, "-s", "1,3,16,16", "-o", out)
    assert r.code == 0, r.err
    original = ms.load(src, arch="fusionmodels:darknet_mismatch")
    rebuilt = ms.load(out, arch="fusionmodels:darknet_mismatch")
    fused = rebuilt.layers[4]
    assert type(fused).__name__ == "ShortcutLayer" and fused.layers == [1, 2]
    assert isinstance(fused.fused, torch.fx.GraphModule) and fused.forward.func is fused.fused
    assert not any(isinstance(m, nn.BatchNorm2d) for m in rebuilt.modules())
    assert ms.compare(rebuilt, original, (1, 3, 20, 20), trials=2).passed
    # a deep copy (EMA, export) still runs through the host's class-name dispatch
    clone = copy.deepcopy(rebuilt)
    assert type(clone.layers[4]).__name__ == "ShortcutLayer"
    assert ms.compare(clone, original, (1, 3, 20, 20), trials=2).passed
    _, again = ms.optimize(clone, (1, 3, 16, 16))
    assert not again.applied and not again.skipped


def test_dry_run_writes_nothing(fusion_ckpt, tmp_path):
    r, rep = _optimize(fusion_ckpt, "--trust-pickle", "--code-path", TESTS, "-s", "1,3,16,16",
                       "-o", tmp_path / "o.pt", "--dry-run")
    assert r.code == 0 and rep["written"] is False and rep["rounds"] == 1
    assert len(rep["applied"]) == 7 and files_in(tmp_path) == set()


class Mixed(nn.Module):
    """Conv+BN branches, then an inline sum with weights computed from a parameter, in a forward
    that branches on data (its forward cannot be regenerated: skipped every round, it must be
    reported once)."""

    def __init__(self):
        super().__init__()
        self.a = ConvBN(3, 6, "none")
        self.b = ConvBN(3, 6, "none")
        self.w = nn.Parameter(torch.randn(2))

    def forward(self, x):
        if bool(x.abs().max() > 1e6):
            return x
        return torch.sigmoid(self.w[0]) * self.a(x) + torch.sigmoid(self.w[1]) * self.b(x)


def test_skipped_candidates_are_reported_once_over_rounds():
    model = finish(Mixed())
    original = copy.deepcopy(model)
    _, report = ms.optimize(model, (1, 3, 8, 8))
    assert report.extra["rounds"] == 2
    ff = next(p for p in report.passes if p.name == "fold-fusion")
    assert len(ff.skipped) == 2 and {s.target for s in ff.skipped} == {"the model: weighted sum"}
    assert report.after.bn == 0
    assert ms.compare(model, original, (2, 3, 8, 8)).passed
