"""Parity for ONNX models: onnxruntime, graph optimisations off, on seeded random inputs.

* :class:`OnnxInputs` -- the graph's declared inputs (initializers excluded), their dtypes and
  the shapes to run them at: the declared static dims, ``--input-shape`` for symbolic ones
  (a symbolic leading batch dim defaults to 1, and says so); values drawn with the same seeding
  as :class:`~modelsurgeon.verify.inputs.InputSpec`, so a one-input float model gets the same
  numbers on either back end.
* :class:`OnnxReferences` -- the ORIGINAL file's outputs, run once per trial before anything
  is edited (graph optimisations off, so the runtime's own fusions cannot hide a mistake),
  with any extra tensors a pass asks for exposed as outputs (truncate's ``--at``); with a
  symbolic batch, the second trial one batch larger.
* :meth:`OnnxReferences.check` -- runs the result and compares every one of its outputs, by
  name, with the original's value of the tensor of that name (tolerance semantics:
  :mod:`.compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import BadInput
from .compare import OutputDiff, ParityReport, Tolerance, compare_arrays, summarise
from .inputs import DTYPES, parse_shape

EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


class OrtError(Exception):
    """onnxruntime refused or failed to run a model."""


def _short(e: BaseException) -> str:
    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    text = lines[0] if lines else type(e).__name__
    return text[:400]


def session(src: Any, external_dir: Path | None = None):
    """An onnxruntime CPU session with every graph optimisation off. ``src`` is a path or
    serialized bytes; ``external_dir`` resolves external data of a model given as bytes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4  # errors are reported by us, in one line
    if external_dir is not None and not isinstance(src, (str, Path)):
        so.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(external_dir))
    try:
        return ort.InferenceSession(str(src) if isinstance(src, Path) else src, so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:
        raise OrtError(_short(e)) from e


def run(sess: Any, feeds: dict) -> dict:
    """``{output name: array}``; feeds for inputs the model does not declare are left out."""
    names = {i.name for i in sess.get_inputs()}
    try:
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
    except Exception as e:
        raise OrtError(_short(e)) from e
    return {o.name: a for o, a in zip(sess.get_outputs(), outs)}


def _numpy_dtype(ir_dtype: Any) -> Any:
    try:
        return ir_dtype.numpy()
    except Exception:
        return None


@dataclass
class OnnxInputs:
    names: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtypes: list[Any] = field(default_factory=list)  # numpy dtypes
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    symbolic_batch: bool = False  # every input's first dim is symbolic: a second batch size is checked too

    @classmethod
    def from_model(cls, model: Any, shapes: Sequence[str] = (), dtype: str = "auto", seed: int = 0) -> "OnnxInputs":
        import numpy as np

        from ..capture.onnx import shape_of

        if dtype != "auto" and dtype not in DTYPES:
            raise BadInput(f"--dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
        g = model.graph
        declared = [v for v in g.inputs if not v.is_initializer()]
        given = [parse_shape(s) for s in shapes]
        if given and len(given) != len(declared):
            names = ", ".join(v.name for v in declared)
            raise BadInput(f"the model has {len(declared)} input{'s' if len(declared) != 1 else ''} ({names}): "
                           f"pass --input-shape once per input, in that order (got {len(given)})")
        spec = cls(seed=seed)
        for i, v in enumerate(declared):
            dt = _numpy_dtype(v.dtype) if v.dtype is not None else None
            if dt is None or dt.kind not in "fiub":
                raise BadInput(f"input {v.name!r} has type {v.dtype or 'unknown'}: only numeric tensor inputs can be generated")
            if dtype != "auto" and dt.kind == "f" and np.dtype(dt).name != dtype:
                raise BadInput(f"--dtype {dtype}: input {v.name!r} is declared {np.dtype(dt).name} "
                               "(ONNX inputs are generated in their declared dtype)")
            decl = shape_of(v)
            if given:
                shape = given[i]
                if decl is not None:
                    if len(decl) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(decl, shape)):
                        raise BadInput(f"--input-shape {','.join(map(str, shape))} does not fit input {v.name!r} "
                                       f"declared {_fmt(decl)}")
            else:
                if decl is None:
                    raise BadInput(f"input {v.name!r} declares no shape: pass --input-shape")
                dims = []
                for j, d in enumerate(decl):
                    if isinstance(d, int) and d > 0:
                        dims.append(d)
                    elif j == 0:
                        dims.append(1)
                        spec.notes.append(f"input {v.name!r}: symbolic batch dimension {d or '?'} set to 1 "
                                          "(pass --input-shape to choose)")
                    else:
                        raise BadInput(f"input {v.name!r} has symbolic dimensions {_fmt(decl)}: pass --input-shape "
                                       f"(e.g. -s {','.join(str(x) if isinstance(x, int) else ('1' if k == 0 else '224') for k, x in enumerate(decl))})")
                shape = tuple(dims)
            spec.names.append(v.name)
            spec.shapes.append(tuple(shape))
            spec.dtypes.append(dt)
        spec.symbolic_batch = bool(declared) and all(
            (d := shape_of(v)) is not None and len(d) > 0 and not (isinstance(d[0], int) and d[0] > 0) for v in declared)
        return spec

    def make(self, trial: int, grow: int = 0) -> dict:
        """Trial ``trial``'s feeds ``{name: array}``: the same numbers for the same seed and trial;
        ``grow`` adds to the first dimension of every input (another batch size)."""
        import numpy as np

        from .inputs import draw

        kinds = ["f" if dt.kind == "f" else "i" for dt in self.dtypes]
        shapes = [(s[0] + grow, *s[1:]) if grow and s else s for s in self.shapes]
        values = draw(shapes, kinds, self.seed, trial)
        return {name: np.require(v.numpy().astype(bool if dt.kind == "b" else dt), requirements="C")
                for name, v, dt in zip(self.names, values, self.dtypes)}

    def describe(self, grow: int = 0) -> str:
        return "; ".join(f"{n} {','.join(map(str, (s[0] + grow, *s[1:]) if grow and s else s))}"
                         for n, s in zip(self.names, self.shapes))


def _fmt(shape: tuple) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


GROWN_TRIAL = 1
"""The trial run one batch larger when every input's batch dimension is symbolic."""


class OnnxReferences:
    """The original model's outputs (and any extra tensors) on every trial's inputs. With a
    symbolic batch (and ``trials >= 2``), trial :data:`GROWN_TRIAL` is one batch larger when the
    original runs at it, so a rewrite that holds only at the example's batch fails there; a
    result whose batch is fixed is checked on that trial at the example's batch instead."""

    def __init__(self, inputs: OnnxInputs, trials: int):
        self.spec = inputs
        self.trials = max(1, trials)
        self.outputs: list[dict] = []
        self.grown: int | None = None  # the trial at batch + 1, once the original ran on it
        self.grown_error: str | None = None  # why the original could not run at batch + 1
        self._session: Any = None
        self._base: dict[int, dict] = {}  # trial -> the original's outputs at the example batch

    def inputs(self, trial: int, grown: bool = True) -> dict:
        return self.spec.make(trial, grow=1 if grown and trial == self.grown else 0)

    def record(self, path: Path | bytes, extra: Sequence[str] = (), types: dict | None = None) -> None:
        """Run the original file (read again from disk, untouched) -- or the serialized graph a
        Darknet / Caffe model was read into -- once per trial; ``extra`` tensors are exposed as
        outputs first."""
        import onnx

        if not extra:
            sess = session(path if isinstance(path, bytes) else Path(path))
        else:
            if isinstance(path, bytes):
                proto, folder = onnx.load_from_string(path), None
            else:
                proto, folder = onnx.load(str(path), load_external_data=False), Path(path).parent
            present = {o.name for o in proto.graph.output}
            for name in extra:
                if name not in present:
                    vi = onnx.ValueInfoProto(name=name)
                    if types and types.get(name) is not None:
                        vi.type.tensor_type.elem_type = int(types[name])
                    proto.graph.output.append(vi)
            sess = session(proto.SerializeToString(), folder)
        self._session = sess
        self.outputs = []
        for t in range(self.trials):
            if t == GROWN_TRIAL and self.spec.symbolic_batch and self.grown is None and self.grown_error is None:
                try:
                    self.outputs.append(run(sess, self.spec.make(t, grow=1)))
                    self.grown = t
                    continue
                except OrtError as e:
                    self.grown_error = str(e)
            self.outputs.append(run(sess, self.inputs(t)))

    def _at_example_batch(self, trial: int) -> dict:
        """The original's outputs of ``trial`` at the example's batch (for a result whose batch
        dimension a pass fixed)."""
        if trial not in self._base:
            self._base[trial] = run(self._session, self.inputs(trial, grown=False))
        return self._base[trial]

    def check(self, sess: Any, tol: Tolerance, expected: Sequence[str] = ()) -> ParityReport:
        """Compare a session of the result with the references, output by output (by name);
        every name in ``expected`` must be an output of the result."""
        fixed = any(isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape) if self.grown is not None else False
        per_trial: list[list[OutputDiff]] = []
        for t in range(self.trials):
            at_example = fixed and t == self.grown
            outs = run(sess, self.inputs(t, grown=not at_example))
            refs = self._at_example_batch(t) if at_example else self.outputs[t]
            diffs = [OutputDiff(n, float("inf"), float("inf"), False, "missing from the result")
                     for n in expected if n not in outs]
            for name, arr in outs.items():
                ref = refs.get(name)
                if ref is None:
                    diffs.append(OutputDiff(name, float("inf"), float("inf"), False, "no reference for this output"))
                else:
                    diffs.append(compare_arrays(name, ref, arr, tol))
            per_trial.append(diffs)
        return summarise(per_trial, tol)
