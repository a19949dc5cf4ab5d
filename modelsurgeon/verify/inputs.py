"""Example inputs: ``--input-shape 1,3,640,640`` (repeatable), ``--dtype``, seeded per trial."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import BadInput
from ..options.run import DTYPES, parse_dims  # noqa: F401  (DTYPES re-exported)


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,640,640`` (or ``1x3x640x640``) -> ``(1, 3, 640, 640)``."""
    try:
        dims = parse_dims(text)
    except ValueError as e:
        raise BadInput(f"--input-shape {text!r}: {e}")
    _check_memory(text, dims)
    return dims


def _check_memory(text: str, dims: tuple[int, ...]) -> None:
    """Refuse, before allocating anything, an input that alone would take more than half of
    the memory available (a typo such as 1,3,64000,64000 would otherwise end in the OOM killer)."""
    import math

    nbytes = math.prod(dims) * 8  # the widest input dtype; a second trial is one batch larger
    avail = _available_memory()
    if avail is not None and nbytes > avail // 2:
        raise BadInput(f"--input-shape {text!r}: one input holds {math.prod(dims):.3g} values "
                       f"({nbytes / 2**30:.3g} GiB), more than half of the memory available "
                       f"({avail / 2**30:.3g} GiB)")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@dataclass
class InputSpec:
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    dtype: str = "float32"
    seed: int = 0
    guessed: bool = False

    @classmethod
    def parse(cls, shapes: Sequence[str] | None, dtype: str = "float32", seed: int = 0) -> "InputSpec":
        if dtype not in DTYPES:
            raise BadInput(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        return cls([parse_shape(s) for s in (shapes or [])], dtype, seed)

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def make(self, trial: int, dtype: Any = None, grow: int = 0) -> list:
        """The inputs of trial ``trial``: the same numbers for the same seed and trial.
        ``grow`` adds to the first dimension of every input (another batch size)."""
        dt = dtype or self.torch_dtype()
        shapes = [(s[0] + grow, *s[1:]) if grow and s else s for s in self.shapes]
        return [x.to(dt) for x in draw(shapes, ["f" if dt.is_floating_point else "i"] * len(shapes), self.seed, trial)]

    def describe(self, grow: int = 0) -> str:
        return "; ".join(",".join(map(str, (s[0] + grow, *s[1:]) if grow and s else s)) for s in self.shapes)


def draw(shapes: Sequence[tuple[int, ...]], kinds: Sequence[str], seed: int, trial: int) -> list:
    """THE seeded generator of both back ends: trial ``trial``'s values for inputs of ``shapes``,
    float32 normal values for floating inputs (``kind`` ``"f"``), 0/1 for the others, as torch
    tensors; the same numbers for the same seed and trial (:meth:`InputSpec.make`,
    ``verify/onnx.py: OnnxInputs.make``, ``compare``)."""
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + trial)
    return [torch.randn(tuple(s), generator=g, dtype=torch.float32) if k == "f"
            else torch.randint(0, 2, tuple(s), generator=g) for s, k in zip(shapes, kinds)]


def guess_shapes(model: Any) -> list[list[tuple[int, ...]]]:
    """Candidate input shapes for a model given without ``--input-shape``: from its first
    conv/linear layer, plus space-to-depth variants (a Focus stem's first conv sees 4x the
    image channels)."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, (nn.modules.conv._ConvNd,)) and not m.transposed:
            nd = len(m.kernel_size)
            spatial = {1: (256,), 2: (64, 64), 3: (16, 16, 16)}[nd]
            cands = [m.in_channels]
            for r in (4, 16):
                if m.in_channels % r == 0 and m.in_channels // r >= 1:
                    cands.append(m.in_channels // r)
            return [[(1, c, *spatial)] for c in cands]
        if isinstance(m, nn.Linear):
            return [[(1, m.in_features)]]
    return []
