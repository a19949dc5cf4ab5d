"""Darknet and Caffe test models: ``.cfg`` / ``.prototxt`` texts of real layouts (channels cut
down, inputs small; the writers of random-weight files, yolov3-tiny and the ResNet deploy net
are ``examples/native.py``'s), and the two readers the tests compare against (OpenCV 4.x's dnn
importers, a test-only dependency, and ``darknet_reference``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from native import (NET, RESNET, YOLOV3_TINY, caffe_random_blobs, conv, conv_bn, random_arrays,  # noqa: F401
                    section, write_caffe, write_darknet, yolo)

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


# MobileNet-SSD deploy backbone (chuanqi305's layout): depthwise (group = channels) + pointwise
# convs with BatchNorm + Scale, ReLU in place; the SSD heads (PriorBox, DetectionOutput) left out
MOBILENET_SSD = ('name: "MobileNet-SSD-backbone"\n'
                 'layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }\n'
                 + conv_bn("conv0", "data", 8, s=2)
                 + conv_bn("conv1/dw", "conv0", 8, group=8) + conv_bn("conv1", "conv1/dw", 16, k=1, p=0)
                 + conv_bn("conv2/dw", "conv1", 16, s=2, group=16) + conv_bn("conv2", "conv2/dw", 16, k=1, p=0)
                 + conv_bn("conv3/dw", "conv2", 16, group=16) + conv_bn("conv3", "conv3/dw", 24, k=1, p=0)
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
