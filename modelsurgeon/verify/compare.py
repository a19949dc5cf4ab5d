"""Tolerance semantics, defined once for every back end and every output.

An output passes when ``max|out - ref| <= atol + rtol * max|ref|`` (both maxima over the whole
output tensor), i.e. errors are judged against the output's own scale. Elementwise relative
error is meaningless next to values that are zero by chance; a wrong fold moves outputs by an
amount comparable to their scale, far above these bounds. Reported per output: ``max_abs`` and
``max_rel = max_abs / max|ref|``, and the statistics of :func:`statistics` (mean / median / p99
error, cosine, the smallest passing atol / rtol). NaN/Inf must appear in the same places in both.
:func:`compare_arrays` is the one comparison every check goes through.

Defaults depend on the dtype the weights are stored in (rewrites round to it):
float64 1e-9, float32 1e-4, float16 1e-2, bfloat16 5e-2 (``rtol``); ``atol`` 1e-6 x that.

The model's own rounding (float32 weights, default tolerances): a deep net can compute its
outputs only to 1e-4 or worse in float32 (cancellation in BatchNorms with large means), so the
rewritten model cannot agree with it better than that. The original is run once more in float64
on the same inputs (``exact``; made only once an output fails the rule above, see
:mod:`.exact`), and an output failing the rule above still passes when

    max|out - exact| <= NOISE_FACTOR * max|ref - exact| + atol + rtol * max|exact|

-- the rewritten model is at most twice as far from the exact function as the original itself
is. Both figures are reported (``own_noise`` = original vs float64, ``vs_float64`` = rewritten vs
float64, relative to ``max|exact|``). A wrong rewrite moves outputs by far more than the model's
own rounding and still fails. Explicit ``--atol`` / ``--rtol`` keep the fixed rule alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RTOL = {"float64": 1e-9, "float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
NOISE_FACTOR = 2.0


@dataclass
class Tolerance:
    atol: float
    rtol: float

    @classmethod
    def default(cls, storage_dtype: Any = None, atol: float | None = None, rtol: float | None = None) -> "Tolerance":
        name = str(storage_dtype).replace("torch.", "") if storage_dtype is not None else "float32"
        r = RTOL.get(name, RTOL["float32"])
        return cls(atol=r * 1e-2 if atol is None else atol, rtol=r if rtol is None else rtol)


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    passed: bool
    note: str = ""
    own_noise: float | None = None  # original vs its float64 run, relative to max|exact|
    vs_float64: float | None = None  # rewritten vs the original's float64 run, relative
    by_noise: bool = False  # failed the fixed rule, passed as within the model's own rounding
    excused: bool = False  # a post-processed output that failed, vouched for by --verify-at outputs
    stats: dict | None = None  # the statistics of :func:`statistics` (mean / median / p99, cosine...)

    def to_json(self) -> dict:
        d = {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel, "passed": self.passed}
        if self.stats is not None:
            d.update(self.stats)
        if self.note:
            d["note"] = self.note
        if self.own_noise is not None:
            d.update(own_noise=self.own_noise, vs_float64=self.vs_float64, by_noise=self.by_noise)
        if self.excused:
            d["excused"] = True
        return d

    def copy(self, name: str | None = None) -> "OutputDiff":
        import dataclasses

        return dataclasses.replace(self, name=self.name if name is None else name)


@dataclass
class ParityReport:
    passed: bool = True
    outputs: list[OutputDiff] = field(default_factory=list)
    trials: int = 0
    atol: float = 0.0
    rtol: float = 0.0
    checked: bool = True
    note: str = ""

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    def worst(self) -> str:
        """One line about the worst output (a failing one if any), for error messages."""
        bad = [o for o in self.outputs if not o.passed] or self.outputs
        if not bad:
            return "no outputs"
        o = max(bad, key=lambda o: o.max_rel)
        return f"{o.name}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}" + (f", {o.note}" if o.note else "")

    def merge(self, other: "ParityReport", prefix: str = "") -> None:
        for o in other.outputs:
            self.outputs.append(o.copy(prefix + o.name))
        self.passed = self.passed and other.passed
        self.trials = max(self.trials, other.trials)
        self.atol, self.rtol = other.atol, other.rtol

    def to_json(self) -> dict:
        d = {"checked": self.checked, "passed": self.passed, "max_abs": self.max_abs,
             "max_rel": self.max_rel, "atol": self.atol, "rtol": self.rtol, "trials": self.trials,
             "outputs": [o.to_json() for o in self.outputs]}
        if self.note:
            d["note"] = self.note
        return d


def flatten_outputs(obj: Any, name: str = "out") -> list[tuple[str, Any]]:
    """``[(name, leaf)]`` for nested tuples/lists/dicts and output objects (dataclasses,
    plain objects holding tensors): ``out[0]``, ``out['boxes']``, ``out.logits``..."""
    if isinstance(obj, (list, tuple)):
        out = []
        for i, o in enumerate(obj):
            out += flatten_outputs(o, f"{name}[{i}]")
        return out
    if isinstance(obj, dict):
        out = []
        for k, o in obj.items():
            out += flatten_outputs(o, f"{name}[{k!r}]")
        return out
    fields = output_fields(obj)
    if fields is not None:
        out = []
        for k, o in fields.items():
            out += flatten_outputs(o, f"{name}.{k}")
        return out
    return [(name, obj)]


def output_fields(obj: Any) -> dict | None:
    """The attributes of an output object (a dataclass, or an instance of a plain class whose
    ``__dict__`` holds the results), or None for a leaf value."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if _is_leaf(obj):
        return None
    d = getattr(obj, "__dict__", None)
    return dict(d) if isinstance(d, dict) else None


