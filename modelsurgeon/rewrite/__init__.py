"""Stage 4 helpers shared by the passes: changing the model exactly, in place.

* :mod:`.affine`  -- folding a per-channel affine map into conv/linear weights (float64)
* :mod:`.modules` -- module replacement, parameter writes rounded to the storage dtype
* :mod:`.recipe`  -- the record of structural edits that lets a state_dict rebuild its model
"""
