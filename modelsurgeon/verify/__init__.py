"""Stage 5 of the pipeline: parity of the rewritten model against references taken first.

* :mod:`.inputs`  -- example inputs from ``--input-shape``/``--dtype``, seeded per trial
* :mod:`.compare` -- tolerance semantics, defined once, applied per output
* :mod:`.torch`   -- running PyTorch models; references before the in-place rewrite

Calling the package (``modelsurgeon.verify(model, reference, shape)``) compares two models.
"""

from .._callable import make_callable as _make_callable

_make_callable(__name__)
