"""strip-dropout on PyTorch models: each dropout module becomes ``nn.Identity``.

torch's dropout classes return their input unchanged in eval mode, the mode a deployed model
runs in. A module of another class is taken for a drop-path (timm ``DropPath``, torchvision
``StochasticDepth``) only by its name *and* what the recorded forward shows: every call
returned its one input, computing nothing. A module with a hook, or called with more than its
tensor, is kept and reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from modelsurgeon.match.calls import call_obstacle
from modelsurgeon.passes.base import Applied, Match, Pass, Skipped, TorchContext
from modelsurgeon.report.codes import Refusal, register_code

DROP_PATH_NAMES = ("DropPath", "StochasticDepth", "DropBlock")
NOT_IDENTITY = "not-identity"  # a skip code of this pass's own (report/codes.py lists modelsurgeon's)
register_code(NOT_IDENTITY, "a module named like a drop-path computes something in eval mode")


@dataclass
class DropoutMatch(Match):
    module: Any = None


def _torch_dropout(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.modules.dropout._DropoutNd)


def _named_like_drop_path(module: Any) -> bool:
    return any(n in type(module).__name__ for n in DROP_PATH_NAMES)


class StripDropout(Pass):
    name = "strip-dropout"
    backend = "torch"

    def match(self, ctx: TorchContext) -> Iterable[Match | Skipped]:
        seen: set[int] = set()
        for path, module in ctx.model.named_modules():
            if id(module) in seen or not path or not (_torch_dropout(module) or _named_like_drop_path(module)):
                continue
            seen.add(id(module))
            calls = ctx.graph.calls_of(module)
            why = next((w for w in (call_obstacle(c, []) for c in calls) if w), None)
            if why is None and not _torch_dropout(module):
                if not calls:
                    why = Refusal("not-executed", f"{type(module).__name__} never ran: whether it is an identity was not seen")
                elif any(c.start != c.end or c.outputs != c.inputs for c in calls):
                    why = Refusal(NOT_IDENTITY, f"{type(module).__name__} computes something in eval mode: not an identity")
            if why is not None:
                yield Skipped(path, why)
                continue
            yield DropoutMatch(target=path, module=module)

    def rewrite(self, ctx: TorchContext, m: DropoutMatch) -> Applied:
        paths = ctx.editor.remove(m.module)  # nn.Identity in its place (at every path it has)
        return Applied(m.target, f"{type(m.module).__name__} → removed (an identity at inference)",
                       {"type": type(m.module).__name__, "paths": paths})
