"""The first stage of the pipeline: read a checkpoint safely and find the models in it.

``load_checkpoint`` returns a :class:`Checkpoint` (container + model slots) for the surgery
pipeline; :func:`modelsurgeon.load` (``api.py``) is the public convenience that returns the
model itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import BadInput, first_line
from .checkpoint import Checkpoint, ModelSlot

__all__ = ["Checkpoint", "ModelSlot", "load_checkpoint", "add_code_paths", "META_KEY"]

META_KEY = "modelsurgeon"
"""Key of modelsurgeon's metadata in a ``.pt`` dict and in safetensors metadata."""

TORCH_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".tar", ".pkl"}
_SD_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params", "module")


def add_code_paths(paths: Iterable[str | Path]) -> None:
    """Put model source trees on the import path (``--code-path``), first in line."""
    for p in reversed(list(paths)):
        p = Path(p)
        if not p.is_dir():
            raise BadInput(f"--code-path {p}: not a directory")
        s = str(p.resolve())
        if s not in sys.path:
            sys.path.insert(0, s)


def check_input_file(path: Path) -> int:
    if not path.exists():
        raise BadInput(f"{path}: no such file", code="not-found")
    if path.is_dir():
        raise BadInput(f"{path}: is a directory, not a checkpoint file", code="not-a-checkpoint")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.read(1)
    except PermissionError:
        raise BadInput(f"{path}: permission denied")
    except OSError as e:
        raise BadInput(f"{path}: cannot read ({e.strerror})")
    if size == 0:
        raise BadInput(f"{path}: file is empty", code="not-a-checkpoint")
    return size


def load_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict | str | None = None,
    trust_pickle: bool = False,
    code_paths: Iterable[str | Path] = (),
    cfg: str | Path | None = None,
    prototxt: str | Path | None = None,
    input_shapes: Iterable[str] = (),
    mmap: bool = False,
) -> Checkpoint:
    """Read ``path`` into a :class:`Checkpoint`. Darknet ``.weights`` (with ``cfg``) and Caffe
    ``.caffemodel`` (with ``prototxt``) are read into ONNX graphs (``input_shapes``, if given,
    sets their input size)."""
    from ..rewrite.recipe import Recipe
    from .arch import parse_kwargs

    path = Path(path)
    add_code_paths(code_paths)
    size = check_input_file(path)
    kwargs = parse_kwargs(arch_kwargs)
    suffix = path.suffix.lower()
    if suffix in CONVERTED:
        ckpt = _load_converted(path, suffix, cfg, prototxt, tuple(input_shapes))
        ckpt.size_bytes = size
        return ckpt
    if cfg is not None or prototxt is not None:
        raise BadInput(f"{'--cfg' if cfg is not None else '--prototxt'} goes with a "
                       f"{'.weights' if cfg is not None else '.caffemodel'} input, not {path.name}")
    if suffix == ".onnx":
        try:
            from .onnx import load_onnx
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.onnx":
                raise
            raise BadInput(f"{path.name}: reading ONNX models is not supported by this modelsurgeon build")

        ckpt = load_onnx(path)
        ckpt.size_bytes = size
        return ckpt
    if suffix == ".safetensors":
        ckpt = _load_safetensors(path, arch, kwargs, trust_pickle)
    else:
        from .pickle_safety import torch_load

        obj = torch_load(path, trust_pickle, mmap=mmap)
        ckpt = _classify(path, obj, arch, kwargs, trust_pickle)
    ckpt.size_bytes = size
    if ckpt.recipe is None:
        ckpt.recipe = Recipe()
    return ckpt


CONVERTED = {".weights": "darknet", ".caffemodel": "caffe"}
"""Inputs read into an ONNX graph and edited by the ONNX back end."""


def _load_converted(path: Path, suffix: str, cfg, prototxt, input_shapes) -> Checkpoint:
    if CONVERTED[suffix] == "darknet":
        if prototxt is not None:
            raise BadInput("--prototxt goes with a .caffemodel input, not a .weights one")
        from .darknet import load_darknet

        return load_darknet(path, cfg, input_shapes)
    if cfg is not None:
        raise BadInput("--cfg goes with a .weights input, not a .caffemodel one")
    from .caffe import load_caffe

    return load_caffe(path, prototxt, input_shapes)


