"""focus-to-conv on ONNX graphs: Slice x4 + Concat in any phase order and spelling,
SpaceToDepth with or without a channel shuffle, symbolic sizes; exactness checks."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest

import onnx_graphs as G
from modelsurgeon import passes as registry
from conftest import run_cli
from onnx_graphs import Builder, out, tensor


def run(tmp_path, model, *args, command="focus-to-conv", name="m"):
    return G.run_pass(tmp_path, model, command, *args, name=name)


def ops(path) -> list[str]:
    """Op types, Constant nodes aside (focus-to-conv leaves the exporter's constants alone)."""
    return [o for o in G.ops(path) if o != "Constant"]


def conv_attrs(path) -> dict:
    conv = next(n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv")
    return {a.name: list(a.ints) if a.ints else a.i for a in conv.attribute}


@pytest.mark.parametrize("order", list(itertools.permutations(G.FOCUS_ORDER))[::5])
def test_focus_any_phase_order(tmp_path, order):
    rep, src, dst = run(tmp_path, G.focus_stem(order=order, bn=False))
    assert ops(dst) == ["Conv", "Sigmoid", "Mul"]
    a = conv_attrs(dst)
    assert a["kernel_shape"] == [6, 6] and a["strides"] == [2, 2] and a["pads"] == [2, 2, 2, 2]
    (applied,) = rep["applied"]
    assert applied["factor"] == 2 and applied["source"] == "x" and len(applied["removed"]) == 5
    G.assert_same_function(src, dst)


@pytest.mark.parametrize("opset,chained,negative,const_nodes,ends", [
    (11, True, False, True, G.INT64_MAX),
    (12, False, True, False, 2 ** 31 - 1),
    (13, True, True, False, G.INT64_MAX),
    (17, False, False, True, G.INT64_MAX),
])
def test_focus_spellings(tmp_path, opset, chained, negative, const_nodes, ends):
    model = G.focus_stem(opset=opset, chained=chained, negative_axes=negative, const_nodes=const_nodes, ends=ends,
                         order=((1, 1), (0, 0), (0, 1), (1, 0)))
    rep, src, dst = run(tmp_path, model)
    assert G.ops(dst)[0] == "Conv" and "Slice" not in G.ops(dst) and "Concat" not in G.ops(dst)
    G.assert_same_function(src, dst)


def test_focus_stem_target_after_optimize(tmp_path):
    rep, src, dst = run(tmp_path, G.focus_stem(), command="optimize")
    assert G.ops(dst) == ["Conv", "Sigmoid", "Mul"]
    names = [p["name"] for p in rep["passes"]]
    assert names == registry.exact_passes()  # the graph clean-up runs around the surgery passes
    assert [n for n in names if registry.REGISTRY[n].group != "cleanup"] == ["focus-to-conv", "fold-fusion", "reparam", "fold-bn"]
    G.assert_same_function(src, dst)


@pytest.mark.parametrize("shuffle", [None, "gather", "transpose"])
def test_space_to_depth_with_channel_shuffles(tmp_path, shuffle):
    rep, src, dst = run(tmp_path, G.s2d_conv(shuffle=shuffle))
    assert G.ops(dst) == ["Conv"]
    G.assert_same_function(src, dst)


def test_space_to_depth_conv_stride_and_valid_padding(tmp_path):
    rep, src, dst = run(tmp_path, G.s2d_conv(k=2, p=0, s=2))
    assert G.ops(dst) == ["Conv"]
    a = conv_attrs(dst)
    assert a["kernel_shape"] == [4, 4] and a["strides"] == [4, 4] and a["pads"] == [0, 0, 0, 0]
    G.assert_same_function(src, dst)


def test_grouped_conv_after_space_to_depth_is_skipped(tmp_path):
    rep, src, dst = run(tmp_path, G.s2d_conv(group=4))
    assert G.ops(dst) == ["SpaceToDepth", "Conv"]
    (s,) = rep["skipped"]
    assert s["target"] == "conv" and s["code"] == "layer-settings"


def test_concat_of_width_blocks_is_left_alone(tmp_path):
    rep, src, dst = run(tmp_path, G.focus_stem_opset9())
    assert G.ops(dst) == ["Slice", "Slice", "Concat", "Conv"]
    assert rep["applied"] == [] and rep["skipped"] == []  # no sub-sampling: not even a candidate


def test_incomplete_phases_are_skipped(tmp_path):
    b = Builder(30)
    parts = [b.node("Slice", ["x", b.const(np.array([dy, dx], np.int64)), b.const(np.array([G.INT64_MAX] * 2, np.int64)),
                              b.const(np.array([2, 3], np.int64)), b.const(np.array([2, 2], np.int64))])
             for dy, dx in ((0, 0), (1, 0), (0, 1), (0, 0))]  # (1, 1) missing, (0, 0) twice
    y = b.conv(b.node("Concat", parts, axis=1), 12, 4, name="conv")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 4, 4])], 13))
    assert "Concat" in G.ops(dst)
    assert rep["skipped"][0]["code"] == "not-a-pattern"


