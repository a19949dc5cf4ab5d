"""focus-to-conv: space-to-depth stems + conv become one strided conv, exactly, and stay trainable.

BatchNorm statistics and affine parameters are randomised in every model, and parity is
re-checked here on fresh inputs, independently of the pass's own verification.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modelsurgeon as ms
from conftest import EXAMPLES, run_cli
from models.common import Conv, Focus
from models.yolo import Model
from s2dlayers import Contract, layered
from testmodels import randomize_all

YOLO = ("--trust-pickle", "--code-path", EXAMPLES / "yolo")


def _run(model, shape, seed=0, **options):
    """focus-to-conv in place; returns (report, original). Parity re-checked on fresh inputs."""
    randomize_all(model, seed)
    model.eval()
    original = copy.deepcopy(model)
    _, report = ms.focus_to_conv(model, shape, **options)
    assert report.parity.passed
    independent = ms.compare(model, original, shape, trials=3, seed=123)
    assert independent.passed, independent.outputs
    return report, original


class Net(nn.Module):
    """A stem followed by a head conv, as in a detector."""

    def __init__(self, stem, c=8):
        super().__init__()
        self.stem = stem
        self.head = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.stem(x)))


# -- YOLOv5 Focus ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("s", [1, 2])
def test_yolov5_focus(k, s):
    m = Net(Focus(3, 8, k, s))
    old = m.stem.conv.conv.weight.detach().clone()
    report, _ = _run(m, (2, 3, 32, 32), seed=k + s)
    (a,) = report.applied
    p = k // 2
    assert a.target == "stem" and a.detail.startswith(f"Focus(k{k} s{s} p{p}) → Conv2d(k{2 * k} s{2 * s} p{2 * p})")
    assert a.data["old"] == {"kernel": [k, k], "stride": [s, s], "padding": [p, p]}
    assert a.data["new"] == {"kernel": [2 * k, 2 * k], "stride": [2 * s, 2 * s], "padding": [2 * p, 2 * p]}
    assert a.data["phase_order"] == [[0, 0], [1, 0], [0, 1], [1, 1]] and a.data["r"] == 2
    # the model's own block replaces the Focus, with its BN and activation kept
    assert type(m.stem) is Conv and isinstance(m.stem.bn, nn.BatchNorm2d) and isinstance(m.stem.act, nn.SiLU)
    conv = m.stem.conv
    assert type(conv) is nn.Conv2d and conv.weight.shape == (8, 3, 2 * k, 2 * k)
    assert conv.stride == (2 * s, 2 * s) and conv.padding == (2 * p, 2 * p) and conv.bias is None
    # weights placed by phase exactly as YOLOv5 v6 did it by hand (ultralytics/yolov5#4825)
    w = conv.weight.detach()
    assert torch.equal(w[:, :, ::2, ::2], old[:, :3]) and torch.equal(w[:, :, 1::2, ::2], old[:, 3:6])
    assert torch.equal(w[:, :, ::2, 1::2], old[:, 6:9]) and torch.equal(w[:, :, 1::2, 1::2], old[:, 9:12])
    assert report.after.ops < report.before.ops


class InlineStem(nn.Module):
    """Focus written inline, in another phase order, with every index spelling (``:``,
    ``slice(None)``, ``...``, two-step slicing), conv + BN + activation as children."""

    ORDER = [(1, 1), (0, 1), (0, 0), (1, 0)]

    def __init__(self, k=3, padding=1):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, k, 1, padding)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x):
        y = torch.cat([x[:, :, 1::2, 1::2], x[slice(None), slice(None), 0::2, 1::2],
                       x[..., ::2, :][..., ::2], x[:, :, 1::2][:, :, :, ::2]], dim=-3)
        return self.act(self.bn(self.conv(y)))


@pytest.mark.parametrize("k,padding", [(3, 1), ((3, 1), (1, 0)), (3, "same")])
def test_inline_slicing_in_another_phase_order(k, padding):
    m = Net(InlineStem(k, padding))
    bn, act = m.stem.bn, m.stem.act
    report, _ = _run(m, (2, 3, 16, 24))
    (a,) = report.applied
    assert a.data["phase_order"] == [list(p) for p in InlineStem.ORDER]
    assert a.data["layout"] == "phase-major"
    kh, kw = (k, k) if isinstance(k, int) else k
    assert isinstance(m.stem, nn.Sequential) and m.stem[1] is bn and m.stem[2] is act
    assert m.stem[0].weight.shape == (8, 3, 2 * kh, 2 * kw) and m.stem[0].bias is not None


def test_generalised_focus_with_3x3_phases():
    class Focus3(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(27, 6, 3, 1, 1)

        def forward(self, x):
            return self.conv(torch.cat([x[..., dy::3, dx::3] for dx in (2, 0, 1) for dy in (1, 2, 0)], 1))

    m = Net(Focus3(), c=6)
    report, _ = _run(m, (1, 3, 18, 12))
    (a,) = report.applied
    assert a.data["r"] == 3 and a.data["new"]["kernel"] == [9, 9] and a.data["new"]["stride"] == [3, 3]
    assert type(m.stem) is nn.Conv2d


# -- pixel_unshuffle and probed space-to-depth modules -----------------------------------------


@pytest.mark.parametrize("r", [2, 4])
def test_pixel_unshuffle_module_in_sequential(r):
    m = Net(nn.Sequential(nn.PixelUnshuffle(r), nn.Conv2d(3 * r * r, 8, 3, 1, 1, bias=False),
                          nn.BatchNorm2d(8), nn.ReLU()))
    report, _ = _run(m, (2, 3, 8 * r, 4 * r), seed=r)
    (a,) = report.applied
    assert a.data["space_to_depth"] == "pixel_unshuffle" and a.data["layout"] == "channel-major"
    assert a.data["new"] == {"kernel": [3 * r, 3 * r], "stride": [r, r], "padding": [r, r]}
    assert [type(c) for c in m.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert not any(isinstance(x, nn.PixelUnshuffle) for x in m.modules())


@pytest.mark.parametrize("r", [2, 4])
def test_functional_pixel_unshuffle(r):
    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3 * r * r, 8, 1)

        def forward(self, x):
            return self.conv(F.pixel_unshuffle(x, r))

    m = Net(Stem())
    report, _ = _run(m, (1, 3, 4 * r, 4 * r))
    assert report.applied[0].detail.startswith(f"Stem(pixel_unshuffle {r}, k1 s1 p0) → Conv2d(k{r} s{r} p0)")
    assert type(m.stem) is nn.Conv2d


def test_rearranging_module_is_probed_for_its_channel_order():
    m = Net(nn.Sequential(Contract(2), Conv(12, 8, 3, 1)))
    report, _ = _run(m, (2, 3, 16, 16))
    (a,) = report.applied
    assert a.data["space_to_depth"] == "probe" and a.data["phase_order"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert type(m.stem) is Conv and m.stem.conv.kernel_size == (6, 6)


# -- YOLO layer lists and checkpoints ----------------------------------------------------------


def test_focus_in_yolo_layer_list_keeps_routing_attributes():
    m = Model(nc=3, width=0.25, focus=True)
    np_before = m.model[0].np
    report, _ = _run(m, (1, 3, 64, 64))
    (a,) = report.applied
    assert a.target == "model.0" and a.data["replaced_by"] == "Conv"
    stem = m.model[0]
    assert type(stem) is Conv and stem.conv.kernel_size == (6, 6)
    assert (stem.i, stem.f, stem.type, stem.np) == (0, -1, "models.common.Focus", np_before)
    assert sum(p.numel() for p in stem.parameters()) == np_before
    assert sorted(a.data["carried"]) == ["f", "i", "np", "type"]


def test_half_checkpoint_model_and_ema(ckpts, tmp_path):
    out = tmp_path / "v6stem.pt"
    r = run_cli("focus-to-conv", ckpts / "yolov5s-focus.pt", *YOLO, "-s", "1,3,64,64", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert {(a["slot"], a["target"]) for a in rep["applied"]} == {("model", "model.0"), ("ema", "model.0")}
    assert rep["parity"]["passed"] and rep["written"]
    src = torch.load(ckpts / "yolov5s-focus.pt", weights_only=False)
    ck = torch.load(out, weights_only=False)
    assert set(ck) == set(src)
    assert ck["epoch"] == src["epoch"] and ck["opt"] == src["opt"]
    for slot in ("model", "ema"):
        old_w = src[slot].model[0].conv.conv.weight
        stem = ck[slot].model[0]
        assert type(stem).__name__ == "Conv" and stem.type == "models.common.Focus" and stem.i == 0
        w = stem.conv.weight
        assert w.dtype == torch.float16 and w.shape == (16, 3, 6, 6)
        assert torch.equal(w[:, :, 1::2, ::2], old_w[:, 3:6])  # fp16 values moved, not recomputed
        assert next(ck[slot].parameters()).dtype == torch.float16
        assert not any(type(x).__module__.startswith("modelsurgeon") for x in ck[slot].modules())
        assert ms.compare(ck[slot].float(), src[slot].float(), (1, 3, 64, 64), trials=2, rtol=1e-3).passed


def test_state_dict_with_arch_rebuilds_the_new_structure(tmp_path):
    m = randomize_all(Model(nc=3, width=0.25, focus=True), 5).eval()
    src, out = tmp_path / "sd.pt", tmp_path / "sd-v6.pt"
    torch.save(m.state_dict(), src)
    r = run_cli("focus-to-conv", src, "--arch", "models.yolo:Model", "--code-path", EXAMPLES / "yolo",
                "-s", "1,3,64,64", "-o", out, "-q")
    assert r.code == 0, r.err
    rebuilt = ms.load(out, arch="models.yolo:Model")
    stem = rebuilt.model[0]
    assert type(stem).__name__ == "Conv" and stem.conv.weight.shape == (16, 3, 6, 6)
    assert (stem.i, stem.f, stem.type) == (0, -1, "models.common.Focus")
    assert ms.compare(rebuilt, m, (1, 3, 64, 64), trials=2).passed


def pixel_unshuffle_net() -> nn.Module:
    """Factory for --arch: a pixel_unshuffle stem in a Sequential (replaced by a new Sequential)."""
    torch.manual_seed(0)
    return Net(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU()))


def test_recipe_rebuilds_a_new_sequential_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    m = randomize_all(pixel_unshuffle_net(), 2).eval()
    src, out = tmp_path / "pu.safetensors", tmp_path / "pu-conv.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(src))
    r = run_cli("focus-to-conv", src, "--arch", "test_focus_to_conv:pixel_unshuffle_net", "-s", "1,3,16,16",
                "-o", out, "-q")
    assert r.code == 0, r.err
    rebuilt = ms.load(out, arch="test_focus_to_conv:pixel_unshuffle_net")  # + the recipe in the file
    assert [type(c) for c in rebuilt.stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert rebuilt.stem[0].weight.shape == (8, 3, 6, 6)
    assert ms.compare(rebuilt, m, (1, 3, 16, 16), trials=2).passed


def test_onnx_output_has_a_plain_conv_stem(ckpts, tmp_path):
    out = tmp_path / "v6stem.onnx"
    r = run_cli("focus-to-conv", ckpts / "yolov5s-focus.pt", *YOLO, "-s", "1,3,64,64", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["parity"]["passed"]
    assert any(o["name"].startswith("onnx:") and o["passed"] for o in rep["parity"]["outputs"])
    g = onnx.load(str(out)).graph
    producers = {o: n for n in g.node for o in n.output}
    stem = next(n for n in g.node if n.op_type == "Conv")
    assert stem.input[0] == g.input[0].name  # nothing between the image and the stem conv
    reads_input = [n.op_type for n in g.node if g.input[0].name in n.input]
    assert reads_input == ["Conv"]
    assert not {"SpaceToDepth", "Gather"} & {n.op_type for n in g.node}
    weight = next(i for i in g.initializer if i.name == stem.input[1])
    assert list(weight.dims) == [16, 3, 6, 6] and producers.get(stem.input[0]) is None


# -- gradients ---------------------------------------------------------------------------------


def test_gradients_of_the_new_conv_are_the_mapped_gradients():
    """The seed article's check, in training mode: same loss, gradients placed by phase."""
    torch.manual_seed(0)
    focus = randomize_all(Focus(3, 16, k=3), 1).train()
    original = copy.deepcopy(focus)
    m = Net(focus, c=16)
    ref = Net(original, c=16)
    ref.head.load_state_dict(m.head.state_dict())
    ms.focus_to_conv(m, (2, 3, 32, 32))
    assert all(mod.training for mod in m.modules())  # training flags restored, the new conv's too
    ref.train()
    x = torch.randn(4, 3, 32, 32)
    label = torch.randn(4, 4, 16, 16)
    for net in (m, ref):
        net.zero_grad()
        F.mse_loss(net(x), label).backward()
    g_old = ref.stem.conv.conv.weight.grad
    expected = torch.zeros(16, 3, 6, 6)
    expected[:, :, ::2, ::2] = g_old[:, :3]
    expected[:, :, 1::2, ::2] = g_old[:, 3:6]
    expected[:, :, ::2, 1::2] = g_old[:, 6:9]
    expected[:, :, 1::2, 1::2] = g_old[:, 9:12]
    g_new = m.stem.conv.weight.grad
    assert torch.allclose(g_new, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    assert torch.allclose(m.stem.bn.weight.grad, ref.stem.conv.bn.weight.grad, rtol=1e-4, atol=1e-7)


def test_check_grad_option_reports_each_stem():
    m = Net(nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(12, 8, 3, 1, 1), nn.BatchNorm2d(8)))
    report, _ = _run(m, (2, 3, 16, 16), check_grad=True)
    (a,) = report.applied
    assert a.data["grad_check"]["passed"] and "gradients equal" in a.detail
    names = [o.name for o in report.parity.outputs]
    assert {"grad stem input", "grad stem weight", "grad stem bias"} <= set(names)


