"""Outputs keep working in the host project's own loading code.

YOLOv5's ``attempt_load`` (detect.py, val.py, export.py, torch.hub) and Ultralytics'
``attempt_load_one_weight`` call the model's ``fuse()``, which fuses every ``Conv`` that still
``hasattr(m, 'bn')``. A folded BatchNorm left as ``nn.Identity`` broke them (``'Identity'
object has no attribute 'weight'``); it is now removed the way ``fuse()`` removes it -- the
attribute deleted, ``forward`` set to the class's ``forward_fuse`` -- when that method is
checked to compute the same. Loaded here as the hosts load, in a process that has torch and
the host's source tree only."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conftest import EXAMPLES, run_cli

TESTS = Path(__file__).resolve().parent
YOLO = EXAMPLES / "yolo"


def _host_run(loader: str, ckpt: Path, paths: list[Path]) -> torch.Tensor:
    """Load ``ckpt`` with ``loader`` ("module:function") in a fresh interpreter whose path has
    only ``paths`` (and the tests' loader modules), run it, return its first output."""
    out = ckpt.with_suffix(".out.pt")
    mod, fn = loader.split(":")
    code = (
        "import sys, torch\n"
        f"sys.path[:0] = {[str(p) for p in paths] + [str(TESTS)]!r}\n"
        f"from {mod} import {fn} as load\n"
        f"m = load({str(ckpt)!r})\n"
        "torch.manual_seed(0)\n"
        "with torch.no_grad():\n"
        "    y = m(torch.randn(1, 3, 64, 64))\n"
        "y = y[0] if isinstance(y, (tuple, list)) else y\n"
        "assert 'modelsurgeon' not in sys.modules, 'the output needs modelsurgeon to load'\n"
        f"torch.save(y, {str(out)!r})\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return torch.load(out)


# -- YOLOv5 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["fold-bn", "optimize"])
def test_yolov5_attempt_load_fuses_the_folded_checkpoint(ckpts, tmp_path, command):
    src, dst = ckpts / "yolov5s-focus.pt", tmp_path / "folded.pt"
    r = run_cli(command, src, "--trust-pickle", "--code-path", YOLO, "-s", "1,3,64,64", "-o", dst, "--json")
    assert r.code == 0, r.err
    assert r.json()["after"]["bn"] == 0
    want = _host_run("yolov5_loader:attempt_load", src, [YOLO])
    got = _host_run("yolov5_loader:attempt_load", dst, [YOLO])
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 1e-2 * scale  # fp16 checkpoint: fp16 rounding


def test_folded_conv_is_left_as_fuse_leaves_it(ckpts, tmp_path):
    from models.common import Conv

    dst = tmp_path / "folded.pt"
    r = run_cli("fold-bn", ckpts / "yolov5s-focus.pt", "--trust-pickle", "--code-path", YOLO, "-s", "1,3,64,64", "-o", dst)
    assert r.code == 0, r.err
    for key in ("model", "ema"):
        convs = [m for m in torch.load(dst, weights_only=False)[key].modules() if isinstance(m, Conv)]
        assert convs
        for m in convs:
            assert not hasattr(m, "bn")
            assert m.forward.__func__ is Conv.forward_fuse and m.forward.__self__ is m


def test_deepcopy_as_yolov5_ema_does(ckpts, tmp_path):
    from models.common import Conv

    dst = tmp_path / "folded.pt"
    assert run_cli("fold-bn", ckpts / "yolov5s-focus.pt", "--trust-pickle", "--code-path", YOLO,
                   "-s", "1,3,64,64", "-o", dst).code == 0
    model = torch.load(dst, weights_only=False)["ema"].float().eval()
    ema = copy.deepcopy(model).eval()
    for m in ema.modules():
        if isinstance(m, Conv):
            assert m.forward.__self__ is m  # bound to the copy, not to the original
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ema(x)[0], model(x)[0])
        with torch.no_grad():
            next(m for m in ema.modules() if isinstance(m, Conv)).conv.weight.mul_(2)
        assert not torch.equal(ema(x)[0], model(x)[0])  # the copy runs its own weights
    ema.fuse()  # the host's fuse on the copy: nothing left to fuse, nothing breaks


def test_state_dict_route_replays_the_fused_forward(tmp_path):
    """A YOLOv5 state_dict + --arch: the recipe records the removal (edit ``use_forward``), so
    the rebuilt model is the same structure; the host's fuse() runs on it."""
    import modelsurgeon as ms
    from models.common import Conv
    from models.yolo import Model

    from zoo import randomize

    model = randomize(Model(), 7).eval()
    src, dst = tmp_path / "sd.pt", tmp_path / "folded.safetensors"
    torch.save(model.state_dict(), src)
    r = run_cli("fold-bn", src, "--arch", "models.yolo:Model", "--code-path", YOLO, "-s", "1,3,64,64", "-o", dst)
    assert r.code == 0, r.err
    rebuilt = ms.load(dst, arch="models.yolo:Model", code_paths=[YOLO]).eval()
    convs = [m for m in rebuilt.modules() if isinstance(m, Conv)]
    assert convs and all(not hasattr(m, "bn") and m.forward.__func__ is Conv.forward_fuse for m in convs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)[0]
        torch.testing.assert_close(rebuilt.fuse()(x)[0], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_a_fused_forward_that_computes_something_else_is_not_used(tmp_path):
    """Parity decides: a class whose forward_fuse differs (here it drops the activation) keeps
    today's placeholder and its own forward."""
    from models.common import Conv

    class Lying(Conv):
        def forward_fuse(self, x):
            return self.conv(x)

    net = nn.Sequential(Lying(3, 8, 3), Conv(8, 8, 3))
    from testmodels import randomize_all

    randomize_all(net, 2).eval()
    import modelsurgeon as ms

    _, report = ms.fold_bn(net, input_shape=(1, 3, 16, 16))
    assert len(report.applied) == 2
    lying, honest = net[0], net[1]
    assert isinstance(lying.bn, nn.Identity) and "forward" not in vars(lying)
    assert not hasattr(honest, "bn") and honest.forward.__func__ is Conv.forward_fuse


# -- Ultralytics ---------------------------------------------------------------------------------

def test_ultralytics_style_host_loads_the_folded_checkpoint(tmp_path):
    import ultralike

    model = ultralike.randomized(3)
    src, dst = tmp_path / "best.pt", tmp_path / "best-folded.pt"
    torch.save({"epoch": 10, "model": None, "ema": copy.deepcopy(model).half(), "optimizer": None,
                "train_args": {"imgsz": 64}}, src)
    r = run_cli("fold-bn", src, "--trust-pickle", "--code-path", TESTS, "-s", "1,3,64,64", "-o", dst, "--json")
    assert r.code == 0, r.err
    folded = torch.load(dst, weights_only=False)["ema"]
    deconv = next(m for m in folded.modules() if isinstance(m, ultralike.ConvTranspose))
    assert not hasattr(deconv, "bn") and deconv.forward.__func__ is ultralike.ConvTranspose.forward_fuse
    plain = [m for m in folded.model if type(m) is ultralike.Conv]
    assert plain and all(not hasattr(m, "bn") for m in plain)
    # RepConv's own fuse_convs reads its branches' BatchNorm statistics (and their convs' weights,
    # ignoring any bias): those are left to it, reported with the reason
    skips = [s for s in r.json()["skipped"] if ".conv1.bn" in s["target"] or ".conv2.bn" in s["target"]]
    assert len(skips) == 8 and all(s["code"] == "host-reads" and "_fuse_bn_tensor" in s["reason"] for s in skips)
    for rep in (m for m in folded.modules() if isinstance(m, ultralike.RepConv)):
        for branch in (rep.conv1, rep.conv2):
            assert isinstance(branch.bn, nn.BatchNorm2d) and branch.conv.bias is None
    assert not folded.is_fused()  # 10+ norms left: the host's fuse() runs, RepConv included
    want = _host_run("ultralike:attempt_load_one_weight", src, [])
    got = _host_run("ultralike:attempt_load_one_weight", dst, [])
    assert float((got - want).abs().max()) <= 1e-2 * float(want.abs().max())
