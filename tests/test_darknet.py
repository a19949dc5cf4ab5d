"""Darknet ``.cfg`` + ``.weights`` in: the graph against OpenCV 4.x's darknet importer and an
independent darknet forward (``darknet_reference``), every command through the ONNX back end,
``.weights`` + ``.cfg`` back out (read again by OpenCV), bad files refused."""

from __future__ import annotations

import numpy as np
import pytest

import darknet_reference as ref
import native_models as M
from conftest import files_in, run_cli

pytest.importorskip("cv2")


def _read(weights, cfg=None, **kw):
    from modelsurgeon.read.darknet import read_darknet

    return read_darknet(weights, cfg, **kw)


def _x(src, seed: int = 1) -> np.ndarray:
    shape = [d for d in src.model.graph.inputs[0].shape.dims]
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


REAL = {"yolov3-tiny": M.YOLOV3_TINY, "yolov4-tiny": M.YOLOV4_TINY, "yolov2": M.YOLOV2, "csp-mish": M.CSP_MISH}


@pytest.mark.parametrize("layout", list(REAL))
def test_real_layouts_equal_opencv(tmp_path, layout):
    cfg, weights = M.write_darknet(tmp_path, layout, REAL[layout], seed=3)
    src = _read(weights)
    x = _x(src)
    outs = M.ort_run(src.onnx_bytes, {"input": x})
    heads = [L for L in src.layers if L.kind in ("yolo", "region")]
    if heads:  # a [yolo] / [region] head's output is its raw input: the conv before it
        assert sorted(outs) == sorted(src.layers[L.inputs[0]].name for L in heads)
    assert len(outs) == max(1, len(heads))
    indices = [int(name.rpartition("_")[2]) for name in outs]
    cv = M.opencv_darknet(cfg, weights, x, indices)
    for name, i in zip(outs, indices):
        M.close(outs[name], cv[i], rtol=1e-4)  # OpenCV's BatchNorm eps is 1e-6, darknet's 1e-5
    # every layer's output against the independent darknet forward
    every = M.ort_run(src.onnx_bytes, {"input": x}, [L.name for L in src.layers])
    mine = ref.forward(src.layers, src.arrays, x)
    for L in src.layers:
        if L.name in every:
            M.close(every[L.name], mine[L.index], rtol=2e-5)


def test_batchnorm_eps_is_darknets(tmp_path):
    """Tiny running variances make the eps visible: 1e-5 (normalize_cpu), as the reference."""
    cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=4, tiny_variance=True)
    src = _read(weights)
    x = _x(src)
    outs = M.ort_run(src.onnx_bytes, {"input": x})
    mine = ref.forward(src.layers, src.arrays, x)
    for name, v in outs.items():
        M.close(v, mine[int(name.rpartition("_")[2])], rtol=1e-4)


LAYERS = (M.NET.format(w=12, h=12, c=4)
          + M.conv(8, act="relu6") + M.conv(8, act="hard_mish", extra="groups=2\n")
          + M.conv(8, act="elu", extra="dilation=2\n") + M.conv(16, act="selu", extra="stride_x=2\nstride_y=1\n")
          + M.section("maxpool", size=3, stride_x=1, stride_y=2, padding=2)
          + M.section("maxpool", maxpool_depth=1, out_channels=8, size=1, stride=1)
          + M.section("route", layers="-1,-2", groups=2, group_id=1)
          + M.section("reorg3d", stride=2) + M.section("reorg3d", stride=2, reverse=1)
          + M.section("reorg", stride=2) + M.section("reorg", stride=2, reverse=1)
          + M.conv(16, 1, act="ramp", bn=0) + M.section("upsample", stride=2, scale=0.5)
          + M.section("upsample", stride=-2, scale=0.25) + M.conv(8, act="loggy", extra="flipped=1\n")
          + M.section("batchnorm") + M.section("activation", activation="relie")
          + M.section("avgpool") + M.conv(8, 1, act="logistic", bn=0)
          + M.section("scale_channels", **{"from": -4}) + M.conv(8, 1, act="hardtan", bn=0)
          + M.section("sam", **{"from": -2}, activation="tanh") + M.section("dropout", probability=0.3)
          + M.section("connected", output=12, batch_normalize=1, activation="leaky")
          + M.conv(12, 1, act="linear") + M.section("shortcut", **{"from": -2})  # a vector read as 12 x 1 x 1
          + M.section("softmax", groups=3, temperature=2))


