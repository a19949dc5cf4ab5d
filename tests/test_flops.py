"""FLOPs from the recorded graph equal torch.utils.flop_counter.FlopCounterMode's."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from modelsurgeon.capture import capture
from testmodels import OneD, ThreeD, Zoo


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 8))

    def forward(self, x):  # x: (B, T, 16)
        q, k, v = self.qkv(x).chunk(3, -1)
        s = torch.matmul(q, k.transpose(-1, -2))
        a = torch.softmax(s, -1) @ v
        y = self.proj(a) + (s @ v) + torch.bmm(x, x.transpose(1, 2)) @ x
        return torch.addmm(torch.zeros(8), y.reshape(-1, 16), self.w)


def _reference(model, x):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("build,shape", [
    (lambda: __import__("zoo.resnet", fromlist=["resnet"]).resnet(), (2, 3, 32, 32)),
    (lambda: __import__("zoo.mobilenetv2", fromlist=["mobilenet_v2"]).mobilenet_v2(), (1, 3, 64, 64)),
    (lambda: __import__("models.yolo", fromlist=["Model"]).Model(), (1, 3, 64, 64)),
    (Zoo, (2, 3, 16, 16)),
    (OneD, (2, 4, 32)),
    (ThreeD, (1, 2, 8, 8, 8)),
    (Attention, (2, 5, 16)),
])
def test_graph_flops_match_flop_counter_mode(build, shape):
    model = build().eval()
    x = torch.randn(shape)
    _, _, flops = capture(model, [x], count_flops=True)
    assert flops == _reference(model, x) and flops > 0


def test_sdpa_is_counted_with_the_registry_formula():
    """FlopCounterMode counts 0 for CPU's fused attention kernel; the formula does not."""
    from torch.utils.flop_counter import sdpa_flop_count

    class M(nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(2, 3, 7, 8)
    _, _, flops = capture(M(), [q], count_flops=True)
    assert flops == sdpa_flop_count(q.shape, q.shape, q.shape) > 0


def test_per_module_flops_match_flop_counter_mode():
    from torch.utils.flop_counter import FlopCounterMode
    from zoo.resnet import resnet

    model = resnet().eval()
    x = torch.randn(1, 3, 32, 32)
    g, _, total = capture(model, [x], count_flops=True)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    ref = {name.partition(".")[2] if "." in name else "": sum(ops.values())
           for name, ops in counter.get_flop_counts().items() if name != "Global"}
    assert g.module_flops[""] == total
    for path in ("layer1", "layer4", "layer4.1.conv2", "fc"):
        assert g.module_flops[path] == ref[path] > 0


def test_onnx_flops_equal_the_torch_models(tmp_path):
    """FLOPs of an exported graph equal the PyTorch model's (same formulas, inferred shapes)."""
    import warnings

    from modelsurgeon.read.onnx import load_onnx
    from modelsurgeon.report.flops import onnx_flops
    from zoo.resnet import resnet

    model = resnet().eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "r.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13, do_constant_folding=False,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    _, _, flops = capture(model, [x], count_flops=True)
    assert onnx_flops(load_onnx(path).container) == flops > 0