def test_space_to_depth_read_elsewhere_is_skipped(tmp_path):
    b = Builder(31)
    s = b.node("SpaceToDepth", ["x"], name="s2d", blocksize=2)
    y = b.conv(s, 12, 4, name="conv")
    model = b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 4, 4]), out(s, ["N", 12, 4, 4])], 13)
    rep, src, dst = run(tmp_path, model)
    assert G.ops(dst) == ["SpaceToDepth", "Conv"]
    assert rep["skipped"][0]["code"] == "other-readers"


def test_symbolic_spatial_size(tmp_path):
    model = G.focus_stem(hw=("H", "W"))
    src = G.save(model, tmp_path / "hw.onnx")
    r = run_cli("focus-to-conv", src, "-o", tmp_path / "o.onnx")
    assert r.code == 2 and "--input-shape" in r.err and r.err.count("\n") == 1
    rep, src, dst = run(tmp_path, model, "-s", "2,3,32,48", name="hw")
    assert G.ops(dst)[0] == "Conv" and "Slice" not in G.ops(dst)
    G.assert_same_function(src, dst, dims={"H": 40, "W": 24})  # another size than the one verified


def test_finite_slice_end_on_symbolic_size_is_skipped(tmp_path):
    rep, src, dst = run(tmp_path, G.focus_stem(hw=("H", "W"), ends=640), "-s", "1,3,32,32")
    assert "Slice" in G.ops(dst)
    assert rep["skipped"][0]["code"] == "size-dependent"


def test_shared_stem_weight_is_duplicated(tmp_path):
    b = Builder(32)
    s = b.node("SpaceToDepth", ["x"], name="s2d", blocksize=2)
    w = b.weight((4, 12, 3, 3), "w")
    y1 = b.node("Conv", [s, w], name="conv", pads=[1] * 4)
    y2 = b.node("Conv", ["z", w], name="other", pads=[1] * 4)
    model = b.model([tensor("x", ["N", 3, 8, 8]), tensor("z", ["N", 12, 4, 4])],
                    [out(b.node("Add", [y1, y2], name="sum"), ["N", 4, 4, 4])], 13)
    rep, src, dst = run(tmp_path, model)
    assert G.ops(dst) == ["Conv", "Conv", "Add"]
    m = onnx.load(str(dst))
    other = next(n for n in m.graph.node if n.name == "other")
    assert other.input[1] == w
    G.assert_same_function(src, dst)


def test_rows_only_subsampling_is_skipped_with_reason(tmp_path):
    b = Builder(33)
    parts = [b.node("Slice", ["x", b.const(np.array([dy], np.int64)), b.const(np.array([G.INT64_MAX], np.int64)),
                              b.const(np.array([2], np.int64)), b.const(np.array([2], np.int64))]) for dy in (0, 1)]
    y = b.conv(b.node("Concat", parts, axis=1), 6, 4, name="conv")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 4, 8])], 13))
    assert "Concat" in G.ops(dst)
    assert rep["skipped"][0]["code"] == "not-a-pattern"


@pytest.mark.parametrize("flag", ["--check-grad", "--bench"])
def test_pytorch_only_flags_are_refused(tmp_path, flag):
    src = G.save(G.s2d_conv(), tmp_path / "m.onnx")
    r = run_cli("focus-to-conv", src, flag, "-o", tmp_path / "o.onnx")
    assert r.code == 2 and flag in r.err and not (tmp_path / "o.onnx").exists()


