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
from .cleanup import CLEANUP as _CLEANUP, EARLY as _EARLY


@dataclass(frozen=True)
class PassInfo:
    name: str
    summary: str
    torch: str | None  # "module:Class"
    onnx: str | None
    exact: bool = True  # function-preserving: part of ``optimize``
    cleanup: bool = False  # generic ONNX graph clean-up: optimize only, no command, nothing to do on PyTorch


def _cleanup(entries) -> dict[str, PassInfo]:
    return {name: PassInfo(name, summary, None, f"modelsurgeon.passes.cleanup.{target}", cleanup=True)
            for name, summary, target in entries}


REGISTRY: dict[str, PassInfo] = {
    # Order matters: ``optimize`` runs the exact passes in this order (a sound one: sizes fixed and
    # shape arithmetic made constant before constants are folded; a Focus stem becomes a conv
    # before its BN is folded; fusion weights reach the convs before BN folding; the graph
    # clean-up of passes/cleanup around them, in the order CLEANUP declares).
    **_cleanup(_CLEANUP[:_EARLY]),
    "focus-to-conv": PassInfo(
        "focus-to-conv",
        "replace space-to-depth stems (YOLOv5 Focus, pixel_unshuffle) + conv by one strided conv",
        "modelsurgeon.passes.focus_to_conv.torch:FocusToConv",
        "modelsurgeon.passes.focus_to_conv.onnx:FocusToConv",
    ),
    "fold-fusion": PassInfo(
        "fold-fusion",
        "evaluate parameter-only computations (fusion weight normalisation) and fold constant scales into convs",
        "modelsurgeon.passes.fold_fusion.torch:FoldFusion",
        "modelsurgeon.passes.fold_fusion.onnx:FoldFusion",
    ),
    "fold-bn": PassInfo(
        "fold-bn",
        "fold BatchNorm and any per-channel affine layer into the conv/linear before it",
        "modelsurgeon.passes.fold_bn.torch:FoldBN",
        "modelsurgeon.passes.fold_bn.onnx:FoldBN",
    ),
    **_cleanup(_CLEANUP[_EARLY:]),
    "truncate": PassInfo(
        "truncate",
        "drop the last blocks of a backbone stage and rewire what consumed them",
        "modelsurgeon.passes.truncate.torch:Truncate",
        "modelsurgeon.passes.truncate.onnx:Truncate",
        exact=False,
    ),
}


def exact_passes() -> list[str]:
    """The function-preserving passes, in the order ``optimize`` runs them."""
    return [name for name, info in REGISTRY.items() if info.exact]


def cleanup_passes() -> list[str]:
    """The generic ONNX clean-up passes (``optimize --skip cleanup`` leaves them all out)."""
    return [name for name, info in REGISTRY.items() if info.cleanup]


def available(name: str, backend: str) -> bool:
    info = REGISTRY.get(name)
    return info is not None and (info.torch if backend == "torch" else info.onnx) is not None


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