def test_layers_equal_darknet_reference(tmp_path):
    """Options OpenCV ignores or lacks, against darknet's own loops (layer by layer)."""
    cfg, weights = M.write_darknet(tmp_path, "layers", LAYERS, seed=5)
    src = _read(weights)
    x = _x(src)
    every = M.ort_run(src.onnx_bytes, {"input": x}, [L.name for L in src.layers])
    mine = ref.forward(src.layers, src.arrays, x)
    checked = 0
    for L in src.layers:
        if L.name in every:
            M.close(every[L.name], mine[L.index], rtol=2e-5)
            checked += 1
    assert checked == len(src.layers) - 1  # all but the [dropout]


def test_maxpool_window_wholly_in_padding(tmp_path):
    """padding >= 2 * size: darknet's loop leaves -FLT_MAX where a window sees no input."""
    text = M.NET.format(w=5, h=5, c=2) + M.section("maxpool", size=2, stride=2, padding=5)
    cfg, weights = M.write_darknet(tmp_path, "pad", text)
    src = _read(weights)
    x = _x(src)
    out = M.ort_run(src.onnx_bytes, {"input": x})["maxpool_0"]
    expect = ref.forward(src.layers, src.arrays, x)[0]
    assert out.shape == expect.shape and (out == -np.finfo(np.float32).max).any()
    np.testing.assert_array_equal(out, expect.astype(np.float32))


@pytest.mark.parametrize("weights_type", ["per_feature", "per_channel"])
@pytest.mark.parametrize("normalization", ["none", "relu", "softmax"])
def test_weighted_shortcut(tmp_path, weights_type, normalization):
    """Seed 002's multi-input weighted [shortcut]: darknet's formula, eps 0.0001, the input with
    fewer channels added to the first ones; then optimize, written back, read back."""
    text = M.weighted_shortcut(weights_type, normalization, misspelled=normalization == "relu")
    cfg, weights = M.write_darknet(tmp_path, "ws", text, seed=6)
    src = _read(weights)
    x = _x(src)
    every = M.ort_run(src.onnx_bytes, {"input": x}, [L.name for L in src.layers])
    mine = ref.forward(src.layers, src.arrays, x)
    for L in src.layers:
        M.close(every[L.name], mine[L.index], rtol=2e-5)
    out = tmp_path / "out.weights"
    r = run_cli("optimize", weights, "-o", out, "--json")
    assert r.code == 0, r.err
    assert r.json()["after"]["bn"] == 0
    back = _read(out)
    assert not any(n.op_type in ("BatchNormalization", "Relu", "Softmax", "Exp", "ReduceSum")
                   for n in back.model.graph)  # statistics folded, fusion weights evaluated once
    text_out = out.with_suffix(".cfg").read_text()
    assert "batch_normalize=1" not in text_out and "weights_normalizion" not in text_out
    assert ("weights_normalization=none" in text_out) or ("weights_type=none" in text_out)
    y0 = M.ort_run(src.onnx_bytes, {"input": x})
    y1 = M.ort_run(back.onnx_bytes, {"input": x})
    M.close(y1["conv_5"], y0["conv_5"])


