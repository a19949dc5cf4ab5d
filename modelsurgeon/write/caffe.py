"""Write a rewritten graph back as Caffe files: ``.caffemodel`` + ``.prototxt`` beside it.

Details: docs/formats.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput

MERGEABLE = {"BatchNorm", "Scale", "Bias", "Power"}
WEIGHTED = {"Convolution", "Deconvolution", "InnerProduct"}


def _refuse(why: str) -> BadInput:
    return BadInput(f"cannot write Caffe files: {why}; write .onnx instead", code="cannot-write-format")


def _array(v: Any, what: str) -> np.ndarray:
    if v is None or v.const_value is None:
        raise _refuse(f"{what} is no longer a constant")
    return np.asarray(v.const_value.numpy(), dtype=np.float32)


class _Net:
    def __init__(self, model: Any, src: Any):
        self.src, self.layers = src, src.net.layers
        self.nodes = {n.name: n for n in model.graph}
        self.expected: dict[int, set[str]] = {}
        for name, idx in src.owner.items():
            self.expected.setdefault(idx, set()).add(name)
        stray = [n for n in self.nodes if n not in src.owner]
        if stray:
            raise _refuse(f"node {stray[0]!r} ({self.nodes[stray[0]].op_type}) was added by a rewrite and belongs "
                          "to no Caffe layer")
        self.outputs = [v.name for v in model.graph.outputs]

    def state(self, layer: Any) -> str:
        exp = self.expected.get(layer.index, set())
        if not exp:
            return "nodeless"
        have = {n for n in exp if n in self.nodes}
        if have == exp:
            return "intact"
        if not have:
            return "gone"
        missing = exp - have
        if layer.type == "Eltwise" and all(n.rpartition("/")[2].startswith("mul") for n in missing):
            return "intact"  # coefficient multiplies merged into the layers before
        raise _refuse(f"{layer.where()} was partly rewritten (node {sorted(missing)[0]!r} is gone)")


def caffe_net(model: Any, src: Any) -> tuple[Any, list[str]]:
    """The NetParameter (structure + blobs) for the rewritten ``model`` read from ``src``."""
    from ..read.caffe.schema import classes

    g = _Net(model, src)
    states = {layer.index: g.state(layer) for layer in g.layers}
    tops = {layer.index: [("input", top) if layer.type == "Input" else (layer.index, t)
                          for t, top in enumerate(layer.param.top)] for layer in g.layers}
    readers: dict[tuple, list[tuple[int, int]]] = {}
    for layer in g.layers:
        for k, v in enumerate(src.bottom_versions[layer.index]):
            readers.setdefault(v, []).append((layer.index, k))
    out_versions = {src.version_of[name]: name for name in g.outputs if name in src.version_of}
    # backwards: what is needed, what is merged (bypassed), what is cut off
    needed: set[tuple] = set(out_versions)
    live: set[int] = set()
    bypass: dict[tuple, tuple] = {}
    for layer in reversed(g.layers):
        i, st = layer.index, states[layer.index]
        wanted = any(v in needed for v in tops[i])
        if st == "gone":
            if not wanted:
                continue
            if layer.type not in MERGEABLE or len(src.bottom_versions[i]) != 1 or len(tops[i]) != 1:
                raise _refuse(f"{layer.where()} was removed but its output is still used")
            bypass[tops[i][0]] = src.bottom_versions[i][0]
            needed.add(src.bottom_versions[i][0])
            continue
        if st == "nodeless" and not wanted and layer.type != "Input":
            continue
        if st == "intact" or wanted or layer.type == "Input":
            live.add(i)
            needed.update(src.bottom_versions[i])

    def resolve(v: tuple) -> tuple:
        while v in bypass:
            v = bypass[v]
        return v

    names: dict[tuple, str] = {}
    for v, out_name in out_versions.items():
        names[resolve(v)] = out_name
    C = classes()
    net = C["NetParameter"]()
    net.CopyFrom(src.net.net)
    del net.layer[:]
    written: dict[str, tuple] = {}  # blob name -> the version it holds at this point of the net
    inputs = {b: ("input", b) for b in src.input_shapes}
    written.update(inputs)
    notes: list[str] = []
    merged = [layer.name for layer in g.layers if states[layer.index] == "gone" and tops[layer.index][0] in bypass]
    for layer in g.layers:
        i = layer.index
        if i not in live:
            continue
        lp = net.layer.add()
        lp.CopyFrom(layer.param)
        del lp.blobs[:]
        del lp.bottom[:]
        for v in map(resolve, src.bottom_versions[i]):
            name = names.get(v) or _blob(layer, v, src)
            if written.get(name) != v:
                raise _refuse(f"{layer.where()}: cannot name its input in Caffe's blob scheme")
            lp.bottom.append(name)
        del lp.top[:]
        for t, v in enumerate(tops[i]):
            name = names.get(v, layer.param.top[t])
            lp.top.append(name)
            written[name] = v
        _set_blobs(g, layer, lp)
    if merged:
        notes.append(f"merged into the layer before and dropped: {', '.join(merged)}")
    cut = [layer.name for layer in g.layers if layer.index not in live and states[layer.index] != "gone"]
    cut += [layer.name for layer in g.layers if states[layer.index] == "gone" and tops[layer.index][0] not in bypass]
    if cut:
        notes.append(f"{len(cut)} layer{'s' if len(cut) > 1 else ''} no longer needed: dropped")
    return net, notes


def _blob(layer: Any, v: tuple, src: Any) -> str:
    if v[0] == "input":
        return v[1]
    return src.net.layers[v[0]].param.top[v[1]]


def _set_blobs(g: _Net, layer: Any, lp: Any) -> None:
    """The layer's blobs from the rewritten graph (or the originals where nothing changed)."""
    nodes, name, t = g.nodes, layer.name, layer.type
    if t == "Eltwise" and layer.param.eltwise_param.coeff:
        coeffs = []
        for k in range(len(layer.param.bottom)):
            mul = nodes.get(f"{name}/mul{k}")
            coeffs.append(1.0 if mul is None else float(_array(mul.inputs[1], f"{layer.where()} coeff").reshape(-1)[0]))
        del lp.eltwise_param.coeff[:]
        if any(c != 1 for c in coeffs):
            lp.eltwise_param.coeff.extend(coeffs)
    original = g.src.arrays.get(name)
    if original is None:
        return
    if t in WEIGHTED:
        node = nodes[name]
        w = _array(node.inputs[1], f"{layer.where()} weight").reshape(original[0].shape)
        b = _array(node.inputs[2], f"{layer.where()} bias") if len(node.inputs) > 2 and node.inputs[2] is not None \
            else None
        blobs = [w] + ([b] if b is not None else [])
        param = lp.inner_product_param if t == "InnerProduct" else lp.convolution_param
        param.bias_term = b is not None
        if t == "InnerProduct" and node.attributes.get("alpha") is not None and node.attributes["alpha"].value != 1:
            raise _refuse(f"{layer.where()}: a Gemm alpha")
    elif t == "BatchNorm":
        bn = nodes[name]
        now = [_array(bn.inputs[k], f"{layer.where()} statistics") for k in range(1, 5)]
        made = [np.ones_like(now[0]), np.zeros_like(now[0])] if len(original) == 3 else original[3:5]
        if not all(np.array_equal(a, b) for a, b in zip(now[:2], made)):
            raise _refuse(f"{layer.where()}: its scale and shift were changed (Caffe's BatchNorm has none)")
        blobs = original  # mean / variance / factor exactly as read
    elif t in ("Scale", "Bias") and len(layer.param.bottom) == 1:
        first = nodes.get(f"{name}/{'add' if t == 'Bias' else 'mul'}")
        blobs = [_array(first.inputs[1], f"{layer.where()} parameter").reshape(original[0].shape)]
        if len(original) > 1:
            blobs.append(_array(nodes[f"{name}/add"].inputs[1], f"{layer.where()} bias").reshape(original[1].shape))
    elif t == "Scale":  # two bottoms: only the bias is a blob
        blobs = [_array(nodes[f"{name}/add"].inputs[1], f"{layer.where()} bias").reshape(original[0].shape)]
    elif t == "PReLU":
        blobs = [_array(nodes[name].inputs[1], f"{layer.where()} slope").reshape(original[0].shape)]
    else:
        blobs = original
    for a in blobs:
        bp = lp.blobs.add()
        bp.shape.dim.extend(int(d) for d in a.shape)
        _fill(bp, a)


def _fill(bp: Any, a: np.ndarray) -> None:
    """Set ``bp.data`` from ``a`` through the packed wire form (fast for large blobs)."""
    from google.protobuf.internal.encoder import _VarintBytes

    raw = np.ascontiguousarray(a, dtype="<f4").tobytes()
    bp.MergeFromString(b"\x2a" + _VarintBytes(len(raw)) + raw)  # field 5 (data), wire type 2 (packed)


def write_caffe(model: Any, src: Any, directory: Path, name: str) -> tuple[Path, Path, list[str]]:
    """Write ``name`` (.caffemodel) and its ``.prototxt`` into ``directory``; returns both paths and notes."""
    from google.protobuf import text_format

    net, notes = caffe_net(model, src)
    model_path = Path(directory) / name
    proto_path = model_path.with_suffix(".prototxt")
    structure = type(net)()
    structure.CopyFrom(net)
    for lp in structure.layer:
        del lp.blobs[:]
    proto_path.write_text(text_format.MessageToString(structure))
    model_path.write_bytes(net.SerializeToString())
    return model_path, proto_path, notes
