"""Parity of any two models (``modelsurgeon compare A B``, ``ms.compare``): runners
(:mod:`.runners`) on the same inputs -- seeded (:func:`.inputs.draw`) or read from an ``.npz``
--, one model at a time (peak memory: one model plus the outputs), outputs paired by name
(two ONNX graphs with the same output names) or by position, compared with
:func:`.compare.compare_arrays`; with ``layers``, where they first diverge (:mod:`.layers`).
JSON schema: docs/json.md (*compare*).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import BadInput
from .compare import OutputDiff, ParityReport, Tolerance, compare_arrays, summarise
from .layers import LayerPair, first_divergence


@dataclass
class Comparison:
    """What ``compare`` found: per-output statistics (worst over the input sets), and with
    ``layers`` the paired layers and the first that diverges."""

    a: str
    b: str
    parity: ParityReport
    inputs: list[dict] = field(default_factory=list)  # name, shape, dtype
    pairs: list[tuple[str, str]] = field(default_factory=list)  # output names (a, b)
    layers: list[LayerPair] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.parity.passed

    @property
    def outputs(self) -> list[OutputDiff]:
        return self.parity.outputs

    @property
    def max_abs(self) -> float:
        return self.parity.max_abs

    @property
    def max_rel(self) -> float:
        return self.parity.max_rel

    def worst(self) -> str:
        return self.parity.worst()

    @property
    def first_divergence(self) -> LayerPair | None:
        return first_divergence(self.layers) if self.layers else None

    def to_json(self) -> dict:
        fd = self.first_divergence
        outs = []
        for o, (_na, nb) in zip(self.parity.outputs, self.pairs or [(o.name, o.name) for o in self.parity.outputs]):
            d = o.to_json()
            d["name_b"] = nb
            outs.append(d)
        doc = {"passed": self.passed, "a": self.a, "b": self.b, "inputs": self.inputs,
               "trials": self.parity.trials, "atol": self.parity.atol, "rtol": self.parity.rtol, "outputs": outs,
               "first_divergence": None if fd is None else
               {"a": fd.a, "b": fd.b, "max_abs": fd.max_abs, "max_rel": fd.max_rel,
                **({"a_output": fd.a_output} if fd.a_output else {}),
                **({"b_output": fd.b_output} if fd.b_output else {})},
               "notes": list(self.notes)}
        if self.layers is not None:
            doc["layers"] = [p.to_json() for p in self.layers]
        return doc


@dataclass
class Side:
    """One model's run: its outputs per input set, its intermediate values (first set), and
    what pairing them needs."""

    label: str
    kind: str
    storage_dtype: Any
    outputs: list[dict] = field(default_factory=list)
    layer_values: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)  # ONNX: (node name, outputs)
    modules: dict = field(default_factory=dict)  # PyTorch: path -> module kind (Identity or not)
    calls: dict = field(default_factory=dict)  # PyTorch: path -> calls in the first input set


def run_side(runner: Any, feeds: list[list], layers: bool) -> Side:
    """Run ``runner`` on every input set; with ``layers``, the intermediate values of the first."""
    from .onnx import OrtError
    from .torch import ModelRunError

    side = Side(runner.label, runner.kind, runner.storage_dtype)
    try:
        for t, xs in enumerate(feeds):
            if runner.kind == "onnx":
                extra = [o for _n, outs in runner.nodes() for o in outs if o] if layers and t == 0 else ()
                out, got = runner.run(xs, extra)
            else:
                out, got = runner.run(xs, layers=layers and t == 0)
            side.outputs.append(out)
            if t == 0:
                side.layer_values = got
    except (ModelRunError, OrtError) as e:
        raise BadInput(f"{runner.label} cannot run on the inputs ({_describe(feeds[0])}): {e}", code="model-cannot-run")
    if layers and runner.kind == "onnx":
        side.nodes = runner.nodes()
    if layers and runner.kind == "torch":
        import torch.nn as nn

        side.modules = {p: (nn.Identity() if isinstance(m, nn.Identity) else None) for p, m in runner.module_paths().items()}
        side.calls = dict(runner.calls)
    return side


def _describe(xs: list) -> str:
    return "; ".join(",".join(map(str, x.shape)) for x in xs)


def looser(a: Any, b: Any) -> str:
    """The dtype name whose default tolerance is the looser of the two storage dtypes."""
    from .compare import RTOL

    names = [str(d).replace("torch.", "") for d in (a, b)]
    return max(names, key=lambda n: RTOL.get(n, RTOL["float32"]))


def compare_sides(a: Side, b: Side, tol: Tolerance, by_name: bool) -> tuple[ParityReport, list[tuple[str, str]]]:
    """Outputs of ``a`` and ``b`` paired (by name or position), compared per input set."""
    na, nb = list(a.outputs[0]), list(b.outputs[0])
    if by_name:
        pairs = [(n, n) for n in na]
    else:
        if len(na) != len(nb):
            raise BadInput(f"{a.label} has {len(na)} output{'s' if len(na) != 1 else ''} ({', '.join(na)}), "
                           f"{b.label} has {len(nb)} ({', '.join(nb)})", code="output-mismatch")
        pairs = list(zip(na, nb))
    per_trial = []
    for oa, ob in zip(a.outputs, b.outputs):
        per_trial.append([compare_arrays(x, oa[x], ob[y], tol) for x, y in pairs if x in oa and y in ob])
    return summarise(per_trial, tol), pairs


def pair_layers(a: Side, b: Side, tol: Tolerance) -> list[LayerPair]:
    from .layers import onnx_points_by_module, onnx_points_by_name, pair, skipped_keys, torch_points

    if a.kind == b.kind == "onnx":
        return pair(onnx_points_by_name(a.nodes, a.layer_values), onnx_points_by_name(b.nodes, b.layer_values), tol)
    modules = set(a.modules) | set(b.modules)

    def points(s: Side) -> list:
        if s.kind == "torch":
            return torch_points(s.layer_values, s.modules)
        return onnx_points_by_module(s.nodes, s.layer_values, modules)

    return pair(points(a), points(b), tol, skipped_keys(a.calls) | skipped_keys(b.calls))


# -- inputs -------------------------------------------------------------------------------------

def read_npz(path: Path, names: list[str] | None, count: int) -> list[list]:
    """Input sets from an ``.npz``: ``NAME`` (one set) or ``NAME@T`` (set ``T``), by the input
    names when the file uses them, else in the file's order."""
    import numpy as np

    try:
        with np.load(str(path), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise BadInput(f"--inputs {path}: not a readable .npz ({e})", code="bad-inputs-file")
    sets: dict[int, dict[str, Any]] = {}
    for k, v in arrays.items():
        base, _, t = k.rpartition("@")
        if base and t.isdigit():
            sets.setdefault(int(t), {})[base] = v
        else:
            sets.setdefault(0, {})[k] = v
    out = []
    for t in sorted(sets):
        got = sets[t]
        if names and set(names) <= set(got):
            out.append([got[n] for n in names])
        elif len(got) == count:
            out.append(list(got.values()))
        else:
            raise BadInput(f"--inputs {path}: set {t} holds {', '.join(got) or 'nothing'}; the models take "
                           f"{count} input{'s' if count != 1 else ''}" + (f" ({', '.join(names)})" if names else ""),
                           code="input-mismatch")
    if not out:
        raise BadInput(f"--inputs {path}: no arrays", code="input-mismatch")
    return out


def save_npz(path: Path, sets: list[dict]) -> None:
    import numpy as np

    from ..write.atomic import atomic_path

    flat = {}
    for t, d in enumerate(sets):
        for k, v in d.items():
            flat[k if len(sets) == 1 else f"{k}@{t}"] = v
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **flat)


