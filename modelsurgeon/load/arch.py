"""``--arch module.path:factory``: build a model for a state_dict or safetensors checkpoint."""

from __future__ import annotations

import importlib
import json
from typing import Any, Mapping

from ..errors import BadInput

MAX_KEYS = 4


def parse_kwargs(text: str | dict | None) -> dict:
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadInput(f"--arch-kwargs is not valid JSON: {e.msg} at column {e.colno}")
    if not isinstance(value, dict):
        raise BadInput("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def build_model(arch: str, kwargs: dict) -> Any:
    import torch

    if not isinstance(arch, str) or ":" not in arch:
        raise BadInput(f"--arch must look like 'package.module:factory', got {arch!r}")
    mod_name, _, attr = arch.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise BadInput(f"--arch: cannot import '{mod_name}' ({e}); add its source tree with --code-path DIR")
    except Exception as e:
        raise BadInput(f"--arch: importing '{mod_name}' failed: {type(e).__name__}: {e}")
    factory: Any = mod
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise BadInput(f"--arch: '{mod_name}' has no attribute '{attr}'")
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise BadInput(f"--arch: {arch}(**{kwargs}) failed: {e}")
    except Exception as e:
        raise BadInput(f"--arch: {arch} raised {type(e).__name__}: {e}")
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"--arch: {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def strip_prefix(state: Mapping[str, Any], model: Any) -> tuple[dict, str]:
    """Match the checkpoint's keys to the model's, removing a common prefix (``model.``,
    ``module.`` from DataParallel, a Lightning attribute name) if that is what it takes."""
    expected = set(model.state_dict().keys())
    keys = list(state.keys())
    if not keys or set(keys) & expected:
        return dict(state), ""
    for k in keys:
        head, dot, _ = k.partition(".")
        if not dot:
            continue
        prefix = head + "."
        stripped = {kk[len(prefix):]: v for kk, v in state.items() if kk.startswith(prefix)}
        if set(stripped) & expected and len(stripped) >= len(expected) * 0.5:
            return stripped, prefix
    return dict(state), ""


def load_state(model: Any, state: Mapping[str, Any], source: str) -> None:
    """``load_state_dict`` with one clear line for missing, unexpected and mis-shaped keys."""
    import torch

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = ", ".join(items[:MAX_KEYS]) + (f" (+{len(items) - MAX_KEYS} more)" if len(items) > MAX_KEYS else "")
            problems.append(f"{len(items)} {label} ({shown})")
    if problems:
        raise BadInput(f"{source} does not match --arch: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except Exception as e:
        raise BadInput(f"{source} does not load into --arch: {str(e).splitlines()[0]}")
