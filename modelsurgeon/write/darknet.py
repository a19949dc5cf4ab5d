"""Write a rewritten graph back as darknet files: ``.weights`` + ``.cfg`` beside it.

The graph read from darknet files names every node after its layer (``read/darknet``); the
writer maps the rewritten graph's nodes back to those layers and keeps the ``.cfg`` text as it
was (comments, training settings), changing only what the rewrite changed:

* a ``[convolutional]`` / ``[connected]`` whose BatchNorm was folded is written with
  ``batch_normalize=0`` and the folded weights and biases;
* a weighted ``[shortcut]`` whose weights were evaluated (fold-fusion) gets them as
  ``weights_normalization=none`` weights, or ``weights_type=none`` when every weight moved
  into the layer producing its input;
* a cut (truncate) that keeps layers ``0..k`` (and the ``[yolo]`` / ``[region]`` heads right
  after them) drops the rest.

Anything else (a node a pass added, a layer partly removed, a cut that is not a prefix) cannot
be said in a ``.cfg``: refused with the reason, nothing written -- write ``.onnx`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput

NODELESS_TAIL = {"yolo", "region", "gaussian_yolo", "dropout", "cost", "empty"}
OPTIONAL_STEPS = {"convolutional": ("bn",), "connected": ("bn",)}


def _refuse(why: str) -> BadInput:
    return BadInput(f"cannot write darknet files: {why}; write .onnx instead", code="cannot-write-format")


def _const(node: Any, i: int) -> np.ndarray | None:
    if i >= len(node.inputs) or node.inputs[i] is None:
        return None
    v = node.inputs[i]
    if v.const_value is None:
        raise _refuse(f"input {i} of node {node.name!r} is no longer a constant")
    return np.asarray(v.const_value.numpy(), dtype=np.float32)


class _Layers:
    """The rewritten graph's nodes, grouped by the darknet layer they came from."""

    def __init__(self, model: Any, src: Any):
        self.src = src
        self.nodes = {n.name: n for n in model.graph}
        expected: dict[int, set[str]] = {}
        for name, idx in src.owner.items():
            expected.setdefault(idx, set()).add(name)
        self.expected = expected
        stray = [n for n in self.nodes if n not in src.owner]
        if stray:
            n = self.nodes[stray[0]]
            raise _refuse(f"node {stray[0]!r} ({n.op_type}) was added by a rewrite and belongs to no darknet layer")

    def present(self, L: Any) -> set[str]:
        return {n for n in self.expected.get(L.index, ()) if n in self.nodes}

    def optional(self, L: Any, name: str) -> bool:
        step = name.partition("/")[2]
        if step in OPTIONAL_STEPS.get(L.kind, ()):
            return True
        if L.kind == "shortcut":
            return step.startswith(("weights", "weight", "mul"))
        return False

    def alive(self, L: Any, alive_before: dict[int, bool]) -> bool:
        exp = self.expected.get(L.index, set())
        if not exp:
            return all(j < 0 or alive_before.get(j, False) for j in L.inputs)
        have = self.present(L)
        if not have:
            return False
        missing = [n for n in exp - have if not self.optional(L, n)]
        if missing:
            raise _refuse(f"{L.where()} was partly removed (node {sorted(missing)[0]!r})")
        return True


def darknet_files(model: Any, src: Any) -> tuple[str, bytes, list[str]]:
    """``(cfg text, weights bytes, notes)`` for the rewritten ``model`` read from ``src``."""
    from ..read.darknet.weights import Header

    g = _Layers(model, src)
    alive: dict[int, bool] = {}
    for L in src.layers:
        alive[L.index] = g.alive(L, alive)
    with_nodes = [L.index for L in src.layers if g.expected.get(L.index) and alive[L.index]]
    if not with_nodes:
        raise _refuse("no darknet layer is left")
    last = max(with_nodes)
    dead = [L for L in src.layers[:last + 1] if not alive[L.index]]
    if dead:
        raise _refuse(f"{dead[0].where()} was removed while later layers stay (darknet numbers its layers: only a "
                      "cut that keeps layers 0..k can be written)")
    while last + 1 < len(src.layers) and src.layers[last + 1].kind in NODELESS_TAIL and alive[last + 1]:
        last += 1
    kept = src.layers[:last + 1]
    edits: dict[int, dict[str, str | None]] = {}
    parts: list[bytes] = []
    notes: list[str] = []
    for L in kept:
        arrays, opts = _layer_arrays(g, L)
        parts.extend(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in arrays)
        if opts:
            edits[L.index] = opts
    if last + 1 < len(src.layers):
        notes.append(f"layers {last + 1}..{len(src.layers) - 1} cut off: the .cfg keeps layers 0..{last}")
    folded = [L.index for L in kept if edits.get(L.index, {}).get("batch_normalize") == "0"]
    if folded:
        notes.append(f"batch_normalize=0 in {len(folded)} layer{'s' if len(folded) > 1 else ''} (BatchNorm folded)")
    h = src.header
    header = Header(h.major, h.minor, h.revision, h.seen).pack()
    return _cfg_text(src.cfg, kept, edits), header + b"".join(parts), notes


