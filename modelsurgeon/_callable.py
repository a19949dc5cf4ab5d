"""``load``, ``verify`` and ``save`` are both pipeline stages (packages) and API functions.

``from modelsurgeon import verify`` must give something callable, while
``modelsurgeon.verify.compare`` must stay importable. Instead of letting the function shadow
the package (which breaks ``import modelsurgeon.verify.compare``), the stage package itself is
made callable: calling it calls the API function of the same name.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _StageModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from . import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = _StageModule
