"""fold-bn on norms written the way timm writes them (``tests/timm_norms.py``): the frozen
BN+activation, a BatchNorm before a Linear / unpadded conv, a BatchNorm after a mixed conv."""

from __future__ import annotations

import pytest
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


# -- a BatchNorm before a Linear / conv: folded forward into it ------------------------------------

def test_norm_linear_heads_are_folded_into_their_linear():
    from timm_norms import NormLinearNet

    model = randomize(NormLinearNet(), 5)
    out, r = _fold(model, (3, 3, 16, 16))
    assert not r.skipped
    assert sorted(a.target for a in r.applied) == ["head.linear", "head_dist.linear"]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in out.modules())
    assert r.applied[0].data["folded"][0]["direction"] == "forward"


@pytest.mark.parametrize("groups,bias", [(1, True), (2, False), (2, True)])
def test_batchnorm_before_an_unpadded_conv_is_folded_into_it(groups, bias):
    from timm_norms import BnThenConv

    model = randomize(BnThenConv(groups=groups, bias=bias), 6)
    out, r = _fold(model, (2, 3, 8, 8))
    assert [a.target for a in r.applied] == ["conv"] and not r.skipped
    assert isinstance(out.bn, nn.Identity) or not hasattr(out, "bn")
    assert out.conv.bias is not None


def test_batchnorm_before_a_padded_conv_is_refused_with_its_code():
    from timm_norms import BnThenConv

    model = randomize(BnThenConv(padding=1, k=3), 7)
    out, r = _fold(model, (2, 3, 8, 8))
    assert not r.applied and [s.code for s in r.skipped] == ["padding"]
    assert isinstance(out.bn, nn.BatchNorm2d)


def test_batchnorm_with_zero_shift_folds_into_a_padded_conv():
    from timm_norms import BnThenConv

    model = randomize(BnThenConv(padding=1, k=3), 8)
    with torch.no_grad():
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
    out, r = _fold(model, (2, 3, 8, 8))
    assert [a.target for a in r.applied] == ["conv"] and not r.skipped


def test_a_layer_folded_from_both_sides():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv = nn.Conv2d(8, 6, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn2(self.conv(self.bn1(torch.relu(self.stem(x)))))

    model = randomize(Both(), 9)
    out, r = _fold(model, (2, 3, 8, 8))
    assert sorted(a.target for a in r.applied) == ["conv", "conv"] and not r.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())


def test_batchnorm_before_a_hooked_layer_is_refused():
    from timm_norms import NormLinearNet

    model = randomize(NormLinearNet(), 10)
    model.head.linear.register_forward_pre_hook(lambda mod, args: None)
    out, r = _fold(model, (3, 3, 16, 16))
    assert [a.target for a in r.applied] == ["head_dist.linear"]
    assert [(s.target, s.code) for s in r.skipped] == [("head.bn", "hook")]
    assert isinstance(out.head.bn, nn.BatchNorm1d)


# -- a BatchNorm after a concatenation of convs: split into them -----------------------------------

@pytest.mark.parametrize("depthwise", [False, True])
def test_batchnorm_after_mixed_conv_is_split_into_its_convs(depthwise):
    from timm_norms import MixedBlock

    model = randomize(MixedBlock(depthwise), 11)
    out, r = _fold(model, (2, 3, 12, 12))
    assert not r.skipped and len(r.applied) == 1
    assert r.applied[0].target == "conv_dw.0 + conv_dw.1 + conv_dw.2"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert all(c.bias is not None for c in out.conv_dw.values())


def test_mixed_conv_whose_conv_output_is_read_elsewhere_is_refused():
    from timm_norms import MixedConv2d

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = MixedConv2d(6, 6, kernels=(3, 5))
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            xs = torch.split(x, self.mixed.splits, 1)
            a, b = self.mixed["0"](xs[0]), self.mixed["1"](xs[1])
            return self.bn(torch.cat([a, b], 1)), a

    model = randomize(Leaky(), 12)
    out, r = _fold(model, (2, 6, 8, 8))
    assert not r.applied and [(s.target, s.code) for s in r.skipped] == [("bn", "other-readers")]
    assert isinstance(out.bn, nn.BatchNorm2d)


def test_concatenation_with_a_non_conv_part_is_not_split():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(7)

        def forward(self, x):
            return self.bn(torch.cat([self.conv(x), x], 1))

    model = randomize(Mixed(), 13)
    out, r = _fold(model, (2, 3, 8, 8))
    assert not r.applied and [s.target for s in r.skipped] == ["bn"]
    assert isinstance(out.bn, nn.BatchNorm2d)


