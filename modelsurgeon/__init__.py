"""modelsurgeon: exact, verified surgery on trained PyTorch checkpoints and ONNX files.

    import modelsurgeon as ms
    model = ms.load("resnet.pt", trust_pickle=True)
    model, report = ms.fold_bn(model, input_shape=(1, 3, 224, 224))

The pipeline (and the folders it lives in): read → capture → match → rewrite → verify → write.
Attributes are imported lazily so that ``import modelsurgeon`` (and the CLI) start fast.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__
from .errors import BadInput, ParityError, SurgeryError, UnsafeCheckpoint

_API = {"load", "save", "run", "compare", "fold_bn", "focus_to_conv", "fold_fusion", "reparam", "truncate", "optimize"}

__all__ = ["__version__", "BadInput", "ParityError", "SurgeryError", "UnsafeCheckpoint", "register_pass",
           *sorted(_API)]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name == "register_pass":  # a pass from another package (see modelsurgeon.passes.spec.PassSpec)
        from .passes import register_pass

        return register_pass
    raise AttributeError(f"module 'modelsurgeon' has no attribute {name!r}")
