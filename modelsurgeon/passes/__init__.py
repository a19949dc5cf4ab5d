"""The match and rewrite stages: one package per pass, one module per back end.

    passes/<name>/__init__.py   SPEC: a PassSpec (name, options dataclass, order, implementations)
    passes/<name>/torch.py      the Pass on a recorded PyTorch graph
    passes/<name>/onnx.py       the Pass on an ONNX IR graph

The contract is :mod:`.base`; :mod:`.registry` holds the passes (plugins included) and
:mod:`.manager` runs them in rounds. A new pass is a new package plus one line below (or, from
another package, :func:`register_pass` / the ``modelsurgeon.passes`` entry point). Implementations
are imported when a pass runs, so that the CLI starts without torch or onnx.
"""

from __future__ import annotations

import importlib

from .registry import (REGISTRY, available, exact_passes, get, in_group, in_order, load_all,  # noqa: F401
                       load_plugins, register_pass, spec, specs)
from .spec import PassSpec  # noqa: F401

BUILTIN = ("focus_to_conv", "fold_fusion", "reparam", "fold_bn", "truncate")

from .cleanup import EARLY as _EARLY, LATE as _LATE  # noqa: E402  (the ONNX graph clean-up: passes/cleanup)

for _spec in [*_EARLY, *(importlib.import_module(f".{p}", __name__).SPEC for p in BUILTIN), *_LATE]:
    register_pass(_spec)
