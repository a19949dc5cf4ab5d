"""Reading a Caffe net: the ``.prototxt`` (text format) and the ``.caffemodel`` (binary).

* The text is parsed by protobuf's own text-format parser against ``schema.py``. Layers of a
  type modelsurgeon does not convert are refused first (by name, type and line -- their
  parameters, often a fork's, need not be known); then the net is parsed strictly, so a field
  Caffe's schema lacks (a fork's extension of a known layer, a typo) is refused with its line
  rather than silently ignored.
* V1 nets (``layers { type: CONVOLUTION }``) are refused, naming the first layer: upgrade them
  with Caffe's ``upgrade_net_proto_text``.
* Layers are kept for the TEST phase, as Caffe's ``Net`` filters them (``include`` /
  ``exclude`` rules on phase, level and stage).
* The ``.caffemodel`` is parsed as a ``NetParameter`` (unknown fields skipped); its layers'
  blobs are matched to the prototxt's layers by name, as Caffe's ``CopyTrainedLayersFrom``
  does (V1 ``layers`` of an old ``.caffemodel`` included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BadInput, first_line
from .schema import classes

_TOKEN = re.compile(r"""\s+|#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[A-Za-z_][\w.]*|[{}<>]|[^\s{}<>"'#]+""")


@dataclass
class CaffeLayer:
    param: Any  # LayerParameter
    index: int  # position among the kept layers
    line: int  # 1-based line in the prototxt (0 when unknown)

    @property
    def name(self) -> str:
        return self.param.name

    @property
    def type(self) -> str:
        return self.param.type

    def where(self) -> str:
        at = f", line {self.line}" if self.line else ""
        return f"layer {self.name!r} (type {self.type}{at})"


@dataclass
class CaffeNet:
    name: str
    net: Any  # NetParameter as parsed from the prototxt (all phases)
    layers: list[CaffeLayer]  # kept for TEST, in order
    dropped: list[int] = field(default_factory=list)  # indices (in net.layer) filtered out by phase


def top_level_lines(text: str) -> dict[str, list[tuple[int, int, int]]]:
    """``(line, start, end)`` of each top-level ``layer`` and ``layers`` message (1-based line,
    character span of its body)."""
    out: dict[str, list[tuple[int, int, int]]] = {"layer": [], "layers": []}
    depth, line = 0, 1
    pending: tuple[str, int] | None = None
    opened: tuple[str, int, int] | None = None
    for m in _TOKEN.finditer(text):
        tok = m.group(0)
        if tok.isspace() or tok.startswith("#"):
            line += tok.count("\n")
            continue
        if tok in ("{", "<"):
            if depth == 0 and pending is not None:
                opened = (pending[0], pending[1], m.end())
            depth += 1
            pending = None
            continue
        if tok in ("}", ">"):
            depth = max(0, depth - 1)
            if depth == 0 and opened is not None:
                out[opened[0]].append((opened[1], opened[2], m.start()))
                opened = None
            pending = None
            continue
        if depth == 0 and tok in out:
            pending = (tok, line)
        elif tok != ":":
            pending = None
        line += tok.count("\n")
    return out


def _parse(text: str, name: str, lenient: bool) -> Any:
    from google.protobuf import text_format

    net = classes()["NetParameter"]()
    try:
        text_format.Parse(text, net, allow_unknown_field=lenient)
    except text_format.ParseError as e:
        raise BadInput(f"{name}: not a Caffe prototxt the schema knows: {first_line(e)}")
    return net


def _meets(rule: Any, state: Any) -> bool:
    """Caffe's ``Net::StateMeetsRule`` for the TEST phase."""
    if rule.HasField("phase") and rule.phase != state["phase"]:
        return False
    if rule.HasField("min_level") and state["level"] < rule.min_level:
        return False
    if rule.HasField("max_level") and state["level"] > rule.max_level:
        return False
    if any(s not in state["stage"] for s in rule.stage):
        return False
    return not any(s in state["stage"] for s in rule.not_stage)


