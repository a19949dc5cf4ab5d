"""``optimize`` on ONNX exports of every architecture family of the bench table (small sizes):
the clean-up leaves no BatchNormalization and no Identity, never more nodes than the surgery
passes alone (``--skip cleanup``), none of the ops the family's export computes shapes with, and
the same function at another batch size."""

from __future__ import annotations

import warnings
from collections import Counter

import onnx
import pytest
import torch

import onnx_graphs as G
from conftest import run_cli

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Cast", "Ceil", "Range", "ConstantOfShape", "Identity", "Dropout"}


def _family(name):
    from zoo.bifpn import bifpn
    from zoo.densenet import densenet
    from zoo.efficientnet import efficientnet, efficientnet_lite
    from zoo.mobilenetv2 import mobilenet_v2
    from zoo.mobilenetv3 import mobilenet_v3
    from zoo.repvgg import repvgg
    from zoo.resnet import resnet
    from zoo.shufflenet import shufflenet_v2
    from zoo.unet import unet
    from zoo.vit import vit

    from models.yolo import Model

    # builder, input size, ops that must be gone (besides BatchNormalization and Identity)
    return {
        "resnet": (lambda: resnet(10, 8, 1), 32, set()),
        "mobilenetv2": (lambda: mobilenet_v2(10, 0.25, 64), 32, set()),
        "mobilenetv3": (lambda: mobilenet_v3(0.25, 10), 32, set()),
        "efficientnet-lite": (lambda: efficientnet_lite(0.25, 0.34, 10), 33, SHAPE_OPS | {"Pad", "Div"}),
        "efficientnet-se": (lambda: efficientnet(0.25, 0.34, 10), 32, SHAPE_OPS | {"Pad"}),
        "repvgg": (lambda: repvgg(0.25, 0.25, 10), 32, set()),
        "densenet": (lambda: densenet(8, 0.2, 10), 32, set()),
        "shufflenet": (lambda: shufflenet_v2(0.25, 0.25, 10), 32, SHAPE_OPS),
        "vit": (lambda: vit(32, 16, 2, 2, 10), 32, {"Identity", "Range", "ConstantOfShape", "Cast"}),
        "unet": (lambda: unet(4, 2, 2), 32, SHAPE_OPS),
        "bifpn": (lambda: bifpn(8), 32, {"ReduceSum", "Relu", "Div", "Gather"}),
        "yolo": (lambda: Model(nc=3, width=0.25), 64, SHAPE_OPS | {"Expand"}),
    }[name]


FAMILIES = ["resnet", "mobilenetv2", "mobilenetv3", "efficientnet-lite", "efficientnet-se", "repvgg", "densenet",
            "shufflenet", "vit", "unet", "bifpn", "yolo"]


def _export(model, size, path, fold):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, do_constant_folding=fold,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return path


def _optimize(src, dst, *args):
    r = run_cli("optimize", src, "-o", dst, "--json", *args)
    assert r.code == 0, r.err
    return r.json()


@pytest.mark.parametrize("family", FAMILIES)
def test_family_export_without_constant_folding(tmp_path, family):
    from zoo import randomize

    build, size, gone = _family(family)
    torch.manual_seed(0)
    model = randomize(build(), 3).eval()
    src = _export(model, size, tmp_path / "m.onnx", fold=False)
    rep = _optimize(src, tmp_path / "o.onnx")
    base = _optimize(src, tmp_path / "base.onnx", "--skip", "cleanup")
    ops = Counter(G.ops(tmp_path / "o.onnx"))
    assert rep["parity"]["passed"] and rep["after"]["modules"] == sum(ops.values())
    assert sum(ops.values()) <= sum(Counter(G.ops(tmp_path / "base.onnx")).values())
    assert "Identity" not in ops and not (gone & set(ops)), sorted(gone & set(ops))
    assert "BatchNormalization" not in ops
    if family == "repvgg":  # identity branches (a BN reading a block's input) go with reparam: one Conv per block
        blocks = sum(1 for m in model.modules() if hasattr(m, "identity"))
        reparam = next(p for p in rep["passes"] if p["name"] == "reparam")
        assert blocks and reparam["applied"] == blocks and base["after"]["bn"] == 0 and "Add" not in ops
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # stays symbolic
    G.assert_same_function(src, tmp_path / "o.onnx", batch=2)


def test_legacy_export_without_folding_through_the_cli(tmp_path):
    """The issue's case: TF-same EfficientNet-lite exported with constant folding off, human report."""
    from zoo import randomize
    from zoo.efficientnet import efficientnet_lite

    torch.manual_seed(0)
    src = _export(randomize(efficientnet_lite(0.25, 0.34, 10), 4).eval(), 48, tmp_path / "lite.onnx", fold=False)
    before = Counter(G.ops(src))
    assert before["Pad"] and before["Shape"] and before["BatchNormalization"]
    r = run_cli("optimize", src, "-o", tmp_path / "lite.opt.onnx")
    assert r.code == 0, r.err
    assert "fold-shapes:" in r.out and "fuse-pad:" in r.out and "wrote" in r.out
    after = Counter(G.ops(tmp_path / "lite.opt.onnx"))
    assert set(after) <= {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}, after
    assert after["Conv"] == before["Conv"]
    G.assert_same_function(src, tmp_path / "lite.opt.onnx", batch=3)


def test_dynamo_export(tmp_path):
    pytest.importorskip("onnxscript")
    from zoo import randomize
    from zoo.resnet import resnet

    torch.manual_seed(0)
    src = tmp_path / "r.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(randomize(resnet(10, 8, 1), 5).eval(), (torch.randn(1, 3, 32, 32),), dynamo=True,
                                 optimize=False, dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        prog.save(str(src))
    assert "CastLike" in G.ops(src)
    rep = _optimize(src, tmp_path / "o.onnx")
    ops = set(G.ops(tmp_path / "o.onnx"))
    assert rep["parity"]["passed"] and not ops & {"BatchNormalization", "CastLike", "Expand", "Shape"}
    G.assert_same_function(src, tmp_path / "o.onnx", batch=2)
