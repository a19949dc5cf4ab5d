"""Run PyTorch models for parity: references before the rewrite, comparison after it."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

from .compare import OutputDiff, ParityReport, Tolerance, compare_outputs, output_fields, summarise
from .inputs import InputSpec


class ModelRunError(Exception):
    """The model raised while running on the example inputs."""


def run(model: Any, inputs: list) -> Any:
    import torch

    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:
        raise ModelRunError(f"{type(e).__name__}: {_short(e)}") from e


def _short(e: BaseException) -> str:
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    return lines[0][:300] if lines else ""


def detach(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (list, tuple)):
        return type(out)(detach(o) for o in out) if not hasattr(out, "_fields") else type(out)(*(detach(o) for o in out))
    if isinstance(out, dict):
        return {k: detach(v) for k, v in out.items()}
    fields = output_fields(out)
    if fields:  # an output object: a shallow copy holding detached copies of its tensors
        import copy

        try:
            dup = copy.copy(out)
            for k, v in fields.items():
                object.__setattr__(dup, k, detach(v))
            return dup
        except Exception:
            return out
    return out


EXTRA_TRIALS = 4


def _informative(out: Any) -> bool:
    """Whether an output holds any non-zero value (an all-zero reference proves nothing)."""
    import torch

    from .compare import flatten_outputs

    for _, leaf in flatten_outputs(out):
        if isinstance(leaf, torch.Tensor):
            if leaf.numel() and bool((leaf != 0).any()):
                return True
        elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool) and leaf != 0:
            return True
    return False


GROWN_TRIAL = 1
"""The trial run at another batch size (the first dimension of every input one larger)."""


class References:
    """Outputs of the original model on every trial's inputs, taken before any rewrite.

    Trial 0 is the example input the graph was captured on, so the passes' decisions were made
    on it; trial :data:`GROWN_TRIAL` (with ``trials >= 2``) is a fresh input one larger in the
    first dimension, when the original model runs on it: a rewrite that holds only for the
    captured batch size (a batch-dependent forward, a probe fooled by batch 1) fails there.
    """

    def __init__(self, spec: InputSpec, trials: int, dtype: Any):
        self.spec = spec
        self.trials = max(1, trials)
        self.dtype = dtype
        self.outputs: list[Any] = []
        self.exact: list[Any] | None = None  # the original's float64 outputs per trial (its own rounding)
        self.at: list[str] = []  # --verify-at module paths (verify/points.py)
        self.at_outputs: list[dict] = []  # per trial: path -> [output of each call]
        self.at_exact: list[dict] | None = None
        self.rewritten = False  # outputs re-recorded from a model whose function changed on purpose
        self.uninformative = False
        self.grown: int | None = None  # the trial at batch + 1, once the original ran on it
        self.grown_error: str | None = None  # why the original could not run at batch + 1
        self.exact_source: Callable[[], Any] | None = None  # the original, for a lazy float64 run
        self.exact_error: str | None = None  # why the float64 run could not be made

    def inputs(self, trial: int) -> list:
        return self.spec.make(trial, self.dtype, grow=1 if trial == self.grown else 0)

    def kernels(self, trial: int) -> Any:
        """The context to run ``trial`` in: the larger batch with torch's native convolution
        kernels, which oneDNN would otherwise serve by reordering each large weight into a
        copy (measured on a 1 GB ResNet: +200 MB peak at batch 2); the same kernels for the
        original and the rewritten model, so the comparison is like for like."""
        return _native_kernels() if trial == self.grown else contextlib.nullcontext()

    def same_shape_trials(self) -> list[int]:
        """The trials on the example shapes (what a fixed-shape ONNX export can run)."""
        return [t for t in range(self.trials) if t != self.grown]

    def record(self, model: Any, first_output: Any = None) -> None:
        """Store references; ``first_output`` is trial 0's output if already computed.

        References that are zero everywhere (a ReLU-clipped logit, say) would let any rewrite
        pass: up to :data:`EXTRA_TRIALS` more trials are added until one output is not; if
        none is, ``uninformative`` is set for the report."""
        if self.at:
            first_output = None  # trial 0 runs again, with the --verify-at modules recorded
        self.outputs = [detach(first_output)] if first_output is not None else []
        self.at_outputs = [{}] if first_output is not None else []
        for t in range(len(self.outputs), self.trials):
            if t == GROWN_TRIAL and self.grown is None and self.grown_error is None and self.spec.shapes:
                self.grown = t  # try the larger batch; if the original cannot run it, keep the shape
                try:
                    self._record_trial(model, t)
                    continue
                except ModelRunError as e:
                    self.grown, self.grown_error = None, str(e)
            self._record_trial(model, t)
        extra = 0
        while extra < EXTRA_TRIALS and not any(_informative(o) for o in self.outputs):
            self._record_trial(model, self.trials)
            self.trials += 1
            extra += 1
        self.uninformative = not any(_informative(o) for o in self.outputs)

    def run_trial(self, model: Any, trial: int, runner: Callable[[Any, list], Any] = run, dtype: Any = None) -> tuple:
        """``(output, {path: [outputs]})`` of ``model`` on ``trial``'s inputs (cast to ``dtype``)."""
        from .points import module_outputs

        xs = self.inputs(trial)
        if dtype is not None:
            xs = [x.to(dtype) if x.is_floating_point() else x for x in xs]
        with self.kernels(trial), (module_outputs(model, self.at) if self.at else contextlib.nullcontext({})) as got:
            out = runner(model, xs)
        return out, got

    def _record_trial(self, model: Any, trial: int) -> None:
        out, got = self.run_trial(model, trial)
        self.outputs.append(detach(out))
        self.at_outputs.append(got)

    def record_exact(self, model: Any) -> str | None:
        """Run the original once more in float64 on every trial's inputs and keep the outputs
        (:attr:`exact`), so that the comparison allows for the model's own float32 rounding
        (:mod:`.compare`). The modules are cast as they run and put back exactly
        (:func:`.exact.float64`): no copy of the model. Returns why it could not, or ``None``."""
        import torch

        from .exact import float64

        exact, at = [], []
        try:
            with float64(model):
                for t in range(self.trials):
                    out, got = self.run_trial(model, t, dtype=torch.float64)
                    exact.append(detach(out))
                    at.append(got)
        except ModelRunError as e:
            return f"the model does not run in float64: {e}"
        self.exact, self.at_exact = exact, at
        return None

    def check(self, model: Any, tol: Tolerance, first_output: Any = None,
              runner: Callable[[Any, list], Any] = run) -> ParityReport:
        """Compare ``model`` (rewritten) against the references on every trial. With an
        :attr:`exact_source` and an output failing the fixed rule, the original's float64 run is
        made now (:meth:`exact_lazily`) and the outputs judged again with it."""
        runs = []
        for t in range(self.trials):
            if t == 0 and first_output is not None and not self.at:
                runs.append((first_output, {}))
            else:
                runs.append(self.run_trial(model, t, runner))
        per_trial = self._diffs(runs, tol)
        if self.exact is None and self.exact_source is not None and any(not d.passed for ds in per_trial for d in ds):
            self.exact_lazily()
            if self.exact is not None:
                per_trial = self._diffs(runs, tol)
        return summarise(per_trial, tol)

    def _diffs(self, runs: list, tol: Tolerance) -> list[list[OutputDiff]]:
        per_trial: list[list[OutputDiff]] = []
        for t, (out, got) in enumerate(runs):
            exact = self.exact[t] if self.exact is not None and t < len(self.exact) else None
            diffs = compare_outputs(self.outputs[t], out, tol, exact=exact)
            for p in self.at:
                ref = self.at_outputs[t].get(p, [])
                ex = self.at_exact[t].get(p) if self.at_exact is not None and t < len(self.at_exact) else None
                if not ref:
                    diffs.append(OutputDiff(f"at:{p}", float("inf"), float("inf"), False, "did not run in this trial"))
                    continue
                diffs += compare_outputs(ref, got.get(p, []), tol, prefix=f"at:{p}:", exact=ex)
            per_trial.append(diffs)
        return per_trial

    def exact_lazily(self) -> None:
        """The float64 run on the original :attr:`exact_source` gives (once; why not: :attr:`exact_error`)."""
        source, self.exact_source = self.exact_source, None
        try:
            original = source()
        except Exception as e:  # the file cannot be read again: the fixed rule alone
            self.exact_error = f"the original could not be read again: {type(e).__name__}: {_short(e)}"
            return
        self.exact_error = self.record_exact(original)
        del original


@contextlib.contextmanager
def _native_kernels():
    import torch

    backend = getattr(torch.backends, "mkldnn", None)
    before = getattr(backend, "enabled", None)
    if before is None:
        yield
        return
    backend.enabled = False
    try:
        yield
    finally:
        backend.enabled = before


def dtype_problem(model, spec, refs, compute, e) -> None:
    """An explicit ``--dtype`` the model cannot compute in is the dtype's fault, not the
    shape's: said so when the same shapes run in the model's own compute dtype."""
    if spec.dtype == "auto" or compute is None or refs.dtype == compute:
        return
    try:
        run(model, spec.make(0, compute))
    except ModelRunError:
        return
    from ..errors import BadInput

    name = str(compute).replace("torch.", "")
    raise BadInput(f"--dtype {spec.dtype}: the model computes in {name} and cannot run {spec.dtype} inputs ({e}); "
                   f"leave --dtype at auto, or convert the model", code="input-dtype")
