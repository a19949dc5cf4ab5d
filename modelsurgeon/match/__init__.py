"""Stage 3 helpers shared by the passes: recognising what can be rewritten exactly.

* :mod:`.conv`   -- conv/linear ops whose weights are parameters only they read; which tensors
  a rewrite may write (:func:`.conv.unwritable`)
* :mod:`.calls`  -- whether a recorded module call can be removed (hooks, extra arguments,
  tensors read outside it)
* :mod:`.affine` -- per-channel affine maps: batch_norm ops, constant mul/add, numeric probing
* :mod:`.absorb` -- the conv/BatchNorm that can take a per-channel scale of a value
* :mod:`.fusion` -- multi-input modules that are per-channel weighted sums
* :mod:`.stage`, :mod:`.head` -- backbone stages and their blocks, the head after them
* :mod:`.onnx`   -- the same recognisers on ONNX graphs
"""

from __future__ import annotations

from typing import Any


def dims(shape: Any) -> str:
    """``2×3×16×16``: a shape (or a spatial size) as the reasons write it."""
    return "×".join(str(d) for d in shape)
