"""Regression tests for bugs the property tests (test_properties.py) found in modelsurgeon."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modelsurgeon as ms


class SaturatedSiLU(nn.Module):
    """``silu(a * x + b)`` with a large shift: on inputs of a few units it is linear to within
    1e-10, yet it is no affine map (inputs past -b/a reach the curved part)."""

    def __init__(self, n: int):
        super().__init__()
        self.a = nn.Parameter(torch.full((n,), 3.0))
        self.b = nn.Parameter(torch.full((n,), 60.0))

    def forward(self, x):
        # addcmul: not an inline mul/add the pass folds op by op, so the module gets probed
        return F.silu(torch.addcmul(self.b.view(1, -1, 1, 1), x, self.a.view(1, -1, 1, 1)))


def test_probing_does_not_take_a_saturated_activation_for_an_affine_map():
    """Numeric probing used inputs of amplitude ~3 only: ``silu(3x + 60)`` probed as affine and
    was folded into the conv and removed, which is wrong wherever ``3x + 60`` is not >> 0."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), SaturatedSiLU(4)).eval()
    original = copy.deepcopy(m)
    _, report = ms.fold_bn(m, (1, 3, 8, 8))
    assert not report.applied
    assert isinstance(m[1], SaturatedSiLU) and float(m[1].b[0]) == 60.0
    x = torch.randn(4, 3, 8, 8) * 30  # reaches the curved part of the SiLU
    with torch.no_grad():
        assert torch.allclose(m(x), original(x))


class BNSiLU(nn.BatchNorm2d):
    """timm-style BN + activation module; with a large shift the whole module looks linear."""

    def __init__(self, n):
        super().__init__(n)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps))


def test_bn_with_saturated_activation_is_folded_keeping_the_activation():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), BNSiLU(4)).eval()
    with torch.no_grad():
        m[1].running_mean.fill_(-20.0)  # shift >= 100: the SiLU looks linear near 0
        m[1].running_var.fill_(1e-2)
        m[1].weight.uniform_(0.5, 2.0)
    original = copy.deepcopy(m)
    _, report = ms.fold_bn(m, (1, 3, 8, 8))
    assert len(report.applied) == 1 and "probed" not in report.applied[0].detail
    assert isinstance(m[1], nn.SiLU)
    x = torch.randn(4, 3, 8, 8) * 30
    with torch.no_grad():
        torch.testing.assert_close(m(x), original(x), rtol=1e-4, atol=1e-4)


def _clipped_logit_model():
    """Linear(3→1) → BN → ReLU whose only output is 0 on trial 0's input (seed 0) and positive
    on some later trial."""
    from modelsurgeon.verify.inputs import InputSpec

    spec = InputSpec.parse(["1,3"], "float32", 0)
    xs = [spec.make(t)[0] for t in range(5)]
    m = nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1), nn.ReLU()).eval()
    with torch.no_grad():
        m[0].weight.copy_(torch.tensor([[4.0, -3.0, 5.0]]))
        m[0].bias.fill_(0.0)
        m[0].bias.fill_(-float(m[0](xs[0])) - 1.0)  # pre-activation -1 on trial 0
        m[1].running_mean.fill_(0.2)
        m[1].running_var.fill_(0.7)
    with torch.no_grad():
        outs = [float(m(x)) for x in xs]
    assert outs[0] == 0.0 and any(o > 0 for o in outs[1:]), outs
    return m, next(t for t, o in enumerate(outs) if o > 0)


def test_parity_with_all_zero_references_adds_trials(monkeypatch):
    """With the only output ReLU-clipped to 0 on trial 0, a wrong fold passed verification
    (0 == 0). References that are zero everywhere now get more trials."""
    from modelsurgeon.rewrite.modules import ModuleEditor

    real = ModuleEditor.scale_weight

    def wrong(self, param, scale64, *args, **kwargs):  # the weight scaled twice too much:
        return real(self, param, scale64 * 2, *args, **kwargs)  # invisible when clipped to 0

    monkeypatch.setattr(ModuleEditor, "scale_weight", wrong)
    model, first_nonzero = _clipped_logit_model()
    # one trial asked for (the batch-2 second trial would catch it on its own): the extra
    # trials, on fresh inputs of the example's shape, are what refuses the wrong fold
    with pytest.raises(ms.ParityError) as e:
        ms.fold_bn(model, (1, 3), trials=1)
    assert e.value.report.parity.trials == first_nonzero + 1


def test_all_zero_outputs_are_reported_as_uninformative():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        m[1].bias.fill_(-1e6)  # every output clipped to 0, whatever the input
    _, report = ms.fold_bn(m, (1, 3, 8, 8), trials=1)
    assert report.parity.trials == 5  # the one asked for and up to 4 more (README)
    assert any("every output is zero" in w for w in report.warnings)


class InlineBN(nn.Module):
    """``F.batch_norm`` in the host forward, on the host's own tensors: folded, then the
    statistics are set so that the op is the identity (nothing to remove)."""

    def __init__(self, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(4))
        self.register_buffer("running_var", torch.ones(4))
        self.weight = nn.Parameter(torch.ones(4))
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.running_mean, self.running_var, self.weight, self.bias,
                            False, 0.0, self.eps)