# -- ONNX: Flatten / Reshape between a MatMul and its BatchNormalization ----------------------------

def _export(model, shape, path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*shape),), str(path), dynamo=False, do_constant_folding=False,
                          opset_version=17)
    return path


def test_onnx_levit_blocks_fold_through_their_reshapes(tmp_path):
    import numpy as np
    import onnxruntime as ort
    from conftest import run_cli
    from levit import levitish

    model = levitish(4)
    src = _export(model, (1, 3, 32, 32), tmp_path / "levit.onnx")
    r = run_cli("fold-bn", src, "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    # the blocks' Linear -> Flatten -> BatchNorm1d -> Reshape fold; the heads' BN-before-Linear stay
    assert rep["before"]["bn"] == 12 and rep["after"]["bn"] == 2
    assert all(s["code"] == "not-foldable" and "/head" in s["target"] for s in rep["skipped"])
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x})[0], ref, rtol=1e-4, atol=1e-5)


def test_onnx_reshape_that_moves_channels_is_not_looked_through(tmp_path):
    from conftest import run_cli
    from test_missed_folds import MovesChannels, SplitsChannels
    from testmodels import randomize_all

    for i, (cls, shape) in enumerate([(SplitsChannels, (2, 5, 8)), (MovesChannels, (3, 3, 2, 2))]):
        src = _export(randomize_all(cls(), 1).eval(), shape, tmp_path / f"m{i}.onnx")
        r = run_cli("fold-bn", src, "-o", tmp_path / f"o{i}.onnx", "--json")
        assert r.code == 0, r.err
        rep = r.json()
        assert not rep["applied"] and rep["after"]["bn"] == 1


# -- an .onnx output runs no host code: nothing is left to the host's fuse() ------------------------

def test_onnx_output_folds_the_norms_a_host_fuse_would_read(tmp_path):
    import onnx
    import ultralike
    from conftest import run_cli

    src = tmp_path / "m.pt"
    torch.save(ultralike.randomized(3), src)
    tests = str(__import__("pathlib").Path(__file__).parent)
    common = ["--trust-pickle", "--code-path", tests, "-s", "1,3,64,64", "--json"]
    pt = run_cli("fold-bn", src, *common, "-o", tmp_path / "o.pt")
    assert pt.code == 0, pt.err
    assert any(s["code"] == "host-reads" for s in pt.json()["skipped"])  # left to RepConv's own fuse
    r = run_cli("fold-bn", src, *common, "-o", tmp_path / "o.onnx")
    assert r.code == 0, r.err
    rep = r.json()
    assert not any(s["code"] == "host-reads" for s in rep["skipped"])
    assert rep["parity"]["passed"]
    graph = onnx.load(str(tmp_path / "o.onnx")).graph
    assert sum(n.op_type == "BatchNormalization" for n in graph.node) == rep["after"]["bn"]
    assert rep["after"]["bn"] < pt.json()["after"]["bn"]


def test_shared_batchnorm_before_a_linear_is_refused():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Linear(6, 8)
            self.bn = nn.BatchNorm1d(8)
            self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            y = torch.relu(self.stem(x))
            return self.a(self.bn(y)) + self.b(self.bn(-y))

    model = randomize(Shared(), 14)
    out, r = _fold(model, (4, 6))
    assert not r.applied and {s.code for s in r.skipped} == {"shared-module"}
    assert isinstance(out.bn, nn.BatchNorm1d)


def test_onnx_flatten_with_symbolic_leading_sizes_is_looked_through(tmp_path):
    import warnings

    import numpy as np
    import onnxruntime as ort
    from conftest import run_cli
    from levit import LinearNorm

    model = randomize(LinearNorm(6, 8), 15)
    src = tmp_path / "ln.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 6),), str(src), dynamo=False, do_constant_folding=False,
                          opset_version=17, input_names=["x"], dynamic_axes={"x": {0: "B", 1: "N"}})
    r = run_cli("fold-bn", src, "-s", "2,5,6", "-o", tmp_path / "o.onnx", "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert len(rep["applied"]) == 1 and rep["after"]["bn"] == 0 and not rep["skipped"]
    x = np.random.default_rng(1).standard_normal((3, 7, 6)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-5)
