"""Darknet and Caffe example models: real layouts (channels cut down, inputs small) written in
the native binary formats with random weights and randomised BatchNorm statistics.

    yolov3-tiny.cfg + .weights            darknet; its .cfg beside it (nothing else needed)
    resnet-deploy.prototxt + .caffemodel  Caffe; BatchNorm + Scale in place and not in place

``write_darknet`` / ``write_caffe`` write any ``.cfg`` / ``.prototxt`` text this way (the tests
use them too); the layout of the binary files is the one modelsurgeon's readers derive from
the text, which the tests check against OpenCV reading the same files.
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
    from modelsurgeon.read.darknet.cfg import parse_cfg
    from modelsurgeon.read.darknet.layers import input_shape, read_layers
    from modelsurgeon.read.darknet.weights import Header, pack_weights

    cfg_path = Path(directory) / f"{name}.cfg"
    cfg_path.write_text(cfg_text)
    cfg = parse_cfg(cfg_text, cfg_path.name)
    layers = read_layers(cfg, input_shape(cfg))
    weights = cfg_path.with_suffix(".weights")
    weights.write_bytes(pack_weights(Header(major, minor, 5, 32013), layers,
                                     random_arrays(layers, seed, tiny_variance)))
    return cfg_path, weights


# -- caffe .prototxt texts -----------------------------------------------------------------------

def conv_bn(name: str, bottom: str, out: int, k: int = 3, s: int = 1, p: int = 1, group: int = 1,
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
          + conv_bn("conv1", "data", 8, k=7, s=2, p=3)
          + 'layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"\n'
            '  pooling_param { kernel_size: 3 stride: 2 pool: MAX } }\n'
          + conv_bn("res2a_branch1", "pool1", 16, k=1, p=0, relu=False)
          + conv_bn("res2a_branch2a", "pool1", 4, k=1, p=0)
          + conv_bn("res2a_branch2b", "res2a_branch2a", 4, in_place=False)
          + conv_bn("res2a_branch2c", "res2a_branch2b/scale", 16, k=1, p=0, relu=False)
          + 'layer { name: "res2a" type: "Eltwise" bottom: "res2a_branch1" bottom: "res2a_branch2c" top: "res2a" }\n'
            'layer { name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }\n'
            'layer { name: "pool5" type: "Pooling" bottom: "res2a" top: "pool5"\n'
            '  pooling_param { kernel_size: 3 stride: 2 pad: 1 pool: AVE } }\n'
            'layer { name: "fc10" type: "InnerProduct" bottom: "pool5" top: "fc10"\n'
            '  inner_product_param { num_output: 10 } }\n'
            'layer { name: "prob" type: "Softmax" bottom: "fc10" top: "prob" }\n')

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
    from modelsurgeon.read.caffe import _net_inputs
    from modelsurgeon.read.caffe.graph import CaffeGraph
    from modelsurgeon.read.caffe.layers import HANDLERS
    from modelsurgeon.read.caffe.prototxt import read_prototxt
    from modelsurgeon.read.caffe.schema import classes

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


def build_native(out: Path) -> list[Path]:
    """The example files under ``out``."""
    cfg, weights = write_darknet(out, "yolov3-tiny", YOLOV3_TINY, seed=21)
    proto, caffemodel = write_caffe(out, "resnet-deploy", RESNET, seed=22)
    return [cfg, weights, proto, caffemodel]
