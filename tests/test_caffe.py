"""Caffe ``.prototxt`` + ``.caffemodel`` in: the graph against OpenCV 4.x's Caffe importer,
every command through the ONNX back end, ``.caffemodel`` + ``.prototxt`` back out with
BatchNorm / Scale merged (read again by OpenCV), bad files refused."""

from __future__ import annotations

import numpy as np
import pytest

import native_models as M
from conftest import files_in, run_cli

pytest.importorskip("cv2")


def _read(caffemodel, prototxt=None, **kw):
    from modelsurgeon.read.caffe import read_caffe

    return read_caffe(caffemodel, prototxt, **kw)


def _feeds(src, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal([d for d in v.shape.dims]).astype(np.float32) for v in src.model.graph.inputs}


def _writer_of(src, blob: str) -> str:
    return [layer.name for layer in src.net.layers if blob in layer.param.top][-1]


def _against_opencv(src, prototxt, caffemodel, rtol=1e-4, feeds=None):
    feeds = feeds or _feeds(src)
    outs = M.ort_run(src.onnx_bytes, feeds)
    cv = M.opencv_caffe(prototxt, caffemodel, feeds, [_writer_of(src, n) for n in outs])
    for name in outs:
        M.close(outs[name], cv[_writer_of(src, name)], rtol=rtol)
    return outs, feeds


REAL = {"resnet": M.RESNET, "mobilenet-ssd": M.MOBILENET_SSD, "pooling": M.POOLING}


@pytest.mark.parametrize("layout", list(REAL))
def test_real_layouts_equal_opencv(tmp_path, layout):
    proto, model = M.write_caffe(tmp_path, layout, REAL[layout], seed=2)
    src = _read(model)
    outs, _ = _against_opencv(src, proto, model)
    if layout == "pooling":  # Caffe's ceil rounding and its clip rule decide these sizes
        sizes = {n: v.shape[2:] for n, v in outs.items()}
        assert sizes == {"p1": (5, 5), "p2": (6, 6), "p3": (5, 5), "p4": (6, 6), "p5": (4, 6), "p6": (1, 1)}


def _caffe_max_pool(x, k, s, p, out):
    """pooling_layer.cpp's MAX loop: -FLT_MAX, then the max over the window clipped to the input."""
    n, c, h, w = x.shape
    y = np.full((n, c, *out), -np.finfo(np.float32).max, np.float32)
    for i in range(out[0]):
        for j in range(out[1]):
            h0, w0 = i * s[0] - p[0], j * s[1] - p[1]
            h1, w1 = min(h0 + k[0], h), min(w0 + k[1], w)
            h0, w0 = max(h0, 0), max(w0, 0)
            if h1 > h0 and w1 > w0:
                y[:, :, i, j] = x[:, :, h0:h1, w0:w1].max(axis=(2, 3))
    return y


def test_pooling_where_opencv_sizes_differently(tmp_path):
    """A window past the input (stride > kernel, ceil rounding): Caffe keeps -FLT_MAX (OpenCV: 0);
    a kernel taller than the input: Caffe gives one row (OpenCV: none)."""
    text = ('input: "data"\ninput_shape { dim: 1 dim: 2 dim: 3 dim: 4 }\n'
            'layer { name: "past" type: "Pooling" bottom: "data" top: "past" pooling_param { pool: MAX kernel_size: 1 stride: 2 } }\n'
            'layer { name: "tall" type: "Pooling" bottom: "data" top: "tall" pooling_param { pool: MAX kernel_h: 4 kernel_w: 2 stride: 2 } }\n')
    proto, model = M.write_caffe(tmp_path, "odd", text)
    src = _read(model)
    feeds = _feeds(src)
    outs = M.ort_run(src.onnx_bytes, feeds)
    x = feeds["data"]
    np.testing.assert_array_equal(outs["past"], _caffe_max_pool(x, (1, 1), (2, 2), (0, 0), (2, 3)))
    np.testing.assert_array_equal(outs["tall"], _caffe_max_pool(x, (4, 2), (2, 2), (0, 0), (1, 2)))
    assert (outs["past"] == -np.finfo(np.float32).max).any()


