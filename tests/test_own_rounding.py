"""Parity judged against the model's own float32 rounding: a deep net whose outputs float32
cannot compute better than ~1e-4 (BatchNorms subtracting large means: cancellation) is folded
exactly -- the folded net is even closer to the exact function -- yet differs from the
original by more than the fixed 1e-4. The original is run once in float64; the rewrite passes
when it is at most twice as far from that as the original is. A wrong rewrite still fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import run_cli


def noisy_deep_net(depth: int = 12, c: int = 16, offset: float = 1e3, seed: int = 0) -> nn.Sequential:
    """conv (bias + a large common offset) -> BN whose statistics are the activations' own
    (randomised around them) -> ReLU, ``depth`` times: each BN subtracts a large mean from
    values close to it, so float32 loses digits layer after layer."""
    torch.manual_seed(seed)
    layers, cin = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    m = nn.Sequential(*layers).eval()
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        for i in range(0, 3 * depth, 3):
            conv, bn = m[i], m[i + 1]
            conv.bias.add_(offset)
            y = conv(h)
            mu, var = y.mean((0, 2, 3)), y.var((0, 2, 3))
            bn.running_mean.copy_(mu + torch.randn(c, generator=g) * var.sqrt() * 0.1)
            bn.running_var.copy_(var * (torch.rand(c, generator=g) + 0.5))
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
            h = m[i + 2](bn(y))
    return m


def _own_noise(model: nn.Module) -> float:
    import copy

    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        r32, r64 = model(x).double(), copy.deepcopy(model).double()(x.double())
    return float((r32 - r64).abs().max() / r64.abs().max())


def test_the_net_is_noisier_than_the_fixed_tolerance():
    assert _own_noise(noisy_deep_net()) > 1e-4


@pytest.mark.parametrize("command", ["fold-bn", "optimize"])
def test_exact_fold_of_a_noisy_net_passes_with_both_figures(tmp_path, command):
    src, dst = tmp_path / "noisy.pt", tmp_path / "folded.pt"
    torch.save(noisy_deep_net(), src)
    r = run_cli(command, src, "--trust-pickle", "-s", "2,3,16,16", "-o", dst, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["after"]["bn"] == 0 and dst.exists()
    (out,) = rep["parity"]["outputs"]
    assert out["passed"] and out["by_noise"] is True
    assert out["max_rel"] > 1e-4  # the fixed rule alone would refuse it
    assert out["own_noise"] > 1e-4 and out["vs_float64"] < out["own_noise"]


def test_explicit_tolerances_keep_the_fixed_rule(tmp_path):
    src = tmp_path / "noisy.pt"
    torch.save(noisy_deep_net(), src)
    r = run_cli("fold-bn", src, "--trust-pickle", "-s", "2,3,16,16", "--rtol", "1e-4", "-o", tmp_path / "o.pt", "--json")
    assert r.code == 1 and not (tmp_path / "o.pt").exists()
    assert "own_noise" not in r.json()["parity"]["outputs"][0]


@pytest.mark.parametrize("error", [1e-2, 1e-3])
def test_a_wrong_fold_of_a_noisy_net_still_fails(tmp_path, monkeypatch, error):
    """A bias off by a small fraction of its own size in every fold: far less than the output
    scale, but far more than the model's own rounding."""
    import modelsurgeon.passes.fold_bn.torch as fb

    real = fb.fold_bias
    monkeypatch.setattr(fb, "fold_bias", lambda b, s, t: (lambda v: v + error * v.abs().mean())(real(b, s, t)))
    src, dst = tmp_path / "noisy.pt", tmp_path / "o.pt"
    torch.save(noisy_deep_net(), src)
    r = run_cli("fold-bn", src, "--trust-pickle", "-s", "2,3,16,16", "-o", dst, "--json")
    assert r.code == 1, r.json()["parity"]
    assert not dst.exists()
    (out,) = r.json()["parity"]["outputs"]
    assert not out["passed"] and out["vs_float64"] > 2 * out["own_noise"]


def test_float64_run_leaves_the_model_as_it_was():
    """The float64 run casts in place and puts back the very tensors (tied weights stay tied)
    and the attributes the forward cached."""
    from modelsurgeon.verify.exact import float64

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied
            self.cache = [torch.zeros(1)]

        def forward(self, x):
            self.cache[0] = x.new_ones(1)
            self.last = x.dtype
            return self.b(self.a(x)) * self.cache[0]

    m = Cached()
    before = {n: (t, t.data_ptr(), t.dtype) for n, t in m.state_dict(keep_vars=True).items()}
    with float64(m):
        assert m(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    after = m.state_dict(keep_vars=True)
    for n, (t, ptr, dt) in before.items():
        assert after[n] is t and t.data_ptr() == ptr and t.dtype == dt
    assert m.a.weight is m.b.weight
    assert m.cache[0].dtype == torch.float32 and not hasattr(m, "last")


def test_float64_run_holds_float64_copies_of_the_running_modules_only():
    """No second copy of the model: while a layer runs, only its own tensors are float64."""
    from modelsurgeon.verify.exact import float64

    net = nn.Sequential(*[nn.Linear(16, 16) for _ in range(8)])
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(sum(p.dtype == torch.float64 for p in net.parameters())))
             for m in net]
    with float64(net):
        net(torch.randn(2, 16, dtype=torch.float64))
    for h in hooks:
        h.remove()
    assert seen == [2] * 8  # the running layer's weight and bias
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_float64_run_is_lazy_on_files(tmp_path, monkeypatch):
    """The float64 run is made only when an output fails the fixed rule, on the original read
    again from the file; a fold that passes the fixed rule never pays for it. In memory (the
    API) it is made before the rewrite, as before."""
    from testmodels import randomize_all, seeded_resnet

    from modelsurgeon.verify import exact
    from modelsurgeon.verify.torch import References

    calls, reloads = [], []
    real, real_reload = References.record_exact, exact.reload_original
    monkeypatch.setattr(References, "record_exact", lambda self, m: calls.append(m) or real(self, m))
    monkeypatch.setattr(exact, "reload_original", lambda *a: reloads.append(a) or real_reload(*a))
    clean = tmp_path / "clean.pt"
    torch.save(randomize_all(seeded_resnet(1), 2), clean)
    r = run_cli("fold-bn", clean, "--trust-pickle", "-s", "1,3,32,32", "-o", tmp_path / "c.pt", "--json")
    assert r.code == 0 and not calls and not reloads
    assert "own_noise" not in r.json()["parity"]["outputs"][0]
    noisy = tmp_path / "noisy.pt"
    model = noisy_deep_net()
    torch.save(model, noisy)
    r = run_cli("fold-bn", noisy, "--trust-pickle", "-s", "2,3,16,16", "-o", tmp_path / "n.pt", "--json")
    assert r.code == 0 and len(calls) == 1 and len(reloads) == 1
    assert calls[0] is not model and r.json()["parity"]["outputs"][0]["by_noise"] is True
    import modelsurgeon as ms

    calls.clear()
    _m, rep = ms.fold_bn(noisy_deep_net(), (2, 3, 16, 16))
    assert len(calls) == 1 and rep.parity.outputs[0].by_noise
