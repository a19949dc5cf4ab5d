"""Runners: a model of either back end behind one face -- its input signature, and ``run``
returning named outputs (an ordered mapping name -> numpy array) for numpy feeds, optionally
with intermediate values (``layers``). Used stand-alone by ``compare`` (:mod:`.models`) and by
the API's ``ms.compare``. See docs/architecture.md (verify).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .compare import flatten_outputs, to_numpy


@dataclass
class InputSig:
    name: str
    shape: tuple | None  # ints, or None / str for a symbolic dim; None: undeclared
    dtype: Any  # numpy dtype


class TorchRunner:
    """A PyTorch module (in eval mode). Outputs are named as the parity report names them
    (``out``, ``out[0]``, ``out['boxes']``...); with ``layers``, every module's output (its
    first call, tensors only) by module path, in the order the calls returned."""

    kind = "torch"

    def __init__(self, model: Any, storage_dtype: Any = None, input_dtype: Any = None, label: str = "model"):
        import torch

        self.model = model
        self.label = label
        self.calls: dict[str, int] = {}  # module path -> calls in the last run with layers
        self.storage_dtype = storage_dtype or next((p.dtype for p in model.parameters() if p.is_floating_point()),
                                                   torch.float32)
        compute = torch.float32 if self.storage_dtype in (torch.float16, torch.bfloat16) else self.storage_dtype
        self.input_dtype = input_dtype or compute

    def signature(self) -> list[InputSig] | None:
        """The forward's positional parameters (no shapes: a module does not declare them)."""
        import inspect

        try:
            params = list(inspect.signature(self.model.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return None
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                 and p.default is p.empty]
        return [InputSig(n, None, None) for n in names]

    def run(self, feeds: Sequence[Any], layers: bool = False) -> tuple[dict, dict]:
        """``({output name: array}, {module path: array})`` for positional ``feeds``."""
        import torch

        from .torch import run as run_model

        xs = [torch.from_numpy(_c(a)) for a in feeds]
        xs = [x.to(self.input_dtype) if x.is_floating_point() else x for x in xs]
        got: dict[str, Any] = {}
        handles = []
        if layers:
            self.calls: dict[str, int] = {}
            paths = {id(m): p for p, m in self.model.named_modules() if p}

            def hook(mod, _args, out):
                p = paths.get(id(mod))
                if p is None:
                    return
                self.calls[p] = self.calls.get(p, 0) + 1
                if p not in got and isinstance(out, torch.Tensor):
                    got[p] = to_numpy(out.float() if out.is_floating_point() else out).copy()

            handles.append(torch.nn.modules.module.register_module_forward_hook(hook))
        try:
            out = run_model(self.model, xs)
        finally:
            for h in handles:
                h.remove()
        return {n: _array(v) for n, v in flatten_outputs(out)}, got

    def module_paths(self) -> dict[str, Any]:
        return {p: m for p, m in self.model.named_modules() if p}


class OnnxRunner:
    """An onnxruntime session (optimisations off) of an ONNX file or serialized model; with
    ``layers``, the named intermediate tensors exposed as outputs too (nothing else changes)."""

    kind = "onnx"

    def __init__(self, source: Path | bytes, label: str = "model"):
        import onnx

        self.source = source
        self.label = label
        if isinstance(source, bytes):
            self.proto, self.folder = onnx.load_from_string(source), None
        else:
            self.proto, self.folder = onnx.load(str(source), load_external_data=False), Path(source).parent
        self.storage_dtype = _onnx_storage_dtype(self.proto)

    def signature(self) -> list[InputSig]:
        from onnx import helper

        inits = {i.name for i in self.proto.graph.initializer}
        out = []
        for v in self.proto.graph.input:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            try:
                dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
            except Exception:
                dt = None
            shape = tuple((d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
                          for d in tt.shape.dim) if tt.HasField("shape") else None
            out.append(InputSig(v.name, shape, dt))
        return out

    def output_names(self) -> list[str]:
        return [o.name for o in self.proto.graph.output]

    def nodes(self) -> list[tuple[str, list[str]]]:
        """``(node name, output names)`` in graph order."""
        return [(n.name, list(n.output)) for n in self.proto.graph.node]

    def run(self, feeds: Sequence[Any], extra: Sequence[str] = ()) -> tuple[dict, dict]:
        """``({output name: array}, {extra tensor: array})`` for positional ``feeds``."""
        from .onnx import run, session

        sig = self.signature()
        present = {o.name for o in self.proto.graph.output}
        wanted = list(extra)
        extra = [e for e in extra if e not in present]
        if extra:
            import onnx

            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)
            for name in extra:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
            sess = session(proto.SerializeToString(), self.folder)
        else:
            sess = session(self.source if isinstance(self.source, bytes) else Path(self.source))
        fed = {s.name: _c(a).astype(s.dtype) if s.dtype is not None and a.dtype.kind == s.dtype.kind == "f" else _c(a)
               for s, a in zip(sig, feeds)}
        outs = run(sess, fed)
        named = [o.name for o in self.proto.graph.output]
        return {n: outs[n] for n in named}, {n: outs[n] for n in wanted if n in outs}


def _c(a: Any) -> Any:
    import numpy as np

    return np.require(np.asarray(a), requirements="C")


def _array(v: Any) -> Any:
    import numpy as np

    v = to_numpy(v)
    return v if isinstance(v, np.ndarray) else np.asarray(v)


def _onnx_storage_dtype(proto: Any) -> Any:
    """The float dtype most initializer elements are stored in (float32 if none)."""
    import numpy as np
    from onnx import helper

    counts: dict[Any, int] = {}
    for t in proto.graph.initializer:
        try:
            dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        except Exception:
            continue
        if dt.kind == "f":
            n = 1
            for d in t.dims:
                n *= d
            counts[dt] = counts.get(dt, 0) + n
    return max(counts, key=counts.get) if counts else np.dtype("float32")


def open_model(path: Path, *, arch: str | None = None, arch_kwargs: Any = None, trust_pickle: bool = False,
               code_paths: Sequence[Path] = (), cfg: Path | None = None, prototxt: Path | None = None,
               input_shapes: Sequence[str] = (), label: str = "model") -> Any:
    """A runner for any file the other commands read: PyTorch checkpoints (the primary model of a
    container, prepared: eval, float32 compute), ONNX files, Darknet / Caffe models (the ONNX
    graph they are read into)."""
    from ..read import load_checkpoint
    from ..read.prepare import prepare

    ckpt = load_checkpoint(path, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
                           code_paths=code_paths, cfg=cfg, prototxt=prototxt, input_shapes=input_shapes)
    if ckpt.source is not None:
        return OnnxRunner(ckpt.source.onnx_bytes, label)
    if ckpt.is_onnx:
        return OnnxRunner(Path(path), label)
    slot = ckpt.primary()
    storage = prepare(slot.module)
    return TorchRunner(slot.module, storage.default_dtype, label=label)


def peek_signature(path: Any) -> list[InputSig] | None:
    """The inputs an ``.onnx`` file declares (read without its weights), else None."""
    if isinstance(path, (str, Path)) and Path(path).suffix.lower() == ".onnx" and Path(path).is_file():
        return OnnxRunner(Path(path)).signature()
    return None
