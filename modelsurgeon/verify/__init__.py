"""Stage 5 of the pipeline: parity of the rewritten model against references taken first.

* :mod:`.inputs`  -- example inputs from ``--input-shape``/``--dtype``, seeded per trial
* :mod:`.compare` -- tolerance semantics, defined once, applied per output
* :mod:`.torch`   -- running PyTorch models; references before the in-place rewrite
"""