def test_optimize_writes_darknet_files_opencv_reads(tmp_path):
    cfg, weights = M.write_darknet(tmp_path, "v4", M.YOLOV4_TINY, seed=7)
    out = tmp_path / "v4-opt.weights"
    r = run_cli("optimize", weights, "-o", out, "--json")
    assert r.code == 0, r.err
    rep = r.json()
    assert rep["before"]["bn"] > 0 and rep["after"]["bn"] == 0 and rep["parity"]["passed"]
    text = out.with_suffix(".cfg").read_text()
    assert "batch_normalize=1" not in text and text.count("batch_normalize=0") == cfg.read_text().count(
        "batch_normalize=1")
    assert text.splitlines()[:3] == cfg.read_text().splitlines()[:3]  # comments and [net] kept as written
    src = _read(weights)
    x = _x(src)
    before = M.ort_run(src.onnx_bytes, {"input": x})
    indices = [int(n.rpartition("_")[2]) for n in before]
    cv = M.opencv_darknet(out.with_suffix(".cfg"), out, x, indices)
    for name, i in zip(before, indices):
        M.close(cv[i], before[name], rtol=1e-4)
    assert out.stat().st_size < weights.stat().st_size  # no more scales / means / variances


def test_every_command_and_output_format(tmp_path):
    import onnx

    cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=8)
    for command, extra in [("fold-bn", []), ("fold-fusion", []), ("focus-to-conv", []), ("optimize", []),
                           ("truncate", ["--at", "conv_15"])]:
        for suffix in (".onnx", ".weights"):
            out = tmp_path / f"{command}{suffix}"
            r = run_cli(command, weights, "--cfg", cfg, "-o", out, *extra)
            assert r.code == 0, (command, r.err)
            if suffix == ".onnx":
                onnx.checker.check_model(str(out))
            else:
                assert out.with_suffix(".cfg").exists()
    # truncate keeps layers 0..15 and the [yolo] after them
    kept = (tmp_path / "truncate.cfg").read_text()
    assert kept.count("[yolo]") == 1 and kept.count("[convolutional]") == 10
    assert run_cli("fold-bn", weights, "-o", tmp_path / "x.pt").code == 2
    assert not (tmp_path / "x.pt").exists()


def test_nothing_to_do_writes_the_same_files(tmp_path):
    cfg, weights = M.write_darknet(tmp_path, "plain", M.weighted_shortcut("per_feature", "relu"), seed=9)
    out = tmp_path / "same.weights"
    assert run_cli("focus-to-conv", weights, "-o", out).code == 0
    assert out.read_bytes() == weights.read_bytes()
    assert out.with_suffix(".cfg").read_text() == cfg.read_text()


def test_truncate_refuses_what_a_cfg_cannot_say(tmp_path):
    cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=10)
    before = files_in(tmp_path)
    for at in (["--at", "conv_13/bn"], ["--at", "maxpool_11", "--at", "conv_15"]):
        r = run_cli("truncate", weights, *at, "-o", tmp_path / "cut.weights", "--json")
        assert r.code == 2, r.err
        assert r.json()["error"]["code"] == "cannot-write-format"
        assert files_in(tmp_path) == before
    assert run_cli("truncate", weights, "--at", "conv_13/bn", "-o", tmp_path / "cut.onnx").code == 0


def test_cfg_grammar(tmp_path):
    """darknet's reader: blanks anywhere, # and ; comments, first of a repeated key, atoi
    prefixes, section aliases, a 32-bit 'seen' (version 0.1)."""
    text = ("[net]\n width = 16 \n\theight=16\nchannels=3 # rgb\n; comment\n\n"
            "[conv]\nbatch_normalize=1\nfilters=4\nfilters=99\nsize=3#kernel\nstride=1\npad=1\nactivation=leaky\n"
            "[max]\nsize = 2\nstride = 2\n\n[convolutional]\nfilters=4\nsize=1\nactivation=linear\n")
    cfg, weights = M.write_darknet(tmp_path, "g", text, seed=11, major=0, minor=1)
    src = _read(weights)
    assert src.header.seen_bytes == 4 and [L.kind for L in src.layers] == ["convolutional", "maxpool",
                                                                           "convolutional"]
    assert src.layers[0].c == 4 and src.layers[0].p["size"] == 3 and src.layers[2].p["activation"] == "linear"
    x = _x(src)
    outs = M.ort_run(src.onnx_bytes, {"input": x})
    M.close(outs["conv_2"], ref.forward(src.layers, src.arrays, x)[2], rtol=2e-5)  # OpenCV knows no [conv] / [max]


