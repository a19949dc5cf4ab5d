"""focus-to-conv's own measurements: --check-grad (the new conv's gradients equal the original's,
mapped) and --bench (the stem's CPU latency before and after).
"""

from __future__ import annotations

from typing import Any

from ...rewrite.space_to_depth import merge_weight
from ..base import TorchContext
from .pattern import SpaceToDepth, StemMatch

BENCH_MIN_TIME = 0.2  # seconds of timing per measurement (torch.utils.benchmark)


# ----------------------------------------------------------------------------------------------
# --check-grad and --bench


class _Stop(Exception):
    pass


def _stem_input(ctx: TorchContext, m: StemMatch) -> Any:
    """The stem's input on the example inputs (the model runs until the stem is reached)."""
    import torch

    from ...capture.recorder import flatten_tensors

    g = ctx.graph
    if m.s2d.source in g.inputs:
        return flatten_tensors(ctx.inputs)[g.inputs.index(m.s2d.source)].detach()
    got: list = []

    def hook(_mod, args):
        got.append(flatten_tensors(args)[0].detach().clone())
        raise _Stop

    handle = m.stem.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            ctx.model(*ctx.inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return got[0]


def _grads(module: Any, x: Any, weight: Any, bias: Any) -> list:
    """Gradients of a fixed random projection of ``module(x)`` w.r.t. x, weight (and bias)."""
    import torch

    params = [p for p in (weight, bias) if p is not None]
    flags = [p.requires_grad for p in params]
    try:
        with torch.enable_grad():
            xi = x.detach().clone().requires_grad_(True)
            for p in params:
                p.requires_grad_(True)
            out = module(xi)
            proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            loss = (out * proj.to(out.dtype)).sum()
            return [t.detach() for t in torch.autograd.grad(loss, [xi] + params)]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def map_gradient(grad: Any, s: SpaceToDepth) -> Any:
    """The original conv's weight gradient placed where the new conv's weight holds it."""
    return merge_weight(grad.double(), s.phases, s.r)


def _grad_check(m: StemMatch, replacement: Any, new: Any, x: Any, before: list) -> Any:
    from ...verify.compare import Tolerance, compare_arrays, summarise

    after = _grads(replacement, x, new.weight, new.bias)
    tol = Tolerance.default(x.dtype)
    name = f"grad {m.target}"
    diffs = [compare_arrays(f"{name} input", before[0].double().numpy(), after[0].double().numpy(), tol),
             compare_arrays(f"{name} weight", map_gradient(before[1], m.s2d).numpy(), after[1].double().numpy(), tol)]
    if len(before) > 2:
        diffs.append(compare_arrays(f"{name} bias", before[2].double().numpy(), after[2].double().numpy(), tol))
    return summarise([diffs], tol)


def _bench(module: Any, x: Any) -> float:
    """Median seconds of one forward of ``module`` on ``x`` (CPU, no grad)."""
    import torch
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="m(x)", globals={"m": module, "x": x}, num_threads=1)
    with torch.no_grad():
        module(x)  # warm-up
        return timer.blocked_autorange(min_run_time=BENCH_MIN_TIME).median
