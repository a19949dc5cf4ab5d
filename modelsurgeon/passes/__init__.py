"""Stages 3 and 4 of the pipeline: one package per pass, one module per back end.

    passes/<pass_name>/torch.py   match + rewrite on a recorded PyTorch graph
    passes/<pass_name>/onnx.py    match + rewrite on an ONNX IR graph

Both define a class with ``name``, ``match(ctx)`` and ``rewrite(ctx, match)``
(:mod:`modelsurgeon.passes.base`). A new pass is a new package plus one line in
:data:`REGISTRY`; the CLI and ``optimize`` pick it up from there. Imports are lazy so that the
CLI starts without torch or onnx.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import BadInput


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    torch: str | None  # "module:Class"
    onnx: str | None
    exact: bool = True  # function-preserving: part of ``optimize``


REGISTRY: dict[str, PassInfo] = {
    "fold-bn": PassInfo(
        "fold-bn",
        "fold BatchNorm and any per-channel affine layer into the conv/linear before it",
        "modelsurgeon.passes.fold_bn.torch:FoldBN",
        None,
    ),
}


def get(name: str, backend: str):
    """An instance of pass ``name`` for ``backend`` ("torch" or "onnx")."""
    info = REGISTRY.get(name)
    if info is None:
        raise BadInput(f"unknown pass {name!r} (known: {', '.join(REGISTRY)})")
    target = info.torch if backend == "torch" else info.onnx
    if target is None:
        raise BadInput(f"{name} is not available for {backend} models yet")
    mod_name, _, cls_name = target.partition(":")
    return getattr(importlib.import_module(mod_name), cls_name)()


def load_all() -> None:
    """Import every pass module (they may register recipe kinds)."""
    for info in REGISTRY.values():
        for target in (info.torch, info.onnx):
            if target:
                importlib.import_module(target.partition(":")[0])