# -- regressions (QA pass on the ONNX back end) -----------------------------------------------------

def _stale_value_info_stem(ends: int):
    """Relu(x) then the 4 Focus Slices, x declared [1, 3, H, W] but the split tensor carrying a
    static value_info [1, 3, 8, 8] -- a model exported at 8x8 whose input was made dynamic."""
    b = Builder(40)
    r = b.node("Relu", ["x"], name="relu")
    parts = [b.node("Slice", [r, b.const(np.array([dy, dx], np.int64)), b.const(np.array([ends, ends], np.int64)),
                              b.const(np.array([2, 3], np.int64)), b.const(np.array([2, 2], np.int64))])
             for dy, dx in G.FOCUS_ORDER]
    y = b.conv(b.node("Concat", parts, axis=1), 12, 4, name="conv")
    m = b.model([tensor("x", [1, 3, "H", "W"])], [out(y, [1, 4, "h", "w"])], 13)
    m.graph.value_info.append(tensor(r, [1, 3, 8, 8]))
    return m


def test_stale_static_value_info_does_not_hide_a_symbolic_size(tmp_path):
    # finite ends crop at other sizes: only a space-to-depth at 8x8, so it must be skipped
    rep, src, dst = run(tmp_path, _stale_value_info_stem(8), "-s", "1,3,8,8", name="crop")
    assert "Slice" in G.ops(dst) and rep["applied"] == []
    (s,) = rep["skipped"]
    assert s["code"] == "size-dependent"
    G.assert_same_function(src, dst, dims={"H": 16, "W": 16})
    # the same stem running to the end is a space-to-depth at every size: rewritten, exact elsewhere too
    rep, src, dst = run(tmp_path, _stale_value_info_stem(G.INT64_MAX), "-s", "1,3,8,8", name="full")
    assert "Slice" not in G.ops(dst) and len(rep["applied"]) == 1
    G.assert_same_function(src, dst, dims={"H": 16, "W": 24})


def test_detail_shows_every_stride_and_pad_when_they_differ(tmp_path):
    b = Builder(41)
    y = b.node("SpaceToDepth", ["x"], name="s2d", blocksize=2)
    y = b.node("Conv", [y, b.weight((5, 12, 3, 3))], name="conv", kernel_shape=[3, 3], strides=[1, 2], pads=[0, 1, 2, 0])
    rep, src, dst = run(tmp_path, b.model([tensor("x", [1, 3, 8, 8])], [out(y, [1, 5, 4, 2])], 13))
    (a,) = rep["applied"]
    assert "Conv k3 s[1,2] p[0,1,2,0] → Conv k6 s[2,4] p[0,2,4,0]" in a["detail"]
    assert conv_attrs(dst)["strides"] == [2, 4] and conv_attrs(dst)["pads"] == [0, 2, 4, 0]
    G.assert_same_function(src, dst)
    rep, _, _ = run(tmp_path, G.s2d_conv(), name="uniform")
    assert "Conv k3 s1 p1 → Conv k6 s2 p2" in rep["applied"][0]["detail"]


