"""Write PyTorch outputs: ``.pt`` in the input's own container, or ``.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BadInput, first_line
from ..read import META_KEY
from ..read.checkpoint import Checkpoint, ModelSlot
from .atomic import atomic_files, atomic_path, disk_full, io_errno


def recipe_of(ckpt: Checkpoint, slot: ModelSlot) -> list[dict]:
    """The slot's structural edits as a file records them: module paths relative to the model
    itself, also when the slot is a ``DataParallel`` wrapper (whose keys keep ``module.``)."""
    from ..rewrite.recipe import relocate, wrapper_prefix

    return relocate(ckpt.recipe_for(slot), "", wrapper_prefix(slot.module)).to_json()


def meta_for(ckpt: Checkpoint, slot: ModelSlot) -> dict:
    """modelsurgeon's metadata: what rebuilds the rewritten structure from its factory."""
    edits = recipe_of(ckpt, slot)
    return {
        "format_version": 1,
        "tool": f"modelsurgeon {__version__}",
        "arch": ckpt.arch,
        "arch_kwargs": ckpt.arch_kwargs or {},
        "recipe": edits,
        "slot": slot.name,
        "source": ckpt.path.name,
        "source_format": ckpt.format,
    }


def _check_describable(ckpt: Checkpoint, slot: ModelSlot, what: str) -> None:
    for e in recipe_of(ckpt, slot):
        added = (e.get("add") or {}).values() if e.get("op") == "set_forward" else ()
        if e.get("op") in ("replace", "set_forward") and (e.get("module") is None or None in added):
            raise BadInput(
                f"cannot write a {what}: the rewrite at {e.get('path')} created a module that a "
                f"state_dict cannot describe; write a full-module .pt instead"
            )


def state_dict_of(slot: ModelSlot) -> dict:
    """The model's state_dict under the file's key prefix, then the file's other entries
    (:attr:`ModelSlot.sd_extra`) as they were."""
    sd = slot.module.state_dict()
    if slot.sd_prefix:
        sd = {slot.sd_prefix + k: v for k, v in sd.items()}
    sd = dict(sd)
    for k, v in slot.sd_extra.items():
        sd.setdefault(k, v)
    return sd


def save_pt(ckpt: Checkpoint, path: Path) -> None:
    import torch

    if ckpt.format == "module":
        obj: Any = ckpt.slots[0].module
    elif ckpt.format == "container":
        obj = ckpt.container
        for s in ckpt.slots:
            obj[s.key] = s.module
        for alias, key in ckpt.aliases.items():  # the same object: pickled once, both keys
            obj[alias] = obj[key]
    else:
        slot = ckpt.slots[0]
        _check_describable(ckpt, slot, "state_dict")
        sd = state_dict_of(slot)
        meta = meta_for(ckpt, slot)
        if ckpt.format == "state_dict" and ckpt.sd_key is not None and isinstance(ckpt.container, dict):
            obj = dict(ckpt.container)
            obj[ckpt.sd_key] = sd
            obj[META_KEY] = meta
        else:
            obj = {"state_dict": sd, META_KEY: meta}
    write_pt(obj, path)


def write_pt(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically, through torch's own C++ file writer (a Python file
    object halves its speed). The staged file is named ``archive.pt``: a zip's record prefix is
    its file's stem, so the bytes are exactly those of a save to a file object, whatever the
    output is called."""
    import errno
    import os

    import torch

    path = Path(path)
    with atomic_files(path) as tmp_dir:
        staged = tmp_dir / "archive.pt"
        try:
            torch.save(obj, str(staged))
        except RuntimeError as e:
            code = io_errno(e) or (errno.ENOSPC if disk_full(tmp_dir) else None)
            reason = os.strerror(code) if code else first_line(e, 200)
            raise BadInput(f"cannot write {path}: {reason}") from e
        staged.rename(tmp_dir / path.name)


def save_safetensors(ckpt: Checkpoint, path: Path) -> tuple[str, list[str]]:
    """Write the primary model's tensors + metadata; returns the slot written and warnings."""
    import torch
    from safetensors.torch import save_file

    slot = ckpt.primary()
    _check_describable(ckpt, slot, "safetensors file")
    sd = state_dict_of(slot)
    warnings = []
    plain = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if plain:
        shown = ", ".join(plain[:4]) + (f" (+{len(plain) - 4} more)" if len(plain) > 4 else "")
        warnings.append(f"the state_dict's non-tensor entries ({shown}) are not in the .safetensors output "
                        f"(it holds tensors only): write .pt to keep them")
    tensors = {}
    seen: dict[tuple, str] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype) if v.numel() else None
        t = v.detach()
        if key is not None and key in seen:
            t = t.clone()  # safetensors stores no aliases: tied weights are written twice
        elif key is not None:
            seen[key] = k
        tensors[k] = t.contiguous()
    metadata = {k: v for k, v in (ckpt.metadata or {}).items() if isinstance(v, str) and k != META_KEY}
    metadata[META_KEY] = json.dumps(meta_for(ckpt, slot), sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return slot.name, warnings


def how_to_load(ckpt: Checkpoint, out_path: Path) -> tuple[str, dict]:
    """How to load a state_dict output: ``(report note, the report's ``load`` section)``."""
    edited = bool(ckpt.recipe)
    api = f"modelsurgeon.load({str(out_path)!r}, arch={ckpt.arch!r})"
    if edited:
        torch_way = (f"plain torch: build {ckpt.arch}, replay the structural edits recorded in the file "
                     "(modelsurgeon.load does this), then load_state_dict; the original structure no longer "
                     "takes these tensors")
    else:
        torch_way = f"plain torch: {ckpt.arch}(...).load_state_dict(<the file's tensors>) (no structural edit)"
    note = f"load the result with {api}" + ("; its structure changed (recorded in the file)" if edited
                                             else f", or {torch_way}")
    return note, {"api": api, "structure_changed": edited, "torch": torch_way}
