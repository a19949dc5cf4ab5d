"""Darknet and Caffe test models: ``.cfg`` / ``.prototxt`` texts of real layouts (channels cut
down, inputs small), files written in the native binary formats with random weights and
randomised BatchNorm statistics, and the two readers the tests compare against (OpenCV 4.x's
dnn importers, a test-only dependency, and ``darknet_reference``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# -- darknet .cfg texts ------------------------------------------------------------------------

NET = "[net]\n# Testing\nbatch=1\nsubdivisions=1\nwidth={w}\nheight={h}\nchannels={c}\nmomentum=0.9\n\n"


def conv(filters: int, size: int = 3, stride: int = 1, act: str = "leaky", bn: int = 1, extra: str = "") -> str:
    bn_line = f"batch_normalize={bn}\n" if bn else ""
    return f"[convolutional]\n{bn_line}filters={filters}\nsize={size}\nstride={stride}\npad=1\nactivation={act}\n{extra}\n"


def yolo(mask: str) -> str:
    return (f"[yolo]\nmask = {mask}\nanchors = 10,14,  23,27,  37,58,  81,82,  135,169,  344,319\n"
            "classes=1\nnum=6\njitter=.3\nignore_thresh = .7\ntruth_thresh = 1\nrandom=1\n\n")


def section(kind: str, **opts) -> str:
    return f"[{kind}]\n" + "".join(f"{k}={v}\n" for k, v in opts.items()) + "\n"


# yolov3-tiny.cfg, filters / 8, 1 class (255 -> 18 filters before each [yolo])
YOLOV3_TINY = (NET.format(w=64, h=64, c=3)
               + conv(2) + section("maxpool", size=2, stride=2) + conv(4) + section("maxpool", size=2, stride=2)
               + conv(8) + section("maxpool", size=2, stride=2) + conv(16) + section("maxpool", size=2, stride=2)
               + conv(32) + section("maxpool", size=2, stride=2) + conv(64) + section("maxpool", size=2, stride=1)
               + conv(128) + conv(32, 1) + conv(64) + conv(18, 1, act="linear", bn=0) + yolo("3,4,5")
               + section("route", layers=-4) + conv(16, 1) + section("upsample", stride=2)
               + section("route", layers="-1, 8") + conv(32) + conv(18, 1, act="linear", bn=0) + yolo("0,1,2"))

# yolov4-tiny.cfg (CSP blocks with grouped routes), filters / 8
_V4_CSP = lambda f: (conv(f) + section("route", layers=-1, groups=2, group_id=1) + conv(f // 2) + conv(f // 2)  # noqa: E731
                     + section("route", layers="-1,-2") + conv(f, 1) + section("route", layers="-6,-1")
                     + section("maxpool", size=2, stride=2))
YOLOV4_TINY = (NET.format(w=64, h=64, c=3) + conv(4, stride=2) + conv(8, stride=2)
               + _V4_CSP(8) + _V4_CSP(16) + _V4_CSP(32)
               + conv(64) + conv(32, 1) + conv(64) + conv(18, 1, act="linear", bn=0) + yolo("3,4,5")
               + section("route", layers=-4) + conv(16, 1) + section("upsample", stride=2)
               + section("route", layers="-1, 23") + conv(32) + conv(18, 1, act="linear", bn=0) + yolo("1,2,3"))

# yolov2.cfg (passthrough: [reorg] of a 1x1 conv, routed with the deep features; a [region] head),
# filters / 16, 1 class
YOLOV2 = (NET.format(w=64, h=64, c=3) + conv(4) + section("maxpool", size=2, stride=2) + conv(8)
          + section("maxpool", size=2, stride=2) + conv(16) + section("maxpool", size=2, stride=2)
          + conv(32) + conv(16, 1) + conv(32) + section("maxpool", size=2, stride=2) + conv(64) + conv(64)
          + section("route", layers=-4) + conv(8, 1) + section("reorg", stride=2) + section("route", layers="-1,-4")
          + conv(64) + conv(30, 1, act="linear", bn=0)
          + section("region", anchors="0.57,0.67, 1.87,2.06, 3.33,5.47, 7.88,3.52, 9.77,9.16", bias_match=1,
                    classes=1, coords=4, num=5, softmax=1, jitter=.3, rescore=1))

# a CSPDarknet53 stage (yolov4 / yolov4-csp backbone): mish everywhere, residual shortcuts
CSP_MISH = (NET.format(w=32, h=32, c=3) + conv(8, act="mish") + conv(16, stride=2, act="mish")
            + conv(16, 1, act="mish") + section("route", layers=-2) + conv(16, 1, act="mish")
            + conv(8, 1, act="mish") + conv(16, act="mish") + section("shortcut", **{"from": -3}, activation="linear")
            + conv(8, 1, act="mish") + conv(16, act="mish") + section("shortcut", **{"from": -3}, activation="linear")
            + conv(16, 1, act="mish") + section("route", layers="-1,-10") + conv(16, 1, act="mish")
            + conv(32, stride=2, act="swish") + conv(16, 1, act="logistic") + section("avgpool")
            + section("connected", output=10, activation="linear") + section("softmax", groups=1))


def weighted_shortcut(weights_type: str, normalization: str, misspelled: bool = False) -> str:
    """BiFPN-style fusion (seed 002): three inputs, weighted, one of them with fewer channels."""
    key = "weights_normalizion" if misspelled else "weights_normalization"
    return (NET.format(w=16, h=16, c=3) + conv(8) + conv(8) + conv(8, act="linear") + conv(6, act="linear")
            + section("shortcut", **{"from": "-2, -3, -4"}, weights_type=weights_type, **{key: normalization},
                      activation="leaky")
            + conv(8, 1, act="linear", bn=0))


# -- darknet files ------------------------------------------------------------------------------

def random_arrays(layers, seed: int = 0, tiny_variance: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for L in layers:
        if not L.weights:
            continue
        d = {}
        for name, shape in L.weights:
            if name == "rolling_variance":
                a = rng.uniform(1e-3, 1e-2, shape) if tiny_variance else rng.uniform(0.5, 2.0, shape)
            elif name == "scales":
                a = rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)
            elif name == "weights" and L.kind in ("convolutional", "connected"):
                fan_in = int(np.prod(shape[1:]))
                a = rng.normal(0, 1.5 / np.sqrt(fan_in), shape)
            elif name == "weights":  # shortcut fusion weights, signed
                a = rng.normal(0, 1, shape)
            else:
                a = rng.normal(0, 0.5, shape)
            d[name] = a.astype(np.float32)
        arrays[L.index] = d
    return arrays


def write_darknet(directory: Path, name: str, cfg_text: str, seed: int = 0, major: int = 0, minor: int = 2,
                  tiny_variance: bool = False) -> tuple[Path, Path]:
    """``name.cfg`` + ``name.weights`` with random weights; the layout is the .cfg's as read by
    modelsurgeon (OpenCV then reading the same files checks it)."""
    from modelsurgeon.load.darknet.cfg import parse_cfg
    from modelsurgeon.load.darknet.layers import input_shape, read_layers
    from modelsurgeon.load.darknet.weights import Header, pack_weights

    cfg_path = Path(directory) / f"{name}.cfg"
    cfg_path.write_text(cfg_text)
    cfg = parse_cfg(cfg_text, cfg_path.name)
    layers = read_layers(cfg, input_shape(cfg))
    weights = cfg_path.with_suffix(".weights")
    weights.write_bytes(pack_weights(Header(major, minor, 5, 32013), layers,
                                     random_arrays(layers, seed, tiny_variance)))
    return cfg_path, weights


ACTIVATIONS = ("leaky", "mish", "swish", "logistic", "relu", "tanh")


def opencv_darknet(cfg: Path, weights: Path, x: np.ndarray, indices: list[int]) -> dict[int, np.ndarray]:
    """OpenCV's output of each darknet layer in ``indices``: the last OpenCV layer before the
    first of layer ``i + 1`` (OpenCV names activations after the next layer's index)."""
    import cv2

    net = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    net.enableFusion(False)
    names = list(net.getLayerNames())

    def first_of(i: int) -> int | None:
        for k, n in enumerate(names):
            base, _, idx = n.rpartition("_")
            if idx == str(i) and base not in ACTIVATIONS:
                return k
        return None

    wanted = {}
    for i in indices:
        k = first_of(i + 1)
        wanted[i] = names[k - 1] if k is not None else names[-1]
    net.setInput(x)
    outs = net.forward(list(wanted.values()))
    return {i: o for i, o in zip(wanted, outs)}


# -- caffe .prototxt texts -----------------------------------------------------------------------

def _conv_bn(name: str, bottom: str, out: int, k: int = 3, s: int = 1, p: int = 1, group: int = 1,
             in_place: bool = True, relu: bool = True) -> str:
    top_bn = name if in_place else f"{name}/bn"
    top_sc = name if in_place else f"{name}/scale"
    text = (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{name}"\n'
            f'  convolution_param {{ num_output: {out} bias_term: false pad: {p} kernel_size: {k} stride: {s}'
            f'{f" group: {group} engine: CAFFE" if group > 1 else ""} }} }}\n'
            f'layer {{ name: "{name}/bn" type: "BatchNorm" bottom: "{name}" top: "{top_bn}"\n'
            f'  batch_norm_param {{ use_global_stats: true eps: 0.00002 }} }}\n'
            f'layer {{ name: "{name}/scale" type: "Scale" bottom: "{top_bn}" top: "{top_sc}"\n'
            f'  scale_param {{ bias_term: true }} }}\n')
    if relu:
        text += f'layer {{ name: "{name}/relu" type: "ReLU" bottom: "{top_sc}" top: "{top_sc}" }}\n'
    return text


# ResNet-50 deploy layout (conv1 + the first bottleneck + head), channels cut down: BatchNorm +
# Scale in place (as ResNet-50-deploy.prototxt) and not in place, projection shortcut, ceil pooling
RESNET = ('name: "ResNet-50-tiny"\ninput: "data"\ninput_dim: 1\ninput_dim: 3\ninput_dim: 35\ninput_dim: 35\n'
          + _conv_bn("conv1", "data", 8, k=7, s=2, p=3)
          + 'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"\n'
            '  pooling_param { kernel_size: 3 stride: 2 pool: MAX } }\n'
          + _conv_bn("res2a_branch1", "pool1", 16, k=1, p=0, relu=False)
          + _conv_bn("res2a_branch2a", "pool1", 4, k=1, p=0)
          + _conv_bn("res2a_branch2b", "res2a_branch2a", 4, in_place=False)
          + _conv_bn("res2a_branch2c", "res2a_branch2b/scale", 16, k=1, p=0, relu=False)
          + 'layer { name: "res2a" type: "Eltwise" bottom: "res2a_branch1" bottom: "res2a_branch2c" top: "res2a" }\n'
            'layer { name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }\n'
            'layer { name: "pool5" type: "Pooling" bottom: "res2a" top: "pool5"\n'
            '  pooling_param { kernel_size: 3 stride: 2 pad: 1 pool: AVE } }\n'
            'layer { name: "fc10" type: "InnerProduct" bottom: "pool5" top: "fc10"\n'
            '  inner_product_param { num_output: 10 } }\n'
            'layer { name: "prob" type: "Softmax" bottom: "fc10" top: "prob" }\n')

# MobileNet-SSD deploy backbone (chuanqi305's layout): depthwise (group = channels) + pointwise
# convs with BatchNorm + Scale, ReLU in place; the SSD heads (PriorBox, DetectionOutput) left out
MOBILENET_SSD = ('name: "MobileNet-SSD-backbone"\n'
                 'layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }\n'
                 + _conv_bn("conv0", "data", 8, s=2)
                 + _conv_bn("conv1/dw", "conv0", 8, group=8) + _conv_bn("conv1", "conv1/dw", 16, k=1, p=0)
                 + _conv_bn("conv2/dw", "conv1", 16, s=2, group=16) + _conv_bn("conv2", "conv2/dw", 16, k=1, p=0)
                 + _conv_bn("conv3/dw", "conv2", 16, group=16) + _conv_bn("conv3", "conv3/dw", 24, k=1, p=0)
                 + 'layer { name: "conv3_mbox_conf" type: "Convolution" bottom: "conv3" top: "conv3_mbox_conf"\n'
                   '  convolution_param { num_output: 6 kernel_size: 1 } }\n'
                   'layer { name: "conv3_mbox_conf_perm" type: "Permute" bottom: "conv3_mbox_conf"\n'
                   '  top: "conv3_mbox_conf_perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }\n'
                   'layer { name: "conv3_mbox_conf_flat" type: "Flatten" bottom: "conv3_mbox_conf_perm"\n'
                   '  top: "conv3_mbox_conf_flat" flatten_param { axis: 1 } }\n')

# pooling with Caffe's ceil rounding and its clip-to-the-last-start rule (input 10 x 11: MAX k3 s2
# -> 5 x 5 (floor: 4 x 5); k2 s2 p1 on width 11 -> ceil gives 7, but the last window would start
# in the padding -> 6; p5's height: ceil gives 5, clipped to 4)
POOLING = ('name: "pooling"\ninput: "data"\ninput_shape { dim: 1 dim: 4 dim: 10 dim: 11 }\n'
           'layer { name: "p1" type: "Pooling" bottom: "data" top: "p1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }\n'
           'layer { name: "p2" type: "Pooling" bottom: "data" top: "p2" pooling_param { pool: MAX kernel_size: 2 stride: 2 pad: 1 } }\n'
           'layer { name: "p3" type: "Pooling" bottom: "data" top: "p3" pooling_param { pool: AVE kernel_size: 3 stride: 2 } }\n'
           'layer { name: "p4" type: "Pooling" bottom: "data" top: "p4" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }\n'
           'layer { name: "p5" type: "Pooling" bottom: "data" top: "p5" pooling_param { pool: AVE kernel_h: 2 kernel_w: 3 stride_h: 3 stride_w: 2 pad_h: 1 pad_w: 1 } }\n'
           'layer { name: "p6" type: "Pooling" bottom: "data" top: "p6" pooling_param { pool: AVE global_pooling: true } }\n')


def caffe_random_blobs(layer, expected: list, rng) -> list[np.ndarray]:
    if layer.type == "BatchNorm":  # stored statistics are scaled by the moving-average factor
        c = expected[0][0]
        f = np.float32(rng.uniform(0.5, 3.0))
        return [(rng.normal(0, 0.5, c) * f).astype(np.float32), (rng.uniform(0.5, 2.0, c) * f).astype(np.float32),
                np.array([f], np.float32)]
    out = []
    for k, e in enumerate(expected):
        shape = tuple(e) if e is not None else (1,)
        if layer.type in ("Convolution", "Deconvolution", "InnerProduct") and k == 0:
            a = rng.normal(0, 1.5 / np.sqrt(np.prod(shape[1:])), shape)
        elif layer.type == "Scale" and k == 0:
            a = rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)
        else:
            a = rng.normal(0, 0.3, shape)
        out.append(np.asarray(a, np.float32).reshape(shape))
    return out


