"""Graph capture works by recording the real execution, including on untraceable models."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn as nn

from modelsurgeon.capture import OUTPUT, capture
from testmodels import ControlFlow, SharedConv, TwoConsumers


def test_control_flow_model_is_not_fx_traceable_but_is_captured():
    m = ControlFlow().eval()
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(m)
    x = torch.randn(2, 3, 16, 16)
    g, out, flops = capture(m, [x], count_flops=True)
    assert torch.equal(out, m(x))
    names = [e.name for e in g.events]
    assert names.count("conv2d") == 2 and names.count("batch_norm") == 2
    assert "Tensor.__float__" in names  # the data-dependent branch was recorded as a use
    conv1 = g.calls_of(m.conv1)[0]
    bn_ev = next(e for e in g.events if e.name == "batch_norm")
    # conv1's output is read by exactly one op: bn1's batch_norm
    assert [g.event(u) for u in g.uses(conv1.outputs[0])] == [bn_ev]
    assert flops and flops > 0
    assert g.outputs and g.uses(g.outputs[0])[-1] == OUTPUT


def test_call_counts_and_consumer_counts():
    m = SharedConv().eval()
    g, _, _ = capture(m, [torch.randn(1, 4, 8, 8)])
    assert g.call_count(m.conv) == 2
    assert g.call_count(m.bn_a) == 1
    m2 = TwoConsumers().eval()
    g2, _, _ = capture(m2, [torch.randn(1, 3, 8, 8)])
    conv_out = g2.calls_of(m2.conv)[0].outputs[0]
    assert len(g2.uses(conv_out)) == 2


def test_inplace_ops_create_new_versions():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.c(x)
            y = self.act(y)
            y += 1
            return y

    m = M().eval()
    g, _, _ = capture(m, [torch.randn(1, 3, 4, 4)])
    relu = next(e for e in g.events if e.name == "relu")
    add = next(e for e in g.events if e.name == "Tensor.__iadd__" or e.name == "Tensor.add_")
    assert relu.inplace and add.inplace
    assert g.value(relu.outputs[0]).version_of == relu.inputs[0]
    assert g.outputs == [add.outputs[0]]


def test_capture_leaves_no_trace_on_the_model():
    m = ControlFlow().eval()
    before = pickle.dumps(m)
    capture(m, [torch.randn(1, 3, 8, 8)])
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert len(pickle.dumps(m)) == len(before)


def test_parameter_only_expressions_are_constants():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))
            self.c = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            k = torch.softmax(self.w, 0).view(1, -1, 1, 1)
            return self.c(x) * k

    m = M().eval()
    g, _, _ = capture(m, [torch.randn(1, 3, 4, 4)])
    mul = next(e for e in g.events if e.name in ("Tensor.mul", "Tensor.__mul__", "mul"))
    consts = [g.value(i).const for i in mul.inputs]
    assert consts.count(True) == 1 and consts.count(False) == 1
    k = next(g.value(i) for i in mul.inputs if g.value(i).const)
    assert torch.allclose(k.tensor.reshape(-1), torch.softmax(m.w, 0))


def test_capture_leaves_no_global_module_hooks_behind():
    """The recorder's global hooks (one with kwargs) are all removed afterwards: torch's handle
    does not drop a with_kwargs flag by itself, and torch.compile warns about global hooks."""
    import torch.nn.modules.module as module_mod

    import modelsurgeon as ms

    registries = ("_global_forward_hooks", "_global_forward_hooks_with_kwargs", "_global_forward_pre_hooks",
                  "_global_forward_hooks_always_called")
    assert all(isinstance(getattr(module_mod, r, None), dict) for r in registries), "torch renamed a registry"
    before = {r: dict(getattr(module_mod, r)) for r in registries}
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    ms.optimize(m, (1, 3, 8, 8))
    assert {r: dict(getattr(module_mod, r)) for r in registries} == before