class TwoStreams(nn.Module):
    """Two inputs, two stems; the second stem sits behind another layer."""

    def __init__(self):
        super().__init__()
        self.a = Focus(3, 8, 3)
        self.pre = nn.Conv2d(2, 2, 1)
        self.b = nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8))

    def forward(self, x, y):
        return self.a(x).mean((2, 3)) + self.b(self.pre(y)).mean((2, 3))


def test_check_grad_on_several_stems_and_inputs():
    m = TwoStreams()
    report, _ = _run(m, [(2, 3, 16, 16), (2, 2, 16, 16)], check_grad=True)
    assert {a.target for a in report.applied} == {"a", "b"}
    assert all(a.data["grad_check"]["passed"] for a in report.applied)
    assert {o.name for o in report.parity.outputs} >= {"grad a weight", "grad b weight", "grad b input"}


def test_wrong_gradient_mapping_fails_check_grad(ckpts, tmp_path, monkeypatch):
    """A wrong weight placement would still be caught: here the mapping of gradients is broken
    on purpose, and --check-grad must fail the run (exit 1, nothing written)."""
    from modelsurgeon.passes.focus_to_conv import measure as pass_module

    real = pass_module.map_gradient
    monkeypatch.setattr(pass_module, "map_gradient", lambda g, s: real(g, s).flip(-1))
    out = tmp_path / "bad.pt"
    r = run_cli("focus-to-conv", ckpts / "yolov5s-focus.pt", *YOLO, "-s", "1,3,64,64", "-o", out, "--check-grad")
    assert r.code == 1, r.err
    assert "parity failed" in r.err and "grad model.0 weight" in r.err
    assert not out.exists()