def write_caffe(directory: Path, name: str, prototxt_text: str, seed: int = 0, legacy_shapes: bool = False):
    """``name.prototxt`` + ``name.caffemodel`` with random blobs (every BatchNorm with its own
    moving-average factor); blob shapes are the prototxt's as modelsurgeon reads it."""
    from modelsurgeon.load.caffe import _net_inputs
    from modelsurgeon.load.caffe.graph import CaffeGraph
    from modelsurgeon.load.caffe.layers import HANDLERS
    from modelsurgeon.load.caffe.prototxt import read_prototxt
    from modelsurgeon.load.caffe.schema import classes

    proto = Path(directory) / f"{name}.prototxt"
    proto.write_text(prototxt_text)
    net = read_prototxt(proto, set(HANDLERS))
    rng = np.random.default_rng(seed)
    made: dict[str, tuple[str, list]] = {}

    class Random(CaffeGraph):
        def weights(self, layer, expected):
            arrays = caffe_random_blobs(layer, expected, rng)
            made[layer.name] = (layer.type, arrays)
            self.arrays[layer.name] = arrays
            return arrays

    Random(net, {}, _net_inputs(net, (), proto.name)).build()
    model = classes()["NetParameter"](name=net.name)
    for layer in net.layers:  # every layer, as Caffe's Net::ToProto writes them
        ltype, arrays = made.get(layer.name, (layer.type, []))
        lp = model.layer.add(name=layer.name, type=ltype)
        for a in arrays:
            b = lp.blobs.add()
            if legacy_shapes and a.ndim <= 4:
                b.num, b.channels, b.height, b.width = (1,) * (4 - a.ndim) + a.shape
            else:
                b.shape.dim.extend(a.shape)
            b.data.extend(a.reshape(-1).tolist())
    caffemodel = proto.with_suffix(".caffemodel")
    caffemodel.write_bytes(model.SerializeToString())
    return proto, caffemodel


def opencv_caffe(prototxt: Path, caffemodel: Path, feeds: dict[str, np.ndarray], layers: list[str]) -> dict:
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.enableFusion(False)
    for k, v in feeds.items():
        net.setInput(v, k)
    return dict(zip(layers, net.forward(layers)))


# -- running the graph modelsurgeon reads ------------------------------------------------------

def ort_run(onnx_bytes: bytes, feeds: dict, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """The graph's outputs (plus ``extra`` tensors) in onnxruntime, optimisations off."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load_from_string(onnx_bytes)
    have = {o.name for o in proto.graph.output}
    made = {o for n in proto.graph.node for o in n.output}
    for name in extra:
        if name not in have and name in made:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-4) -> float:
    """``max|a - b| / max|b|`` after checking the sizes agree (shapes may differ by 1-dims)."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    assert a.size == b.size, (a.size, b.size)
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    assert err <= rtol, err
    return err