def shapes_from(sig: list | None, label: str) -> list[tuple[int, ...]] | None:
    """Input shapes an ONNX side declares (a symbolic leading dim: 1)."""
    if not sig:
        return None
    shapes = []
    for s in sig:
        if s.shape is None:
            raise BadInput(f"{label}: input {s.name!r} declares no shape: pass --input-shape", code="input-shape")
        dims = []
        for j, d in enumerate(s.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif j == 0:
                dims.append(1)
            else:
                raise BadInput(f"{label}: input {s.name!r} has symbolic dimensions {list(s.shape)}: pass --input-shape",
                               code="input-shape")
        shapes.append(tuple(dims))
    return shapes


# -- the whole comparison -------------------------------------------------------------------------

Opener = Callable[[], Any]


def compare_runners(open_a: Opener, open_b: Opener, *, shapes: Sequence[tuple[int, ...]] = (), inputs: list[list] | None = None,
                    trials: int = 2, seed: int = 0, atol: float | None = None, rtol: float | None = None,
                    layers: bool = False, tol: Tolerance | None = None, peek_b: Opener | None = None,
                    names: tuple[str, str] = ("A", "B"), save_inputs: Path | None = None,
                    save_outputs: Path | None = None) -> Comparison:
    """Compare the models ``open_a()`` and ``open_b()`` return (runners), opened one after the
    other. ``peek_b`` gives B's input signature cheaply (an ONNX side) when A cannot say."""
    import numpy as np

    from .inputs import draw, guess_shapes

    ra = open_a()
    sig_a = ra.signature()
    sig_b = peek_b() if peek_b is not None else None
    onnx_sig = sig_a if ra.kind == "onnx" else sig_b
    notes: list[str] = []
    if inputs is None:
        if not shapes:
            shapes = shapes_from(onnx_sig, names[0] if ra.kind == "onnx" else names[1]) or []
        if not shapes and ra.kind == "torch":
            guesses = guess_shapes(ra.model)
            if not guesses:
                raise BadInput("no input shape: pass --input-shape", code="input-shape")
            shapes = guesses[0]
            notes.append(f"input shape guessed from the first layer: {_describe([np.empty(s) for s in shapes])}")
        kinds = [("f" if s.dtype is None or np.dtype(s.dtype).kind == "f" else "i") for s in onnx_sig] \
            if onnx_sig and len(onnx_sig) == len(shapes) else ["f"] * len(shapes)
        inputs = [[x.numpy() for x in draw(shapes, kinds, seed, t)] for t in range(trials)]
        if onnx_sig and len(onnx_sig) == len(shapes):
            inputs = [[x.astype(bool if np.dtype(s.dtype).kind == "b" else s.dtype) if s.dtype is not None and x.dtype.kind != "f" else x
                       for s, x in zip(onnx_sig, xs)] for xs in inputs]
    for sig, label in ((sig_a, names[0]), (sig_b, names[1])):
        if sig is not None and sig and len(sig) != len(inputs[0]):
            raise BadInput(f"{label} takes {len(sig)} input{'s' if len(sig) != 1 else ''} "
                           f"({', '.join(s.name for s in sig)}); {len(inputs[0])} given", code="input-mismatch")
    in_names = [s.name for s in onnx_sig] if onnx_sig else [f"input{i}" for i in range(len(inputs[0]))]
    if save_inputs is not None:
        save_npz(save_inputs, [dict(zip(in_names, xs)) for xs in inputs])
    side_a = run_side(ra, inputs, layers)
    del ra
    gc.collect()
    rb = open_b()
    sig_b = rb.signature()
    if sig_b and len(sig_b) != len(inputs[0]):
        raise BadInput(f"{names[1]} takes {len(sig_b)} input{'s' if len(sig_b) != 1 else ''} "
                       f"({', '.join(s.name for s in sig_b)}); {names[0]} takes {len(inputs[0])}", code="input-mismatch")
    if side_a.kind == rb.kind == "onnx" and sig_a and sig_b and [s.name for s in sig_a] != [s.name for s in sig_b]:
        raise BadInput(f"the inputs differ: {names[0]} takes {', '.join(s.name for s in sig_a)}; "
                       f"{names[1]} takes {', '.join(s.name for s in sig_b)}", code="input-mismatch")
    side_b = run_side(rb, inputs, layers)
    del rb
    gc.collect()
    if tol is None:
        tol = Tolerance.default(looser(side_a.storage_dtype, side_b.storage_dtype), atol, rtol)
    by_name = side_a.kind == side_b.kind == "onnx" and set(side_a.outputs[0]) == set(side_b.outputs[0])
    if side_a.kind == side_b.kind == "onnx" and not by_name:
        notes.append("the output names differ: outputs paired in order")
    parity, pairs = compare_sides(side_a, side_b, tol, by_name)
    if save_outputs is not None:
        save_npz(save_outputs, [{**{f"a:{k}": v for k, v in oa.items()}, **{f"b:{k}": v for k, v in ob.items()}}
                                for oa, ob in zip(side_a.outputs, side_b.outputs)])
    result = Comparison(names[0], names[1], parity, pairs=pairs, notes=notes,
                        inputs=[{"name": n, "shape": list(x.shape), "dtype": str(x.dtype)} for n, x in zip(in_names, inputs[0])])
    if layers:
        result.layers = pair_layers(side_a, side_b, tol)
        if not result.layers:
            result.notes.append("no intermediate layers could be paired")
    return result


def compare_files(opts: Any) -> Comparison:
    """``modelsurgeon compare`` (``opts``: :class:`~modelsurgeon.options.compare.CompareOptions`)."""
    from .inputs import parse_shape
    from .runners import OnnxRunner, open_model, peek_signature

    for p in (opts.a, opts.b):
        if not Path(p).exists():
            raise BadInput(f"{p}: no such file", code="not-found")
    shapes = [parse_shape(s) for s in opts.input_shape]

    def opener(path: Path, arch: str | None) -> Opener:
        return lambda: open_model(Path(path), arch=arch, arch_kwargs=opts.arch_kwargs, trust_pickle=opts.trust_pickle,
                                  code_paths=opts.code_paths, input_shapes=opts.input_shape, label=str(path))

    peek = lambda: peek_signature(opts.b)  # noqa: E731
    inputs = None
    if opts.inputs is not None:
        names, count = None, None
        for p in (opts.a, opts.b):
            if Path(p).suffix.lower() == ".onnx":
                sig = OnnxRunner(Path(p)).signature()
                names, count = [s.name for s in sig], len(sig)
                break
        if count is None:
            import numpy as np

            try:
                with np.load(str(opts.inputs), allow_pickle=False) as z:
                    keys = list(z.files)
            except (OSError, ValueError) as e:
                raise BadInput(f"--inputs {opts.inputs}: not a readable .npz ({e})", code="bad-inputs-file")
            count = len([k for k in keys if "@" not in k]) or len({k.rpartition("@")[0] for k in keys})
        inputs = read_npz(Path(opts.inputs), names, count)
    return compare_runners(opener(opts.a, opts.arch), opener(opts.b, opts.arch_b or opts.arch), shapes=shapes,
                           inputs=inputs, trials=opts.trials, seed=opts.seed, atol=opts.atol, rtol=opts.rtol,
                           layers=opts.layers, peek_b=peek, names=(str(opts.a), str(opts.b)),
                           save_inputs=opts.save_inputs, save_outputs=opts.save_outputs)