def read_prototxt(path: Path, supported: set[str]) -> CaffeNet:
    try:
        text = path.read_bytes().decode("utf-8-sig", errors="replace")
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})")
    spans = top_level_lines(text)
    if spans["layers"]:
        line, start, end = spans["layers"][0]
        body = text[start:end]
        name = re.search(r"\bname\s*:\s*[\"']([^\"']*)", body)
        kind = re.search(r"\btype\s*:\s*[\"']?(\w+)", body)
        raise BadInput(f"{path.name}: layer {name.group(1) if name else '?'!r} (type {kind.group(1) if kind else '?'}, "
                       f"line {line}) is a V1 layer (layers {{ }}): V1 nets are not supported; upgrade the net with "
                       "Caffe's upgrade_net_proto_text", code="unsupported-layer")
    loose = _parse(text, path.name, lenient=True)
    line_of = [ln for ln, _, _ in spans["layer"]] if len(spans["layer"]) == len(loose.layer) else [0] * len(loose.layer)
    state = {"phase": 1, "level": loose.state.level if loose.HasField("state") else 0,
             "stage": set(loose.state.stage) if loose.HasField("state") else set()}
    kept, dropped = [], []
    for i, lp in enumerate(loose.layer):
        if lp.include:
            keep = any(_meets(r, state) for r in lp.include)
        else:
            keep = not any(_meets(r, state) for r in lp.exclude)
        if not keep:
            dropped.append(i)
            continue
        layer = CaffeLayer(param=lp, index=len(kept), line=line_of[i])
        if lp.type not in supported:
            raise BadInput(f"{path.name}: {layer.where()} is not supported (supported: {', '.join(sorted(supported))})",
                           code="unsupported-layer")
        kept.append(i)
    net = _parse(text, path.name, lenient=False)
    layers = [CaffeLayer(param=net.layer[i], index=k, line=line_of[i]) for k, i in enumerate(kept)]
    if not layers:
        raise BadInput(f"{path.name}: no layers for the TEST phase")
    return CaffeNet(name=net.name or path.stem, net=net, layers=layers, dropped=dropped)


def read_caffemodel(path: Path) -> dict[str, list[Any]]:
    """``{layer name: [BlobProto, ...]}`` from a ``.caffemodel`` (V2 ``layer`` and V1 ``layers``)."""
    from google.protobuf.message import DecodeError

    data = path.read_bytes()
    model = classes()["NetParameter"]()
    try:
        model.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise BadInput(f"{path.name}: not a Caffe model, or a truncated one (the protobuf does not parse: "
                       f"{str(e).rpartition(': ')[2][:200] or 'truncated?'})",
                       code="not-a-checkpoint")
    blobs: dict[str, list[Any]] = {}
    for lp in list(model.layer) + list(model.layers):
        if lp.blobs and lp.name not in blobs:
            blobs[lp.name] = list(lp.blobs)
    if not model.layer and not model.layers:
        raise BadInput(f"{path.name}: not a Caffe model (no layers in it)", code="not-a-checkpoint")
    return blobs


def blob_array(blob: Any, expected: tuple[int, ...] | None, where: str, k: int) -> Any:
    """A ``BlobProto`` as a float32 array of the ``expected`` shape (legacy 4-D
    num/channels/height/width shapes accepted when Caffe would, i.e. padded with leading 1s)."""
    import numpy as np

    if blob.HasField("raw_data"):
        raise BadInput(f"{where}: blob {k} is stored as raw_data (NVIDIA Caffe fp16): not supported")
    if len(blob.data):
        arr = np.array(blob.data, dtype=np.float32)
    else:
        arr = np.array(blob.double_data, dtype=np.float64).astype(np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
        legacy = False
    else:
        shape = (blob.num, blob.channels, blob.height, blob.width)
        legacy = True
    count = 1
    for d in shape:
        count *= d
    if count != arr.size:
        raise BadInput(f"{where}: blob {k} declares shape {list(shape)} but holds {arr.size} values",
                       code="weights-mismatch")
    if expected is not None:
        exp = tuple(expected)
        ok = shape == exp or (legacy and len(exp) <= 4 and (1,) * (4 - len(exp)) + exp == shape)
        if not ok:
            raise BadInput(f"{where}: blob {k} has shape {list(shape)}, the prototxt needs {list(exp)}",
                           code="weights-mismatch")
        shape = exp
    if not np.isfinite(arr).all():
        raise BadInput(f"{where}: blob {k} holds NaN or infinite values")
    return arr.reshape(shape)