def test_windows_cfg_kept_as_written(tmp_path):
    """A .cfg saved on Windows (BOM, CRLF): read, and written back with its own line endings."""
    cfg, weights = M.write_darknet(tmp_path, "w", M.YOLOV3_TINY, seed=15)
    cfg.write_bytes(b"\xef\xbb\xbf" + M.YOLOV3_TINY.replace("\n", "\r\n").encode())
    out = tmp_path / "o.weights"
    assert run_cli("fold-bn", weights, "-o", out).code == 0
    text = out.with_suffix(".cfg").read_bytes()
    assert b"batch_normalize=0\r\n" in text and b"batch_normalize=1" not in text
    assert text.count(b"\n") == text.count(b"\r\n")


def test_input_shape_resizes_the_network(tmp_path):
    cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=12)
    src = _read(weights, input_shapes=["2,3,96,128"])
    outs = M.ort_run(src.onnx_bytes, {"input": _x(src)})
    assert outs["conv_15"].shape == (2, 18, 3, 4)
    r = run_cli("fold-bn", weights, "-s", "1,4,64,64", "-o", tmp_path / "o.onnx")
    assert r.code == 2 and "channels" in r.err


def _bad(tmp_path, weights, *args, code: str = "bad-input") -> str:
    before = files_in(tmp_path)
    r = run_cli("fold-bn", weights, "-o", tmp_path / "out.weights", "--json", *args)
    assert r.code == 2, r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert r.json()["error"]["code"] == code
    assert files_in(tmp_path) == before
    return r.err


def test_bad_weight_files(tmp_path):
    cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=13)
    data = weights.read_bytes()
    (tmp_path / "short.weights").write_bytes(data[:-4])
    (tmp_path / "long.weights").write_bytes(data + b"\0" * 8)
    (tmp_path / "header.weights").write_bytes(b"\xff\xff\x01\x00" + data[4:])
    (tmp_path / "tiny.weights").write_bytes(data[:10])
    for name, code in (("short", "weights-mismatch"), ("long", "weights-mismatch"), ("header", "not-a-checkpoint"),
                       ("tiny", "not-a-checkpoint")):
        _bad(tmp_path, tmp_path / f"{name}.weights", "--cfg", cfg, code=code)
    other, _ = M.write_darknet(tmp_path, "v4", M.YOLOV4_TINY)
    # another model's .cfg: the sizes disagree
    assert "v4.cfg" in _bad(tmp_path, weights, "--cfg", other, code="weights-mismatch")
    (tmp_path / "lonely.weights").write_bytes(data)
    assert "--cfg" in _bad(tmp_path, tmp_path / "lonely.weights", code="missing-structure")


@pytest.mark.parametrize("change,code", [
    (("activation=leaky", "activation=gelu2"), "unsupported-layer"), (("[maxpool]", "[maxpooling]"), "unsupported-layer"),
    (("[route]\nlayers=-4", "[route]\nlayers=40"), "bad-input"), (("filters=18\nsize=1", "filters=17\nsize=1"), "bad-input"),
    (("[net]", "width=3\n[net]"), "bad-input"),
])
def test_bad_cfg(tmp_path, change, code):
    cfg, weights = M.write_darknet(tmp_path, "v3", M.YOLOV3_TINY, seed=14)
    cfg.write_text(M.YOLOV3_TINY.replace(*change, 1))
    err = _bad(tmp_path, weights, code=code)
    assert "v3.cfg" in err
