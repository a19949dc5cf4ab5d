"""fold-bn: patterns that look foldable but are not exactly so are skipped with their reason,
and every BatchNorm-like module that is not folded is reported (QA findings, one test each).

Each test randomises the BatchNorm statistics, keeps an untouched deepcopy, and checks the
rewritten model against it on fresh inputs -- at other batch sizes and spatial sizes than the
one the graph was captured on, since that is where these bugs hid (parity re-runs the capture
shape).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modelsurgeon as ms
from conftest import ROOT, run_cli
from test_regressions import InlineBN
from testmodels import FrozenBatchNorm2d, randomize_all


def _fold(model: nn.Module, shape, seed: int = 0, **kwargs):
    randomize_all(model, seed)
    model.eval()
    original = copy.deepcopy(model)
    _, report = ms.fold_bn(model, shape, **kwargs)
    return report, original


def _same(model, original, *shapes, amplitude: float = 1.0, make=None, rtol: float = 1e-4):
    g = torch.Generator().manual_seed(1234)
    for shape in shapes:
        x = make(shape, g) if make is not None else torch.randn(shape, generator=g) * amplitude
        with torch.no_grad():
            y, ref = model(x), original(x)
            torch.testing.assert_close(y, ref, rtol=rtol, atol=rtol * float(ref.abs().max()),
                                       msg=lambda m: f"at input {tuple(shape)}: {m}")


def _skip(report, target: str):
    """The skip reported for ``target`` (tests assert its stable code, not its wording)."""
    hits = [s for s in report.skipped if s.target == target]
    assert hits, f"{target} not in skipped: {[(s.target, s.code, s.reason) for s in report.skipped]}"
    return hits[0]


def _code(report, target: str) -> str:
    return _skip(report, target).code


def _reason(report, target: str) -> str:
    """Only to check that a reason names the right module or op."""
    return _skip(report, target).reason


# -- bug 1: probing at batch 1 took a norm using batch statistics for a zero scale --------------


class BatchStatNorm(nn.Module):
    """Normalises with the batch's own statistics; constant on a batch of one."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c))
        self.b = nn.Parameter(torch.randn(c))

    def forward(self, x):
        x = x.float()
        mu, var = x.mean(0, keepdim=True), x.var(0, unbiased=False, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.w + self.b


class SpatialStatNorm(nn.Module):
    """Normalises over the spatial axes: constant when they have one entry each."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, c, 1, 1))

    def forward(self, x):
        x = x.float()
        return (x - x.mean((2, 3), keepdim=True)) * self.w + 1.0


class PrunedScale(nn.Module):
    """A Caffe-style scale with some channels pruned to exactly 0: a true per-channel map."""

    def __init__(self, c):
        super().__init__()
        self.register_buffer("g", torch.linspace(-1, 1, c).view(1, c, 1, 1))
        self.register_buffer("h", torch.linspace(0, 2, c).view(1, c, 1, 1))
        self.g[:, ::2] = 0

    def forward(self, x):
        return torch.addcmul(self.h, x, self.g)


def test_batch_statistics_norm_probed_at_batch_one_is_skipped():
    m = nn.Sequential(nn.Linear(10, 6), BatchStatNorm(6))
    report, original = _fold(m, (1, 10))
    assert not report.applied
    assert _code(report, "1") == "norm-like"
    assert torch.equal(m[0].weight, original[0].weight)
    _same(m, original, (4, 10), (7, 10), (2, 10))


def test_spatial_statistics_norm_probed_at_one_pixel_is_skipped():
    m = nn.Sequential(nn.Conv2d(3, 5, 1), SpatialStatNorm(5))
    report, original = _fold(m, (1, 3, 1, 1))
    assert not report.applied
    assert _code(report, "1") == "norm-like"
    _same(m, original, (2, 3, 4, 4), (3, 3, 5, 7))


def test_a_scale_that_is_zero_in_some_channels_still_folds_once_confirmed():
    m = nn.Sequential(nn.Conv2d(3, 6, 3), PrunedScale(6))
    report, original = _fold(m, (1, 3, 1 + 2, 1 + 2))  # a 1x1 output: widened to confirm
    assert [a.target for a in report.applied] == ["0"] and isinstance(m[1], nn.Identity)
    _same(m, original, (4, 3, 9, 9), (1, 3, 3, 3))


# -- bug 2: a non-persistent buffer neutralised in memory only --------------------------------


def test_inline_scale_in_a_non_persistent_buffer_is_skipped_and_state_dict_outputs_reload(tmp_path):
    from testmodels import non_persistent_scale

    arch = "testmodels:non_persistent_scale"
    m = non_persistent_scale()
    original = copy.deepcopy(m)
    _, report = ms.fold_bn(m, (1, 3, 12, 12))
    assert _code(report, "Tensor.mul in the model's forward") == "non-persistent-buffer"
    assert [a.target for a in report.applied] == ["conv2"]
    assert torch.equal(m.scale, original.scale)
    _same(m, original, (2, 3, 12, 12), (3, 3, 9, 17))
    src = tmp_path / "sd.pt"
    torch.save(non_persistent_scale().state_dict(), src)
    for ext in ("pt", "safetensors"):
        out = tmp_path / f"out.{ext}"
        r = run_cli("fold-bn", src, "--arch", arch, "--code-path", ROOT / "tests", "-s", "1,3,12,12",
                    "-o", out, "--json")
        assert r.code == 0, r.err
        reloaded = ms.load(out, arch=arch)
        _same(reloaded, original, (2, 3, 12, 12), (1, 3, 20, 10))


# -- bug 3: a tied weight whose other user does not run in forward ---------------------------


class TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dec = nn.ConvTranspose2d(8, 3, 3, padding=1)
        self.dec.weight = self.enc.weight  # one Parameter, two modules

    def forward(self, x):
        return self.bn(self.enc(x))

    def decode(self, z):
        return self.dec(z)


def test_tied_weight_used_by_an_unexecuted_module_is_skipped_naming_it():
    m = TiedAutoencoder()
    report, original = _fold(m, (1, 3, 16, 16))
    assert not report.applied
    assert _code(report, "bn") == "tied-tensor" and "dec" in _reason(report, "bn")
    assert m.dec.weight is m.enc.weight
    _same(m, original, (2, 3, 16, 16), (1, 3, 9, 13))
    z = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        assert torch.equal(m.decode(z), original.decode(z))


# -- bug 4: a parameter sliced to the input size -------------------------------------------


class PositionalSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(1, 8, 8, 8))
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        y = self.c(x)
        h, w = y.shape[-2:]
        return (y + self.pos[:, :, :h, :w]) * self.gamma[None, :, None, None]


def test_parameter_sliced_to_the_input_size_is_not_taken_for_a_per_channel_one():
    m = PositionalSlice()
    report, original = _fold(m, (1, 3, 4, 4))  # a 1x1 map: the slice looks per-channel
    assert not report.applied
    assert _code(report, "Tensor.add in the model's forward") == "size-dependent"
    assert torch.equal(m.pos, original.pos)
    _same(m, original, (1, 3, 32, 32), (2, 3, 16, 24), (1, 3, 4, 4))


class WholeParameterViews(nn.Module):
    """``x * g[None, :, None, None] + b.view(1, -1, 1, 1)``: views of the whole parameter fold."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.beta = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return self.c(x) * self.gamma[None, :, None, None] + self.beta.view(1, -1, 1, 1)


def test_whole_parameter_views_still_fold():
    m = WholeParameterViews()
    report, original = _fold(m, (1, 3, 3, 3))
    assert [a.target for a in report.applied] == ["c"]
    _same(m, original, (2, 3, 16, 16), (1, 3, 7, 5))


# -- bug 7: a conv subclass whose forward ignores an added bias --------------------------------


class NoBiasConv(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self.weight, None, self.stride, self.padding)


class SubclassedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = NoBiasConv(3, 8, 3, bias=False)
        self.b = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.b2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.b2(self.c2(self.b(self.c(x))))


def test_conv_subclass_with_its_own_forward_gets_no_bias_and_the_rest_still_folds():
    m = SubclassedConv()
    report, original = _fold(m, (1, 3, 16, 16))
    assert _code(report, "b") == "no-bias"
    assert [a.target for a in report.applied] == ["c2"]
    assert m.c.bias is None and isinstance(m.b, nn.BatchNorm2d) and isinstance(m.b2, nn.Identity)
    _same(m, original, (3, 3, 16, 16), (1, 3, 10, 22))


class Conv2dSame(nn.Conv2d):
    """timm-style 'same' padding: overrides forward, but reads ``self.bias`` like torch's own."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_conv_subclass_that_reads_an_added_bias_gets_one():
    """EfficientNet-style bias-free ``Conv2dSame`` + BN: the overriding forward is measured to
    add a bias given to it, so the BN folds (a bias is added) instead of being skipped."""
    m = nn.Sequential(Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8))
    report, original = _fold(m, (1, 3, 16, 16))
    assert [a.target for a in report.applied] == ["0"] and not report.skipped
    assert isinstance(m[0], Conv2dSame) and m[0].bias is not None and isinstance(m[1], nn.Identity)
    _same(m, original, (3, 3, 16, 16), (2, 3, 21, 30))


def test_whether_an_overriding_forward_adds_a_bias_is_measured_only_when_asked_and_once(monkeypatch):
    """Measuring it runs the layer twice with a temporary bias: not on every conv_unit call
    (fold-bn, each absorber search), only when a rewrite must add a bias, once per module."""
    from modelsurgeon.capture import capture
    from modelsurgeon.match import conv as conv_match

    calls: list = []
    real = conv_match.reads_added_bias
    monkeypatch.setattr(conv_match, "reads_added_bias", lambda *a: calls.append(a[0]) or real(*a))
    m = randomize_all(nn.Sequential(Conv2dSame(3, 8, 3, stride=2, bias=False), NoBiasConv(8, 8, 1, bias=False),
                                    nn.BatchNorm2d(8)), 2).eval()
    g, _, _ = capture(m, [torch.randn(1, 3, 16, 16)])
    evs = [e for e in g.events if e.name == "conv2d"]
    units = [conv_match.conv_unit(g, e) for e in evs for _ in range(2)]
    assert not calls
    assert [u.can_add_bias for u in units] == [True, True, False, False]
    assert units[2].no_bias_reason.code == "no-bias" and units[0].no_bias_reason is None
    assert calls == [m[0], m[1]]  # once per module, whatever asks again
    assert m[0].bias is None and m[1].bias is None


# -- bug 8: torch.add(p, x, alpha=a) and torch.rsub(x, p) ------------------------------------


class InlineOp(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.c = nn.Conv2d(3, 8, 3)
        self.p = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x):
        return self.op(self.c(x), self.p)


@pytest.mark.parametrize("op,name", [
    (lambda y, p: torch.add(p, y, alpha=2), "add"),
    (lambda y, p: torch.rsub(y, p), "rsub"),
    (lambda y, p: torch.sub(p, y), "sub"),
])
def test_inline_ops_that_cannot_become_the_identity_are_skipped(op, name):
    m = InlineOp(op)
    report, original = _fold(m, (1, 3, 8, 8))
    assert not report.applied
    assert report.skipped[0].code == "not-foldable" and name in report.skipped[0].reason, report.skipped
    assert torch.equal(m.p, original.p)
    _same(m, original, (2, 3, 8, 8), (1, 3, 13, 7))


@pytest.mark.parametrize("op", [
    lambda y, p: torch.add(y, p, alpha=2),
    lambda y, p: torch.sub(y, p, alpha=3),
    lambda y, p: torch.rsub(p, y),
    lambda y, p: p + y,
])
def test_inline_ops_that_become_the_identity_still_fold(op):
    m = InlineOp(op)
    report, original = _fold(m, (1, 3, 8, 8))
    assert [a.target for a in report.applied] == ["c"] and bool((m.p == 0).all())
    _same(m, original, (2, 3, 8, 8), (1, 3, 13, 7))


# -- bug 9: unbatched conv input ---------------------------------------------------------------


class Unbatched(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.c(x))


class ChannelScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.rand(6, 1) + 0.5)

    def forward(self, x):
        return x * self.s


def test_unbatched_conv_output_has_its_channels_on_axis_0():
    m = Unbatched(nn.BatchNorm1d(6))  # normalises the (6) positions, not the channels
    report, original = _fold(m, (4, 6))
    assert not report.applied
    assert _code(report, "norm") == "other-axis"
    _same(m, original, (4, 6))
    m = Unbatched(ChannelScale())  # per output channel of a (C, L) output: folds
    report, original = _fold(m, (4, 6))
    assert [a.target for a in report.applied] == ["c"]
    _same(m, original, (4, 6), (4, 17))


# -- bug 10: a module called with keyword or extra arguments ---------------------------------


class MaskedAffine(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.g = nn.Parameter(torch.randn(1, c, 1))
        self.b = nn.Parameter(torch.randn(1, c, 1))

    def forward(self, x, mask=None):
        y = torch.addcmul(self.b, x, self.g)
        return y if mask is None else y * mask


class Masked(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.c = nn.Conv1d(4, 6, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        mask = (x.abs().sum(1, keepdim=True) > 0).to(x.dtype)  # 0 at padded positions
        return self.norm(self.c(x), mask=mask)


class MaskedInline(MaskedAffine):
    def forward(self, x, mask=None):
        y = x * self.g + self.b
        return y if mask is None else y * mask


def _padded(shape, g):
    x = torch.randn(shape, generator=g)
    x[..., shape[-1] // 2:] = 0
    return x


def test_module_called_with_keyword_arguments_is_not_replaced():
    m = Masked(MaskedAffine(6))
    report, original = _fold(m, (1, 4, 20))
    assert not report.applied
    assert _code(report, "norm") == "call-arguments" and "mask" in _reason(report, "norm")
    assert isinstance(m.norm, MaskedAffine)
    _same(m, original, (2, 4, 20), (3, 4, 9), make=_padded)


def test_inline_ops_of_a_keyword_called_module_fold_and_the_mask_stays():
    m = Masked(MaskedInline(6))
    report, original = _fold(m, (1, 4, 20))
    assert [a.target for a in report.applied] == ["c"] and isinstance(m.norm, MaskedInline)
    _same(m, original, (2, 4, 20), (3, 4, 9), make=_padded)


class TwoArgs(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.register_buffer("g", torch.rand(1, c, 1) + 0.5)
        self.register_buffer("h", torch.randn(1, c, 1))

    def forward(self, x, t=1.0):
        return torch.addcmul(self.h, x, self.g) * t


def test_module_called_with_extra_positional_arguments_is_not_replaced():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv1d(4, 6, 3)
            self.s = TwoArgs(6)

        def forward(self, x):
            return self.s(self.c(x), 2.0 if x.shape[-1] > 8 else 3.0)

    m = M()
    report, original = _fold(m, (1, 4, 12))
    assert not report.applied and isinstance(m.s, TwoArgs)
    assert _code(report, "s") == "call-arguments"
    _same(m, original, (2, 4, 12), (1, 4, 6))


# -- bug 11: hooks --------------------------------------------------------------------------------


def _conv_bn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))


def test_batchnorm_with_an_output_changing_hook_is_skipped():
    m = _conv_bn()
    m[1].register_forward_hook(lambda mod, inp, out: torch.relu(out))
    report, original = _fold(m, (1, 3, 16, 16))
    assert not report.applied
    assert _code(report, "1") == "hook"
    _same(m, original, (2, 3, 16, 16), (1, 3, 9, 11))


def test_feature_capturing_hooks_keep_seeing_the_original_values():
    feats: dict = {}
    m = _conv_bn()
    m[0].register_forward_hook(lambda mod, inp, out: feats.__setitem__("conv", out))
    report, original = _fold(m, (1, 3, 16, 16))
    assert not report.applied and _code(report, "1") == "hook"
    m2 = _conv_bn()
    m2[1].register_forward_pre_hook(lambda mod, inp: feats.__setitem__("bn_in", inp[0]))
    report, original2 = _fold(m2, (1, 3, 16, 16))
    assert not report.applied and _code(report, "1") == "hook"
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        m(x), m2(x)
        got = dict(feats)
        original(x), original2(x)
    for k in ("conv", "bn_in"):
        assert torch.equal(got[k], feats[k]), k


def test_hooked_probed_module_is_skipped():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8))
    seen = []
    m[1].register_forward_hook(lambda mod, inp, out: seen.append(1))
    report, original = _fold(m, (1, 3, 8, 8))
    assert not report.applied and _code(report, "1") == "hook"
    assert isinstance(m[1], FrozenBatchNorm2d) and m[1]._forward_hooks
    _same(m, original, (2, 3, 8, 8))


# -- bug 13: every BatchNorm-like module that is not folded is reported ---------------------


class Unreported(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)
        self.b = nn.BatchNorm2d(8)
        self.aux_c = nn.Conv2d(8, 8, 1)
        self.aux_b = nn.BatchNorm2d(8)  # runs in training only
        self.c2 = nn.Conv2d(8, 8, 3)
        self.fbn = FrozenBatchNorm2d(8)  # after a ReLU
        self.c3 = nn.Conv2d(8, 8, 1)
        self.default_bn = nn.BatchNorm2d(8, eps=1e-3)  # default statistics, after a ReLU

    def forward(self, x):
        y = self.b(self.c(x))
        if self.training:
            return y, self.aux_b(self.aux_c(y))
        y = self.fbn(torch.relu(self.c2(y)))
        return self.default_bn(torch.relu(self.c3(y)))


def test_every_unfolded_batchnorm_like_module_is_reported():
    m = Unreported()
    randomize_all(m, 0)
    with torch.no_grad():  # back to the defaults: x / sqrt(1 + eps), not the identity
        m.default_bn.reset_parameters()
    m.eval()
    original = copy.deepcopy(m)
    _, report = ms.fold_bn(m, (1, 3, 16, 16))
    assert [a.target for a in report.applied] == ["c"]
    assert _code(report, "aux_b") == "not-executed"
    assert _code(report, "fbn") == "not-foldable" and "relu" in _reason(report, "fbn")
    assert _code(report, "default_bn") == "not-foldable" and "relu" in _reason(report, "default_bn")
    bn_like = {p for p, mod in m.named_modules()
               if isinstance(mod, nn.modules.batchnorm._BatchNorm) or hasattr(mod, "running_var")}
    assert bn_like <= {s.target for s in report.skipped}
    _same(m, original, (2, 3, 16, 16), (1, 3, 11, 13))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_inline_batchnorm_neutralised_by_the_pass_is_not_folded_again(dtype):
    """optimize repeats its passes: the BatchNorm a fold made the identity (in fp16 only up to a
    scale, folded too) is neither folded again nor reported; one with default statistics would be."""
    m = randomize_all(InlineBN(1e-3), 1).to(dtype).eval()
    original = copy.deepcopy(m).float()
    _, report = ms.optimize(m, (2, 3, 8, 8), passes=["fold-bn"])
    assert len(report.applied) == 1 and not report.skipped
    _same(m.float(), original, (1, 3, 8, 8), (3, 3, 12, 10), rtol=1e-4 if dtype == torch.float32 else 1e-2)


# -- observation: a model stored in training mode ---------------------------------------------


def test_model_stored_in_training_mode_is_folded_with_a_warning():
    m = _conv_bn()
    randomize_all(m, 2)
    original = copy.deepcopy(m).eval()
    m.train()
    _, report = ms.fold_bn(m, (1, 3, 8, 8))
    assert any("stored in training mode" in w and "inference model" in w for w in report.warnings), report.warnings
    assert m.training  # flags are restored as stored
    _same(m.eval(), original, (2, 3, 8, 8), (1, 3, 5, 9))


def test_a_hook_seeing_a_later_step_s_input_stops_the_chain_there():
    """conv → bn1 → bn2 with a forward hook on bn2 (it sees bn1's output): bn1 folds, bn2 stays."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8))
    seen: dict = {}
    m[2].register_forward_hook(lambda mod, inp, out: seen.__setitem__("in", inp[0]))
    report, original = _fold(m, (1, 3, 8, 8))
    assert [a.target for a in report.applied] == ["0"] and isinstance(m[1], nn.Identity)
    assert isinstance(m[2], nn.BatchNorm2d) and _code(report, "2") == "hook"
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        m(x)
        got = seen["in"]
        original(x)
    torch.testing.assert_close(got, seen["in"], rtol=1e-4, atol=1e-5)
    _same(m, original, (2, 3, 8, 8), (1, 3, 13, 9))


class ConvBNReLU(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.ReLU())


def test_a_block_starting_with_a_layer_is_not_reported_as_an_unfoldable_norm():
    """A bias-free conv read only by the next conv-BN-ReLU block: the block's BN folds into its
    own conv, and is not also listed as skipped."""
    m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), ConvBNReLU())
    report, original = _fold(m, (1, 3, 16, 16))
    assert [a.target for a in report.applied] == ["1.0"] and not report.skipped
    _same(m, original, (2, 3, 16, 16), (1, 3, 11, 19))
