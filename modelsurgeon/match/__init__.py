"""Stage 3 helpers shared by the passes: recognising what can be rewritten exactly.

* :mod:`.conv`   -- conv/linear ops whose weights are parameters only they read
* :mod:`.affine` -- per-channel affine maps: batch_norm ops, constant mul/add, numeric probing
"""
