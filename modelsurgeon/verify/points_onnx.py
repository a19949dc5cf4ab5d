"""``--verify-at TENSOR`` and post-processed outputs on ONNX graphs (the rules:
:mod:`.points`): the graph before the passes is remembered by node signatures, so that what
the passes changed is found by comparison, whatever edited it."""

from __future__ import annotations

from typing import Any, Sequence

from ..errors import BadInput
from .compare import ParityReport
from .points import excuse

DISCRETE_ONNX = frozenset({
    "TopK", "NonMaxSuppression", "ArgMax", "ArgMin", "NonZero", "Unique", "Compress", "Greater",
    "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "Round", "Floor", "Ceil",
})


def onnx_snapshot(model: Any) -> dict:
    """What :func:`onnx_changed` compares against: each node's inputs, attributes, and the data
    object of each initializer."""
    nodes = {id(n): (n.op_type, tuple(id(v) for v in n.inputs), repr(sorted(n.attributes.items(), key=lambda kv: kv[0])))
             for n in model.graph}
    inits = {v.name: id(v.const_value) for v in model.graph.initializers.values()}
    keep = list(model.graph) + [v.const_value for v in model.graph.initializers.values()]  # ids stay unique
    return {"nodes": nodes, "inits": inits, "keep": keep}


def onnx_changed(model: Any, before: dict) -> list:
    """Nodes that are new, rewired, re-attributed or read a rewritten initializer."""
    inits = {v.name: id(v.const_value) for v in model.graph.initializers.values()}
    rewritten = {n for n, i in inits.items() if before["inits"].get(n) != i}
    out = []
    for n in model.graph:
        sig = (n.op_type, tuple(id(v) for v in n.inputs), repr(sorted(n.attributes.items(), key=lambda kv: kv[0])))
        if before["nodes"].get(id(n)) != sig or any(v is not None and v.name in rewritten for v in n.inputs):
            out.append(n)
    return out


def onnx_separation(model: Any, changed: list, verified: set[str]) -> str | None:
    names = {o.name for n in model.graph for o in n.outputs} | {v.name for v in model.graph.inputs}
    missing = [t for t in verified if t not in names]
    if missing:
        return f"the rewritten graph has no tensor {missing[0]!r}"
    stack, seen = [o for n in changed for o in n.outputs], set()
    while stack:
        v = stack.pop()
        if id(v) in seen or v.name in verified:
            continue
        seen.add(id(v))
        if v.is_graph_output():
            return f"a rewritten value reaches the output {v.name!r} without going through the verified tensors"
        for c in v.consumers():
            stack.extend(c.outputs)
    return None


def onnx_post_processed(model: Any, inputs_of: dict | None = None) -> dict[str, str]:
    """Graph output name -> why it is post-processed; ``inputs_of`` (if given) receives, per such
    output, the first input of the discrete node met (the tensor to compare instead)."""
    out: dict[str, str] = {}
    for o in model.graph.outputs:
        dt = o.dtype.numpy() if o.dtype is not None else None
        if dt is not None and dt.kind in "iub":
            out[o.name] = f"an integer output ({dt})"
            continue
        stack, seen = [o], set()
        while stack:
            v = stack.pop()
            p = v.producer() if v is not None else None
            if p is None or id(v) in seen:
                continue
            seen.add(id(v))
            if p.op_type in DISCRETE_ONNX:
                out[o.name] = f"computed after {p.op_type} {p.name or ''}".rstrip()
                if inputs_of is not None and p.inputs and p.inputs[0] is not None:
                    inputs_of[o.name] = p.inputs[0].name
                break
            stack.extend(i for i in p.inputs if i is not None and not i.is_initializer())
    return out


class OnnxPoints:
    """The ONNX pipeline's counterpart of :class:`TorchPoints`: ``--verify-at`` tensors, the
    graph as it was before the passes, the post-processed outputs."""

    def __init__(self, model: Any, names: Sequence[str]):
        from ..capture.onnx import OnnxGraph

        values = OnnxGraph(model).values_by_name()
        for n in names:
            if n not in values:
                raise BadInput(f"--verify-at {n}: the graph has no tensor of this name", code="verify-at")
        self.names = list(names)
        self.before = onnx_snapshot(model)
        inputs_of: dict[str, str] = {}
        self.post = onnx_post_processed(model, inputs_of)
        self.suggestion = next(iter(inputs_of.values()), None)
        self.changed: list = []

    def after_passes(self, model: Any) -> None:
        """Note what the passes changed (before writing, which may load external data)."""
        if self.names:
            self.changed = onnx_changed(model, self.before)
        self.before = {}

    def describe(self) -> str | None:
        if not self.post:
            return None
        shown = ", ".join(f"{n} ({w})" for n, w in list(self.post.items())[:4])
        hint = "" if self.names else f"; compare a tensor with --verify-at {self.suggestion or 'TENSOR'}"
        return f"post-processed outputs: {shown}: their discrete decisions may change with an exact rewrite{hint}"

    def hint(self, parity: ParityReport) -> str:
        bad = [o.name for o in parity.outputs if not o.passed and o.name in self.post]
        if not bad or self.names:
            return ""
        return f"; {bad[0]} is post-processed ({self.post[bad[0]]}): compare a tensor with --verify-at " \
               f"{self.suggestion or 'TENSOR'}"

    def judge(self, parity: ParityReport, model: Any) -> list[str]:
        for o in parity.outputs:
            if o.name in self.names:
                o.name = f"at:{o.name}"
        if not self.names or parity.passed:
            return []
        at_ok = all(o.passed for o in parity.outputs if o.name.startswith("at:"))
        sep = onnx_separation(model, self.changed, set(self.names))
        return excuse(parity, self.post.get, at_ok, sep)


def session_with_outputs(path: Any, names: Sequence[str]) -> Any:
    """An onnxruntime session of the file at ``path`` (or a serialized model) with the tensors
    ``names`` (those the graph still has) exposed as outputs too."""
    from pathlib import Path

    import onnx

    from .onnx import session

    if not names:
        return session(path if isinstance(path, bytes) else Path(path))
    if isinstance(path, bytes):  # a serialized model (a Darknet / Caffe model's graph)
        proto, folder = onnx.load_from_string(path), None
    else:
        proto, folder = onnx.load(str(path), load_external_data=False), Path(path).parent
    have = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    present = {o.name for o in proto.graph.output}
    for n in names:
        if n in have and n not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=n))
    return session(proto.SerializeToString(), folder)