def test_pooling_round_mode_floor(tmp_path):
    """round_mode (newer than OpenCV's Caffe schema): floor sizes, against a plain max."""
    text = ('input: "data"\ninput_shape { dim: 1 dim: 2 dim: 10 dim: 11 }\n'
            'layer { name: "p" type: "Pooling" bottom: "data" top: "p"\n'
            '  pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR } }\n')
    proto, model = M.write_caffe(tmp_path, "floor", text)
    src = _read(model)
    feeds = _feeds(src)
    out = M.ort_run(src.onnx_bytes, feeds)["p"]
    x = feeds["data"]
    expect = np.array([[[[x[0, c, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max() for j in range(5)] for i in range(4)]
                        for c in range(2)]])
    M.close(out, expect, rtol=0)


def test_batchnorm_moving_average_factor(tmp_path):
    """Seed 004: Caffe divides mean and variance by blobs[2] (0 -> scale factor 0)."""
    text = ('input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 4\ninput_dim: 4\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "data" top: "bn" batch_norm_param { eps: 0.001 } }\n'
            'layer { name: "bn0" type: "BatchNorm" bottom: "data" top: "bn0" }\n')
    proto, model = M.write_caffe(tmp_path, "bn", text, seed=3)
    from modelsurgeon.read.caffe.schema import classes

    net = classes()["NetParameter"]()
    net.ParseFromString(model.read_bytes())
    zero = next(lp for lp in net.layer if lp.name == "bn0")
    del zero.blobs[2].data[:]
    zero.blobs[2].data.append(0.0)
    model.write_bytes(net.SerializeToString())
    src = _read(model)
    feeds = _feeds(src)
    outs = M.ort_run(src.onnx_bytes, feeds)
    x = feeds["data"].astype(np.float64)
    mean, var, factor = (np.array(b.data) for b in next(lp for lp in net.layer if lp.name == "bn").blobs)
    expect = (x - (mean / factor[0]).reshape(1, -1, 1, 1)) / np.sqrt((var / factor[0]).reshape(1, -1, 1, 1) + 0.001)
    M.close(outs["bn"], expect, rtol=1e-5)
    M.close(outs["bn0"], x / np.sqrt(1e-5), rtol=1e-5)
    _against_opencv(src, proto, model)


LAYERS = ('name: "layers"\ninput: "data"\ninput_shape { dim: 1 dim: 6 dim: 9 dim: 10 }\n'
          'layer { name: "c1" type: "Convolution" bottom: "data" top: "c1" convolution_param { num_output: 8\n'
          '  kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 2 pad_h: 2 pad_w: 1 dilation: 2 } }\n'
          'layer { name: "prelu" type: "PReLU" bottom: "c1" top: "c1" }\n'
          'layer { name: "split" type: "Split" bottom: "c1" top: "s1" top: "s2" }\n'
          'layer { name: "slice" type: "Slice" bottom: "s1" top: "a" top: "b" slice_param { axis: 1 slice_point: 3 } }\n'
          'layer { name: "elu" type: "ELU" bottom: "a" top: "a" elu_param { alpha: 0.5 } }\n'
          'layer { name: "sig" type: "Sigmoid" bottom: "b" top: "b" }\n'
          'layer { name: "cat" type: "Concat" bottom: "b" bottom: "a" top: "cat" }\n'
          'layer { name: "prod" type: "Eltwise" bottom: "cat" bottom: "s2" top: "prod" eltwise_param { operation: PROD } }\n'
          'layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "s2" top: "max" eltwise_param { operation: MAX } }\n'
          'layer { name: "wsum" type: "Eltwise" bottom: "max" bottom: "s2" top: "wsum" eltwise_param { coeff: 0.5 coeff: -1.5 } }\n'
          'layer { name: "pow" type: "Power" bottom: "wsum" top: "pow" power_param { power: 2 scale: 0.5 shift: 1 } }\n'
          'layer { name: "tanh" type: "TanH" bottom: "pow" top: "pow" }\n'
          'layer { name: "lrn" type: "LRN" bottom: "pow" top: "lrn" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }\n'
          'layer { name: "gpool" type: "Pooling" bottom: "lrn" top: "gpool" pooling_param { pool: AVE global_pooling: true } }\n'
          'layer { name: "gate" type: "Flatten" bottom: "gpool" top: "gate" }\n'
          'layer { name: "gated" type: "Scale" bottom: "lrn" bottom: "gate" top: "gated" scale_param { axis: 0 } }\n'
          'layer { name: "bias" type: "Scale" bottom: "gated" top: "bias" scale_param { bias_term: true } }\n'
          'layer { name: "deconv" type: "Deconvolution" bottom: "bias" top: "deconv"\n'
          '  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }\n'
          'layer { name: "leaky" type: "ReLU" bottom: "deconv" top: "deconv" relu_param { negative_slope: 0.2 } }\n'
          'layer { name: "abs" type: "AbsVal" bottom: "deconv" top: "abs" }\n'
          'layer { name: "drop" type: "Dropout" bottom: "abs" top: "abs" dropout_param { dropout_ratio: 0.3 } }\n'
          'layer { name: "perm" type: "Permute" bottom: "abs" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }\n'
          'layer { name: "resh" type: "Reshape" bottom: "perm" top: "resh" reshape_param { shape { dim: 0 dim: -1 dim: 4 } } }\n'
          'layer { name: "ip2" type: "InnerProduct" bottom: "resh" top: "ip2" inner_product_param { num_output: 3 axis: 2 } }\n'
          'layer { name: "flat" type: "Flatten" bottom: "ip2" top: "flat" }\n'
          'layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 7 } }\n'
          'layer { name: "fct" type: "InnerProduct" bottom: "fc" top: "fct" inner_product_param { num_output: 5 transpose: true } }\n'
          'layer { name: "sm" type: "Softmax" bottom: "fct" top: "sm" }\n')


def test_layers_equal_opencv(tmp_path):
    proto, model = M.write_caffe(tmp_path, "layers", LAYERS, seed=4)
    src = _read(model)
    feeds = _feeds(src)
    blobs = ["c1", "a", "b", "cat", "prod", "max", "wsum", "pow", "lrn", "gated", "bias", "deconv", "perm", "resh",
             "ip2", "fc"]
    outs = M.ort_run(src.onnx_bytes, feeds, blobs + ["fct", "sm"])
    cv = M.opencv_caffe(proto, model, feeds, [_writer_of(src, b) for b in blobs])
    for b in blobs:
        M.close(outs[b], cv[_writer_of(src, b)], rtol=1e-4)
    # OpenCV ignores InnerProduct's transpose: Caffe computes x (M x K) @ W (K x N) then
    w, bias = src.arrays["fct"]
    fct = outs["fc"].astype(np.float64) @ w + bias
    M.close(outs["fct"], fct, rtol=1e-5)
    e = np.exp(fct - fct.max())
    M.close(outs["sm"], e / e.sum(), rtol=1e-5)


def test_upsample_interp_bias(tmp_path):
    """Layers OpenCV's Caffe importer does not read (forks' Upsample / Interp, Bias): against
    their definitions."""
    text = ('input: "data"\ninput_shape { dim: 1 dim: 2 dim: 3 dim: 4 }\n'
            'layer { name: "bias" type: "Bias" bottom: "data" top: "biased" bias_param { axis: 1 num_axes: 2 } }\n'
            'layer { name: "up" type: "Upsample" bottom: "data" top: "up" upsample_param { scale: 2 } }\n'
            'layer { name: "zoom" type: "Interp" bottom: "data" top: "zoom" interp_param { zoom_factor: 3 } }\n'
            'layer { name: "fixed" type: "Interp" bottom: "data" top: "fixed" interp_param { height: 5 width: 2 } }\n')
    proto, model = M.write_caffe(tmp_path, "resize", text)
    src = _read(model)
    feeds = _feeds(src)
    outs = M.ort_run(src.onnx_bytes, feeds)
    x = feeds["data"].astype(np.float64)
    M.close(outs["up"], x.repeat(2, axis=2).repeat(2, axis=3), rtol=0)
    M.close(outs["biased"], x + src.arrays["bias"][0].reshape(1, 2, 3, 1), rtol=1e-6)

    def align_corners(x, oh, ow):  # PSPNet's caffe_cpu_interp2: ratios (in-1)/(out-1)
        h, w = x.shape[2:]
        ys = np.arange(oh) * ((h - 1) / (oh - 1) if oh > 1 else 0)
        xs = np.arange(ow) * ((w - 1) / (ow - 1) if ow > 1 else 0)
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        g = lambda yy, xx: x[:, :, yy][:, :, :, xx]  # noqa: E731
        return (g(y0, x0) * (1 - fy) * (1 - fx) + g(y0, x1) * (1 - fy) * fx + g(y1, x0) * fy * (1 - fx)
                + g(y1, x1) * fy * fx)

    assert outs["zoom"].shape[2:] == (7, 10)
    M.close(outs["zoom"], align_corners(x, 7, 10), rtol=1e-5)
    M.close(outs["fixed"], align_corners(x, 5, 2), rtol=1e-5)


@pytest.mark.parametrize("layout", ["resnet", "mobilenet-ssd"])
def test_optimize_merges_batchnorm_and_scale(tmp_path, layout):
    proto, model = M.write_caffe(tmp_path, layout, REAL[layout], seed=5)
    out = tmp_path / "merged.caffemodel"
    r = run_cli("optimize", model, "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["before"]["bn"] > 0 and rep["after"]["bn"] == 0 and rep["parity"]["passed"]
    written = out.with_suffix(".prototxt").read_text()
    assert '"BatchNorm"' not in written and '"Scale"' not in written
    back = _read(out)
    assert not any(n.op_type in ("BatchNormalization", "Mul", "Add") and n.name != "res2a" for n in back.model.graph)
    src = _read(model)
    feeds = _feeds(src)
    before = M.ort_run(src.onnx_bytes, feeds)
    cv = M.opencv_caffe(out.with_suffix(".prototxt"), out, feeds, [_writer_of(back, n) for n in before])
    for name in before:
        M.close(cv[_writer_of(back, name)], before[name])


def test_eltwise_coefficients_merged(tmp_path):
    """fold-fusion moves SUM coefficients into the convolutions; the Eltwise keeps the rest."""
    text = ('input: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 8\ninput_dim: 8\n'
            'layer { name: "a" type: "Convolution" bottom: "data" top: "a" convolution_param { num_output: 4 kernel_size: 3 } }\n'
            'layer { name: "b" type: "Convolution" bottom: "data" top: "b" convolution_param { num_output: 4 kernel_size: 3 } }\n'
            'layer { name: "r" type: "ReLU" bottom: "b" top: "rb" }\n'
            'layer { name: "sum" type: "Eltwise" bottom: "a" bottom: "rb" top: "sum" eltwise_param { coeff: 0.5 coeff: -2 } }\n')
    proto, model = M.write_caffe(tmp_path, "coeff", text, seed=8)
    out = tmp_path / "merged.caffemodel"
    r = run_cli("fold-fusion", model, "-o", out)
    assert r.code == 0, r.err
    written = out.with_suffix(".prototxt").read_text()
    assert "coeff: 1" in written and "coeff: -2" in written  # a's 0.5 moved into a; rb is no conv output
    src = _read(model)
    feeds = _feeds(src)
    before = M.ort_run(src.onnx_bytes, feeds)
    M.close(M.opencv_caffe(out.with_suffix(".prototxt"), out, feeds, ["sum"])["sum"], before["sum"])


def test_every_command_and_output_format(tmp_path):
    import onnx

    proto, model = M.write_caffe(tmp_path, "resnet", M.RESNET, seed=6)
    for command, extra in [("fold-bn", []), ("fold-fusion", []), ("focus-to-conv", []), ("optimize", []),
                           ("truncate", ["--at", "res2a_branch2b/bn"])]:
        for suffix in (".onnx", ".caffemodel"):
            out = tmp_path / f"{command}{suffix}"
            r = run_cli(command, model, "--prototxt", proto, "-o", out, *extra)
            assert r.code == 0, (command, r.err)
            if suffix == ".onnx":
                onnx.checker.check_model(str(out))
            else:
                assert out.with_suffix(".prototxt").exists()
    # the cut: the net now ends at that BatchNorm, its output named as the graph's
    cut = _read(tmp_path / "truncate.caffemodel")
    assert [v.name for v in cut.model.graph.outputs] == ["res2a_branch2b/bn"]
    assert "res2a_branch2c" not in (tmp_path / "truncate.prototxt").read_text()
    r = run_cli("fold-bn", model, "-o", tmp_path / "x.pt", "--json")
    assert r.code == 2 and r.json()["error"]["code"] == "output-format"


def test_phases_and_legacy_blobs(tmp_path):
    """TRAIN-only layers are left out as Caffe's TEST net does; 4-d legacy blob shapes read."""
    text = ('input: "data"\ninput_dim: 1\ninput_dim: 2\ninput_dim: 4\ninput_dim: 4\n'
            'layer { name: "loss_only" type: "PriorBox" bottom: "data" top: "p" include { phase: TRAIN } }\n'
            'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }\n'
            'layer { name: "acc" type: "Accuracy" bottom: "fc" top: "acc" exclude { phase: TEST } }\n')
    proto, model = M.write_caffe(tmp_path, "phases", text.replace(
        'layer { name: "loss_only"', '#').replace('layer { name: "acc"', '#'), legacy_shapes=True)
    proto.write_text(text)
    src = _read(model)
    assert [layer.name for layer in src.net.layers] == ["fc"]
    test_net = tmp_path / "test-phase.prototxt"  # OpenCV does not filter layers by phase
    test_net.write_text(text.replace('layer { name: "loss_only"', '#').replace('layer { name: "acc"', '#'))
    _against_opencv(src, test_net, model)


def _bad(tmp_path, model, *args, code: str = "bad-input") -> str:
    before = files_in(tmp_path)
    r = run_cli("fold-bn", model, "-o", tmp_path / "out.caffemodel", "--json", *args)
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert r.json()["error"]["code"] == code
    assert files_in(tmp_path) == before
    return r.err


def test_unsupported_layer_and_v1_nets(tmp_path):
    proto, model = M.write_caffe(tmp_path, "ssd", M.MOBILENET_SSD)
    text = M.MOBILENET_SSD + ('layer { name: "conv3_mbox_priorbox" type: "PriorBox" bottom: "conv3" bottom: "data"\n'
                              '  top: "conv3_mbox_priorbox" prior_box_param { min_size: 8.0 aspect_ratio: 2.0 } }\n')
    proto.write_text(text)
    err = _bad(tmp_path, model, code="unsupported-layer")
    line = text[:text.index('"conv3_mbox_priorbox"')].count("\n") + 1
    assert "conv3_mbox_priorbox" in err and "PriorBox" in err and f"line {line}" in err
    proto.write_text('name: "v1"\ninput: "data"\nlayers {\n  name: "conv1"\n  type: CONVOLUTION\n  bottom: "data"\n'
                     '  top: "conv1"\n  convolution_param { num_output: 4 kernel_size: 3 }\n}\n')
    err = _bad(tmp_path, model, code="unsupported-layer")
    assert "conv1" in err and "V1" in err and "line 3" in err


CODES = {"truncated": "not-a-checkpoint", "garbage": "not-a-checkpoint", "other-net": "weights-mismatch",
         "blob-shape": "weights-mismatch", "unknown-field": "bad-input", "batch-statistics": "bad-input",
         "no-prototxt": "missing-structure"}


@pytest.mark.parametrize("damage", list(CODES))
def test_bad_files(tmp_path, damage):
    proto, model = M.write_caffe(tmp_path, "resnet", M.RESNET, seed=7)
    data = model.read_bytes()
    args = []
    if damage == "truncated":
        model.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        model.write_bytes(b"<html>not a model</html>" * 10)
    elif damage == "other-net":
        _, other = M.write_caffe(tmp_path, "pool", M.POOLING)
        args = ["--prototxt", proto]
        model = other
    elif damage == "blob-shape":
        proto.write_text(M.RESNET.replace("num_output: 10", "num_output: 11"))
    elif damage == "unknown-field":
        proto.write_text(M.RESNET.replace("pool: MAX", "pool: MAX ceil_mode: false"))
    elif damage == "batch-statistics":
        proto.write_text(M.RESNET.replace("use_global_stats: true", "use_global_stats: false", 1))
    else:
        proto.unlink()
    err = _bad(tmp_path, model, *args, code=CODES[damage])
    if damage == "unknown-field":
        assert "ceil_mode" in err
