"""fold-fusion / optimize on EfficientDet-style BiFPN cells whose fusion weights are computed
inline in one big forward (tests/bifpn_models.py): the cell's forward is regenerated, no
normalisation op on a weight runs any more, each weight moves into the BatchNorm producing its
input when nothing else reads that input and stays one constant multiply otherwise, and every
output type round-trips. BatchNorm statistics, affine parameters and fusion weights are random."""

from __future__ import annotations

import copy

import pytest
import torch

import bifpn_models as bm
import modelsurgeon as ms
from conftest import ROOT, run_cli, run_without_modelsurgeon
from modelsurgeon.capture import capture

SHAPE = (1, 3, 32, 32)
NORMALISING = {"relu", "Tensor.relu", "softmax", "Tensor.softmax", "sigmoid", "Tensor.sigmoid", "sum", "Tensor.sum",
               "div", "Tensor.div", "add", "Tensor.add"}
# the five inputs of the first cell read once: the channel-reducing conv + BatchNorm of each
MOVED = ["bifpn.0.p5_down_channel", "bifpn.0.p4_down_channel", "bifpn.0.p3_down_channel",
         "bifpn.0.p4_down_channel_2", "bifpn.0.p5_down_channel_2"]


def weight_ops(model, shape=SHAPE):
    """``(ops computed from parameters alone, multiplies by a constant)`` run in the BiFPN cells."""
    g, _, _ = capture(model, [torch.randn(shape)])
    alone, muls = [], []
    for e in g.events:
        if not g.call(e.scope).path.startswith("bifpn"):
            continue
        if e.inputs and not g.reads_variable(e):
            alone.append(e.name)
        elif e.name in ("Tensor.mul", "mul") and any(g.value(i).const for i in e.inputs):
            muls.append(e)
    return alone, muls


def fold(model, run=ms.fold_fusion):
    original = copy.deepcopy(model)
    _, report = run(model, SHAPE)
    assert report.parity.passed, report.parity.worst()
    for shape in [(2, 3, 32, 64), (1, 3, 64, 32)]:
        assert ms.compare(model, original, shape, trials=1, seed=3).passed, shape
    return report, original


@pytest.mark.parametrize("weighting,per_channel", [("fast", False), ("fast", True), ("softmax", False),
                                                   ("softmax", True), ("sigmoid", False)])
def test_inline_weights_are_evaluated_once_and_moved(weighting, per_channel):
    model = bm.build(weighting, per_channel)
    alone, muls = weight_ops(model)
    assert {"softmax", "sigmoid", "relu"} & set(alone) and len(muls) == 38  # 2 cells x 19 weights
    report, _ = fold(model)
    assert [a.target for a in report.applied] == ["bifpn.0: 8 weighted sums", "bifpn.1: 8 weighted sums"]
    assert not report.skipped
    inputs = [i for a in report.applied for i in a.data["inputs"]]
    assert [i["absorbed_by"] for i in inputs if i["absorbed_by"]] == [p + ".1" for p in MOVED]
    assert all(i["code"] == "other-readers" for i in inputs if i["kept"])
    alone, muls = weight_ops(model)
    assert not set(alone) & NORMALISING, alone  # no normalisation op on a weight runs
    assert len(muls) == sum(i["kept"] for i in inputs) == 38 - len(MOVED)
    for cell in model.bifpn:  # the cells keep their class and children; their weights are gone
        assert type(cell) is bm.BiFPN and isinstance(cell.conv4_up, bm.SeparableConvBlock)
        assert not [n for n, _ in cell.named_parameters() if "_w" in n.split(".")[-1]]
        assert cell.forward.func is cell.fused
    before, after = report.applied[0].data["ops"]
    assert after < before


def test_optimize_leaves_no_batchnorm_and_fewer_ops():
    model = bm.build("fast")
    report, _ = fold(model, ms.optimize)
    assert report.before.bn == 27 and report.after.bn == 0
    assert report.after.ops < report.before.ops
    alone, muls = weight_ops(model)
    assert not set(alone) & NORMALISING and len(muls) == 38 - len(MOVED)
    _, again = ms.fold_fusion(model, SHAPE)
    assert not again.applied and not again.skipped