def _inline_bn(eps: float, dtype) -> nn.Module:
    m = InlineBN(eps)
    with torch.no_grad():
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 1.5)
        m.weight.normal_(1.0, 0.3)
        m.bias.normal_()
    return m.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inline_batch_norm_in_low_precision_keeps_what_was_verified(dtype):
    """The identity running_var (1 - eps) was computed in float32 and only rounded to bf16/fp16
    when the model was cast back: the kept model differed from the verified one (by 8e-4 with
    eps=0.1 in bf16). It is now chosen among values the storage dtype holds, and the scale
    the op keeps is folded into the conv."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_properties import apply, assert_verified_is_kept

    m = _inline_bn(0.1, dtype)
    seen: dict = {}
    cfg = {"input_shape": [2, 3, 8, 8], "dtype": str(dtype).replace("torch.", "")}
    report = apply("fold-bn", m, cfg, seen)
    assert len(report.applied) == 1 and m.running_var.dtype == dtype
    assert_verified_is_kept(m, cfg, seen)


def test_inline_batch_norm_with_eps_above_one_keeps_a_positive_variance():
    """With eps >= 1 the identity variance 1 - eps is negative: it was written as is (a file
    modelsurgeon then refuses to read back). A positive variance is kept, its scale folded."""
    m = _inline_bn(2.0, torch.float32)
    original = copy.deepcopy(m)
    ms.fold_bn(m, (2, 3, 8, 8))
    assert bool((m.running_var > 0).all())
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), original(x), rtol=1e-4, atol=1e-5)
    ms.fold_bn(m, (2, 3, 8, 8))  # the result is valid input again


class BatchDependentBN(nn.BatchNorm2d):
    """A test-time-adaptation-style BatchNorm: running statistics for one sample, the batch's
    own statistics for several. At batch 1 its data path is an inference ``batch_norm``."""

    def forward(self, x):
        if x.shape[0] == 1:
            return super().forward(x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def test_a_rewrite_exact_only_at_the_captured_batch_size_is_refused():
    """The graph is captured on the example input (batch 1), so the passes decide on it; the
    second trial runs batch 2, where folding this BN is wrong: refused, not written."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchDependentBN(4)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 2)
        m[1].bias.uniform_(-1, 1)
    with pytest.raises(ms.ParityError) as e:
        ms.fold_bn(copy.deepcopy(m), (1, 3, 8, 8))
    assert not e.value.report.parity.passed
    # with a single trial (the captured input) the same fold passes: the second trial is what catches it
    assert ms.fold_bn(copy.deepcopy(m), (1, 3, 8, 8), trials=1)[1].parity.passed


def test_a_model_that_runs_only_at_its_example_batch_is_still_verified():
    """A forward that hard-codes the batch (``view(1, 144)``) cannot run at batch 2: parity is
    then checked on fresh inputs of the example's shape, and the report says so."""

    class Flat1(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)).view(1, 4 * 6 * 6)

    m = Flat1().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    _, report = ms.fold_bn(m, (1, 3, 8, 8))
    assert report.applied and report.parity.passed and report.parity.trials == 2
    assert any("does not run at inputs 2,3,8,8" in n for n in report.notes)


@dataclasses.dataclass
class DetOut:
    boxes: torch.Tensor
    scores: torch.Tensor
    meta: str = "det"


class Holder:
    def __init__(self, feats, label):
        self.feats, self.label = feats, label


class ObjectOutputs(nn.Module):
    """Returns a dataclass and a plain object holding tensors (comparing them crashed with
    'Boolean value of Tensor ... ambiguous', or compared the objects by identity)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.kind == "dataclass":
            return DetOut(y.flatten(1), y.mean((2, 3)))
        return Holder([y, y.amax((2, 3))], "feats")


@pytest.mark.parametrize("kind", ["dataclass", "object"])
def test_outputs_held_in_objects_are_compared_field_by_field(kind, monkeypatch):
    m = ObjectOutputs(kind).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
        m.bn.weight.uniform_(0.5, 2)
    _, report = ms.fold_bn(copy.deepcopy(m), (1, 3, 8, 8))
    assert report.applied and report.parity.passed
    names = {o.name for o in report.parity.outputs}
    assert names == ({"out.boxes", "out.scores", "out.meta"} if kind == "dataclass"
                     else {"out.feats[0]", "out.feats[1]", "out.label"})
    # and a wrong fold is caught inside the object
    from modelsurgeon.rewrite.modules import ModuleEditor

    real = ModuleEditor.scale_weight
    monkeypatch.setattr(ModuleEditor, "scale_weight",
                        lambda self, p, s, *a, **k: real(self, p, s * 1.01, *a, **k))
    with pytest.raises(ms.ParityError):
        ms.fold_bn(copy.deepcopy(m), (1, 3, 8, 8))


class CountingObserver(nn.Module):
    """Records the largest value it has seen, in eval mode too (like a calibrated observer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("max_val", torch.tensor(-1e9))  # any input moves it
        self.register_buffer("calls", torch.tensor(0))

    def forward(self, x):
        self.max_val.copy_(torch.maximum(self.max_val, x.detach().max()))
        self.calls += 1
        return x


def test_buffers_the_tool_s_own_runs_change_are_kept_at_the_checkpoint_values(tmp_path):
    """Capture, references and verification run the model; a module that updates its buffers
    in eval mode was saved with the state those runs left (a calibrated max moved)."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), CountingObserver()).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    src, out = tmp_path / "m.pt", tmp_path / "o.pt"
    torch.save(m, src)
    report = ms.run("fold-bn", src, out, trust_pickle=True, code_paths=[Path(__file__).parent],
                    input_shape=(1, 3, 8, 8))
    assert report.applied and report.written
    assert any("changes its buffers" in w and "2.max_val" in w for w in report.warnings)
    again = torch.load(out, weights_only=False)
    assert float(again[2].max_val) == -1e9 and int(again[2].calls) == 0