def _classify(path: Path, obj: Any, arch: str | None, kwargs: dict, trust: bool = False) -> Checkpoint:
    import torch

    if isinstance(obj, torch.nn.Module):
        return Checkpoint(path=path, format="module", container=obj,
                          slots=[ModelSlot(name="module", key=None, module=obj)])
    if isinstance(obj, Mapping):
        modules = [(k, v) for k, v in obj.items() if isinstance(v, torch.nn.Module)]
        if modules:
            order = {"model": 0, "ema": 1}
            modules.sort(key=lambda kv: order.get(str(kv[0]), 2))
            slots, aliases, first = [], {}, {}
            for k, v in modules:
                if id(v) in first:  # the same object under two keys: rewritten once, saved as one
                    aliases[k] = first[id(v)]
                    continue
                first[id(v)] = k
                slots.append(ModelSlot(name=str(k), key=k, module=v))
            ckpt = Checkpoint(path=path, format="container", container=obj, slots=slots, aliases=aliases)
            for k, orig in aliases.items():
                ckpt.notes.append(f"'{k}' is the same module object as '{orig}': rewritten once, and saved as "
                          f"one object under both keys")
            return ckpt
        sd, sd_key = _find_state_dict(obj)
        if sd is not None:
            meta = obj.get(META_KEY) if sd_key is not None else None
            return _from_state_dict(path, obj, sd, sd_key, arch, kwargs, meta if isinstance(meta, dict) else None,
                                    trust=trust)
        keys = ", ".join(map(str, list(obj.keys())[:8]))
        raise BadInput(f"{path.name}: no model or state_dict found (top-level keys: {keys})")
    raise BadInput(f"{path.name}: holds a {type(obj).__name__}, not a model, checkpoint dict or state_dict")


def _is_tensor_map(obj: Any, strict: bool = True) -> bool:
    """A state_dict: string keys, tensor values. Not ``strict``: mostly tensors, with a few
    plain entries beside them (``{**sd, 'version': 3}``) -- never a nested dict or a module,
    which would make it a checkpoint container."""
    import torch

    if not (isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(k, str) for k in obj)):
        return False
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    if tensors == len(obj) or strict:
        return tensors == len(obj)
    plain = all(isinstance(v, torch.Tensor) or not isinstance(v, (Mapping, torch.nn.Module)) for v in obj.values())
    return plain and tensors > len(obj) - tensors


def _find_state_dict(obj: Mapping) -> tuple[Mapping | None, str | None]:
    for strict in (True, False):
        if _is_tensor_map(obj, strict):
            return obj, None
        for k in _SD_KEYS:
            if _is_tensor_map(obj.get(k), strict):
                return obj[k], k
    return None, None


def _from_state_dict(path: Path, container: Any, sd: Mapping, sd_key: str | None,
                     arch: str | None, kwargs: dict, meta: dict | None,
                     fmt: str = "state_dict", trust: bool = False) -> Checkpoint:
    from ..rewrite.recipe import Recipe, apply, relocate, wrapper_prefix
    from .arch import build_model, key_prefix, load_state, match_dtypes, split_state

    recipe = Recipe()
    if meta:
        recorded, recorded_kwargs = meta.get("arch"), meta.get("arch_kwargs") or {}
        if not isinstance(recorded, (str, type(None))) or not isinstance(recorded_kwargs, dict):
            raise BadInput(f"{path.name}: corrupt modelsurgeon metadata: arch / arch_kwargs")
        if not arch and recorded and not trust:
            # importing and calling a factory the file names would let a weights-only file run
            # code (say "subprocess:run" with its arguments in arch_kwargs)
            raise BadInput(f"{path.name} was written for --arch {recorded}: pass --arch {recorded} to rebuild "
                           f"it (modelsurgeon does not import code a file names unless told to trust it)")
        if not kwargs and (not arch or arch == recorded):
            kwargs = dict(recorded_kwargs)
        arch = arch or recorded
        try:
            recipe = Recipe.from_json(meta.get("recipe", []))
        except ValueError as e:
            raise BadInput(f"{path.name}: corrupt modelsurgeon metadata: {e}")
    if not arch:
        raise BadInput(
            f"{path.name} holds only weights: pass --arch package.module:factory (and --code-path "
            f"DIR if the package is not installed) to rebuild the model", code="needs-arch"
        )
    model = build_model(arch, kwargs)
    if recipe:
        try:
            model = apply(recipe, model)
        except Exception as e:
            raise BadInput(f"{path.name}: cannot replay its modelsurgeon recipe on {arch}: {e}")
        recipe = relocate(recipe, wrapper_prefix(model), "")  # in memory: relative to the root itself
    prefix = key_prefix(sd, model)
    state, extra = split_state(sd, prefix, model)
    match_dtypes(model, state)
    load_state(model, state, path.name)
    ckpt = Checkpoint(path=path, format=fmt, container=container,
                      slots=[ModelSlot(name="model", key=sd_key, module=model, sd_prefix=prefix, sd_extra=extra)],
                      arch=arch, arch_kwargs=kwargs, recipe=recipe, sd_key=sd_key)
    if meta:
        ckpt.metadata = {META_KEY: meta}
    return ckpt


def _load_safetensors(path: Path, arch: str | None, kwargs: dict, trust: bool = False) -> Checkpoint:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        sd = load_file(str(path))
    except Exception as e:
        raise BadInput(f"{path.name} is not a readable safetensors file: {first_line(e)}")
    meta = None
    if META_KEY in metadata:
        try:
            meta = json.loads(metadata[META_KEY])
        except json.JSONDecodeError:
            raise BadInput(f"{path.name}: corrupt modelsurgeon metadata")
    if not sd:
        raise BadInput(f"{path.name}: holds no tensors")
    ckpt = _from_state_dict(path, None, sd, None, arch, kwargs, meta, fmt="safetensors", trust=trust)
    ckpt.metadata = metadata
    return ckpt