def _is_leaf(obj: Any) -> bool:
    if obj is None or isinstance(obj, (str, bytes, bool, int, float, complex, type)):
        return True
    mod = type(obj).__module__ or ""
    return mod.startswith(("torch", "numpy")) or callable(obj)


STAT_KEYS = ("mean_abs", "median_abs", "p99_abs", "mean_rel", "median_rel", "p99_rel", "cosine",
             "min_atol", "min_rtol")
"""The statistics every comparison reports besides ``max_abs`` / ``max_rel`` (docs/json.md)."""


def statistics(diff: Any, ref: Any, out: Any, scale: float, tol: Tolerance) -> dict:
    """Per-output statistics of ``diff = |out - ref|`` (finite elements, float64): mean, median
    and 99th percentile of the absolute error, the same relative to the output's scale
    (``max|ref|``, as the tolerance is), cosine similarity of the two, and the smallest ``atol``
    (at the given ``rtol``) and ``rtol`` (at the given ``atol``) with which it would pass."""
    import numpy as np

    if not diff.size:
        return dict.fromkeys(STAT_KEYS, 0.0) | {"cosine": 1.0}
    med, p99 = (float(v) for v in np.percentile(diff, [50, 99]))
    mean, top = float(diff.mean()), float(diff.max())
    rel = (lambda v: v / scale) if scale > 0 else (lambda v: 0.0 if v == 0 else float("inf"))
    nr, no = float(np.linalg.norm(ref)), float(np.linalg.norm(out))
    cosine = float(np.dot(ref.ravel(), out.ravel()) / (nr * no)) if nr > 0 and no > 0 else (1.0 if nr == no else 0.0)
    over = top - tol.atol
    return {"mean_abs": mean, "median_abs": med, "p99_abs": p99, "mean_rel": rel(mean), "median_rel": rel(med),
            "p99_rel": rel(p99), "cosine": cosine, "min_atol": max(0.0, top - tol.rtol * scale),
            "min_rtol": 0.0 if over <= 0 else (over / scale if scale > 0 else float("inf"))}


def _mismatch_stats(ref: Any, out: Any) -> dict:
    inf = float("inf")
    return dict.fromkeys(STAT_KEYS, inf) | {"cosine": 0.0, "shape": list(getattr(out, "shape", ())),
                                            "ref_shape": list(getattr(ref, "shape", ()))}


def compare_arrays(name: str, ref: Any, out: Any, tol: Tolerance) -> OutputDiff:
    """THE comparison of two numpy arrays (or scalars): pass/fail by the rule above, and the
    statistics of :func:`statistics` in ``stats``. Every check compares through it."""
    import numpy as np

    ref = np.asarray(ref)
    out = np.asarray(out)
    d = _compare(name, ref, out, tol)
    if d.stats is None:
        d.stats = _mismatch_stats(ref, out) if not d.passed else dict.fromkeys(STAT_KEYS, 0.0) | {"cosine": 1.0}
    d.stats.update(dtype=str(out.dtype), ref_dtype=str(ref.dtype))
    return d


def _compare(name: str, ref: Any, out: Any, tol: Tolerance) -> OutputDiff:
    import numpy as np

    if ref.shape != out.shape:
        return OutputDiff(name, float("inf"), float("inf"), False, f"shape {out.shape} != {ref.shape}")
    if ref.dtype.kind not in "fc" and out.dtype.kind not in "fc":
        same = bool(np.array_equal(ref, out))
        return OutputDiff(name, 0.0 if same else float("inf"), 0.0 if same else float("inf"), same,
                          "" if same else "values differ")
    if ref.dtype.kind == "c" or out.dtype.kind == "c":  # real and imaginary parts, side by side
        ref, out = np.stack([ref.real, ref.imag], -1), np.stack([out.real, out.imag], -1)
    r = ref.astype(np.float64)
    o = out.astype(np.float64)
    if r.size == 0:
        return OutputDiff(name, 0.0, 0.0, True)
    fin_r, fin_o = np.isfinite(r), np.isfinite(o)
    if not np.array_equal(fin_r, fin_o) or not np.array_equal(r[~fin_r], o[~fin_o], equal_nan=True):
        return OutputDiff(name, float("inf"), float("inf"), False, "non-finite values differ")
    diff = np.abs(r[fin_r] - o[fin_r])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r[fin_r]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return OutputDiff(name, max_abs, max_rel, max_abs <= tol.atol + tol.rtol * scale,
                      stats=statistics(diff, r[fin_r], o[fin_r], scale, tol))


