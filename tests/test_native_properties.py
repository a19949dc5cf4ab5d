"""Random layer geometries: darknet convolution / maxpool / upsample / route options against
darknet's own loops (``darknet_reference``), Caffe convolution and pooling (ceil rounding, the
clip rule, average pooling's divisor) against OpenCV. Each example either equals the reference
or is refused with one line (exit 2 semantics: ``BadInput``). The geometries OpenCV sizes
differently from Caffe are checked in test_caffe.py against Caffe's own loops."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import darknet_reference as ref
import native_models as M
from modelsurgeon.errors import BadInput

pytest.importorskip("cv2")

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def darknet_nets(draw):
    c = draw(st.sampled_from([2, 4]))
    h, w = draw(st.integers(5, 11)), draw(st.integers(5, 11))
    size = draw(st.integers(1, 4))
    groups = draw(st.sampled_from([1, 2])) if c % 2 == 0 else 1
    conv = {"filters": draw(st.sampled_from([2, 4, 6])), "size": size, "groups": groups,
            "stride_x": draw(st.integers(1, 3)), "stride_y": draw(st.integers(1, 3)),
            "dilation": draw(st.integers(1, 2)), "batch_normalize": draw(st.integers(0, 1)),
            "activation": draw(st.sampled_from(["leaky", "mish", "linear", "relu6", "hard_mish"]))}
    if draw(st.booleans()):
        conv["pad"] = 1
    else:
        conv["padding"] = draw(st.integers(0, 2))
    pool = {"size": draw(st.integers(1, 4)), "stride_x": draw(st.integers(1, 3)), "stride_y": draw(st.integers(1, 3))}
    if draw(st.booleans()):  # up to what leaves no window wholly in the padding (tested on its own)
        pool["padding"] = draw(st.integers(0, 2 * pool["size"] - 2))
    up = {"stride": draw(st.sampled_from([1, 2, 3])), "scale": draw(st.sampled_from([1, 0.5, 2]))}
    groups_r = draw(st.sampled_from([1, 2]))
    route = {"layers": "-1,-2", "groups": groups_r, "group_id": draw(st.integers(0, groups_r - 1))}
    return (M.NET.format(w=w, h=h, c=c) + M.section("convolutional", **conv) + M.section("maxpool", **pool)
            + M.section("upsample", **up) + M.section("convolutional", filters=4, size=1, activation="linear")
            + M.section("route", **route))


@SETTINGS
@given(text=darknet_nets(), seed=st.integers(0, 2**16))
def test_darknet_geometry(tmp_path, text, seed):
    from modelsurgeon.read.darknet import read_darknet

    try:
        cfg, weights = M.write_darknet(tmp_path, "p", text, seed=seed)
        src = read_darknet(weights)
    except BadInput as e:
        assert "\n" not in str(e)
        event(f"refused: {str(e).split(': ')[-1][:40]}")
        return
    event("compared")
    x = np.random.default_rng(seed).standard_normal([d for d in src.model.graph.inputs[0].shape.dims])
    x = x.astype(np.float32)
    every = M.ort_run(src.onnx_bytes, {"input": x}, [L.name for L in src.layers])
    mine = ref.forward(src.layers, src.arrays, x)
    for L in src.layers:
        if L.name in every:
            assert every[L.name].shape[1:] == mine[L.index].shape[1:]
            M.close(every[L.name], mine[L.index], rtol=5e-5)


@st.composite
def caffe_nets(draw):
    h, w = draw(st.integers(4, 12)), draw(st.integers(4, 12))
    ck, cs, cd = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    cp = draw(st.integers(0, 2))
    oh, ow = ((n + 2 * cp - (cd * (ck - 1) + 1)) // cs + 1 for n in (h, w))
    # kernels up to the input (OpenCV sizes a larger kernel's output 0, Caffe 1)
    k = (draw(st.integers(1, max(1, min(4, oh)))), draw(st.integers(1, max(1, min(4, ow)))))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] - 1)), draw(st.integers(0, k[1] - 1)))
    pool = draw(st.sampled_from(["MAX", "AVE"]))
    return ('input: "data"\n'
            f'input_shape {{ dim: 1 dim: 4 dim: {h} dim: {w} }}\n'
            'layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 4 '
            f'kernel_size: {ck} stride: {cs} pad: {cp} dilation: {cd} group: 2 }} }}\n'
            'layer { name: "p" type: "Pooling" bottom: "c" top: "p" pooling_param { '
            f'pool: {pool} kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} stride_w: {s[1]} '
            f'pad_h: {p[0]} pad_w: {p[1]} }} }}\n')


@SETTINGS
@given(text=caffe_nets(), seed=st.integers(0, 2**16))
def test_caffe_convolution_and_pooling(tmp_path, text, seed):
    from modelsurgeon.read.caffe import read_caffe

    try:
        proto, model = M.write_caffe(tmp_path, "p", text, seed=seed)
        src = read_caffe(model)
    except BadInput as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("compared")
    rng = np.random.default_rng(seed)
    feeds = {"data": rng.standard_normal([d for d in src.model.graph.inputs[0].shape.dims]).astype(np.float32)}
    outs = M.ort_run(src.onnx_bytes, feeds, ["c"])
    cv = M.opencv_caffe(proto, model, feeds, ["c", "p"])
    # a max window wholly past the input (stride > kernel, ceil rounding): Caffe leaves -FLT_MAX there,
    # OpenCV writes 0
    empty = outs["p"] == -np.finfo(np.float32).max
    assert (cv["p"][empty] == 0).all()
    outs["p"], cv["p"] = np.where(empty, 0, outs["p"]), np.where(empty, 0, cv["p"])
    for name in ("c", "p"):
        assert outs[name].shape == cv[name].shape
        M.close(outs[name], cv[name], rtol=1e-5)