def test_a_cell_branching_on_data_is_skipped_with_the_reason_never_wrong():
    model = bm.build("fast", cls=bm.DataBranchBiFPN)
    before = {k: v.clone() for k, v in model.bifpn[0].state_dict().items()}
    report, _ = fold(model)
    assert [a.target for a in report.applied] == ["bifpn.1: 8 weighted sums"]  # the other cell still is
    skipped = [s for s in report.skipped if s.target.startswith("bifpn.0")]
    assert len(skipped) == 19
    assert all(s.code == "inline" and "Tensor.__bool__" in s.reason  # the branch on data, named
               for s in skipped), skipped[0].reason
    assert "forward" not in vars(model.bifpn[0])
    assert all(torch.equal(v, model.bifpn[0].state_dict()[k]) for k, v in before.items())


def test_pt_output_loads_with_torch_alone(tmp_path):
    src, out = tmp_path / "m.pt", tmp_path / "o.pt"
    torch.save(bm.build("softmax", True), src)
    r = run_cli("optimize", src, "--trust-pickle", "--code-path", ROOT / "tests", "-s", "1,3,32,32", "-o", out, "--json")
    assert r.code == 0, r.err
    x = torch.randn(2, 3, 32, 64)
    expected = torch.load(src, weights_only=False)(x)
    torch.save(x, tmp_path / "x.pt")
    shown = run_without_modelsurgeon(out, tmp_path / "x.pt", tmp_path / "y.pt",
                                     "type(m.bifpn[0]).__name__, type(c.bifpn[1]).__name__, type(m.bifpn[0].fused).__name__")
    assert shown == ["BiFPN", "BiFPN", "GraphModule"]
    for got in torch.load(tmp_path / "y.pt"):
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, expected))


def test_safetensors_output_rebuilds_from_its_recipe(tmp_path):
    arch = "bifpn_models:softmax_per_channel"
    src, out = tmp_path / "sd.pt", tmp_path / "o.safetensors"
    factory = getattr(bm, arch.split(":")[1])
    torch.save(factory().state_dict(), src)
    r = run_cli("optimize", src, "--arch", arch, "--code-path", ROOT / "tests", "-s", "1,3,32,32", "-o", out, "--json")
    assert r.code == 0, r.err
    rebuilt = ms.load(out, arch=arch)
    rewritten = factory()
    ms.optimize(rewritten, SHAPE)
    expected, got = rewritten.state_dict(), rebuilt.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], v) for k, v in expected.items())
    x = torch.randn(2, 3, 32, 64)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt(x), rewritten(x)))
    assert ms.compare(rebuilt, factory(), (1, 3, 64, 32), trials=2).passed
    assert all(type(c) is bm.BiFPN and c.forward.func is c.fused for c in rebuilt.bifpn)


def weight_computations(graph) -> list[str]:
    """ONNX nodes computed from initializers (weights) alone: what an exporter left of the
    weight normalisations (shape arithmetic, from ``Constant`` nodes, does not count)."""
    known = {i.name for i in graph.initializer}
    derived, out = set(known), []
    for n in graph.node:
        if n.op_type == "Constant":
            known.update(n.output)
        elif n.input and all(i in known or not i for i in n.input):
            known.update(n.output)
            if any(i in derived for i in n.input):
                derived.update(n.output)
                out.append(n.op_type)
    return out


def test_onnx_exports_have_no_weight_computations(tmp_path):
    import io

    import onnx

    src, out = tmp_path / "m.pt", tmp_path / "o.onnx"
    torch.save(bm.build("fast"), src)
    r = run_cli("fold-fusion", src, "--trust-pickle", "--code-path", ROOT / "tests", "-s", "1,3,32,32", "-o", out,
                "--json")
    assert r.code == 0, r.err
    assert r.json()["parity"]["passed"] and not weight_computations(onnx.load(str(out)).graph)
    # exported without constant folding: the original computes its weights in the graph, the
    # rewritten model (its generated forwards) does not
    model = bm.build("fast")
    counts = []
    for m in (copy.deepcopy(model), model):
        if m is model:
            ms.fold_fusion(m, SHAPE)
        f = io.BytesIO()
        torch.onnx.export(m, (torch.randn(SHAPE),), f, dynamo=False, do_constant_folding=False, opset_version=17)
        counts.append(weight_computations(onnx.load_from_string(f.getvalue()).graph))
    assert {"Relu", "ReduceSum", "Div"} <= set(counts[0]) and counts[1] == []