def to_numpy(x: Any) -> Any:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach()
            if x.dtype == torch.bfloat16:
                x = x.float()
            return x.cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return x


def within_noise(d: OutputDiff, ref: Any, out: Any, exact: Any, tol: Tolerance) -> OutputDiff:
    """Add the model's-own-rounding figures to ``d`` (numpy leaves of the same shape) and pass a
    failing output the rewritten model computes about as well as the original does (module
    docstring)."""
    import numpy as np

    r, o, e = (np.asarray(a) for a in (ref, out, exact))
    if e.dtype != np.float64 or r.dtype.kind != "f" or not (r.shape == o.shape == e.shape) or not r.size:
        return d
    e64, fin = e.astype(np.float64), np.isfinite(e)
    if not (np.array_equal(fin, np.isfinite(r)) and np.array_equal(fin, np.isfinite(o))) or not fin.any():
        return d
    scale = float(np.abs(e64[fin]).max())
    noise = float(np.abs(r.astype(np.float64)[fin] - e64[fin]).max())
    err = float(np.abs(o.astype(np.float64)[fin] - e64[fin]).max())
    d.own_noise = noise / scale if scale > 0 else (0.0 if noise == 0 else float("inf"))
    d.vs_float64 = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
    if not d.passed and err <= NOISE_FACTOR * noise + tol.atol + tol.rtol * scale:
        d.passed, d.by_noise = True, True
        d.note = "within the model's own float32 rounding"
    return d


def compare_outputs(ref: Any, out: Any, tol: Tolerance, prefix: str = "", exact: Any = None) -> list[OutputDiff]:
    """Compare two nested outputs leaf by leaf (structure must match); with ``exact`` (the
    original's float64 outputs, same structure) the model's own rounding is allowed for."""
    rl = flatten_outputs(ref)
    ol = flatten_outputs(out)
    el = flatten_outputs(exact) if exact is not None else None
    if el is not None and len(el) != len(rl):
        el = None
    if len(rl) != len(ol):
        return [OutputDiff(prefix + "out", float("inf"), float("inf"), False,
                           f"{len(ol)} outputs instead of {len(rl)}")]
    diffs = []
    for i, ((name, r), (_, o)) in enumerate(zip(rl, ol)):
        r, o = to_numpy(r), to_numpy(o)
        if r is None or isinstance(r, (str, bool)) or (not hasattr(r, "shape") and not isinstance(r, (int, float, complex))):
            try:
                same = bool(r == o)
            except Exception:  # an object that cannot say whether it equals another
                diffs.append(OutputDiff(prefix + name, float("inf"), float("inf"), False,
                                        f"cannot compare outputs of type {type(r).__name__}"))
                continue
            diffs.append(OutputDiff(prefix + name, 0.0 if same else float("inf"), 0.0 if same else float("inf"),
                                    same, "" if same else "values differ"))
            continue
        d = compare_arrays(prefix + name, r, o, tol)
        if el is not None:
            d = within_noise(d, r, o, to_numpy(el[i][1]), tol)
        diffs.append(d)
    return diffs


def summarise(diffs_per_trial: list[list[OutputDiff]], tol: Tolerance) -> ParityReport:
    """Worst case per output over all trials."""
    rep = ParityReport(trials=len(diffs_per_trial), atol=tol.atol, rtol=tol.rtol)
    worst: dict[str, OutputDiff] = {}
    for diffs in diffs_per_trial:
        for d in diffs:
            w = worst.get(d.name)
            if w is None:
                worst[d.name] = d.copy()
            else:
                w.max_abs = max(w.max_abs, d.max_abs)
                w.max_rel = max(w.max_rel, d.max_rel)
                w.passed = w.passed and d.passed
                w.by_noise = w.by_noise or d.by_noise
                w.excused = w.excused or d.excused
                if d.stats is not None:
                    w.stats = _worst_stats(w.stats, d.stats)
                if d.own_noise is not None:
                    w.own_noise = max(w.own_noise or 0.0, d.own_noise)
                    w.vs_float64 = max(w.vs_float64 or 0.0, d.vs_float64)
                if d.note and (not w.note or not d.passed):
                    w.note = d.note
    rep.outputs = list(worst.values())
    rep.passed = all(o.passed for o in rep.outputs)
    return rep


def _worst_stats(a: dict | None, b: dict) -> dict:
    """The worse of two trials' statistics, key by key (the lower cosine)."""
    if a is None:
        return dict(b)
    out = dict(a)
    for k, v in b.items():
        if k == "cosine":
            out[k] = min(a.get(k, v), v)
        elif k in STAT_KEYS:
            out[k] = max(a.get(k, v), v)
        else:
            out.setdefault(k, v)
    return out
