"""Run PyTorch models for parity: references before the rewrite, comparison after it."""

from __future__ import annotations

from typing import Any, Callable

from .compare import OutputDiff, ParityReport, Tolerance, compare_outputs, summarise
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


class References:
    """Outputs of the original model on every trial's inputs, taken before any rewrite."""

    def __init__(self, spec: InputSpec, trials: int, dtype: Any):
        self.spec = spec
        self.trials = max(1, trials)
        self.dtype = dtype
        self.outputs: list[Any] = []
        self.rewritten = False  # outputs re-recorded from a model whose function changed on purpose
        self.uninformative = False

    def inputs(self, trial: int) -> list:
        return self.spec.make(trial, self.dtype)

    def record(self, model: Any, first_output: Any = None) -> None:
        """Store references; ``first_output`` is trial 0's output if already computed.

        References that are zero everywhere (a ReLU-clipped logit, say) would let any rewrite
        pass: up to :data:`EXTRA_TRIALS` more trials are added until one output is not; if
        none is, ``uninformative`` is set for the report."""
        self.outputs = [detach(first_output)] if first_output is not None else []
        for t in range(len(self.outputs), self.trials):
            self.outputs.append(detach(run(model, self.inputs(t))))
        extra = 0
        while extra < EXTRA_TRIALS and not any(_informative(o) for o in self.outputs):
            self.outputs.append(detach(run(model, self.inputs(self.trials))))
            self.trials += 1
            extra += 1
        self.uninformative = not any(_informative(o) for o in self.outputs)

    def check(self, model: Any, tol: Tolerance, first_output: Any = None,
              runner: Callable[[Any, list], Any] = run) -> ParityReport:
        """Compare ``model`` (rewritten) against the references on every trial."""
        per_trial: list[list[OutputDiff]] = []
        for t in range(self.trials):
            out = first_output if (t == 0 and first_output is not None) else runner(model, self.inputs(t))
            per_trial.append(compare_outputs(self.outputs[t], out, tol))
        return summarise(per_trial, tol)
