"""reparam on PyTorch models: training-form blocks as each project writes them become one conv
per block (no BatchNorm, no branch add left after optimize), equal to the project's own deploy
method where it has one; what cannot be merged exactly is skipped with its stable code; outputs
in each format."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modelsurgeon as ms
import reparam_models as R
from conftest import run_cli, run_without_modelsurgeon
from modelsurgeon.capture import capture
from testmodels import randomize_all

ROOT = Path(__file__).resolve().parents[1]
S16 = (1, 3, 16, 16)

MODELS = {
    "repvgg-a": (lambda: R.RepVGG(), (1, 3, 32, 32)),
    "mobileone": (lambda: R.MobileOne(), (1, 3, 32, 32)),
    "yolov6-repvgg": (lambda: nn.Sequential(R.V6RepVGGBlock(3, 8, s=2), R.V6RepVGGBlock(8, 8)), S16),
    "yolov6-qarepvgg": (lambda: nn.Sequential(R.QARepVGGBlock(3, 8, s=2), R.QARepVGGBlock(8, 8)), S16),
    "yolov7-repconv": (lambda: nn.Sequential(R.RepConv(3, 8, s=2), R.RepConv(8, 8), R.RepConv(8, 8, g=4)), S16),
    "repghost": (lambda: nn.Sequential(R.RepGhostModule(3, 8), R.RepGhostModule(8, 8, relu=False)), S16),
    "acnet": (lambda: R.ACNet(), S16),
    "dbb": (lambda: R.DBBNet(), S16),
}
BLOCKS = (R.RepVGGBlock, R.MobileOneBlock, R.V6RepVGGBlock, R.RepConv, R.RepGhostModule, R.ACBlock,
          R.DiverseBranchBlock)


def _built(name, seed=3):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    return randomize_all(make(), seed).eval(), shape


def _ops_in_blocks(model, shape):
    g, _, _ = capture(model, [torch.randn(shape)])
    out = {}
    for c in g.calls:
        if isinstance(c.module, BLOCKS):
            out[c.path] = [e.name for e in g.events_in(c)]
    return out


def _close(a, b):
    return float((a - b).abs().max()) <= 2e-5 * (1 + float(b.abs().max()))


@pytest.mark.parametrize("name", list(MODELS))
def test_optimize_leaves_one_conv_per_block_and_no_batchnorm(name):
    model, shape = _built(name)
    original = copy.deepcopy(model)
    model, report = ms.optimize(model, shape)
    assert report.parity.passed
    rp = next(p for p in report.passes if p.name == "reparam")
    assert rp.applied and not rp.skipped
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for path, ops in _ops_in_blocks(model, shape).items():
        convs = [o for o in ops if o == "conv2d"]
        adds = [o for o in ops if "add" in o]
        # RepGhost's primary conv stays beside the merged cheap operation
        assert len(convs) == (2 if isinstance(model.get_submodule(path), R.RepGhostModule) else 1), (path, ops)
        assert not adds and "batch_norm" not in ops, (path, ops)
    blocks = [(n, type(m)) for n, m in original.named_modules() if isinstance(m, BLOCKS)]
    assert blocks and all(type(model.get_submodule(n)) is t for n, t in blocks)
    x = torch.randn(2, *shape[1:]) * 2
    with torch.no_grad():  # float64-fold precision: the merged weights are float32 roundings of exact sums
        assert _close(model(x), original(x))
        assert torch.allclose(model.double()(x.double()), original.double()(x.double()), rtol=1e-6, atol=1e-6)


def test_figures_per_block():
    model, shape = _built("repvgg-a")
    _, report = ms.reparam(model, shape)
    (rp,) = report.passes
    first = rp.applied[0].to_json()
    (block,) = first["blocks"]
    assert block["conv"] == "rbr_reparam" and block["kernel"] == [3, 3] and block["stride"] == [2, 2]
    assert len(block["branches"]) == 2 and block["flops"][1] < block["flops"][0]
    assert block["params"][1] == 3 * 8 * 9 + 8 < block["params"][0]
    ident = [b for a in rp.applied for b in a.to_json()["blocks"] if len(b["branches"]) == 3]
    assert ident and all("identity" in b["branches"][2] for b in ident)


def _own(model, method):
    for m in model.modules():
        if hasattr(m, method):
            getattr(m, method)()
    return model


@pytest.mark.parametrize("name, method, attr", [
    ("repvgg-a", "switch_to_deploy", "rbr_reparam"),
    ("mobileone", "reparameterize", "reparam_conv"),
    ("yolov7-repconv", "fuse_repvgg_block", "rbr_reparam"),
    ("yolov6-qarepvgg", "switch_to_deploy", "rbr_reparam"),
    ("repghost", "switch_to_deploy", None),
    ("dbb", "switch_to_deploy", "dbb_reparam"),
])
def test_equals_the_projects_own_deploy_method(name, method, attr):
    model, shape = _built(name)
    theirs = _own(copy.deepcopy(model), method)
    ours, _ = ms.reparam(model, shape)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        assert _close(ours(x), theirs(x))
    if attr is None or name == "yolov6-qarepvgg":  # QARepVGG's own keeps its BN after the conv
        return
    blocks = [n for n, m in ours.named_modules() if isinstance(m, BLOCKS)]
    assert blocks
    for n in blocks:
        mine, own = getattr(ours.get_submodule(n), attr), getattr(theirs.get_submodule(n), attr)
        assert (mine.kernel_size, mine.stride, mine.padding, mine.groups) == \
               (own.kernel_size, own.stride, own.padding, own.groups)
        assert torch.allclose(mine.weight, own.weight, atol=1e-5) and torch.allclose(mine.bias, own.bias, atol=1e-5)


def test_acnet_equals_its_equivalent_kernel():
    model, shape = _built("acnet")
    kernels = [b.get_equivalent_kernel_bias() for b in model.modules() if isinstance(b, R.ACBlock)]
    ms.reparam(model, shape)
    for (k, b), block in zip(kernels, [m for m in model.modules() if isinstance(m, R.ACBlock)]):
        assert torch.allclose(block.fused_conv.weight, k, atol=1e-5) and torch.allclose(block.fused_conv.bias, b, atol=1e-5)
    assert not model.body[0].deploy  # the class keeps its state; the instance runs the merged conv


class Branches(nn.Module):
    """Two or three branches of ``x`` summed before a ReLU, each built by ``make``."""

    def __init__(self, *branches):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.act = nn.ReLU()

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return self.act(out)


class Relu1x1(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return F.relu(self.conv(x))


def _skips(model, shape=(1, 4, 8, 8)):
    torch.manual_seed(0)
    model = randomize_all(model, 5).eval()
    original = copy.deepcopy(model)
    model, report = ms.reparam(model, shape)
    (rp,) = report.passes
    x = torch.randn(shape)
    with torch.no_grad():
        assert _close(model(x), original(x))
    return rp


@pytest.mark.parametrize("make, code", [
    (lambda: R.PaddedSequence(4), "zero-padding-after-bn"),
    (lambda: Branches(nn.Conv2d(4, 4, 2, 2), nn.Conv2d(4, 4, 1, 2)), "misaligned-centres"),
    (lambda: Branches(R.conv_bn(4, 4, 3, 1, 1, g=2), R.conv_bn(4, 4, 1, 1, 0)), "groups-mismatch"),
    (lambda: Branches(R.conv_bn(4, 4, 3, 1, 1), R.conv_bn(4, 4, 1, 1, 0), Relu1x1(4)), "nonlinear-branch"),
    (lambda: Branches(nn.Conv2d(4, 4, 3, 1, 1, padding_mode="reflect"), R.conv_bn(4, 4, 1, 1, 0)), "padding-mode"),
    (lambda: Branches(nn.Conv2d(4, 4, 3, 1, 1), nn.BatchNorm2d(4, track_running_stats=False)), "training-mode"),
])
def test_what_is_not_one_conv_is_skipped_with_its_code(make, code):
    rp = _skips(make())
    assert not rp.applied and [s.code for s in rp.skipped] == [code]


def test_stride_mismatch_is_skipped():
    rp = _skips(Branches(nn.Conv2d(4, 4, 5), nn.Conv2d(4, 4, 1, 5)), (1, 4, 5, 5))
    assert [s.code for s in rp.skipped] == ["stride-mismatch"]


def test_hooks_and_shared_modules_are_skipped():
    block = Branches(R.conv_bn(4, 4, 3, 1, 1), R.conv_bn(4, 4, 1, 1, 0))
    block.branches[1].register_forward_hook(lambda m, i, o: None)
    assert [s.code for s in _skips(block).skipped] == ["hook"]

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Branches(R.conv_bn(4, 4, 3, 1, 1), R.conv_bn(4, 4, 1, 1, 0))

        def forward(self, x):
            return self.block(x) + self.block.branches[1](x)

    assert [s.code for s in _skips(Twice()).skipped] == ["shared-module"]


def test_a_residual_block_is_no_candidate():
    from testmodels import seeded_resnet

    model = seeded_resnet()
    _, report = ms.reparam(model, (1, 3, 32, 32))
    assert not report.passes[0].applied and not report.passes[0].skipped


def test_pickled_and_state_dict_outputs(tmp_path):
    model, shape = _built("repvgg-a")
    src = tmp_path / "m.pt"
    torch.save(model, src)
    for out in (tmp_path / "o.pt", tmp_path / "o.onnx"):
        r = run_cli("optimize", src, "--trust-pickle", "--code-path", ROOT / "tests", "-s", "1,3,32,32", "-o", out,
                    "--json")
        assert r.code == 0, r.err
        rep = r.json()
        assert rep["parity"]["passed"] and rep["after"]["bn"] == 0
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    shown = run_without_modelsurgeon(tmp_path / "o.pt", tmp_path / "x.pt", tmp_path / "y.pt",
                                     "type(m.stage1[0]).__name__, '+'.join(sorted(m.stage1[0]._modules))")
    assert shown == ["RepVGGBlock", "fused+nonlinearity+rbr_reparam+se"]
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node]
    assert "BatchNormalization" not in ops and "Add" not in ops and ops.count("Conv") == 7
    # a state_dict, through its factory: the safetensors output rebuilds the merged blocks
    sd, out = tmp_path / "sd.pt", tmp_path / "o.safetensors"
    torch.save(model.state_dict(), sd)
    r = run_cli("reparam", sd, "--arch", "reparam_models:RepVGG", "--code-path", ROOT / "tests", "-s", "1,3,32,32",
                "-o", out, "--json")
    assert r.code == 0, r.err
    rebuilt = ms.load(out, arch="reparam_models:RepVGG")
    with torch.no_grad():
        assert _close(rebuilt(x), model(x))
    assert isinstance(rebuilt.stage1[0].rbr_reparam, nn.Conv2d) and not hasattr(rebuilt.stage1[0], "rbr_dense")


@pytest.mark.parametrize("name, method", [
    ("repvgg-a", "switch_to_deploy"), ("mobileone", "reparameterize"), ("yolov7-repconv", "fuse_repvgg_block"),
    ("yolov6-qarepvgg", "switch_to_deploy"), ("dbb", "switch_to_deploy"),
])
def test_the_projects_own_deploy_method_still_runs_on_the_output(name, method):
    """A host calls its deploy method when it loads a model (YOLOv7's fuse(), Ultralytics'):
    guarded by ``hasattr(self, name)`` it finds the merged conv under that name; guarded by a
    flag (MobileOne's ``inference_mode``, YOLOv7's ``deploy``) it finds the flag set."""
    model, shape = _built(name)
    ours, report = ms.optimize(model, shape)
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        before = ours(x)
        _own(ours, method)
        assert torch.equal(ours(x), before)
    rp = next(p for p in report.passes if p.name == "reparam")
    assert not any(a.data["host_methods_unusable"] for a in rp.applied)


def test_ultralytics_style_host_loads_the_optimized_checkpoint(tmp_path):
    """Ultralytics' loader calls ``fuse()``, which calls ``RepConv.fuse_convs`` (guarded by
    ``hasattr(self, "conv")``) and then runs ``forward_fuse``: the merged conv is named ``conv``."""
    import ultralike
    from test_host_loaders import _host_run

    model = ultralike.randomized(3)
    src, dst = tmp_path / "best.pt", tmp_path / "best-opt.pt"
    torch.save({"epoch": 10, "model": None, "ema": copy.deepcopy(model).half(), "optimizer": None,
                "train_args": {"imgsz": 64}}, src)
    r = run_cli("optimize", src, "--trust-pickle", "--code-path", ROOT / "tests", "-s", "1,3,64,64", "-o", dst, "--json")
    assert r.code == 0, r.err
    out = torch.load(dst, weights_only=False)["ema"]
    reps = [m for m in out.modules() if isinstance(m, ultralike.RepConv)]
    assert reps and all(isinstance(m.conv, nn.Conv2d) and not hasattr(m, "conv1") for m in reps)
    want = _host_run("ultralike:attempt_load_one_weight", src, [])
    got = _host_run("ultralike:attempt_load_one_weight", dst, [])
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())


def test_mixed_dilation_becomes_one_dense_kernel_with_its_cost():
    def dilated(d):
        return nn.Sequential(nn.Conv2d(4, 4, 3, 1, d, dilation=d, bias=False), nn.BatchNorm2d(4))

    torch.manual_seed(0)
    model = randomize_all(Branches(dilated(2), dilated(1), nn.BatchNorm2d(4)), 4).eval()
    original = copy.deepcopy(model)
    model, report = ms.reparam(model, (1, 4, 9, 9))
    (block,) = report.passes[0].applied[0].to_json()["blocks"]
    assert block["kernel"] == [5, 5] and block["dilation"] == [1, 1] and block["padding"] == [2, 2]
    assert block["flops"][1] > block["flops"][0]  # exact, and dearer: said in the report
    x = torch.randn(2, 4, 12, 7)
    with torch.no_grad():
        assert _close(model(x), original(x))


@pytest.mark.slow
def test_repvgg_a0_and_mobileone_s0_sized_models():
    for make in (lambda: R.RepVGG((2, 4, 14, 1), (48, 96, 192, 1280)), lambda: R.MobileOne((48, 128, 256, 1024), k=4)):
        torch.manual_seed(0)
        model = randomize_all(make(), 7).eval()
        original = copy.deepcopy(model)
        model, report = ms.optimize(model, (1, 3, 64, 64))
        assert report.parity.passed and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        x = torch.randn(2, 3, 96, 64)
        with torch.no_grad():
            assert _close(model(x), original(x))


class _TimmStyleRepVggBlock(nn.Module):
    """timm's RepVggBlock: the sum built step by step, then an ``inplace=True`` activation that
    changes the summed tensor in place."""

    def __init__(self, c):
        super().__init__()
        self.identity = nn.BatchNorm2d(c)
        self.conv_kxk = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.conv_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x = x + identity
        return self.act(x)


def test_a_sum_changed_in_place_by_its_activation_is_merged():
    model = nn.Sequential(_TimmStyleRepVggBlock(8), _TimmStyleRepVggBlock(8)).eval()
    randomize_all(model)
    original = copy.deepcopy(model)
    model, report = ms.reparam(model, input_shape=(2, 8, 12, 12))
    rp = next(p for p in report.passes if p.name == "reparam")
    assert len(rp.applied) == 2 and not rp.skipped
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 2
    x = torch.randn(3, 8, 12, 12)
    with torch.no_grad():
        assert torch.allclose(model.double()(x.double()), original.double()(x.double()), rtol=1e-6, atol=1e-6)
