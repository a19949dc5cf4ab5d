"""truncate: the head after the cut rebuilt for the new width, and running the truncated model.
"""

from __future__ import annotations

from typing import Any

from ...errors import BadInput, ParityError, first_line
from ...match import dims
from ..base import TorchContext
from .cut import TruncateMatch, _describe

INIT_SEED = 0


class _Reached(Exception):
    def __init__(self, shape):
        self.shape = shape


# ------------------------------------------------------------------------------------------
# running and rebuilding


def _repair_head(ctx: TorchContext, m: TruncateMatch) -> list[dict]:
    """Drop or rebuild the head layers for the new input width; rows for the report."""
    import torch

    ed = ctx.editor
    head_rows = []
    for i, layer in enumerate(m.layers):
        old = layer.module
        if layer.kind == "drop":
            ed.replace(old, torch.nn.Identity())
            head_rows.append({"path": layer.path, "type": type(old).__name__, "action": "dropped",
                              "before": _describe(old), "after": "Identity"})
            continue
        width = _probe_width(ctx.model, old, ctx.inputs, layer.path)
        if width == _in_width(old):  # same input width (e.g. a block of equal channels removed)
            head_rows.append({"path": layer.path, "type": type(old).__name__, "action": "kept",
                              "before": _describe(old), "after": _describe(old),
                              "reinitialised": False})
            continue
        new = _rebuild(old, width, INIT_SEED + i)
        ed.replace(old, new)
        head_rows.append({"path": layer.path, "type": type(old).__name__, "action": "rebuilt",
                          "before": _describe(old), "after": _describe(new), "reinitialised": True})
        ctx.warnings.append(f"{layer.path} was rebuilt as {_describe(new)} with fresh random weights: "
                            "the model needs fine-tuning before its outputs mean anything")
    return head_rows


def _run_to(model: Any, module: Any, inputs: list, full: bool = False, count_flops: bool = False):
    """Run ``model`` and take ``module``'s output (only that unless ``full``).

    Returns ``(module_output, model_output, flops)``.
    """
    import torch

    from ...verify.torch import detach, run

    got: list = []

    def hook(_m, _args, out):
        got.append(detach(out))

    h = module.register_forward_hook(hook)
    try:
        if count_flops:
            from ...capture import capture
            from ...verify.torch import ModelRunError

            try:
                _, out, flops = capture(model, inputs, count_flops=True)
            except Exception as e:  # same contract as verify.torch.run
                raise ModelRunError(f"{type(e).__name__}: {str(e).strip()[:300]}") from e
        else:
            with torch.no_grad():
                out = run(model, inputs)
            flops = None
    finally:
        h.remove()
    return (got[0] if got else None), (out if full else None), flops


def _probe_width(model: Any, layer: Any, inputs: list, path: str) -> int:
    """The input width ``layer`` receives in the (truncated) model, by running up to it."""
    import torch
    import torch.nn as nn

    def pre(_m, args):
        x = args[0] if args else None
        raise _Reached(tuple(x.shape) if isinstance(x, torch.Tensor) else None)

    h = layer.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model(*inputs)
    except _Reached as r:
        if r.shape is None or len(r.shape) < 1:
            raise ParityError(f"head layer {path} receives no tensor after truncation; nothing written")
        return int(r.shape[-1] if isinstance(layer, nn.Linear) else r.shape[1])
    except Exception as e:
        raise _Fails(e, f"before reaching {path}") from e
    finally:
        h.remove()
    raise ParityError(f"head layer {path} is no longer called after truncation; nothing written")


class _Fails(Exception):
    """The truncated model raised ``error`` (``where``: how far it got)."""

    def __init__(self, error: BaseException, where: str = ""):
        super().__init__(where)
        self.error, self.where = error, where


def _check_runs(model: Any, inputs: list) -> None:
    """The truncated model runs on the example input, or the cut is refused (exit 2) with what
    the removed blocks changed: a neck that combines the stage's output with features of the
    size it used to have (an FPN's upsample-and-add, say) cannot take a cut that changes it."""
    import torch

    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        raise _Fails(e) from e


def _refusal(m: TruncateMatch, f: _Fails) -> BadInput:
    e = f.error
    msg = first_line(e)
    last = m.last_kept
    old, new = m.stage.blocks[-1].out_shape, last.out_shape
    change = ""
    if old is not None and new is not None and tuple(old[2:]) != tuple(new[2:]):
        change = (f"; the removed blocks change the stage's output size from {dims(old)} to {dims(new)}, and "
                  "later layers need the old size (only the channel count can change)")
    where = f" {f.where}" if f.where else ""
    return BadInput(f"cannot truncate {m.stage.label} after {last.path}: the truncated model fails{where} "
                    f"({type(e).__name__}: {msg}){change}; nothing written", code="truncated-model-fails")


def _rebuild(old: Any, width: int, seed: int) -> Any:
    """A fresh torch layer like ``old`` with input width ``width`` (default initialisation)."""
    import torch
    import torch.nn as nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(old, nn.Linear):
            new = nn.Linear(width, old.out_features, bias=old.bias is not None)
        else:
            nd = len(old.kernel_size)
            kwargs = dict(in_channels=width, out_channels=old.out_channels, kernel_size=old.kernel_size,
                          stride=old.stride, padding=old.padding, dilation=old.dilation, groups=1,
                          bias=old.bias is not None, padding_mode=old.padding_mode)
            if old.transposed:
                cls = getattr(nn, f"ConvTranspose{nd}d")
                kwargs["output_padding"] = old.output_padding
            else:
                cls = getattr(nn, f"Conv{nd}d")
            new = cls(**kwargs)
    new.to(device=old.weight.device, dtype=old.weight.dtype)
    new.train(old.training)
    new.requires_grad_(old.weight.requires_grad)
    return new


def _in_width(m: Any) -> int:
    import torch.nn as nn

    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _shapes(out: Any) -> list:
    from ...capture.recorder import flatten_tensors

    return [list(t.shape) for t in flatten_tensors(out)]