def test_bench_reports_stem_latency():
    m = Net(Focus(3, 8, 3))
    report, _ = _run(m, (1, 3, 32, 32), bench=True)
    (a,) = report.applied
    b = a.data["bench"]
    assert b["before_ms"] > 0 and b["after_ms"] > 0 and b["input"] == [1, 3, 32, 32]
    assert "stem CPU" in a.detail


# -- errors and what cannot be rewritten -------------------------------------------------------


def test_odd_input_size_is_a_clear_error_and_nothing_is_written(ckpts, tmp_path):
    out = tmp_path / "odd.pt"
    r = run_cli("focus-to-conv", ckpts / "yolov5s-focus.pt", *YOLO, "-s", "1,3,63,64", "-o", out)
    assert r.code == 2
    assert r.err.startswith("modelsurgeon: error: the model cannot run on inputs 1,3,63,64")
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1
    assert not out.exists()


class HostDoesMore(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, 1, 1)
        self.skip = nn.Conv2d(3, 8, 2, 2)

    def forward(self, x):
        y = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.conv(y) + self.skip(x)


class SliceReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, 1, 1)

    def forward(self, x):
        a = x[..., ::2, ::2]
        y = torch.cat([a, x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return self.conv(y) + a.mean()


class TwoReaders(nn.Module):
    def __init__(self):
        super().__init__()
        self.pu = nn.PixelUnshuffle(2)
        self.conv = nn.Conv2d(12, 8, 3, 1, 1)
        self.other = nn.Conv2d(12, 8, 1)

    def forward(self, x):
        y = self.pu(x)
        return self.conv(y) + self.other(y)


class MissingPhase(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, 1, 1)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., ::2, ::2]], 1))


class SharedStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Focus(3, 8, 3)

    def forward(self, x):
        return self.stem(x) + self.stem(x.flip(-1))


def _seq(conv):
    return Net(nn.Sequential(nn.PixelUnshuffle(2), conv))


@pytest.mark.parametrize("build,code", [
    (lambda: Net(Focus(3, 8, 3, g=2)), "layer-settings"),  # groups=2
    (lambda: _seq(nn.Conv2d(12, 8, 3, 1, 2, dilation=2)), "layer-settings"),
    (lambda: _seq(nn.Conv2d(12, 8, 3, 1, 1, padding_mode="reflect")), "layer-settings"),
    (lambda: Net(HostDoesMore()), "inline"),
    (lambda: Net(SliceReadTwice()), "other-readers"),
    (lambda: Net(TwoReaders()), "other-readers"),
    (lambda: Net(MissingPhase()), "not-a-pattern"),
    (lambda: Net(nn.Sequential(nn.PixelUnshuffle(2), nn.ReLU(), nn.Conv2d(12, 8, 1))), "not-a-pattern"),
    (SharedStem, "shared-module"),
    (lambda: Focus(3, 8, 3), "inline"),  # the stem is the model's whole forward
])
def test_not_rewritable_is_skipped_with_reason(build, code):
    m = build()
    report, original = _run(m, (1, 3, 16, 16))
    assert not report.applied
    assert any(s.code == code for s in report.skipped), [(s.code, s.reason) for s in report.skipped]
    assert str(m) == str(original)