class _Unshuffle:
    @staticmethod
    def net(r: int, functional: bool):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.shuffle = torch.nn.PixelUnshuffle(r)
                self.conv = torch.nn.Conv2d(3 * r * r, 8, 3, padding=1)

            def forward(self, x):
                x = torch.nn.functional.pixel_unshuffle(x, r) if functional else self.shuffle(x)
                return torch.relu(self.conv(x))

        torch.manual_seed(r)
        return Net().eval()


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("r,functional,dynamic", [(2, True, None), (2, True, "hw"), (4, False, "batch")])
def test_torch_exported_pixel_unshuffle_becomes_one_conv(tmp_path, opset, r, functional, dynamic):
    """torch.onnx.export writes F.pixel_unshuffle / nn.PixelUnshuffle as Reshape → Transpose →
    Reshape (with Unsqueeze / Squeeze for dynamic sizes), no SpaceToDepth."""
    import torch

    net = _Unshuffle.net(r, functional)
    axes = {None: None, "batch": {"x": {0: "N"}}, "hw": {"x": {0: "N", 2: "H", 3: "W"}}}[dynamic]
    src = tmp_path / "pu.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), str(src), dynamo=False, opset_version=opset,
                      input_names=["x"], output_names=["y"], dynamic_axes=axes)
    assert "SpaceToDepth" not in G.ops(src) and "Transpose" in G.ops(src)
    dst = tmp_path / "pu.out.onnx"
    args = ["-s", "1,3,16,16"] if dynamic == "hw" else []
    r_ = run_cli("focus-to-conv", src, "-o", dst, "--json", *args)
    assert r_.code == 0, r_.err
    assert ops(dst) == ["Conv", "Relu"]
    (a,) = r_.json()["applied"]
    assert a["factor"] == r and a["kernel"] == [3 * r, 3 * r] and a["stride"] == [r, r]
    G.assert_same_function(src, dst, **({"dims": {"H": 32, "W": 48}} if dynamic == "hw" else {}))
    x = torch.randn(2 if dynamic else 1, 3, 32 if dynamic == "hw" else 16, 48 if dynamic == "hw" else 16)
    with torch.no_grad():
        ref = net(x).numpy()
    (got,) = G.ort_outputs(dst, {"x": x.numpy()})
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_channel_shuffle_reshape_transpose_is_not_a_candidate(tmp_path):
    """ShuffleNet's Reshape → Transpose → Reshape on channels: no sub-sampling, left without a report."""
    b = Builder(42)
    y = b.node("Reshape", ["x", b.const(np.array([0, 2, 4, 8, 8], np.int64))])
    y = b.node("Transpose", [y], perm=[0, 2, 1, 3, 4])
    y = b.node("Reshape", [y, b.const(np.array([0, 8, 8, 8], np.int64))])
    y = b.conv(y, 8, 4, name="conv")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 8, 8, 8])], [out(y, ["N", 4, 8, 8])], 13))
    assert rep["applied"] == [] and rep["skipped"] == []
    assert ops(dst) == ["Reshape", "Transpose", "Reshape", "Conv"]


def test_reshuffle_moving_data_between_batch_elements_is_skipped(tmp_path):
    """A space-to-depth at batch 1 that mixes batch elements at batch 2 (batch and channel axes
    swapped first): measured at batch 2 as well, skipped."""
    b = Builder(43)
    y = b.node("Transpose", ["x"], perm=[1, 0, 2, 3])
    y = b.node("Reshape", [y, b.const(np.array([-1, 3, 4, 2, 4, 2], np.int64))])
    y = b.node("Transpose", [y], perm=[0, 1, 3, 5, 2, 4])
    y = b.node("Reshape", [y, b.const(np.array([-1, 12, 4, 4], np.int64))])
    y = b.conv(y, 12, 4, name="conv")
    rep, src, dst = run(tmp_path, b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["M", 4, 4, 4])], 13))
    assert rep["applied"] == []
    assert rep["skipped"][0]["code"] == "not-a-pattern"


def test_space_to_depth_read_elsewhere_is_skipped_before_any_measurement(tmp_path, monkeypatch):
    """The cheap reader check comes first: the subgraph is not run by the reference evaluator
    for a candidate skipped anyway (a Reshape/Transpose reshuffle aside, which is reported only
    once measured to be a space-to-depth)."""
    from modelsurgeon.passes.focus_to_conv import onnx as f2c

    runs: list = []
    real = f2c.probe
    monkeypatch.setattr(f2c, "probe", lambda *a: runs.append(a[-1]) or real(*a))
    b = Builder(31)
    s = b.node("SpaceToDepth", ["x"], name="s2d", blocksize=2)
    y = b.conv(s, 12, 4, name="conv")
    model = b.model([tensor("x", ["N", 3, 8, 8])], [out(y, ["N", 4, 4, 4]), out(s, ["N", 12, 4, 4])], 13)
    rep, src, dst = run(tmp_path, model)
    assert rep["skipped"][0]["code"] == "other-readers" and G.ops(dst) == ["SpaceToDepth", "Conv"]
    assert runs == []
