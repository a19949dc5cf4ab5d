"""``--arch module.path:factory``: build a model for a state_dict or safetensors checkpoint."""

from __future__ import annotations

import importlib
import json
from typing import Any, Mapping

from ..errors import BadInput, first_line

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
    except SystemExit as e:  # a module that parses the command line at import, say
        raise BadInput(f"--arch {arch} exited ({exit_reason(e)}) while importing '{mod_name}': "
                       f"it must build the model without ending the program")
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
    except SystemExit as e:  # an argparse-based factory, say
        raise BadInput(f"--arch {arch} exited ({exit_reason(e)}) when called: it must return the model "
                       f"(pass its arguments with --arch-kwargs JSON)")
    except Exception as e:
        raise BadInput(f"--arch: {arch} raised {type(e).__name__}: {e}")
    if not isinstance(model, torch.nn.Module):
        raise BadInput(f"--arch: {arch} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def exit_reason(e: SystemExit) -> str:
    """``SystemExit 2``, or the first line of the message a ``SystemExit`` carries: what code
    that ended the program (a factory, a module imported, an unpickled object) said."""
    code = e.code
    if isinstance(code, str):
        code = repr((code.strip().splitlines() or [""])[0][:100])
    return f"SystemExit {code}"


def key_prefix(state: Mapping[str, Any], model: Any) -> str:
    """The prefix to remove from the checkpoint's keys to match the model's (``model.``,
    ``module.`` from DataParallel, a Lightning attribute name), or ``""``."""
    expected = set(model.state_dict().keys())
    keys = list(state.keys())
    if not keys or set(keys) & expected:
        return ""
    for k in keys:
        head, dot, _ = k.partition(".")
        if not dot:
            continue
        prefix = head + "."
        stripped = {kk[len(prefix):] for kk in keys if kk.startswith(prefix)}
        if stripped & expected and len(stripped) >= len(expected) * 0.5:
            return prefix
    return ""


def split_state(state: Mapping[str, Any], prefix: str, model: Any) -> tuple[dict, dict]:
    """The entries of a file's state_dict that load into ``model`` (keys without ``prefix``),
    and the others, as the file holds them: keys outside the prefix (a Lightning module's
    ``loss.weight`` beside its ``model.*``) and non-tensor values the model does not own
    (``'version': 3``). The others are written back unchanged."""
    import torch

    own = set(model.state_dict().keys())
    mine, extra = {}, {}
    for k, v in state.items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name is None or (not isinstance(v, torch.Tensor) and name not in own):
            extra[k] = v
        else:
            mine[name] = v
    return mine, extra


def match_dtypes(model: Any, state: Mapping[str, Any]) -> None:
    """Give the factory's model the floating dtypes the file stores, tensor by tensor, so that
    ``load_state_dict`` keeps them (it casts to the model's dtype): an fp16 state_dict stays
    fp16 (evaluated in float32 by ``prepare``, like a pickled fp16 module) and a float64 one
    keeps its precision."""
    import torch

    with torch.no_grad():
        for path, mod in model.named_modules():
            for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
                v = state.get(f"{path}.{name}" if path else name)
                if (t is None or not isinstance(v, torch.Tensor) or not v.is_floating_point()
                        or not t.is_floating_point() or t.dtype == v.dtype):
                    continue
                if name in mod._parameters:
                    t.data = t.data.to(v.dtype)
                else:
                    mod._buffers[name] = t.to(v.dtype)


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
        raise BadInput(f"{source} does not load into --arch: {first_line(e)}")
