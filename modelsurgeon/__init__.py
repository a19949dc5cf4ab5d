"""modelsurgeon: exact, verified surgery on trained PyTorch checkpoints and ONNX files.

    from modelsurgeon import load, fold_bn, compare, save

The pipeline (and the folders it lives in): read → capture → match → rewrite → verify → write.
Attributes are imported lazily so that ``import modelsurgeon`` (and the CLI) start fast.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .errors import BadInput, ParityError, SurgeryError, UnsafeCheckpoint

_API = {"load", "save", "compare", "load_checkpoint", "fold_bn", "focus_to_conv", "fold_fusion", "optimize",
        "truncate", "apply_passes", "run", "Options"}

__all__ = ["__version__", "BadInput", "ParityError", "SurgeryError", "UnsafeCheckpoint",
           *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'modelsurgeon' has no attribute {name!r}")