def test_stem_input_with_other_readers_is_still_rewritten():
    class Model2(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = Focus(3, 8, 3)
            self.skip = nn.Conv2d(3, 8, 2, 2)

        def forward(self, x):
            return self.stem(x) + self.skip(x)

    report, _ = _run(Model2(), (1, 3, 16, 16))
    assert len(report.applied) == 1 and not report.skipped


def test_optimize_converts_the_stem_then_folds_its_batchnorm():
    m = Net(Focus(3, 8, 3))
    randomize_all(m, 9).eval()
    original = copy.deepcopy(m)
    _, report = ms.optimize(m, (1, 3, 32, 32), passes=["focus-to-conv", "fold-bn"])
    assert [a.pass_name for a in report.applied] == ["focus-to-conv", "fold-bn"]
    # the folded BN removed as YOLOv5's fuse() removes it: the stem Conv runs its forward_fuse
    assert not hasattr(m.stem, "bn") and m.stem.forward.__func__ is type(m.stem).forward_fuse
    assert m.stem.conv.bias is not None
    assert ms.compare(m, original, (1, 3, 32, 32), trials=2).passed


# -- regressions: rewrites that held at the verified shape only (QA focus pass) ----------------


def _same_at(model, original, shapes, rtol=1e-4):
    """The rewritten model matches the original on fresh inputs of each shape."""
    g = torch.Generator().manual_seed(7)
    for shape in shapes:
        x = torch.randn(shape, generator=g) * 2 + 0.5
        with torch.no_grad():
            want, got = original(x), model(x)
        assert got.shape == want.shape, (shape, got.shape, want.shape)
        assert float((got - want).abs().max()) <= rtol * float(want.abs().max()), shape


class ContractHW(nn.Module):
    """h and w swapped in the first view: a space-to-depth only when H == W."""

    def forward(self, x):
        b, c, h, w = x.size()
        x = x.view(b, c, w // 2, 2, h // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(b, c * 4, h // 2, w // 2)


class ContractNC(nn.Module):
    """N and C mixed by a reshape: a space-to-depth only at batch 1."""

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(c, b, h, w).view(c, b, h // 2, 2, w // 2, 2).permute(1, 3, 5, 0, 2, 4)
        return x.reshape(b, 4 * c, h // 2, w // 2)


class FixedBatch(nn.Module):
    """A space-to-depth hard-wired to batch 1 (fails at any other batch size)."""

    def forward(self, x):
        _, c, h, w = x.shape
        x = x.view(1, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(1, 4 * c, h // 2, w // 2)


@pytest.mark.parametrize("s2d,what", [(ContractHW, "1×3×34×36"), (ContractNC, "2×3×32×32"), (FixedBatch, "2×3×32×32")])
def test_rearrangement_that_depends_on_the_input_size_is_skipped(s2d, what):
    m = Net(nn.Sequential(s2d(), Conv(12, 8, 3, 1)))
    report, original = _run(m, (1, 3, 32, 32), seed=3)
    assert not report.applied
    (s,) = report.skipped
    assert s.target == "stem.0" and s.code == "size-dependent"
    assert what in s.reason, s.reason  # the size it was caught at, named
    assert str(m) == str(original)


def test_probed_rearrangement_is_confirmed_at_other_shapes_and_stays_exact_there():
    m = Net(nn.Sequential(Contract(2), Conv(12, 8, 3, 1)))
    report, original = _run(m, (1, 3, 32, 32), seed=4)
    (a,) = report.applied
    assert a.data["space_to_depth"] == "probe"
    _same_at(m, original, [(3, 3, 32, 32), (1, 3, 24, 40), (2, 3, 40, 16)])


class BoundedFocus(nn.Module):
    """Focus slices with explicit stops, as code generated from a traced / exported graph has them."""

    def __init__(self, stop):
        super().__init__()
        self.stop = stop
        self.conv = Conv(12, 8, 3, 1)

    def forward(self, x):
        e = self.stop
        return self.conv(torch.cat([x[..., 0:e:2, 0:e:2], x[..., 1:e:2, 0:e:2],
                                    x[..., 0:e:2, 1:e:2], x[..., 1:e:2, 1:e:2]], 1))


def test_slices_with_an_explicit_stop_are_skipped():
    m = Net(BoundedFocus(64))
    report, original = _run(m, (1, 3, 64, 64), seed=5)
    assert not report.applied
    (s,) = report.skipped
    assert s.target == "stem" and s.code == "size-dependent"
    assert isinstance(m.stem, BoundedFocus)
    # below the recorded size, a stop inside the axis is not a whole-extent slice at all
    report, _ = _run(Net(BoundedFocus(32)), (1, 3, 64, 64))
    assert not report.applied and report.skipped[0].code == "not-a-pattern"


@pytest.mark.parametrize("stop", [2**31 - 1, 2**63 - 1])
def test_int_max_style_slice_ends_mean_to_the_end(stop):
    m = Net(BoundedFocus(stop))
    report, original = _run(m, (1, 3, 32, 32), seed=6)
    (a,) = report.applied
    assert type(m.stem) is Conv and m.stem.conv.kernel_size == (6, 6)
    _same_at(m, original, [(2, 3, 96, 64), (1, 3, 16, 48)])


# -- a space-to-depth that is its own layer, then a conv layer, routed by the host ----------------


@pytest.mark.parametrize("kind,name,what", [("pixel_unshuffle", "PixelUnshuffle", "pixel_unshuffle 2"),
                                            ("spd", "space_to_depth", "2×2 slices"),
                                            ("contract", "Contract", "space-to-depth 2, probed")])
def test_space_to_depth_layer_becomes_identity_and_the_next_conv_is_merged(kind, name, what):
    m = layered(kind, seed=1)
    before = {k: getattr(m.model[0], k) for k in ("i", "f", "type", "np")}
    old = m.model[1].conv.weight.detach().clone()
    report, original = _run(m, (1, 3, 32, 32), seed=1)
    (a,) = report.applied
    assert a.target == "model.0" and a.data["separate_layers"] and a.data["replaced_by"] == "Identity"
    assert a.detail == (f"{name} ({what}) → Identity; model.1.conv Conv2d(k3 s1 p1) → Conv2d(k6 s2 p2)")
    assert {"f", "i", "np", "type"} <= set(a.data["carried"])  # (and Contract's own gain)
    assert type(m.model[0]) is nn.Identity
    assert {k: getattr(m.model[0], k) for k in before} == before  # the host routes on these
    conv = m.model[1].conv
    assert type(conv) is nn.Conv2d and conv.weight.shape == (8, 3, 6, 6) and conv.stride == (2, 2)
    assert isinstance(m.model[1].bn, nn.BatchNorm2d)  # BN and activation kept
    if kind != "contract":  # phase-major (Focus order) or channel-major (pixel_unshuffle) placement
        w = conv.weight.detach()
        if kind == "spd":
            assert torch.equal(w[:, :, 1::2, ::2], old[:, 3:6])
        else:
            assert torch.equal(w[:, 1, 1::2, ::2], old[:, 6])  # channel 1, phase (1, 0)
    _same_at(m, original, [(2, 3, 32, 32), (1, 3, 48, 24), (3, 3, 16, 40)])


def test_space_to_depth_layer_read_by_another_layer_too_is_skipped():
    m = layered("pixel_unshuffle", routed=True, seed=2)
    report, original = _run(m, (1, 3, 32, 32), seed=2)
    assert not report.applied
    (s,) = report.skipped
    assert s.target == "model.0" and s.code == "other-readers"
    assert str(m) == str(original)


def test_space_to_depth_layer_check_grad_and_bench():
    m = layered("spd", seed=3)
    report, _ = _run(m, (2, 3, 16, 16), seed=3, check_grad=True, bench=True)
    (a,) = report.applied
    assert a.data["grad_check"]["passed"] and "gradients equal" in a.detail
    assert a.data["bench"]["before_ms"] > 0 and a.data["bench"]["input"] == [2, 3, 16, 16]


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_space_to_depth_layer_through_state_dict_arch(ext, tmp_path):
    m = layered("pixel_unshuffle", seed=4)
    src, out = tmp_path / "sd.pt", tmp_path / f"sd-f2c.{ext}"
    torch.save(m.state_dict(), src)
    r = run_cli("focus-to-conv", src, "--arch", "s2dlayers:layered", "-s", "1,3,32,32", "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert [a["target"] for a in rep["applied"]] == ["model.0"] and rep["parity"]["passed"]
    if ext == "pt":
        ck = torch.load(out, weights_only=True)  # still tensors only, plus the recipe
        assert ck["state_dict"]["model.1.conv.weight"].shape == (8, 3, 6, 6)
        edits = ck["modelsurgeon"]["recipe"]
        assert {"op": "replace", "path": "model.0", "module": {"class": "Identity", "kwargs": {}}} in edits
        assert {"op": "setattr", "path": "model.0", "name": "f", "value": -1} in edits
    rebuilt = ms.load(out, arch="s2dlayers:layered")  # the factory + the recipe in the file
    assert type(rebuilt.model[0]) is nn.Identity and rebuilt.model[0].f == -1 and rebuilt.model[0].i == 0
    assert rebuilt.model[1].conv.weight.shape == (8, 3, 6, 6)
    _same_at(rebuilt.eval(), m, [(1, 3, 32, 32), (2, 3, 24, 40)])


def test_space_to_depth_layer_pickled_model_loads_without_modelsurgeon(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    m = layered("contract", seed=5)
    src, out = tmp_path / "m.pt", tmp_path / "m-f2c.pt"
    torch.save(m, src)
    r = run_cli("focus-to-conv", src, "--trust-pickle", "--code-path", ROOT / "tests", "-s", "1,3,32,32",
                "-o", out, "-q")
    assert r.code == 0, r.err
    assert b"modelsurgeon" not in out.read_bytes()
    x = torch.randn(2, 3, 24, 40)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['modelsurgeon'] = None\n"
        "import torch\n"
        f"m = torch.load({str(out)!r}, weights_only=False)\n"
        "print(type(m.model[0]).__name__, m.model[0].type, tuple(m.model[1].conv.weight.shape))\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT / "tests"), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["Identity", "Contract", "(8,", "3,", "6,", "6)"]
    with torch.no_grad():
        want = m(x)
    got = torch.load(tmp_path / "y.pt").detach()
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


class ChildS2dHostDoesMore(nn.Module):
    """The space-to-depth is a child module; the host's forward also reads its input."""

    def __init__(self, shared=False):
        super().__init__()
        self.pu = nn.PixelUnshuffle(2)
        self.conv = nn.Conv2d(12, 8, 3, 1, 1)
        self.skip = nn.Conv2d(3, 8, 2, 2)
        self.shared = shared

    def forward(self, x):
        y = self.conv(self.pu(x)) + self.skip(x)
        return y + self.pu(x).mean() if self.shared else y


def test_space_to_depth_child_of_a_host_doing_more_is_still_rewritten():
    m = Net(ChildS2dHostDoesMore())
    report, original = _run(m, (1, 3, 16, 16), seed=8)
    (a,) = report.applied
    assert a.target == "stem.pu" and type(m.stem.pu) is nn.Identity and m.stem.conv.kernel_size == (6, 6)
    _same_at(m, original, [(2, 3, 24, 40)])


def test_shared_space_to_depth_layer_is_skipped_as_shared():
    m = Net(ChildS2dHostDoesMore(shared=True))
    report, original = _run(m, (1, 3, 16, 16), seed=8)
    assert not report.applied
    assert any(s.target == "stem.pu" and s.code == "shared-module" for s in report.skipped), report.skipped
    assert str(m) == str(original)


def test_attributes_set_on_torch_modules_are_carried_but_not_their_configuration():
    from modelsurgeon.rewrite.modules import carried_attributes

    seq = nn.Sequential(Conv(3, 4, 1), Conv(4, 4, 1))
    seq.i, seq.f, seq.type, seq.np = 3, -1, "torch.nn.modules.container.Sequential", 40
    assert carried_attributes(seq, nn.Identity()) == {"i": 3, "f": -1, "type": seq.type, "np": 40}
    conv = nn.Conv2d(3, 4, 3)  # its own settings (transposed, padding_mode...) stay behind
    assert carried_attributes(conv, nn.Identity()) == {}
    conv.i = 7
    assert carried_attributes(conv, nn.Sequential()) == {"i": 7}


class FromEndFocus(nn.Module):
    """Slices whose starts count from the end: the 2×2 phases at 24×24 only (a crop elsewhere)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, 1, 1)

    def forward(self, x):
        return self.conv(torch.cat([x[..., -24::2, -24::2], x[..., -23::2, -24::2],
                                    x[..., -24::2, -23::2], x[..., -23::2, -23::2]], 1))


def test_slices_starting_from_the_end_are_skipped():
    m = Net(FromEndFocus())
    report, original = _run(m, (1, 3, 24, 24), seed=9)
    assert not report.applied
    (s,) = report.skipped
    assert s.code == "size-dependent"
    assert str(m) == str(original)


# -- hooks: a module replaced with its hook, or a hook seeing another tensor ----------------------


def _hooked(module, seen: list):
    return module.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))


@pytest.mark.parametrize("kind", ["pixel_unshuffle", "contract"])
def test_space_to_depth_layer_with_a_hook_is_skipped_not_dropped(kind):
    """A forward hook on a space-to-depth layer: it became nn.Identity and the hook was gone
    (silently). Refused with the reason, as fold-bn refuses removing a hooked module."""
    m = layered(kind, seed=6)
    seen: list = []
    _hooked(m.model[0], seen)
    report, original = _run(m, (1, 3, 32, 32), seed=6)
    assert not report.applied
    (s,) = report.skipped
    assert s.target == "model.0" and s.code == "hook" and s.reason.startswith("model.0 ")  # the hooked module, named
    assert type(m.model[0]) is type(original.model[0]) and str(m) == str(original)
    seen.clear()
    with torch.no_grad():
        m(torch.randn(2, 3, 24, 40))
    assert seen == [(2, 12, 12, 20)]  # the hook still runs


@pytest.mark.parametrize("on,reason", [
    ("stem.0", "stem.0 has a forward hook, which would be dropped with the module"),
    ("stem", "stem has a forward hook, which would be dropped with the module"),
    ("stem.1.conv", "stem.1.conv has a forward hook, which would be dropped with the module"),
    ("stem.1", "stem.1 has a forward hook, which would see the input of the space-to-depth in place of its output"),
])
def test_stem_with_a_hook_on_what_the_rewrite_removes_or_feeds_differently_is_skipped(on, reason):
    m = Net(nn.Sequential(nn.PixelUnshuffle(2), Conv(12, 8, 3, 1)))
    seen: list = []
    _hooked(m.get_submodule(on), seen)
    report, original = _run(m, (1, 3, 16, 16), seed=7)
    assert not report.applied
    (s,) = report.skipped
    assert s.target == "stem" and s.code == "hook" and s.reason.startswith(on + " ")  # the hooked module, named
    assert str(m) == str(original) and m.stem[1].conv.kernel_size == (3, 3)
    seen.clear()
    with torch.no_grad():
        m(torch.randn(1, 3, 8, 12))
    assert len(seen) == 1


def test_space_to_depth_layer_before_a_hooked_conv_is_skipped():
    m = layered("pixel_unshuffle", seed=8)
    _hooked(m.model[1].conv, [])
    report, original = _run(m, (1, 3, 32, 32), seed=8)
    assert not report.applied
    (s,) = report.skipped
    assert s.target == "model.0" and s.code == "hook" and s.reason.startswith("model.1.conv ")
    assert str(m) == str(original)