def _layer_arrays(g: _Layers, L: Any) -> tuple[list[np.ndarray], dict[str, str | None]]:
    """The layer's arrays in the order darknet reads them, and the .cfg options to change."""
    nodes, opts = g.nodes, {}
    if L.kind in ("convolutional", "connected"):
        main = nodes[L.name]
        w, b = _const(main, 1), _const(main, 2)
        bn = nodes.get(f"{L.name}/bn")
        if L.kind == "convolutional" and L.p["flipped"]:
            opts["flipped"] = "0"
        if bn is not None:
            scales, biases, mean, var = (_const(bn, i) for i in range(1, 5))
            if b is not None and np.any(b):
                raise _refuse(f"{L.where()}: the convolution gained a bias in front of its BatchNorm")
            tail = [scales, mean, var]
            return ([biases] + tail + [w] if L.kind == "convolutional" else [biases, w] + tail), opts
        if L.p["bn"]:
            opts["batch_normalize"] = "0"
            if L.section.has("cbn"):
                opts["cbn"] = "0"
        b = np.zeros(w.shape[0], np.float32) if b is None else b
        return [b, w], opts
    if L.kind == "batchnorm":
        bn = nodes.get(L.name)
        if bn is None:
            raise _refuse(f"{L.where()} was folded away (a [batchnorm] layer cannot be dropped without renumbering)")
        scales, biases, mean, var = (_const(bn, i) for i in range(1, 5))
        return [biases, scales, mean, var], opts
    if L.kind == "shortcut" and L.p["weights_type"] != "none":
        return _shortcut_weights(g, L)
    return [], opts


def _shortcut_weights(g: _Layers, L: Any) -> tuple[list[np.ndarray], dict[str, str | None]]:
    names = g.expected[L.index]
    normalizing = {n for n in names if n.partition("/")[2].startswith(("weights", "weight"))}
    have = normalizing & set(g.nodes)
    if have:
        if have != normalizing:
            raise _refuse(f"{L.where()}: its weight normalisation was partly evaluated")
        return [g.src.arrays[L.index]["weights"]], {}  # untouched: the file's raw weights
    n = len(L.inputs)
    per_input = []
    for k in range(n):
        mul = g.nodes.get(f"{L.name}/mul{k}")
        per_input.append(np.ones(1, np.float32) if mul is None else _const(mul, 1).reshape(-1))
    wkey = next((k for k in ("weights_normalization", "weights_normalizion") if L.section.has(k)), None)
    opts: dict[str, str | None] = {}
    if wkey == "weights_normalizion":
        opts[wkey] = None
    if all(np.all(w == 1) for w in per_input):
        opts.update(weights_type="none", weights_normalization=None)
        return [], opts
    if all(w.size == 1 for w in per_input):
        opts.update(weights_type="per_feature", weights_normalization="none")
        return [np.concatenate(per_input)], opts
    opts.update(weights_type="per_channel", weights_normalization="none")
    return [np.concatenate([np.broadcast_to(w, (L.c,)) for w in per_input])], opts


def _cfg_text(cfg: Any, kept: list, edits: dict[int, dict[str, str | None]]) -> str:
    """The original .cfg text up to the last kept layer, with ``edits`` applied in place."""
    lines = list(cfg.lines[:kept[-1].section.last_line])
    inserts: dict[int, list[str]] = {}
    for L in kept:
        for key, value in edits.get(L.index, {}).items():
            hit = L.section.options.get(key)
            if hit is not None:
                lines[hit[1] - 1] = "" if value is None else _set_line(lines[hit[1] - 1], key, value)
            elif value is not None:
                ending = lines[L.section.line - 1][len(lines[L.section.line - 1].rstrip("\r\n")):] or "\n"
                inserts.setdefault(L.section.line, []).append(f"{key}={value}{ending}")
    out = []
    for number, line in enumerate(lines, start=1):
        out.append(line)
        if number in inserts:
            if not line.endswith("\n"):
                out.append("\n")
            out.extend(inserts[number])
    text = "".join(out)
    return text if text.endswith("\n") else text + "\n"


def _set_line(line: str, key: str, value: str) -> str:
    return f"{key}={value}{line[len(line.rstrip(chr(13) + chr(10))):]}"  # the line's own ending (CRLF kept)


def write_darknet(model: Any, src: Any, directory: Path, name: str) -> tuple[Path, Path, list[str]]:
    """Write ``name`` (.weights) and its ``.cfg`` into ``directory``; returns both paths and notes."""
    cfg_text, data, notes = darknet_files(model, src)
    weights = Path(directory) / name
    cfg = weights.with_suffix(".cfg")
    cfg.write_text(cfg_text)
    weights.write_bytes(data)
    return weights, cfg, notes
